"""``samtune amg``: automatic mask generation over an image or a folder of images.

    samtune amg --checkpoint sam_vit_b_01ec64.pth --input photos/ --output masks/ \\
        [--points-per-side 32] [--crop-n-layers 1] [--output-mode coco_rle] [--coco-results results.json]

For every image ``<stem>.<ext>`` it writes ``<output>/<stem>.json`` in the SA-1B annotation format
(``{"image": {"image_id", "file_name", "width", "height"}, "annotations": [{"id", "segmentation", "bbox",
"area", "predicted_iou", "stability_score", "point_coords", "crop_box"}]}``), readable by
:class:`samtune.data.SA1BDataset`. ``--output-mode`` chooses the masks' form: ``coco_rle`` (compressed RLE,
as SA-1B), ``uncompressed_rle`` (run lengths as a list) or ``binary_mask`` (compressed RLE in the JSON plus one
PNG per mask in ``<output>/<stem>/<index>.png``). ``--coco-results FILE`` also writes one COCO results list for
all images (class-agnostic, category 1, score = predicted IoU). Image ids (in both outputs) are the file stems
when every stem is an integer and no two are equal as numbers (COCO file names such as ``000000000042.jpg``),
else every image is numbered 1, 2, ... in file order.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from samtune.argtypes import comma_separated, integer, number
from samtune.files import atomic_write, new_dir_mode

__all__ = ["main", "build_parser", "find_images", "image_ids"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class AmgError(Exception):
    """A problem with the command's inputs (printed as one line, exit code 1)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # whole option names only: a prefix must not silently stand for an option
        prog="samtune amg",
        description="Automatic mask generation (point grid, IoU/stability filtering, NMS) over images; writes one "
        "SA-1B-format JSON per image.",
    )
    io = parser.add_argument_group("input / output")
    io.add_argument("--checkpoint", required=True, help="model weights (official .pth, safetensors, samtune checkpoint)")
    io.add_argument(
        "--model", default=None,
        help="registry name of the architecture (e.g. sam_vit_b, lite_medsam); default: inferred from the checkpoint",
    )
    io.add_argument(
        "--base-checkpoint", default=None,
        help="base weights of an adapter-only checkpoint (LoRA / adapters); default: the path it records",
    )
    io.add_argument("--input", required=True, help="an image file or a folder of images (not recursive)")
    io.add_argument("--output", required=True, help="folder for <stem>.json (created)")
    io.add_argument(
        "--output-mode", default="coco_rle", choices=("coco_rle", "uncompressed_rle", "binary_mask"),
        help="mask form in the JSON; binary_mask also writes one PNG per mask (default: coco_rle)",
    )
    io.add_argument("--coco-results", default=None, help="also write a COCO results JSON for all images here")
    image = parser.add_argument_group(
        "image reading (default: the input mapping recorded in the checkpoint by training, else auto)")
    image.add_argument(
        "--intensity", default=None, choices=("auto", "none", "minmax", "percentile", "window"),
        help="mapping of non-uint8 images (16-bit, float) to 0-255",
    )
    image.add_argument("--percentiles", type=comma_separated(float, 2), default=None,
                       help="LO,HI percentiles for --intensity percentile (and auto on images that are not 8-bit)")
    image.add_argument("--window", type=comma_separated(float, 2), default=None,
                       help="LO,HI raw values for --intensity window")
    image.add_argument("--bands", type=comma_separated(int), default=None, help="1 or 3 band indices of multi-band images")
    run = parser.add_argument_group("model")
    run.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    run.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    amg = parser.add_argument_group("generator (defaults as the official SamAutomaticMaskGenerator)")
    amg.add_argument("--points-per-side", type=integer(1), default=32, help="grid clicks per side (default: 32)")
    amg.add_argument("--points-per-batch", type=integer(1), default=64, help="clicks filtered together (default: 64)")
    amg.add_argument("--pred-iou-thresh", type=number(0, 1), default=0.88,
                     help="keep masks with predicted IoU above this, 0 to disable (default: 0.88)")
    amg.add_argument("--stability-score-thresh", type=number(0, 1), default=0.95,
                     help="keep masks with stability score at least this, 0 to disable (default: 0.95)")
    amg.add_argument("--stability-score-offset", type=number(0), default=1.0,
                     help="logit offset of the stability score (default: 1.0)")
    amg.add_argument("--box-nms-thresh", type=number(0, 1), default=0.7, help="box IoU of the NMS in a crop (default: 0.7)")
    amg.add_argument("--crop-n-layers", type=integer(0), default=0, help="crop layers after the whole image (default: 0)")
    amg.add_argument("--crop-nms-thresh", type=number(0, 1), default=0.7,
                     help="box IoU of the NMS between crops (default: 0.7)")
    amg.add_argument("--crop-overlap-ratio", type=number(0, 1, high_open=True), default=512 / 1500,
                     help="overlap of layer-1 crops as a fraction of the short side (default: 512/1500)")
    amg.add_argument("--crop-n-points-downscale-factor", type=integer(1), default=1,
                     help="layer i has points-per-side / factor**i clicks per side (default: 1)")
    amg.add_argument("--min-mask-region-area", type=integer(0), default=0,
                     help="fill holes and remove islands smaller than this many pixels, 0 to skip (default: 0)")
    return parser


def find_images(path: Path) -> list[Path]:
    """The image files of ``path`` (a file, or a folder's files with an image suffix, sorted by name)."""
    if not path.exists():
        raise AmgError(f"input not found: {path}")
    if path.is_file():
        return [path]
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise AmgError(f"no images found in {path} (looked for {', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise AmgError(f"{stems[p.stem].name} and {p.name} would both be written to {p.stem}.json; rename one")
        stems[p.stem] = p
    return images


def _check_device(text: str) -> Any:
    """``--device`` as a ``torch.device`` that exists here, else an :class:`AmgError` naming it."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise AmgError(f"--device {text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise AmgError(f"--device {text!r}: torch sees no CUDA GPU here (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise AmgError(f"--device {text!r}: there {'is' if count == 1 else 'are'} only {count} CUDA GPU"
                           f"{'' if count == 1 else 's'} (cuda:0{'' if count == 1 else f' to cuda:{count - 1}'})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise AmgError(f"--device {text!r}: MPS is not available here (use --device cpu)")
    return device


def _load_predictor(args: argparse.Namespace) -> Any:
    """The checkpoint's model (inferred from the file unless ``--model`` is given) in a Predictor."""
    from samtune.inference.predictor import Predictor

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise AmgError(f"checkpoint not found: {checkpoint}")
    if args.base_checkpoint is not None and not Path(args.base_checkpoint).is_file():
        raise AmgError(f"--base-checkpoint {args.base_checkpoint}: file not found (expected the base weights the "
                       f"adapter checkpoint {checkpoint} was trained on)")
    device = _check_device(args.device)
    return Predictor.from_checkpoint(checkpoint, model=args.model, device=device, precision=args.precision,
                                     base_checkpoint=args.base_checkpoint)


def image_ids(images: Sequence[Path]) -> list[int]:
    """COCO image ids of ``images``: their stems when all are integers that differ as numbers, else 1, 2, ...

    Mixing the two schemes could give two images one id (``2.jpg`` and the second of ``a.jpg``, ``b.jpg``), and
    so could stems such as ``7`` and ``007``.
    """
    if all(p.stem.isascii() and p.stem.isdigit() for p in images):
        numbers = [int(p.stem) for p in images]
        if len(set(numbers)) == len(numbers):
            return numbers
    return list(range(1, len(images) + 1))


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    text = json.dumps(obj)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _write_png_folder(folder: Path, masks: list[Any]) -> None:
    """Replace ``folder`` with one that holds exactly ``0.png``, ``1.png``, ... (one per mask, 0/255).

    The PNGs go to a new temporary folder that then takes the old one's place, so masks of an earlier run on the
    same image (more masks, other settings) never stay beside the new ones. A folder holding anything else is
    not ours to replace: that is an error.
    """
    import shutil
    import tempfile

    import cv2
    import numpy as np

    if folder.exists():
        if not folder.is_dir():
            raise AmgError(f"{folder} is a file, where the PNG masks of {folder.name} go; choose another --output")
        foreign = [p.name for p in folder.iterdir() if not (p.suffix == ".png" and p.stem.isdigit())]
        if foreign:
            raise AmgError(f"{folder} holds files that samtune amg did not write ({', '.join(sorted(foreign)[:3])}); "
                           "choose another --output")
    fresh = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for i, mask in enumerate(masks):
            if not cv2.imwrite(str(fresh / f"{i}.png"), np.asarray(mask, dtype=np.uint8) * 255):
                raise AmgError(f"could not write {folder / f'{i}.png'}")
        fresh.chmod(new_dir_mode())  # mkdtemp makes private 0o700 folders
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        fresh.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from samtune.data.errors import SampleError
    from samtune.data.io import prepare_image, read_image, resolve_input_mapping
    from samtune.inference.amg import AutomaticMaskGenerator, to_coco_results, to_sa1b_json

    images = find_images(Path(args.input))
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise AmgError(f"--output must be a folder, but {output} is a file")
    if args.coco_results is not None and Path(args.coco_results).is_dir():
        raise AmgError(f"--coco-results must be a file, but {args.coco_results} is a folder")
    predictor = _load_predictor(args)
    try:
        mapping = resolve_input_mapping(predictor.input_mapping, bands=args.bands, intensity=args.intensity,
                                        percentiles=args.percentiles, window=args.window)
    except ValueError as err:
        raise AmgError(f"image reading: {err}") from err
    if not args.quiet:
        print(f"samtune amg: image reading {mapping}"
              + (" (recorded in the checkpoint)" if predictor.input_mapping else ""), file=sys.stderr)
    generator = AutomaticMaskGenerator(
        predictor,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        stability_score_offset=args.stability_score_offset,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
        crop_nms_thresh=args.crop_nms_thresh,
        crop_overlap_ratio=args.crop_overlap_ratio,
        crop_n_points_downscale_factor=args.crop_n_points_downscale_factor,
        min_mask_region_area=args.min_mask_region_area,
        output_mode=args.output_mode,
    )
    output.mkdir(parents=True, exist_ok=True)  # once the settings are known to be valid
    coco_results: list[dict[str, Any]] = []
    ids = image_ids(images)
    total = 0
    bar = tqdm(images, unit="image", disable=args.quiet, file=sys.stderr)
    for index, path in enumerate(bar):
        bar.set_postfix_str(path.name)
        try:
            image = prepare_image(read_image(path), **mapping, path=path)
        except SampleError as err:
            raise AmgError(f"cannot read image {err}") from err
        try:
            records = generator.generate(image)
        except ValueError as err:  # e.g. an image too elongated for the model's input: name the file
            raise AmgError(f"{path}: {err}") from err
        total += len(records)
        info = {"image_id": ids[index], "file_name": path.name, "height": image.shape[0], "width": image.shape[1]}
        segmentation = "uncompressed_rle" if args.output_mode == "uncompressed_rle" else "coco_rle"
        if args.output_mode == "binary_mask":
            _write_png_folder(output / path.stem, [rec["segmentation"] for rec in records])
        _write_json(output / f"{path.stem}.json", to_sa1b_json(records, info, segmentation=segmentation))
        if args.coco_results is not None:
            coco_results.extend(to_coco_results(records, info["image_id"]))
    if args.coco_results is not None:
        target = Path(args.coco_results)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_json(target, coco_results)
    if not args.quiet:
        print(f"samtune amg: {total} masks for {len(images)} image(s) written to {output}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``samtune amg`` (see the module docstring). Returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exit_:  # --help (0) or a usage error (2, message already printed)
        return int(exit_.code or 0)
    try:
        return run(args)
    except (AmgError, ValueError) as err:  # CheckpointError is a ValueError
        # `samtune amg --traceback` reaches here as SAMTUNE_TRACEBACK=1 (samtune.cli.main takes the flag off)
        if os.environ.get("SAMTUNE_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"samtune amg: error: {err}", file=sys.stderr)
        return 1
