"""The samtune command line: subcommands, recipes and fragments, one-line errors, quickstart end to end, W&B."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from samtune.build import build_sam
from samtune.callbacks import ValidationOverlays, render_overlays
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
        "--trainer.log_every_n_steps", "1",
        *extra,
    ]


# ----------------------------------------------------------------------------------------------- subcommands
def test_help_lists_every_command(capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "data", "export", "evaluate", "amg"):
        assert f"\n    {command} " in out, command


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_trainer_command_help_names_samtune(command, capsys, monkeypatch):
    """The usage line of ``python -m samtune fit --help`` (and ``torchrun -m samtune``) said ``__main__.py``."""
    monkeypatch.setattr(sys, "argv", [os.path.join("samtune", "__main__.py")])
    capsys.readouterr()
    assert run_cli([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: samtune [options] {command} ")


@pytest.mark.parametrize("command", ["test", "predict"])
def test_lightning_loops_the_task_lacks_are_a_usage_error(command, capsys):
    """The task has no test_step / predict_step: the commands are not offered, and point to what does the job."""
    assert f"\n    {command} " not in (run_cli(["--help"]), capsys.readouterr().out)[1]
    assert run_cli([command, "--config", str(QUICKSTART)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"samtune {command}: error: the SAM task has no {command} loop;") and "samtune evaluate" in err


@pytest.mark.parametrize("command", ["export", "evaluate", "amg"])
def test_tool_commands_have_help(command, capsys):
    assert run_cli([command, "--help"]) == 0
    assert f"samtune {command}" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    assert run_cli(["train"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'train'" in err and len(err.strip().splitlines()) == 1


def test_data_command_errors_name_the_command_once(capsys):
    """``samtune data foo`` printed ``samtune data: error: samtune data: unknown command 'foo'``, and a bare
    ``samtune data`` exited 0 after its help; now one prefix, and exit code 2 as a bare ``samtune`` does."""
    capsys.readouterr()
    assert run_cli(["data", "foo"]) == 2
    assert capsys.readouterr().err == "samtune data: error: unknown command 'foo'; available: synth\n"
    assert run_cli(["data"]) == 2
    assert "synth" in capsys.readouterr().out
    assert run_cli(["data", "--help"]) == 0


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


def test_null_overrides_of_config_fields(capsys):
    """``null`` on the command line reaches a dataclass field (jsonargparse alone rejects it) and keeps the
    group's other values; nulls of plain arguments keep working."""
    satellite = str(REPO_ROOT / "recipes" / "satellite.yaml")
    for flag in (["--model.init_args.loss.focal_alpha", "null"], ["--model.loss.focal_alpha=~"]):
        config = _printed_config(capsys, ["fit", "--config", str(QUICKSTART), *flag])
        loss = config["model"]["init_args"]["loss"]
        assert loss["focal_alpha"] is None and loss["focal_weight"] == 20.0, flag
    config = _printed_config(capsys, [
        "fit", "--config", satellite, "--model.init_args.adaptation.last_k", "4",
        "--model.init_args.adaptation.last_k", "null", "--data.init_args.train_region", "null",
    ])
    adaptation = config["model"]["init_args"]["adaptation"]
    assert adaptation["last_k"] is None and (adaptation["method"], adaptation["lora_rank"]) == ("lora", 8)
    assert config["data"]["init_args"]["train_region"] is None
    assert config["data"]["init_args"]["val_region"] == [450, 0, 900, 600]


def test_null_override_rewrite_touches_only_config_fields():
    from samtune.cli import _null_overrides

    unchanged = ["fit", "--config", "r.yaml", "--trainer.logger", "null", "--data.init_args.val_region", "null",
                 "--model.init_args.loss.focal_alpha", "0.5", "--model.init_args.checkpoint=null", "--data", "null"]
    assert _null_overrides(unchanged) == unchanged
    assert _null_overrides(["--model.init_args.loss.focal_alpha", "NULL", "--trainer.max_steps", "3"]) == [
        "--model.init_args.loss", '{"focal_alpha": null}', "--trainer.max_steps", "3"]


def test_null_override_of_a_wrapped_datamodule_argument(capsys):
    """``null`` for an argument of the datamodule inside ``CachedEmbeddingDataModule`` (``--data.init_args.data.
    init_args.train_split null``, the seeded split of recipes/medical.yaml's comment) is None, not the string
    'None' (a split file named None), and the wrapped datamodule's other arguments stay."""
    cached = str(REPO_ROOT / "recipes" / "medical_cached.yaml")
    for flag in (["--data.init_args.data.init_args.train_split", "null"], ["--data.init_args.data.train_split=~"]):
        config = _printed_config(capsys, ["fit", "--config", cached, *flag])
        inner = config["data"]["init_args"]["data"]["init_args"]
        assert inner["train_split"] is None, flag
        assert inner["val_split"] == "recipes/splits/em_membrane_val.txt" and inner["batch_size"] == 2, flag


def test_medical_recipe_instantiates_with_real_assets(assets, monkeypatch):
    """The medical recipe builds LiteMedSAM from the real weights with LoRA on the encoder, reads the EM slices."""
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
    encoder = dict(task.model.image_encoder.named_parameters())
    trainable = [name for name, p in encoder.items() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any(not p.requires_grad for p in encoder.values())
    assert all(p.requires_grad for p in task.model.mask_decoder.parameters())
    assert not any(p.requires_grad for p in task.model.prompt_encoder.parameters())
    cli.datamodule.setup("fit")
    assert len(cli.datamodule.train_dataset) == 15 and len(cli.datamodule.val_dataset) == 5
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["images"].shape == (2, 3, 256, 256)
    assert 0 < batch["mask_valid"].sum() <= 2 * 16


# ----------------------------------------------------------------------------------------------- errors
def test_unknown_key_is_one_line(capsys):
    assert run_cli(["fit", "--config", str(QUICKSTART), "--model.init_args.no_such_key", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_key" in err[0] and err[0].startswith("samtune fit: error:")


def test_misspelt_key_of_a_class_in_a_fragment_is_named(tmp_path, capsys):
    """A misspelt ``init_args`` key of a logger in a fragment came after jsonargparse's list of union types and the
    alternatives that failed, and the 600-character line ended before it ("... CSVLogger':; Opti ..."); the line
    now keeps the key, the class and the problem."""
    fragment = tmp_path / "wandb_typo.yaml"
    fragment.write_text((REPO_ROOT / "configs" / "logger" / "wandb.yaml").read_text().replace("save_dir:", "save_dri:"))
    capsys.readouterr()
    assert run_cli(["fit", "--config", str(QUICKSTART), "--config", str(fragment), "--print_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('samtune fit: error: Parser key "trainer.logger": ')
    assert "'lightning.pytorch.loggers.CSVLogger': Option 'save_dri' is not accepted" in err[0]
    assert "Subtypes" not in err[0] and "Given value" not in err[0]


def test_wrong_type_is_one_line(capsys):
    assert run_cli(["fit", "--config", str(QUICKSTART), "--trainer.max_steps", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.max_steps" in err[0]


@pytest.mark.parametrize("flag", [
    ["--trainer.max_step", "5"],                            # a Trainer option (max_steps)
    ["--model.init_args.simulation.num_iter", "2"],         # a field of the task's dataclass (num_iterations)
    ["--seed", "3"],                                        # seed_everything
    ["--conf", str(REPO_ROOT / "recipes" / "medical.yaml")],  # --config: merged over the default recipe
], ids=lambda flag: flag[0])
def test_abbreviated_option_is_refused(flag, capsys):
    """argparse expanded a prefix to the one option it matched, so a misspelt flag configured the run silently
    (``--conf`` even after the default recipe had been prepended); whole names only now."""
    capsys.readouterr()
    assert run_cli(["fit", *(["--config", str(QUICKSTART)] if flag[0] != "--conf" else []), *flag,
                    "--print_config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = [line for line in captured.err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and flag[0].rsplit(".", 1)[-1] in err[0] and err[0].startswith("samtune fit: error:")


def test_missing_data_path_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no_such_folder"
    code = run_cli(quick_args("--synthetic_data", "null", "--data.init_args.root", str(missing)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[0] == f"samtune: error: ValueError: SA1BDataModule.root is not a folder: {missing}"
    assert "Traceback" not in "\n".join(err)


def test_checkpoint_that_does_not_fit_is_one_line_and_traceback_on_request(tmp_path, monkeypatch, capsys):
    from samtune.checkpoints import CheckpointError, save_checkpoint

    monkeypatch.chdir(tmp_path)
    other = save_checkpoint(build_sam("sam_tiny_vit_t"), tmp_path / "tiny_vit_t.pth")
    args = quick_args("--model.init_args.checkpoint", str(other))
    assert run_cli(args) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1
    assert errors[0].startswith("samtune: error: CheckpointError:") and "does not fit" in errors[0]
    with pytest.raises(CheckpointError):
        main([*args, "--traceback"])


# -------------------------------------------------------------------------------------- quickstart, logging
def test_quickstart_trains_end_to_end(tmp_path, monkeypatch):
    """Shortened quickstart: generates the data, trains 4 steps, validates, saves checkpoints, CSV metrics and an
    overlay picture."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(quick_args(steps=4)) == 0
    assert len(list((tmp_path / "data" / "quickstart").glob("*.json"))) == 8
    checkpoints = tmp_path / "runs" / "quickstart" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["global_step"] == 4
    assert len(list(checkpoints.glob("step*-iou*.ckpt"))) == 1  # best by val/iou_click_1
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert any(r.get("val/iou_click_1") for r in rows) and any(r.get("train/loss") for r in rows)
    assert (run_dir / "config.yaml").is_file()
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["params/trainable"] == hparams["params/total"] > 0
    assert len(list((run_dir / "overlays").glob("*.png"))) == 1


def test_wandb_offline_run_logs_config_and_overlays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run_cli(quick_args("--config", str(REPO_ROOT / "configs" / "logger" / "wandb.yaml"), steps=2)) == 0
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    import wandb

    try:  # the resolved config and the parameter counts are in the run's config
        assert wandb.run is not None and wandb.run.offline
        assert wandb.run.config["cli"]["model"]["init_args"]["model"] == "sam_tiny"
        assert wandb.run.config["params/trainable"] > 0
    finally:
        wandb.finish()
    files = runs[0] / "files"
    assert list((files / "media" / "images" / "val").glob("overlays_*.png"))


def test_wandb_goes_offline_without_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert configure_wandb_mode() == "offline" and os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert configure_wandb_mode() == "online" and "WANDB_MODE" not in os.environ


def test_render_overlays_draws_truth_prediction_and_clicks():
    side = 32
    image = torch.zeros(3, side, side)  # "minmax": black
    gt = torch.zeros(2, side, side, dtype=torch.bool)
    gt[:, 4:12, 4:12] = True
    pred = torch.zeros_like(gt)
    pred[:, 20:28, 20:28] = True
    example = {"image": image, "gt": gt, "pred": pred, "points": torch.tensor([[[8.0, 8.0]], [[24.0, 24.0]]]),
               "labels": torch.tensor([[1], [0]]), "normalization": "minmax"}
    picture = render_overlays(example)
    assert picture.shape == (2 * side, 2 * side, 3) and picture.dtype.name == "uint8"
    assert picture[6, 6, 1] > 50 and picture[6, 6, 0] == 0           # ground truth tinted green (left)
    assert picture[22, side + 22, 2] > 50                           # prediction tinted blue (right)
    assert tuple(picture[8, side + 8]) == (0, 200, 0)               # positive click
    assert tuple(picture[side + 24, side + 24]) == (230, 0, 0)      # negative click (second row)
    assert picture[side // 2, 0].sum() == 0                         # background untouched


def test_validation_overlays_period_continues_after_resume(tmp_path):
    """The overlay period counted validations from 0 again after a resume: with every_n_epochs=2 and a checkpoint
    saved after 3 validations, the resumed run drew at its first validation (the 4th) instead of the 5th."""
    side = 16
    example = {"image": torch.zeros(3, side, side), "gt": torch.ones(1, side, side, dtype=torch.bool),
               "pred": torch.ones(1, side, side, dtype=torch.bool), "points": torch.tensor([[[4.0, 4.0]]]),
               "labels": torch.tensor([[1]]), "normalization": "minmax"}
    module = SimpleNamespace(last_val_example=example)

    def validate(callback, step):
        trainer = SimpleNamespace(sanity_checking=False, loggers=[], global_step=step, current_epoch=0,
                                  default_root_dir=str(tmp_path))
        callback.last_path = None
        callback.on_validation_epoch_end(trainer, module)
        return callback.last_path is not None

    first = ValidationOverlays(every_n_epochs=2)
    assert [validate(first, step) for step in (1, 2, 3)] == [True, False, True]
    resumed = ValidationOverlays(every_n_epochs=2)
    resumed.load_state_dict(first.state_dict())
    assert [validate(resumed, step) for step in (4, 5)] == [False, True]


def test_synthetic_data_is_generated_once(tmp_path):
    root = tmp_path / "synthetic"
    assert ensure_synthetic_data(root, SyntheticData(num_images=2, image_size=64))
    assert not ensure_synthetic_data(root, SyntheticData(num_images=2, image_size=64))
    assert len(list(root.glob("*.json"))) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_synthetic_data_generated_with_other_settings_is_not_silently_reused(tmp_path, capsys):
    """`--synthetic_data.num_images 3` (or another image_size / seed) over a folder generated with 2 images kept the
    2 without a word; the reuse now says which settings the folder was generated with."""
    root = tmp_path / "synthetic"
    assert ensure_synthetic_data(root, SyntheticData(num_images=2, image_size=64))
    capsys.readouterr()
    assert not ensure_synthetic_data(root, SyntheticData(num_images=2, image_size=64))
    assert capsys.readouterr().err == ""
    assert not ensure_synthetic_data(root, SyntheticData(num_images=3, image_size=64, seed=1))
    err = capsys.readouterr().err
    assert str(root) in err and "num_images=2" in err and "seed=0" in err and "num_images=3" in err
    assert len(list(root.glob("*.json"))) == 2


def test_synthetic_data_refuses_a_folder_of_other_files(tmp_path):
    """data.init_args.root pointing at a folder of the user's own files without annotations failed after generating
    with 'OSError: [Errno 39] Directory not empty: .root.xyz -> root' (a temporary folder, no word of synthetic_data);
    it is now refused before generating, naming the folder and the setting, and the files are untouched."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "scan_001.png").write_bytes(b"user data")
    with pytest.raises(ValueError, match=rf"synthetic_data: data root {re.escape(str(root))} holds other files .*"
                                         r"data\.init_args\.root"):
        ensure_synthetic_data(root, SyntheticData(num_images=2, image_size=64))
    assert [p.name for p in root.iterdir()] == ["scan_001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_dataloader_worker_error_keeps_its_message():
    """torch re-raises a worker's error with the traceback as message: the one line shows the original message."""
    from torch.utils.data import DataLoader, Dataset

    from samtune.cli import _one_line
    from samtune.data import SampleError

    class Bad(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise SampleError("/data/a.json", "no mask of /data/a.tif inside the tile at (0, 64) of size 64")

    with pytest.raises(SampleError) as caught:
        next(iter(DataLoader(Bad(), num_workers=1)))
    assert _one_line(caught.value) == (
        "SampleError: /data/a.json: no mask of /data/a.tif inside the tile at (0, 64) of size 64 "
        "(in DataLoader worker process 0)"
    )
    assert _one_line(ValueError("plain\nmessage")) == "ValueError: plain message"


# ------------------------------------------------------------------------------- default recipe + overrides
def test_fit_without_config_applies_overrides_to_the_default_recipe(capsys):
    """``samtune fit --data.init_args.batch_size 2`` runs the quickstart with that change (it used to drop the
    default recipe and fail on the missing model)."""
    config = _printed_config(capsys, ["fit", "--data.init_args.batch_size", "2", "--model.init_args.model=sam_tiny"])
    assert config["data"]["init_args"]["batch_size"] == 2
    assert config["model"]["init_args"]["model"] == "sam_tiny" and config["trainer"]["max_steps"] == 600
    assert config["data"]["init_args"]["root"] == "data/quickstart"


def test_only_a_config_or_a_class_replaces_the_default_recipe():
    from samtune.cli import _uses_config

    for args in (["--config", "r.yaml"], ["-c", "r.yaml"], ["--config=r.yaml"], ["--model", "PromptableSegmentationTask"],
                 ["--data=SA1BDataModule"], ["--data.class_path", "COCODataModule"],
                 ["--model.class_path=samtune.tasks.PromptableSegmentationTask"]):
        assert _uses_config(args), args
    for args in (["--data.init_args.batch_size", "2"], ["--model.init_args.model", "sam_tiny"],
                 ["--model.loss.focal_alpha=~"], ["--trainer.max_steps", "3"], ["--print_config"], ["--dataset"]):
        assert not _uses_config(args), args


# ------------------------------------------------------------------------------- one-line errors of wrapped causes
def test_one_line_keeps_the_samtune_error_that_names_the_file(tmp_path):
    """An error samtune raised *from* a lower-level one is reported, not the lower-level one (which lacks the file:
    ``JSONDecodeError: Expecting ...``, ``ValueError: compressed RLE counts end inside a value``)."""
    from samtune.cli import _one_line, _root_cause
    from samtune.data import SampleError
    from samtune.data.coco import load_coco_index
    from samtune.data.masks import validate_rle

    bad = tmp_path / "bad.json"
    bad.write_text("{bad")
    with pytest.raises(ValueError) as caught:
        load_coco_index(bad)
    assert _one_line(caught.value).startswith(f"ValueError: {bad}: invalid JSON (Expecting property name")
    with pytest.raises(SampleError) as caught:
        validate_rle({"counts": "abc", "size": [4, 4]}, 4, 4, "/data/x.json [annotation 7]")
    assert _one_line(caught.value) == ("SampleError: /data/x.json [annotation 7]: invalid compressed RLE: "
                                       "compressed RLE counts end inside a value")
    # A wrapper raised outside samtune (jsonargparse's union validation) still gives way to samtune's error.
    try:
        try:
            load_coco_index(bad)
        except ValueError as inner:
            raise RuntimeError("Does not validate against any of the Union subtypes ...") from inner
    except RuntimeError as outer:
        assert _root_cause(outer) is outer.__cause__


def test_bad_coco_files_through_samtune_evaluate_name_the_file(tmp_path, capsys):
    import json

    import cv2
    import numpy as np

    torch.manual_seed(0)
    torch.save(build_sam("sam_tiny").state_dict(), tmp_path / "tiny.pth")
    bad = tmp_path / "bad.json"
    bad.write_text("{bad")
    args = ["evaluate", "--checkpoint", str(tmp_path / "tiny.pth"), "--data", "coco", "--output", str(tmp_path / "o"),
            "--num-workers", "0", "--quiet", "--protocols", "box"]
    assert run_cli([*args, "--annotations", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"samtune: error: ValueError: {bad}: invalid JSON"), err
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((32, 32, 3), np.uint8))
    rle = tmp_path / "rle.json"
    rle.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png", "width": 32, "height": 32}],
                               "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                                "segmentation": {"counts": "abc", "size": [32, 32]}}]}))
    assert run_cli([*args, "--annotations", str(rle)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"samtune: error: SampleError: {rle} [annotation 5 of image 1]: invalid compressed RLE: "
                      "compressed RLE counts end inside a value"), err


def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32(monkeypatch, tmp_path):
    """PyTorch emulates bf16 on CPUs without AVX512-BF16 / AMX (a LiteMedSAM step ~16x slower than fp32): the
    recipes' bf16-mixed trains in 32-true there, with a warning; GPUs and CPUs with native bf16 keep it."""
    import samtune.modeling.precision as precision_module
    from samtune.cli import cpu_precision, run_lightning

    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16 .* trains in '32-true'"):
        assert cpu_precision("bf16-mixed", "auto") == "32-true"
    assert cpu_precision("bf16-mixed", "gpu") == "bf16-mixed" and cpu_precision("32-true", "cpu") == "32-true"
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="without native bf16"):
        cli = run_lightning(quick_args("--trainer.precision", "bf16-mixed", "--trainer.accelerator", "cpu"), run=False)
    assert cli.trainer.precision == "32-true"
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    assert cpu_precision("bf16-mixed", "cpu") == "bf16-mixed"


@pytest.mark.parametrize(("module", "required", "flag"), [
    ("samtune.evaluation.cli", ["--checkpoint", "c.pth", "--output", "out"], "--click"),
    ("samtune.export.cli", ["--checkpoint", "c.pth", "--output", "o.pth", "--format", "pth"], "--mod"),
    ("samtune.inference.amg_cli", ["--checkpoint", "c.pth", "--input", "i", "--output", "o"], "--points-per-s"),
])
def test_tool_commands_refuse_abbreviated_options(module, required, flag):
    """The plain-argparse commands take whole option names too (``--click 5`` used to mean ``--clicks 5``)."""
    import importlib

    parser = importlib.import_module(module).build_parser()
    _, extra = parser.parse_known_args([*required, flag, "5"])
    assert extra == [flag, "5"]


def test_data_synth_refuses_abbreviated_options(tmp_path, capsys):
    assert run_cli(["data", "synth", "--out", str(tmp_path / "s"), "--num-images", "1", "--image-s", "64"]) == 2
    assert "unrecognized arguments: --image-s 64" in capsys.readouterr().err
