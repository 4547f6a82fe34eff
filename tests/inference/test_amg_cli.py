"""``samtune amg``: SA-1B JSON per image, COCO results, PNG masks, clear errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from samtune.checkpoints import save_checkpoint
from samtune.inference.amg import AutomaticMaskGenerator
from samtune.inference.amg_cli import main
from samtune.inference.amg_utils import rle_to_mask

from ..modeling.reference import make_image
from .amg_model import localized_sam

FAST = ["--points-per-side", "6", "--pred-iou-thresh", "0", "--stability-score-thresh", "0.5", "--precision", "fp32", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A saved sam_tiny checkpoint and a folder with two images (PNG and JPEG, different sizes)."""
    root = tmp_path_factory.mktemp("amg_cli")
    checkpoint = save_checkpoint(localized_sam("sam_tiny"), root / "tiny.pth")
    images = root / "images"
    images.mkdir()
    arrays = {"000000000042.png": make_image(200, 150, seed=1), "scene.jpg": make_image(160, 210, seed=2)}
    for name, array in arrays.items():
        cv2.imwrite(str(images / name), cv2.cvtColor(array, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    (images / "notes.txt").write_text("not an image")
    return checkpoint, images, arrays


def test_folder_to_sa1b_json_coco_results_and_progress(setup, tmp_path, capsys):
    checkpoint, images, arrays = setup
    out = tmp_path / "out"
    code = main(["--checkpoint", str(checkpoint), "--model", "sam_tiny", "--input", str(images), "--output", str(out),
                 "--coco-results", str(tmp_path / "coco.json"), *[a for a in FAST if a != "--quiet"]])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2/2" in err and "image" in err  # tqdm progress bar
    assert "masks for 2 image(s) written to" in err
    assert sorted(p.name for p in out.iterdir()) == ["000000000042.json", "scene.json"]
    sa1b = json.loads((out / "000000000042.json").read_text())
    # "scene" is not a number: every image is numbered by its place (a stem id could collide with a place)
    assert sa1b["image"] == {"image_id": 1, "file_name": "000000000042.png", "height": 200, "width": 150}
    # The masks are the generator's on the same (PNG, lossless) image.
    expected = AutomaticMaskGenerator(localized_sam("sam_tiny"), points_per_side=6, pred_iou_thresh=0, stability_score_thresh=0.5, precision="fp32").generate(arrays["000000000042.png"])
    anns = sa1b["annotations"]
    assert len(anns) == len(expected) > 3
    for ann, rec in zip(anns, expected):
        assert isinstance(ann["segmentation"]["counts"], str)
        assert np.array_equal(rle_to_mask(ann["segmentation"]), rec["segmentation"])
        assert ann["bbox"] == rec["bbox"] and ann["area"] == rec["area"] and ann["crop_box"] == rec["crop_box"]
        assert ann["predicted_iou"] == pytest.approx(rec["predicted_iou"]) and ann["point_coords"] == rec["point_coords"]
    scene = json.loads((out / "scene.json").read_text())
    assert scene["image"]["image_id"] == 2 and (scene["image"]["height"], scene["image"]["width"]) == (160, 210)
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert len(coco) == len(anns) + len(scene["annotations"])
    assert {r["image_id"] for r in coco} == {1, 2} and all(r["category_id"] == 1 for r in coco)


def test_single_file_binary_masks_and_uncompressed(setup, tmp_path, capsys):
    checkpoint, images, _ = setup
    out = tmp_path / "png"
    # No --model: the architecture is inferred from the checkpoint.
    assert main(["--checkpoint", str(checkpoint), "--input", str(images / "scene.jpg"),
                 "--output", str(out), "--output-mode", "binary_mask", *FAST]) == 0
    anns = json.loads((out / "scene.json").read_text())["annotations"]
    pngs = sorted((out / "scene").iterdir(), key=lambda p: int(p.stem))
    assert len(pngs) == len(anns) > 0
    mask = cv2.imread(str(pngs[0]), cv2.IMREAD_GRAYSCALE) > 0
    assert np.array_equal(mask, rle_to_mask(anns[0]["segmentation"]))
    out2 = tmp_path / "unc"
    assert main(["--checkpoint", str(checkpoint), "--model", "sam_tiny", "--input", str(images / "scene.jpg"),
                 "--output", str(out2), "--output-mode", "uncompressed_rle", *FAST]) == 0
    anns2 = json.loads((out2 / "scene.json").read_text())["annotations"]
    assert isinstance(anns2[0]["segmentation"]["counts"], list)
    assert np.array_equal(rle_to_mask(anns2[0]["segmentation"]), mask)


def test_binary_masks_of_a_rerun_replace_the_earlier_ones(setup, tmp_path, capsys):
    """A second run on the same image with fewer masks leaves exactly its own PNGs (the earlier run's extra
    masks used to stay beside them), and a folder holding other files is not replaced."""
    checkpoint, images, _ = setup
    out = tmp_path / "png"
    args = ["--checkpoint", str(checkpoint), "--input", str(images / "scene.jpg"), "--output", str(out),
            "--output-mode", "binary_mask", *FAST]
    assert main(args) == 0
    first = len(list((out / "scene").iterdir()))
    assert main([*args, "--points-per-side", "2"]) == 0
    anns = json.loads((out / "scene.json").read_text())["annotations"]
    pngs = sorted(p.name for p in (out / "scene").iterdir())
    assert 0 < len(anns) < first and pngs == sorted(f"{i}.png" for i in range(len(anns)))
    assert sorted(p.name for p in out.iterdir()) == ["scene", "scene.json"]  # no temporary folder left
    assert (out / "scene").stat().st_mode & 0o777 == 0o777 & ~_umask()
    (out / "scene" / "notes.txt").write_text("mine")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "holds files that samtune amg did not write (notes.txt)" in err and str(out / "scene") in err
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "scene").write_text("a file where the folder goes")
    assert main([*args[:5], str(blocked), *args[6:]]) == 1
    assert "scene is a file, where the PNG masks of scene go" in capsys.readouterr().err


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_errors(setup, tmp_path, capsys):
    checkpoint, images, _ = setup
    base = ["--checkpoint", str(checkpoint), "--model", "sam_tiny", "--output", str(tmp_path / "o"), *FAST]

    def error(args: list[str]) -> str:
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("samtune amg: error: ") and len(err.splitlines()) == 1, err
        return err

    assert "input not found: " + str(tmp_path / "missing") in error([*base, "--input", str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    assert f"no images found in {empty}" in error([*base, "--input", str(empty)])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    message = error([*base, "--input", str(broken)])
    assert "cannot read image" in message and str(broken / "bad.png") in message
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("a.png", "a.jpg"):
        cv2.imwrite(str(twins / name), np.zeros((8, 8, 3), np.uint8))
    assert "a.jpg and a.png would both be written to a.json" in error([*base, "--input", str(twins)])
    strip = tmp_path / "strip"
    strip.mkdir()
    cv2.imwrite(str(strip / "line.png"), np.zeros((1, 600, 3), np.uint8))
    message = error([*base, "--input", str(strip)])  # the short side rounds to 0 at the model's 256 px input
    assert str(strip / "line.png") in message and "1x600 pixels" in message and "at most 512:1" in message
    missing_ckpt = [a if a != str(checkpoint) else str(tmp_path / "nope.pth") for a in base]
    assert "checkpoint not found" in error([*missing_ckpt, "--input", str(images)])
    wrong_arch = [a if a != "sam_tiny" else "sam_tiny_vit_t" for a in base]
    assert "image_encoder" in error([*wrong_arch, "--input", str(images)])  # the checkpoint's keys do not fit
    assert main(["--input", str(images)]) == 2  # usage error (argparse)
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "SA-1B" in capsys.readouterr().out


def test_dispatch_from_samtune_cli(setup, tmp_path, capsys):
    from samtune.cli import main as samtune_main

    checkpoint, _, _ = setup
    with pytest.raises(SystemExit) as exit_:
        samtune_main(["amg", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
    assert exit_.value.code == 1
    assert f"samtune amg: error: input not found: {tmp_path / 'nothing'}" in capsys.readouterr().err


def test_image_ids_are_unique(setup, tmp_path, capsys):
    """``2.jpg`` and ``a.jpg`` both got image_id 2; ids now come from the stems only when all are distinct
    integers, and the per-image JSON and --coco-results agree."""
    from samtune.inference.amg_cli import image_ids

    assert image_ids([Path("000000000042.jpg"), Path("7.png")]) == [42, 7]
    assert image_ids([Path("2.jpg"), Path("a.jpg")]) == [1, 2]
    assert image_ids([Path("007.png"), Path("7.jpg")]) == [1, 2]  # equal as numbers
    assert image_ids([Path("\u00b2.png")]) == [1]  # a Unicode digit is not a COCO id
    checkpoint, images, arrays = setup
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("2.png", "a.png", "b.png"):
        cv2.imwrite(str(folder / name), cv2.cvtColor(arrays["000000000042.png"][:64, :64], cv2.COLOR_RGB2BGR))
    out, results = tmp_path / "out", tmp_path / "coco.json"
    assert main(["--checkpoint", str(checkpoint), "--model", "sam_tiny", "--input", str(folder), "--output", str(out),
                 "--coco-results", str(results), *FAST]) == 0
    ids = {name: json.loads((out / f"{name}.json").read_text())["image"]["image_id"] for name in ("2", "a", "b")}
    assert ids == {"2": 1, "a": 2, "b": 3}
    coco = json.loads(results.read_text())
    assert coco and {r["image_id"] for r in coco} <= set(ids.values())


def test_base_checkpoint_flag_and_traceback(setup, tmp_path, monkeypatch, capsys):
    """An adapter checkpoint whose base moved: the error names --base-checkpoint, which then runs it; with
    ``samtune amg --traceback`` the error raises instead of printing one line."""
    from samtune.adapt import AdaptationConfig, apply_adaptation, save_adapter_checkpoint
    from samtune.build import build_sam
    from samtune.checkpoints import CheckpointError
    from samtune.cli import main as samtune_main

    checkpoint, images, _ = setup
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    (run / "base.pth").write_bytes(checkpoint.read_bytes())
    model = apply_adaptation(build_sam("sam_tiny", "base.pth"), AdaptationConfig(method="lora", lora_rank=2))
    adapter = save_adapter_checkpoint(model, run / "adapter.pt", model_name="sam_tiny", base_checkpoint="base.pth")
    moved = (run / "base.pth").rename(tmp_path / "moved.pth")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAMTUNE_TRACEBACK", raising=False)
    args = ["--checkpoint", str(adapter), "--input", str(images / "scene.jpg"), "--output", str(tmp_path / "o"), *FAST]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "base checkpoint base.pth not found" in err and "--base-checkpoint" in err and len(err.splitlines()) == 1
    assert main([*args, "--base-checkpoint", str(tmp_path / "nope.pth")]) == 1
    assert "--base-checkpoint " + str(tmp_path / "nope.pth") + ": file not found" in capsys.readouterr().err
    assert main([*args, "--base-checkpoint", str(moved)]) == 0
    assert json.loads((tmp_path / "o" / "scene.json").read_text())["annotations"]
    with pytest.raises(CheckpointError, match="base checkpoint base.pth not found"):
        samtune_main(["amg", *args, "--traceback"])
    assert "SAMTUNE_TRACEBACK" not in os.environ  # the flag does not leak into later commands
    with pytest.raises(SystemExit) as exit_:
        samtune_main(["amg", *args])
    assert exit_.value.code == 1


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--min-mask-region-area", "-3", "an integer >= 0"),
        ("--points-per-side", "0", "an integer >= 1"),
        ("--points-per-side", "2.5", "an integer >= 1"),
        ("--points-per-batch", "-1", "an integer >= 1"),
        ("--crop-n-layers", "-1", "an integer >= 0"),
        ("--crop-n-points-downscale-factor", "0", "an integer >= 1"),
        ("--pred-iou-thresh", "1.5", "a number in [0, 1]"),
        ("--pred-iou-thresh", "-0.1", "a number in [0, 1]"),
        ("--stability-score-thresh", "nan", "a number in [0, 1]"),
        ("--stability-score-thresh", "1.01", "a number in [0, 1]"),
        ("--stability-score-offset", "-1", "a number >= 0"),
        ("--box-nms-thresh", "2", "a number in [0, 1]"),
        ("--crop-nms-thresh", "-0.5", "a number in [0, 1]"),
        ("--crop-overlap-ratio", "1", "a number in [0, 1)"),
        ("--crop-overlap-ratio", "x", "a number in [0, 1)"),
    ],
)
def test_out_of_range_options_are_usage_errors(tmp_path, capsys, option, value, expected):
    """Negative areas, thresholds outside [0, 1], empty grids...: an argparse error naming the option and what it
    takes (exit code 2), before any file is touched; they used to be accepted silently (``--min-mask-region-area
    -3`` ran as 0, ``--pred-iou-thresh 1.5`` wrote no masks at all)."""
    out = tmp_path / "o"
    args = ["--checkpoint", str(tmp_path / "none.pth"), "--input", str(tmp_path), "--output", str(out), option, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if f"argument {option}: expected {expected}, got " in line)
    assert value in line.rsplit("got ", 1)[1], err  # the text quoted, or the value out of range
    assert not out.exists()


def test_boundary_option_values_are_accepted():
    from samtune.inference.amg_cli import build_parser

    args = build_parser().parse_args([
        "--checkpoint", "c", "--input", "i", "--output", "o", "--min-mask-region-area", "0", "--points-per-side", "1",
        "--pred-iou-thresh", "0", "--stability-score-thresh", "1", "--stability-score-offset", "0",
        "--box-nms-thresh", "1", "--crop-nms-thresh", "0", "--crop-overlap-ratio", "0", "--crop-n-layers", "0",
    ])
    assert (args.min_mask_region_area, args.points_per_side, args.pred_iou_thresh, args.stability_score_thresh) == (0, 1, 0.0, 1.0)
    assert (args.box_nms_thresh, args.crop_nms_thresh, args.crop_overlap_ratio, args.crop_n_layers) == (1.0, 0.0, 0.0, 0)


def test_settings_the_generator_rejects_create_no_output(setup, tmp_path, capsys):
    """Options valid one by one but not together (no grid points left in crop layer 1): one error line, exit 1,
    and no output folder left behind."""
    checkpoint, images, _ = setup
    out = tmp_path / "o"
    assert main(["--checkpoint", str(checkpoint), "--input", str(images), "--output", str(out), "--quiet",
                 "--points-per-side", "2", "--crop-n-layers", "1", "--crop-n-points-downscale-factor", "4"]) == 1
    err = capsys.readouterr().err
    assert "samtune amg: error: points_per_side=2" in err and "leaves no points" in err
    assert not out.exists()


def test_bad_device_is_named(setup, tmp_path, capsys):
    """An unknown or absent --device failed with torch's RuntimeError ("Expected one of cpu, cuda, ... device
    type at start of device string: gpu", "Found no NVIDIA driver") that did not say which option was wrong."""
    checkpoint, images, _ = setup
    base = ["--checkpoint", str(checkpoint), "--input", str(images), "--output", str(tmp_path / "o"), "--quiet"]
    assert main([*base, "--device", "gpu"]) == 1
    err = capsys.readouterr().err
    assert "samtune amg: error: --device 'gpu' is not a torch device (cpu, cuda, cuda:1, mps, ...)" in err, err
    assert main([*base, "--device", "cuda:99"]) == 1
    err = capsys.readouterr().err
    assert "samtune amg: error: --device 'cuda:99': " in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_coco_results_on_a_folder_fails_before_the_run(setup, tmp_path, capsys):
    """--coco-results naming a folder failed only after every image had been processed, with an
    IsADirectoryError traceback from the final write; it is now checked first."""
    checkpoint, images, _ = setup
    folder = tmp_path / "results"
    folder.mkdir()
    out = tmp_path / "o"
    assert main(["--checkpoint", str(checkpoint), "--input", str(images), "--output", str(out), "--quiet",
                 "--coco-results", str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"samtune amg: error: --coco-results must be a file, but {folder} is a folder" in err, err
    assert not out.exists()
