"""A recipe's CPU training step with glibc's default malloc and with freed memory kept in the process.

glibc serves every block above its mmap threshold (32 MB at most) with a fresh ``mmap`` and unmaps it when it is
freed, so the kernel zero-fills every page of the next large activation again, one page fault per 4 KB. With
``MALLOC_MMAP_MAX_=0`` (no mmap) and ``MALLOC_TRIM_THRESHOLD_`` at its maximum (the heap is not handed back),
freed blocks are reused as they are, and the resident memory stays at its peak. glibc reads these variables when
a process starts, so each side runs in its own process; the sides alternate over the repetitions.

One step is the recipe's task on its own training data: ``training_step`` under the trainer's precision, backward
and the recipe's AdamW step (the first two steps of each process are a warm-up). Reported: median seconds per step and
the peak resident memory of each process (``ru_maxrss``; DataLoader workers not included).

    python benchmarks/cpu_malloc.py                               # recipes/satellite.yaml, 10 steps, 2 repetitions
    python benchmarks/cpu_malloc.py --recipe medical --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}


def worker(recipe: Path, steps: int, warmup: int = 2) -> dict[str, float | list[float]]:
    """Time ``steps`` training steps of a materialised recipe in this process."""
    import resource

    import torch

    from samtune.cli import run_lightning
    from samtune.modeling.precision import autocast
    from samtune.tasks import param_groups

    cli = run_lightning(["fit", "--config", str(recipe)], run=False)
    task, data = cli.model, cli.datamodule
    data.setup("fit")
    task.train()
    task.log = lambda *args, **kwargs: None  # no Trainer attached: logging is not part of the timed step
    # The recipe's AdamW and parameter groups, as configure_optimizers builds them; that method also sizes the cosine
    # schedule from a fitting Trainer, which this loop has not (and the schedule does not change the cost).
    cfg = task.optimizer_config
    optimizer = torch.optim.AdamW(param_groups(task.model, cfg), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    precision = "bf16" if "bf16" in str(cli.trainer.precision) else "fp32"
    loader = data.train_dataloader()

    def batches():
        while True:
            yield from loader

    stream = batches()
    times = []
    for i in range(warmup + steps):
        batch = next(stream)
        start = time.perf_counter()
        with autocast("cpu", precision):
            loss = task.training_step(batch, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"steps": times, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="satellite", help="a recipe name under recipes/ (default satellite)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.steps)))
        return

    from benchmarks.common import machine
    from benchmarks.recipes import assets_dir, materialise

    sides = {"glibc default": {}, "freed memory kept": KEEP_FREED}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as work:
        recipe = materialise(args.recipe, Path(work), assets_dir())
        for _ in range(args.repeats):
            for name, extra in sides.items():
                env = {k: v for k, v in os.environ.items() if k not in KEEP_FREED} | extra
                proc = subprocess.run([sys.executable, __file__, "--worker", str(recipe), "--steps", str(args.steps)],
                                      env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{machine()}; recipe {args.recipe}; {args.steps} steps x {args.repeats} processes per side")
    print("| malloc | s/step (median) | peak GB |\n|---|---|---|")
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(t for run in runs for t in run["steps"])
        print(f"| {name} | {medians[name]:.2f} | {max(run['peak_gb'] for run in runs):.2f} |")
    print(f"speed-up: {medians['glibc default'] / medians['freed memory kept']:.2f}x")


if __name__ == "__main__":
    main()
