"""`samtune evaluate` end to end on every dataset format (tiny random SAM) and its error messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from samtune.data.synth import synthesize_sa1b
from samtune.evaluation.cli import main

FAST = ["--num-workers", "0", "--quiet", "--model", "sam_tiny"]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_mask_folder_all_protocols(label_folder, tiny_checkpoint, tmp_path, capsys) -> None:
    images, masks = label_folder
    out = tmp_path / "eval"
    code, stdout, stderr = _run(["--checkpoint", str(tiny_checkpoint), "--data", "mask_folder", "--images", str(images),
                                 "--masks", str(masks), "--clicks", "2", "--batch-size", "2", "--output", str(out),
                                 *FAST], capsys)
    assert code == 0
    assert stdout.startswith("rects: 2 images, 5 masks | model sam_tiny")  # name: parent of the generic "images"
    for word in ("point", "box_jitter", "clicks", "NoC@85", "wrote"):
        assert word in stdout
    data = json.loads((out / "rects.json").read_text())
    assert data["num_masks"] == 5 and data["info"]["checkpoint"] == str(tiny_checkpoint)
    assert data["config"]["protocols"] == ["point", "box", "box_jitter", "clicks"] and data["config"]["num_clicks"] == 2
    assert (out / "rects_masks.csv").read_text().count("\n") == 6 and (out / "summary.csv").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in stderr and not (out / "iou_vs_clicks.png").exists()
    else:
        assert (out / "iou_vs_clicks.png").is_file()


def test_mask_folder_options_and_input_resolution(label_folder, tiny_checkpoint, tmp_path, capsys) -> None:
    images, masks = label_folder
    code, stdout, _ = _run(["--checkpoint", str(tiny_checkpoint), "--data", "mask_folder", "--images", str(images),
                            "--masks", str(masks), "--min-area", "250", "--mask-type", "instance", "--protocols", "box",
                            "--iou-resolution", "input", "--max-images", "1", "--name", "big", "--output",
                            str(tmp_path), *FAST], capsys)
    data = json.loads((tmp_path / "big.json").read_text())
    assert code == 0 and data["num_images"] == 1 and data["num_masks"] == 1  # image 0: one rectangle >= 250 px
    assert data["config"]["iou_resolution"] == "input" and list(data["metrics"]) == ["box"]


def test_coco_and_sa1b(coco_dir, tiny_checkpoint, tmp_path, capsys) -> None:
    code, stdout, _ = _run(["--checkpoint", str(tiny_checkpoint), "--data", "coco", "--annotations",
                            str(coco_dir / "instances.json"), "--protocols", "point,box", "--output", str(tmp_path),
                            *FAST], capsys)
    assert code == 0 and stdout.startswith("instances: 1 images, 2 masks")
    synthesize_sa1b(tmp_path / "sa1b", 2, image_size=(48, 64), seed=0)
    code, stdout, _ = _run(["--checkpoint", str(tiny_checkpoint), "--data", "sa1b", "--images", str(tmp_path / "sa1b"),
                            "--protocols", "clicks", "--clicks", "2", "--no-plot", "--output", str(tmp_path), *FAST],
                           capsys)
    assert code == 0 and stdout.startswith("sa1b: 2 images")
    names = [line.split(",")[0] for line in (tmp_path / "summary.csv").read_text().splitlines()[1:]]
    assert names == ["instances", "sa1b"]


def test_config_recipe_data_section(label_folder, tiny_checkpoint, tmp_path, capsys) -> None:
    images, masks = label_folder
    recipe = {
        "model": {"class_path": "PromptableSegmentationTask",
                  "init_args": {"model": "sam_tiny", "checkpoint": str(tiny_checkpoint)}},
        "data": {"class_path": "MaskFolderDataModule",
                 "init_args": {"image_dir": str(images), "mask_dir": str(masks), "val_fraction": 0.5,
                               "image_size": 1024, "max_masks_per_image": 1, "batch_size": 8}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, stdout, _ = _run(["--config", str(path), "--protocols", "box", "--output", str(tmp_path), "--quiet",
                            "--num-workers", "0"], capsys)
    data = json.loads((tmp_path / "recipe.json").read_text())
    # One validation image of two; the model's input size and every mask, whatever the recipe says.
    assert code == 0 and data["num_images"] == 1 and data["num_masks"] in (2, 3)
    assert data["info"]["model"] == "sam_tiny" and data["info"]["image_size"] == 256


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "mask_folder", "--images", "x"], "--data mask_folder needs --masks"),
        (["--data", "coco"], "--data coco needs --annotations"),
        (["--data", "sa1b", "--images", "x", "--masks", "y"], "--masks do(es) not apply to --data sa1b"),
        (["--data", "mask_folder", "--images", "x", "--masks", "y", "--annotations", "a.json"],
         "--annotations do(es) not apply"),
        (["--data", "sa1b", "--images", "x", "--protocols", "point,boxes"], "unknown protocol(s) ['boxes']"),
        (["--data", "sa1b", "--images", "x", "--config", "r.yaml"], "--config takes the data settings"),
        ([], "give the dataset with --data"),
        (["--data", "sa1b", "--images", "x", "--percentiles", "1"], "expected 2 comma-separated values"),
        (["--data", "sa1b", "--images", "x", "--noc-thresholds", "0.9,0.9"],
         "--noc-thresholds: noc_thresholds must be distinct"),
        (["--data", "sa1b", "--images", "x", "--noc-thresholds", "85"], "--noc-thresholds: noc_thresholds must be in"),
        (["--data", "sa1b", "--images", "x", "--window", "0,10"], "--window needs --intensity window"),
        (["--data", "sa1b", "--images", "x", "--intensity", "percentile", "--window", "0,10"],
         "--window needs --intensity window (got --intensity percentile)"),
        (["--data", "sa1b", "--images", "x", "--intensity", "minmax", "--percentiles", "1,99"],
         "--percentiles needs --intensity percentile or auto (got --intensity minmax)"),
        (["--data", "sa1b", "--images", "x", "--name", "..."], "--name '...': no usable characters for a file name"),
        (["--data", "sa1b", "--images", "x", "--seed", "-1"], "--seed: expected a non-negative integer, got -1"),
        (["--data", "sa1b", "--images", "x", "--seed", "1.5"], "--seed: expected a non-negative integer, got '1.5'"),
        (["--data", "sa1b", "--images", "x", "--box-noise-std", "-0.1"],
         "argument --box-noise-std: expected a non-negative number, got -0.1"),
        (["--data", "sa1b", "--images", "x", "--box-noise-max", "nan"],
         "argument --box-noise-max: expected a non-negative number, got nan"),
        (["--data", "sa1b", "--images", "x", "--num-workers", "-1"],
         "argument --num-workers: expected a non-negative integer, got -1"),
    ],
)
def test_usage_errors(args, message, tiny_checkpoint, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--checkpoint", str(tiny_checkpoint), "--model", "sam_tiny", "--output", str(tmp_path), *args])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_bad_paths_and_files(label_folder, coco_dir, tiny_checkpoint, tmp_path) -> None:
    images, masks = label_folder
    base = ["--output", str(tmp_path / "out"), *FAST]
    with pytest.raises(ValueError, match=r"--checkpoint .*missing\.pth: file not found"):
        main(["--checkpoint", str(tmp_path / "missing.pth"), "--data", "sa1b", "--images", str(images), *base])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match=r"junk\.pth"):  # the model is inferred from the file: it must be one
        main(["--checkpoint", str(junk), "--data", "sa1b", "--images", str(images), "--output",
              str(tmp_path), "--quiet"])
    with pytest.raises(ValueError, match=r"--masks .*nowhere: not a folder"):
        main(["--checkpoint", str(tiny_checkpoint), "--data", "mask_folder", "--images", str(images), "--masks",
              str(tmp_path / "nowhere"), *base])
    with pytest.raises(ValueError, match="no SA-1B <name>.json annotation files"):
        main(["--checkpoint", str(tiny_checkpoint), "--data", "sa1b", "--images", str(images), *base])
    with pytest.raises(ValueError, match=r"--annotations .*nope\.json: file not found \(expected a COCO"):
        main(["--checkpoint", str(tiny_checkpoint), "--data", "coco", "--annotations", str(coco_dir / "nope.json"),
              *base])
    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match="--output .*taken: exists and is not a folder"):
        main(["--checkpoint", str(tiny_checkpoint), "--data", "mask_folder", "--images", str(images), "--masks",
              str(masks), "--output", str(tmp_path / "taken"), *FAST])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {}\n")
    with pytest.raises(ValueError, match="no `data:` section"):
        main(["--config", str(recipe), "--checkpoint", str(tiny_checkpoint), *base])
    recipe.write_text("data: {class_path: Nope, init_args: {}}\n")
    with pytest.raises(ValueError, match="'Nope' is not a samtune datamodule"):
        main(["--config", str(recipe), "--checkpoint", str(tiny_checkpoint), *base])
    recipe.write_text(f"data: {{class_path: MaskFolderDataModule, init_args: {{image_dir: {images}, mask_dir: {masks}, "
                      "colour: red}}\n")
    with pytest.raises(ValueError, match="data.init_args do not fit MaskFolderDataModule.*colour"):
        main(["--config", str(recipe), "--checkpoint", str(tiny_checkpoint), *base])


def test_samtune_command_reports_one_line(label_folder, tiny_checkpoint, tmp_path, capsys) -> None:
    from samtune.cli import main as samtune_main

    images, _ = label_folder
    with pytest.raises(SystemExit) as err:
        samtune_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--model", "sam_tiny", "--data", "mask_folder",
                      "--images", str(images), "--masks", str(Path(tmp_path) / "none"), "--output", str(tmp_path)])
    err_text = capsys.readouterr().err
    assert err.value.code == 1
    assert "samtune: error: ValueError: --masks" in err_text and "none: not a folder" in err_text
    with pytest.raises(SystemExit) as err:
        samtune_main(["evaluate", "--help"])
    assert err.value.code == 0 and "--protocols" in capsys.readouterr().out


def test_model_name_inferred_from_the_checkpoint_is_reported(label_folder, tiny_checkpoint, tmp_path, capsys) -> None:
    """Without --model the header, the JSON and summary.csv name the inferred model (they said None)."""
    images, masks = label_folder
    out = tmp_path / "eval"
    code, stdout, _ = _run(["--checkpoint", str(tiny_checkpoint), "--data", "mask_folder", "--images", str(images),
                            "--masks", str(masks), "--protocols", "box", "--no-plot", "--output", str(out),
                            "--num-workers", "0", "--quiet"], capsys)
    assert code == 0 and stdout.startswith("rects: 2 images, 5 masks | model sam_tiny |")
    assert json.loads((out / "rects.json").read_text())["info"]["model"] == "sam_tiny"
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("name,model,") and rows[1].startswith("rects,sam_tiny,")


def _folder_recipe(images: Path, masks: Path, path: Path, cached: bool) -> Path:
    data = {"class_path": "MaskFolderDataModule",
            "init_args": {"image_dir": str(images), "mask_dir": str(masks), "val_fraction": 0.5,
                          "augmentation": "none", "batch_size": 2}}
    if cached:
        data = {"class_path": "samtune.data.cached.CachedEmbeddingDataModule",
                "init_args": {"cache_dir": str(path.parent / "cache"), "storage_dtype": "float16", "data": data}}
    path.write_text(yaml.safe_dump({"model": {"class_path": "PromptableSegmentationTask",
                                              "init_args": {"model": "sam_tiny"}}, "data": data}))
    return path


def test_config_with_cached_embeddings_evaluates_the_wrapped_datamodule(label_folder, tiny_checkpoint, tmp_path,
                                                                       capsys) -> None:
    images, masks = label_folder
    recipe = _folder_recipe(images, masks, tmp_path / "cached.yaml", cached=True)
    code, stdout, _ = _run(["--config", str(recipe), "--checkpoint", str(tiny_checkpoint), "--protocols", "box",
                            "--no-plot", "--output", str(tmp_path / "out"), "--num-workers", "0", "--quiet"], capsys)
    data = json.loads((tmp_path / "out" / "cached.json").read_text())
    assert code == 0 and data["num_images"] == 1 and data["info"]["model"] == "sam_tiny"
    assert not (tmp_path / "cache").exists()  # the encoder runs on the images: no cache is built
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"class_path": "samtune.data.cached.CachedEmbeddingDataModule",
                                            "init_args": {"cache_dir": "c", "data": {"class_path": "Nope"}}}}))
    with pytest.raises(ValueError, match=r"data\.init_args\.data\.class_path 'Nope' is not a samtune datamodule"):
        main(["--config", str(bad), "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "o"), *FAST])


def test_seed_reaches_the_recipe_datamodule(tmp_path, tiny_checkpoint, capsys) -> None:
    """--seed picks the --max-masks-per-image subset with --config as with --data (it was ignored)."""
    from tests.evaluation.conftest import rectangles, write_label_folder

    boxes = [(2 + 7 * k, 2, 6 + 7 * k, 30) for k in range(6)]
    images, masks = write_label_folder(tmp_path / "many", [rectangles((48, 40), boxes)] * 2)
    recipe = _folder_recipe(images, masks, tmp_path / "recipe.yaml", cached=False)

    def chosen(seed: int) -> list[str]:
        out = tmp_path / f"seed{seed}"
        code, _, _ = _run(["--config", str(recipe), "--checkpoint", str(tiny_checkpoint), "--protocols", "box",
                           "--max-masks-per-image", "1", "--seed", str(seed), "--no-plot", "--output", str(out),
                           "--num-workers", "0", "--quiet"], capsys)
        assert code == 0
        return [line.split(",")[1] for line in (out / "recipe_masks.csv").read_text().splitlines()[1:]]

    picks = {seed: chosen(seed) for seed in range(4)}
    assert all(len(p) == 1 for p in picks.values())
    assert len({tuple(p) for p in picks.values()}) > 1, picks
    assert chosen(2) == picks[2]


def test_adapter_checkpoint_with_base_checkpoint_flag(label_folder, tiny_checkpoint, tmp_path, monkeypatch,
                                                      capsys) -> None:
    """An adapter checkpoint whose recorded base cannot be found: a one-line error naming --base-checkpoint, and
    --base-checkpoint evaluates it."""
    import shutil

    from samtune.adapt import AdaptationConfig, apply_adaptation, save_adapter_checkpoint
    from samtune.build import build_sam
    from samtune.cli import main as samtune_main

    images, masks = label_folder
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / "base.pth")
    monkeypatch.chdir(run)
    model = apply_adaptation(build_sam("sam_tiny", "base.pth"), AdaptationConfig(method="lora", lora_rank=2))
    adapter = save_adapter_checkpoint(model, run / "adapter.pt", model_name="sam_tiny", base_checkpoint="base.pth")
    moved = (run / "base.pth").rename(tmp_path / "moved.pth")
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--checkpoint", str(adapter), "--data", "mask_folder", "--images", str(images), "--masks",
            str(masks), "--protocols", "box", "--no-plot", "--num-workers", "0", "--quiet"]
    with pytest.raises(SystemExit) as err:
        samtune_main([*args, "--output", str(tmp_path / "a")])
    message = capsys.readouterr().err.splitlines()[0]
    assert err.value.code == 1 and "base checkpoint base.pth not found" in message and "--base-checkpoint" in message
    with pytest.raises(ValueError, match=r"--base-checkpoint .*nope\.pth: file not found"):
        main([*args[1:], "--output", str(tmp_path / "b"), "--base-checkpoint", str(tmp_path / "nope.pth")])
    code, stdout, _ = _run([*args[1:], "--output", str(tmp_path / "c"), "--base-checkpoint", str(moved)], capsys)
    info = json.loads((tmp_path / "c" / "rects.json").read_text())["info"]
    assert code == 0 and "model sam_tiny" in stdout
    assert info["base_checkpoint"] == str(moved) and info["checkpoint"] == str(adapter)
