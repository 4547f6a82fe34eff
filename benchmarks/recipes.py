"""The adaptation recipes on the real assets, end to end: evaluate the base model, `samtune fit`, evaluate again.

For each recipe (``recipes/medical.yaml``: LiteMedSAM + LoRA on the EM cells, slices 0-14 train / 15-19 validate;
``recipes/satellite.yaml``: LiteMedSAM + LoRA on the SpaceNet chip, left half trains / right half validates):

1. the committed recipe is copied to a work folder with its relative paths made absolute (assets from
   ``SAMTUNE_ASSETS``, default ``../shared/assets``; split lists from the repository) and its outputs (logger,
   checkpoints) moved into the work folder; nothing else changes;
2. ``samtune evaluate --config <recipe>`` on the recipe's validation split with the base weights: box mIoU (IoU at
   the images' resolution, single-mask output), the filled box's IoU (baseline), k corrective clicks, NoC@85;
3. ``samtune fit --config <recipe>`` (timed: the wall time of the whole command, start-up included);
4. ``samtune evaluate`` again with the run's ``last.ckpt`` (trainable weights on the recorded base).

    python benchmarks/recipes.py                        # both recipes
    python benchmarks/recipes.py --recipes medical --work /tmp/recipes --clicks 5

Prints one table row per recipe and a JSON line with every number; tests/adapt/test_recipes_real.py runs the
same code under ``-m real_train`` and checks issue 7's targets.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("medical", "satellite")  # the defaults; any recipes/<name>.yaml runs (e.g. medical_cached)


def assets_dir() -> Path:
    path = Path(os.environ.get("SAMTUNE_ASSETS", REPO.parent / "shared" / "assets"))
    if not path.is_dir():
        raise SystemExit(f"real assets not found at {path}: set SAMTUNE_ASSETS")
    return path.resolve()


def _absolute(value: Any, assets: Path) -> Any:
    """Recipe paths made absolute: ``../shared/assets/...`` -> the assets folder, ``recipes/...`` -> the repo."""
    if isinstance(value, dict):
        return {k: _absolute(v, assets) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, assets) for v in value]
    if isinstance(value, str):
        if value.startswith("../shared/assets/"):
            return str(assets / value[len("../shared/assets/"):])
        if value.startswith("recipes/"):
            return str(REPO / value)
    return value


def materialise(name: str, work: Path, assets: Path) -> Path:
    """The committed recipe with absolute input paths and its outputs under ``work``; returns the new file."""
    config = _absolute(yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text()), assets)
    trainer = config["trainer"]
    trainer["logger"]["init_args"]["save_dir"] = str(work / "runs")
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(work / "checkpoints")
    trainer["enable_progress_bar"] = False
    data = config["data"]["init_args"]
    if "cache_dir" in data:  # cached-embedding recipes: the cache under work/, not in the repository
        data["cache_dir"] = str(work / "cache")
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run(command: list[str], log: Path) -> float:
    """Run a samtune command (output to ``log``); seconds of wall time. Raises on failure with the log's tail."""
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return seconds


def evaluate(recipe: Path, out: Path, clicks: int, checkpoint: Path | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "samtune", "evaluate", "--config", str(recipe), "--protocols", "box,clicks",
               "--clicks", str(clicks), "--name", "val", "--output", str(out), "--no-plot", "--quiet"]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    out.mkdir(parents=True, exist_ok=True)
    _run(command, out / "log.txt")
    report = json.loads((out / "val.json").read_text())
    return {"num_masks": report["num_masks"], "num_images": report["num_images"], **report["summary"]}


def run_recipe(name: str, work: Path, assets: Path, clicks: int = 5) -> dict[str, Any]:
    """Before / fit / after for one recipe; returns the numbers."""
    work.mkdir(parents=True, exist_ok=True)
    recipe = materialise(name, work, assets)
    before = evaluate(recipe, work / "eval_before", clicks)
    fit_seconds = _run([sys.executable, "-m", "samtune", "fit", "--config", str(recipe)], work / "fit_log.txt")
    checkpoint = work / "checkpoints" / "last.ckpt"
    after = evaluate(recipe, work / "eval_after", clicks, checkpoint)
    return {"recipe": name, "fit_wall_s": round(fit_seconds, 1), "checkpoint_mb": round(checkpoint.stat().st_size / 2**20, 1),
            "weights_mb": round(_weights_mb(checkpoint), 1), "before": before, "after": after}


def _weights_mb(checkpoint: Path) -> float:
    """Size of the model weights stored in a Lightning checkpoint (the rest is optimiser state and metadata)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**20


def row(result: dict[str, Any], clicks: int) -> str:
    b, a = result["before"], result["after"]

    def pair(key: str, digits: int = 3) -> str:
        return f"{b[key]:.{digits}f} -> {a[key]:.{digits}f}"

    return (f"| {result['recipe']} | {a['num_images']} / {a['num_masks']} | {a['box_as_mask_miou']:.3f} | "
            f"{pair('box_miou')} | {pair('click_1')} | {pair(f'click_{clicks}')} | {pair('noc_85', 2)} | "
            f"{result['fit_wall_s'] / 60:.1f} min | {result['weights_mb']} MB ({result['checkpoint_mb']} MB) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--work", default="bench_recipes", help="work folder (recipes, runs, checkpoints, reports)")
    parser.add_argument("--clicks", type=int, default=5)
    args = parser.parse_args()
    assets = assets_dir()
    sys.path.insert(0, str(REPO))
    from benchmarks.common import machine

    print(machine())
    print(f"| recipe | val images / masks | box as mask | box mIoU | 1 click | {args.clicks} clicks | NoC@85 | "
          "fit wall time | weights (whole .ckpt) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.recipes.split(","):
        result = run_recipe(name, Path(args.work).resolve() / name, assets, args.clicks)
        print(row(result, args.clicks), flush=True)
        print(json.dumps(result), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
