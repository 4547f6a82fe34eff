"""The samtune command line: subcommands, recipes and fragments, one-line errors, quickstart end to end, W&B."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from samtune.build import build_sam
from samtune.callbacks import render_overlays
from samtune.cli import SyntheticData, configure_wandb_mode, ensure_synthetic_data, main
from tests.conftest import REPO_ROOT

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
FRAGMENTS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
QUICKSTART = REPO_ROOT / "recipes" / "quickstart.yaml"


def run_cli(args: list[str]) -> int:
    """``samtune ARGS`` in-process; the exit code (0 when main returns)."""
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def quick_args(*extra: str, steps: int = 3) -> list[str]:
    """A shortened quickstart (run it with the working directory in tmp_path: data/, runs/ land there)."""
    return [
        "fit", "--config", str(QUICKSTART),
        "--synthetic_data.num_images", "8",
        "--data.init_args.val_fraction", "0.25",
        "--data.init_args.batch_size", "2",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *extra,
    ]


# ----------------------------------------------------------------------------------------------- subcommands
def test_help_lists_every_command(capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "data", "export", "evaluate", "amg"):
        assert f"\n    {command} " in out, command


@pytest.mark.parametrize("command", ["export", "evaluate", "amg"])
def test_later_commands_say_not_available(command, capsys):
    assert run_cli([command, "--checkpoint", "x.ckpt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"samtune {command}: not available yet in this version (tracked: inference/export issue)"
    assert run_cli([command, "--help"]) == 0
    assert "not available yet" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    assert run_cli(["train"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'train'" in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_data_synth(tmp_path):
    """``python -m samtune`` dispatches, and ``data synth`` writes SA-1B-format files."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = tmp_path / "synth"
    result = subprocess.run(
        [sys.executable, "-m", "samtune", "data", "synth", "--out", str(out), "--num-images", "2",
         "--image-size", "64"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["sa_1.jpg", "sa_1.json", "sa_2.jpg", "sa_2.json"]


def test_data_synth_help(capsys):
    assert run_cli(["data", "synth", "--help"]) == 0
    assert "--num-images" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- recipes, fragments
def _printed_config(capsys, args: list[str]) -> dict:
    capsys.readouterr()
    assert run_cli([*args, "--print_config"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "medical.yaml", "satellite.yaml", "sa1b_pretrain.yaml"}
    names = {str(p.relative_to(REPO_ROOT / "configs")) for p in FRAGMENTS}
    assert names >= {"trainer/cpu.yaml", "trainer/gpu.yaml", "trainer/ddp.yaml", "trainer/fsdp.yaml",
                     "trainer/bf16.yaml", "trainer/slurm.yaml", "logger/wandb.yaml", "logger/csv.yaml",
                     "logger/tensorboard.yaml", "adapt/decoder_only.yaml", "adapt/prompt_decoder.yaml",
                     "adapt/full.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_validates(recipe, capsys):
    config = _printed_config(capsys, ["fit", "--config", str(recipe)])
    assert config["model"]["class_path"] == "samtune.tasks.PromptableSegmentationTask" or \
        config["model"]["class_path"].endswith("PromptableSegmentationTask")
    assert config["data"]["class_path"].startswith("samtune.data.")
    assert config["trainer"]["max_steps"] > 0


def test_pretrain_recipe_is_the_paper_recipe(capsys):
    config = _printed_config(capsys, ["fit", "--config", str(REPO_ROOT / "recipes" / "sa1b_pretrain.yaml")])
    model, trainer, data = config["model"]["init_args"], config["trainer"], config["data"]["init_args"]
    assert model["model"] == "sam_vit_h" and model["mae_checkpoint"]
    assert model["drop_path_rate"] == 0.4
    opt = model["optimizer"]
    assert (opt["lr"], opt["weight_decay"], opt["layer_decay"], opt["warmup_steps"]) == (8e-4, 0.1, 0.8, 250)
    assert trainer["max_steps"] == 90000
    assert [round(f * 90000) for f in opt["step_milestones"]] == [60000, 86666]
    assert model["simulation"]["num_iterations"] == 11 and data["max_masks_per_image"] == 64
    assert trainer["precision"] == "bf16-mixed"
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] * trainer["accumulate_grad_batches"] == 256


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_fragment_composes_with_quickstart(fragment, capsys):
    config = _printed_config(capsys, ["fit", "--config", str(QUICKSTART), "--config", str(fragment)])
    expected = yaml.safe_load(fragment.read_text())
    if "model" in expected:  # adaptation fragments change flags, keep the recipe's task and model
        assert config["model"]["init_args"]["model"] == "sam_tiny"
        for key, value in expected["model"]["init_args"].items():
            assert config["model"]["init_args"][key] == value
    for key, value in expected.get("trainer", {}).items():
        if key in ("logger", "strategy", "plugins"):
            got = config["trainer"][key]
            want_paths = [v["class_path"] for v in (value if isinstance(value, list) else [value])]
            got_paths = [v["class_path"] for v in (got if isinstance(got, list) else [got])]
            assert got_paths == want_paths
        else:
            assert config["trainer"][key] == value, key


def test_medical_recipe_instantiates_with_real_assets(assets, monkeypatch):
    """The medical recipe builds LiteMedSAM from the real weights, frozen encoder, and reads the EM mask folder."""
    from samtune.cli import run_lightning

    monkeypatch.chdir(REPO_ROOT)
    cli = run_lightning([
        "fit", "--config", str(REPO_ROOT / "recipes" / "medical.yaml"),
        "--data.init_args.image_dir", str(assets / "data/em_membrane/image"),
        "--data.init_args.mask_dir", str(assets / "data/em_membrane/label"),
        "--model.init_args.checkpoint", str(assets / "weights/lite_medsam/lite_medsam.pth"),
        "--data.init_args.num_workers", "0",
    ], run=False)
    task = cli.model
    assert not any(p.requires_grad for p in task.model.image_encoder.parameters())
    assert all(p.requires_grad for p in task.model.mask_decoder.parameters())
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["images"].shape == (4, 3, 256, 256)
    assert batch["mask_valid"].sum() > 0
