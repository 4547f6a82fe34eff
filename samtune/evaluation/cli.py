"""``samtune evaluate``: the SAM paper's point / box / interactive-click protocols on a dataset.

Examples::

    samtune evaluate --checkpoint lite_medsam.pth \\
        --data mask_folder --images em/image --masks em/label --mask-type components --connectivity 4 \\
        --protocols point,box,box_jitter,clicks --clicks 5 --output eval/
    samtune evaluate --checkpoint sam_vit_b_01ec64.pth \\
        --data coco --annotations val2017.json --images val2017/ --max-images 100 --output eval/
    samtune evaluate --config recipes/medical.yaml --checkpoint runs/last.ckpt --output eval/

Images are read with the dataset layer's evaluation transforms at the model's input size and normalisation
(what validation does). Results: a table on stdout and, in ``--output``, ``<name>.json``, ``<name>_masks.csv``,
``summary.csv`` and ``iou_vs_clicks.png`` (see :mod:`samtune.evaluation.report`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from samtune.argtypes import comma_separated, integer, number
from samtune.bundled import resolve_config_path
from samtune.evaluation.protocols import PROTOCOLS, ProtocolConfig
from samtune.evaluation.report import format_table, safe_name, write_report
from samtune.evaluation.runner import dataset_options, evaluate
from samtune.metrics import check_noc_thresholds

__all__ = ["build_parser", "load_model", "main"]

GENERIC_FOLDER_NAMES = {"image", "images", "img", "imgs", "jpegimages", "input_images", "train", "val", "test",
                        "annotations", "label", "labels", "masks"}
DATA_FLAGS = ("data", "images", "masks", "annotations", "split_file", "mask_suffix", "mask_type", "background",
              "ignore_values", "min_area", "connectivity", "category_ids", "include_crowd", "intensity",
              "percentiles", "window", "bands", "crop_size", "tile_overlap", "max_mask_area_fraction",
              "on_error")


def load_model(
    checkpoint: str | Path, model: str | None, base_checkpoint: str | Path | None = None
) -> torch.nn.Module:
    """The model to evaluate: any file ``samtune.Predictor.from_checkpoint`` loads.

    Args:
        checkpoint: official ``.pth``, MobileSAM / LiteMedSAM file, safetensors, samtune export, Lightning
            checkpoint, or adapter checkpoint (on its recorded base, or ``base_checkpoint``).
        model: registry name (``samtune.build.available_models()``); None infers it from the file.
        base_checkpoint: base weights of an adapter-only checkpoint (None: the ones it records).

    Raises:
        ValueError: the file does not exist (a mismatching file raises ``CheckpointError`` naming the missing /
            unexpected / mis-shaped keys).
    """
    return _load(checkpoint, model, base_checkpoint)[0]


def _load(checkpoint: str | Path, model: str | None, base_checkpoint: str | Path | None = None
          ) -> tuple[torch.nn.Module, str | None, dict[str, Any] | None]:
    """:func:`load_model`, the registry name of the model (given, or inferred from the file) and the input mapping
    its training recorded (``samtune.export.LoadedCheckpoint.input_mapping``)."""
    from samtune.export import load_sam

    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"--checkpoint {path}: file not found")
    if base_checkpoint is not None and not Path(base_checkpoint).is_file():
        raise ValueError(f"--base-checkpoint {base_checkpoint}: file not found (expected the base weights the "
                         f"adapter checkpoint {path} was trained on)")
    loaded = load_sam(path, model, base_checkpoint=base_checkpoint, merge_adapters="auto")
    return loaded.model, model if model is not None else loaded.name, loaded.input_mapping


# ------------------------------------------------------------------------------------------------ parsing
def _protocols(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in PROTOCOLS]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown protocol(s) {unknown or text!r}; choose from {','.join(PROTOCOLS)}")
    return items


_positive_int = integer(1, "a positive integer")
_non_negative_int = integer(0, "a non-negative integer")
_non_negative_float = number(0, expected="a non-negative number")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``samtune evaluate``."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # whole option names only: a prefix must not silently stand for an option
        prog="samtune evaluate",
        description="Evaluate a SAM checkpoint with the SAM paper's protocols: one click at the mask centre, "
                    "the ground-truth box (exact and jittered) and up to k corrective clicks (mIoU per click, "
                    "NoC@85/90). Writes <name>.json, <name>_masks.csv, summary.csv and iou_vs_clicks.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", help="weights: official .pth, MobileSAM/LiteMedSAM, safetensors, samtune/Lightning "
                                        "checkpoint (default with --config: the recipe's model.init_args.checkpoint)")
    g.add_argument("--model", help="registry name, e.g. sam_vit_b, lite_medsam (default: inferred from the "
                                   "checkpoint; with --config: the recipe's)")
    g.add_argument("--base-checkpoint", help="base weights of an adapter-only checkpoint (LoRA / adapters; "
                   "default: the path it records)")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="fp32 reproduces reference numbers; bf16/auto autocast encoder and decoder")

    g = parser.add_argument_group("data (one format, or --config)")
    g.add_argument("--data", choices=("mask_folder", "coco", "sa1b"), help="dataset format")
    g.add_argument("--images", help="image folder (sa1b: the folder of <name>.jpg + <name>.json; coco: default the "
                                    "annotation file's folder)")
    g.add_argument("--masks", help="mask_folder: folder of mask images paired with the images by name")
    g.add_argument("--annotations", help="coco: the instances JSON")
    g.add_argument("--split-file", help="mask_folder / sa1b: text file of image stems to evaluate")
    g.add_argument("--config", help="recipe YAML: evaluate the validation split of its `data` datamodule "
                                    "(model and checkpoint default to the recipe's)")
    g.add_argument("--name", help="dataset name in tables and file names (default: from the paths)")
    g = parser.add_argument_group("mask_folder options")
    g.add_argument("--mask-suffix", help="appended to the image stem to find its mask (default '')")
    g.add_argument("--mask-type", choices=("binary", "components", "instance", "semantic"),
                   help="how label images become instances (default instance)")
    g.add_argument("--background", type=int, help="background label (default 0)")
    g.add_argument("--ignore-values", type=comma_separated(int), help="labels that are neither object nor background")
    g.add_argument("--min-area", type=int, help="drop instances smaller than this, original pixels (default 0)")
    g.add_argument("--connectivity", type=int, choices=(4, 8), help="connected components (default 8)")
    g = parser.add_argument_group("coco options")
    g.add_argument("--category-ids", type=comma_separated(int), help="keep only these categories")
    g.add_argument("--include-crowd", action="store_true", default=None, help="also evaluate iscrowd annotations")
    g = parser.add_argument_group("image reading (all formats)")
    g.add_argument("--intensity", choices=("auto", "none", "minmax", "percentile", "window"),
                   help="intensity preset for 16-bit / float images (default auto)")
    g.add_argument("--percentiles", type=comma_separated(float, 2),
                   help="LO,HI for --intensity percentile (and auto, on images that are not 8-bit)")
    g.add_argument("--window", type=comma_separated(float, 2), help="LO,HI raw values; needs --intensity window")
    g.add_argument("--bands", type=comma_separated(int), help="1 or 3 band indices of multi-band images")
    g.add_argument("--crop-size", type=_positive_int, help="tile images into squares of this size first")
    g.add_argument("--tile-overlap", type=int, help="pixels shared by neighbouring tiles (each instance is "
                   "evaluated once, whole where a tile holds it whole)")
    g.add_argument("--max-mask-area-fraction", type=float,
                   help="drop masks covering more of the image (default: the format's: 1.0, SA-1B 0.9)")
    g.add_argument("--on-error", choices=("raise", "skip"), help="bad samples: stop (default) or skip them")
    g.add_argument("--max-masks-per-image", type=_positive_int, help="seeded subset per image (default: all masks)")
    g.add_argument("--max-images", type=_positive_int,
                   help="evaluate only the first N samples: images, or tiles with --crop-size")

    g = parser.add_argument_group("protocols")
    g.add_argument("--protocols", type=_protocols, default=list(PROTOCOLS), help="comma-separated subset")
    g.add_argument("--clicks", type=_positive_int, default=5, help="k, click rounds of the clicks protocol (NoC cap)")
    g.add_argument("--first-click", choices=("multimask", "single"), default="multimask",
                   help="click 1: keep the most confident of the 3 multimask outputs (SAM paper) or the single output")
    g.add_argument("--later-clicks", choices=("single", "multimask"), default="single",
                   help="clicks 2..k: single-mask output (SAM) or the most confident multimask output")
    g.add_argument("--no-mask-feedback", action="store_true",
                   help="do not feed the previous round's logits back as the mask prompt")
    g.add_argument("--box-noise-std", type=_non_negative_float, default=0.1,
                   help="box_jitter: noise std as a fraction of the side")
    g.add_argument("--box-noise-max", type=_non_negative_float, default=20.0,
                   help="box_jitter: noise std cap, model-input pixels")
    g.add_argument("--iou-resolution", choices=("original", "input"), default="original",
                   help="compute clicks and IoUs on the GT at the image's resolution (paper) or the model input's")
    g.add_argument("--coordinate-mapping", choices=("official", "area"), default="official",
                   help="GT pixel -> model-input coordinates: x * scale like SamPredictor.transform (official) or "
                        "by pixel area ((x + 0.5) * scale - 0.5; box ends at (x1 + 1) * scale - 1)")
    g.add_argument("--noc-thresholds", type=comma_separated(float), default=[0.85, 0.90], help="IoU thresholds of NoC")
    g.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of the box jitter and of --max-masks-per-image")

    g = parser.add_argument_group("run and output")
    g.add_argument("--output", required=True, help="folder for the JSON / CSV / PNG reports")
    g.add_argument("--batch-size", type=_positive_int, default=4,
                   help="images per encoder call; their masks are decoded together")
    g.add_argument("--max-masks-per-call", type=_positive_int, default=128,
                   help="masks per decoder call (bounds memory: ~10 MB per mask)")
    g.add_argument("--num-workers", type=_non_negative_int, default=2, help="DataLoader worker processes")
    g.add_argument("--no-plot", action="store_true", help="skip iou_vs_clicks.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


# ------------------------------------------------------------------------------------------------ datasets
def _default_name(*paths: str | None) -> str:
    for text in paths:
        if not text:
            continue
        path = Path(text).resolve()
        stem = path.stem if path.suffix else path.name
        if stem.lower() in GENERIC_FOLDER_NAMES and path.parent.name:
            return path.parent.name
        return stem
    return "dataset"


def _image_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"seed": args.seed}
    for key in ("intensity", "bands", "crop_size", "tile_overlap", "max_mask_area_fraction", "on_error"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    for key in ("percentiles", "window"):
        if getattr(args, key) is not None:
            options[key] = tuple(getattr(args, key))
    return options


def _check_intensity_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           recorded: dict[str, Any] | None = None) -> None:
    """--window and --percentiles only act through their --intensity preset (given, else the one the checkpoint
    records, else auto): otherwise they would be silently ignored (``auto`` applies the percentiles to images
    that are not 8-bit)."""
    kept = (recorded or {}).get("intensity")
    intensity = args.intensity or kept or "auto"
    got = (f" (got --intensity {args.intensity})" if args.intensity is not None
           else f" (the checkpoint records intensity {kept})" if kept is not None else "")
    if args.window is not None and intensity != "window":
        parser.error(f"--window needs --intensity window{got}")
    if args.percentiles is not None and intensity not in ("percentile", "auto"):
        parser.error(f"--percentiles needs --intensity percentile or auto{got}")


def _require(parser: argparse.ArgumentParser, args: argparse.Namespace, fmt: str, *flags: str) -> None:
    missing = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is None]
    if missing:
        parser.error(f"--data {fmt} needs {' and '.join(missing)}")


def _refuse(parser: argparse.ArgumentParser, args: argparse.Namespace, fmt: str, *flags: str) -> None:
    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
    if given:
        parser.error(f"{', '.join(given)} do(es) not apply to --data {fmt}")


def build_dataset(
    parser: argparse.ArgumentParser, args: argparse.Namespace, base: dict[str, Any]
) -> tuple[Any, str]:
    """The evaluation dataset of the ``--data`` flags and its default name."""
    from samtune.data import COCODataset, MaskFolderDataset, SA1BDataset

    folder_flags = ("masks", "mask_suffix", "mask_type", "background", "ignore_values", "min_area", "connectivity")
    options = {**_image_options(args), **base}
    if args.data == "mask_folder":
        _require(parser, args, "mask_folder", "images", "masks")
        _refuse(parser, args, "mask_folder", "annotations", "category_ids", "include_crowd")
        extra = {k: getattr(args, k) for k in folder_flags[1:] if getattr(args, k) is not None}
        for path, flag in ((args.images, "--images"), (args.masks, "--masks")):
            if not Path(path).is_dir():
                raise ValueError(f"{flag} {path}: not a folder")
        dataset = MaskFolderDataset(args.images, args.masks, split_file=args.split_file, **extra, **options)
        if len(dataset) == 0:
            raise ValueError(f"--images {args.images}: no images (png, jpg, jpeg, bmp, tif, tiff, webp) found")
        return dataset, _default_name(args.images)
    if args.data == "coco":
        _require(parser, args, "coco", "annotations")
        _refuse(parser, args, "coco", *folder_flags, "split_file")
        if not Path(args.annotations).is_file():
            raise ValueError(f"--annotations {args.annotations}: file not found (expected a COCO instances JSON)")
        if args.images is not None and not Path(args.images).is_dir():
            raise ValueError(f"--images {args.images}: not a folder")
        dataset = COCODataset(args.annotations, image_dir=args.images, category_ids=args.category_ids,
                              include_crowd=bool(args.include_crowd), **options)
        if len(dataset) == 0:
            raise ValueError(f"--annotations {args.annotations}: no image with a usable annotation")
        return dataset, _default_name(args.annotations)
    _require(parser, args, "sa1b", "images")
    _refuse(parser, args, "sa1b", *folder_flags, "annotations", "category_ids", "include_crowd")
    if not Path(args.images).is_dir():
        raise ValueError(f"--images {args.images}: not a folder (expected SA-1B <name>.jpg + <name>.json files)")
    dataset = SA1BDataset(args.images, split_file=args.split_file, **options)
    if len(dataset) == 0:
        raise ValueError(f"--images {args.images}: no SA-1B <name>.json annotation files found")
    return dataset, _default_name(args.images)


def _read_recipe(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {file}: file not found")
    try:
        content = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {file}: invalid YAML ({exc})") from exc
    if not isinstance(content, dict) or not isinstance(content.get("data"), dict):
        raise ValueError(f"--config {file}: no `data:` section (expected a recipe with data.class_path/init_args)")
    return content


def _datamodule_class(class_path: str) -> Any:
    """The class a recipe's ``class_path`` names (short names: samtune's datamodules); None if there is none."""
    import importlib

    import samtune.data.cached as cached
    import samtune.data.datamodules as datamodules

    if "." not in class_path:
        return getattr(datamodules, class_path, None) or getattr(cached, class_path, None)
    module, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None


def dataset_from_recipe(recipe: dict[str, Any], path: str, base: dict[str, Any]) -> Any:
    """The validation dataset of a recipe's ``data`` section, rebuilt with the evaluation options ``base``.

    A ``CachedEmbeddingDataModule`` is unwrapped: evaluation runs the image encoder on the images, so the
    datamodule it caches (its ``init_args.data``) is evaluated.
    """
    from samtune.data.cached import CachedEmbeddingDataModule
    from samtune.data.datamodules import SegmentationDataModule

    key, section = "data", recipe["data"]
    while True:
        class_path = section.get("class_path") if isinstance(section, dict) else None
        if not isinstance(class_path, str):
            raise ValueError(f"--config {path}: {key}.class_path is missing (e.g. MaskFolderDataModule)")
        cls = _datamodule_class(class_path)
        if not (isinstance(cls, type) and issubclass(cls, CachedEmbeddingDataModule)):
            break
        key, section = f"{key}.init_args.data", (section.get("init_args") or {}).get("data")
    if not (isinstance(cls, type) and issubclass(cls, SegmentationDataModule)):
        raise ValueError(f"--config {path}: {key}.class_path {class_path!r} is not a samtune datamodule "
                         "(SA1BDataModule, COCODataModule, MaskFolderDataModule, or a CachedEmbeddingDataModule "
                         "wrapping one)")
    init_args = dict(section.get("init_args") or {})
    init_args.update({k: v for k, v in base.items() if k != "train"})
    try:
        module = cls(**init_args)
        _, val = module.build_datasets()
    except TypeError as exc:
        raise ValueError(f"--config {path}: {key}.init_args do not fit {cls.__name__}: {exc}") from exc
    return val


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> int:
    """Run ``samtune evaluate`` with ``argv`` (the arguments after ``evaluate``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe: dict[str, Any] | None = None
    if args.config is not None:
        given = [f"--{f.replace('_', '-')}" for f in DATA_FLAGS if getattr(args, f) is not None]
        if given:
            parser.error(f"--config takes the data settings from the recipe; drop {', '.join(given)}")
        args.config = resolve_config_path(args.config)  # recipes/X.yaml: the bundled recipe without a checkout
        recipe = _read_recipe(args.config)
        model_section = recipe.get("model") if isinstance(recipe.get("model"), dict) else {}
        model_args = model_section.get("init_args") or {}
        args.model = args.model or model_args.get("model")
        args.checkpoint = args.checkpoint or model_args.get("checkpoint")
    elif args.data is None:
        parser.error("give the dataset with --data {mask_folder,coco,sa1b} (and its paths) or --config RECIPE")
    elif args.intensity is not None:
        _check_intensity_flags(parser, args)  # before loading the model; else once it tells its recorded mapping
    if args.checkpoint is None:
        parser.error("--checkpoint is required")
    try:
        check_noc_thresholds(args.noc_thresholds)
    except ValueError as exc:
        parser.error(f"--noc-thresholds: {exc}")
    if args.name is not None:
        try:
            safe_name(args.name)  # the report's file names; checked before the model loads and the run starts
        except ValueError:
            parser.error(f"--name {args.name!r}: no usable characters for a file name (letters, digits, - _ .)")
    config = ProtocolConfig(
        protocols=tuple(args.protocols), num_clicks=args.clicks,
        first_click_multimask=args.first_click == "multimask", later_clicks_multimask=args.later_clicks == "multimask",
        feed_back_mask=not args.no_mask_feedback,
        box_noise_std_fraction=args.box_noise_std, box_noise_max=args.box_noise_max, seed=args.seed,
        max_masks_per_call=args.max_masks_per_call, iou_resolution=args.iou_resolution,
        coordinate_mapping=args.coordinate_mapping, noc_thresholds=tuple(args.noc_thresholds),
    )
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out}: exists and is not a folder")
    from samtune.data.io import resolve_input_mapping

    model, model_name, recorded = _load(args.checkpoint, args.model, args.base_checkpoint)
    base = dataset_options(model, config, args.max_masks_per_image)
    mapping = None
    if recipe is None:
        _check_intensity_flags(parser, args, recorded)
        try:  # flags given replace the mapping the checkpoint's training recorded, setting by setting
            mapping = resolve_input_mapping(recorded, bands=args.bands, intensity=args.intensity,
                                            percentiles=args.percentiles, window=args.window)
        except ValueError as err:
            parser.error(f"image reading (--intensity, --percentiles, --window, --bands): {err}")
        args.bands, args.intensity, args.percentiles, args.window = (
            mapping["bands"], mapping["intensity"], mapping["percentiles"], mapping["window"])
    if recipe is not None:
        # --seed replaces the recipe's data seed (which mask subset --max-masks-per-image keeps), as with --data
        dataset = dataset_from_recipe(recipe, args.config, {**base, "seed": args.seed})
        default_name = Path(args.config).stem
    else:
        dataset, default_name = build_dataset(parser, args, base)
    name = args.name or default_name
    report = evaluate(
        model, dataset, config, name=name, batch_size=args.batch_size, num_workers=args.num_workers,
        device=args.device, precision=args.precision, max_images=args.max_images, progress=not args.quiet,
        metadata={"model": model_name, "checkpoint": str(args.checkpoint),
                  **({} if args.base_checkpoint is None else {"base_checkpoint": str(args.base_checkpoint)}),
                  "data": args.data or f"config:{args.config}",
                  **({} if mapping is None else {"input_mapping": mapping})},
    )
    paths, warnings = write_report(report, out, plot=not args.no_plot)
    print(format_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    for warning in warnings:
        print(f"samtune evaluate: warning: {warning}", file=sys.stderr)
    return 0
