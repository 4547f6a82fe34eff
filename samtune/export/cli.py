"""``samtune export``: write official-format ``.pth``, safetensors, merged LoRA/adapter weights or ONNX.

Examples::

    samtune export --checkpoint runs/last.ckpt --format pth --output sam_finetuned.pth
    samtune export --checkpoint lite_medsam.pth --format onnx --output lite_medsam_decoder.onnx --return-single-mask
    samtune export --checkpoint sam_vit_b_01ec64.pth --format onnx-encoder --output encoder.onnx
    samtune export --checkpoint runs/lora.ckpt --format safetensors --output merged.safetensors --merge

Each export writes ``OUTPUT.json`` beside the weights (model name, preprocessing convention, samtune version,
source checkpoint, training config); the ``.pth`` itself stays a plain state dict that
``segment_anything.sam_model_registry[...](checkpoint=...)`` loads unchanged.
"""
from __future__ import annotations

import argparse

from samtune.export.writer import FORMAT_OPTIONS, FORMATS, inapplicable_options

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # whole option names only: a prefix must not silently stand for an option
        prog="samtune export",
        description="Write a checkpoint (official SAM .pth, MobileSAM, LiteMedSAM, safetensors, samtune export or "
                    "training .ckpt) as official-format .pth, safetensors or ONNX, with OUTPUT.json metadata.",
    )
    parser.add_argument("--checkpoint", required=True, help="input weights file")
    parser.add_argument("--model", default=None,
                        help="registry name (sam_vit_b, lite_medsam, ...); default: from metadata/hyper-parameters or "
                             "inferred from the tensor shapes")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="pth: official SAM layout; safetensors; onnx: prompt encoder + mask decoder (official "
                             "ONNX interface); onnx-encoder: image encoder")
    parser.add_argument("--output", required=True, help="output file (metadata goes to OUTPUT.json)")
    parser.add_argument("--merge", action="store_true",
                        help="merge LoRA into the base weights (required for pth/onnx of LoRA checkpoints; bottleneck "
                             "adapters cannot be merged: export them with --format safetensors)")
    parser.add_argument("--base-checkpoint", default=None, help="base model weights of an adapter-only checkpoint")
    onnx = parser.add_argument_group("ONNX")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset, 14 or later (default 17)")
    onnx.add_argument("--return-single-mask", action="store_true",
                      help="decoder: output only the best mask (token 0 for > 2 points, else the best multimask one)")
    onnx.add_argument("--use-stability-score", action="store_true",
                      help="decoder: scores are the stability score of the low-res masks instead of the predicted IoU")
    onnx.add_argument("--return-extra-metrics", action="store_true",
                      help="decoder: also output stability_scores and areas of the upscaled masks")
    onnx.add_argument("--gelu-approximate", action="store_true", help="decoder: tanh-approximated GELU")
    onnx.add_argument("--include-preprocessing", action="store_true",
                      help="onnx-encoder: input is the resized 0-255 RGB image [1, 3, h, w]; normalisation and "
                           "padding run in the graph")
    onnx.add_argument("--no-verify", action="store_true",
                      help="skip the onnxruntime-vs-PyTorch check of the exported graph (done when onnxruntime is installed)")
    return parser


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str]) -> int:
    """Run ``samtune export``; returns 0 on success (usage errors exit 2).

    Errors (unreadable checkpoint, adapted checkpoint without ``--merge``, bad ``--opset``, ...) are raised, as by
    the other subcommands: ``samtune``'s entry point (:func:`samtune.cli.main`) prints them on one line and exits
    1, or shows the traceback with ``--traceback`` / ``SAMTUNE_TRACEBACK=1``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    wrong = inapplicable_options(args.format, {name: getattr(args, name) for name in FORMAT_OPTIONS if name != "verify"})
    if wrong:  # e.g. --include-preprocessing with --format onnx: the decoder would be written without it
        parser.error("; ".join(f"--{n.replace('_', '-')} applies to --format {' / '.join(FORMAT_OPTIONS[n])}, not "
                               f"{args.format}" for n in wrong))
    from samtune.checkpoints import CheckpointError
    from samtune.export.onnx import OnnxExportError
    from samtune.export.writer import export_checkpoint

    is_onnx = args.format.startswith("onnx")
    verify = is_onnx and not args.no_verify and _onnxruntime_available()
    try:
        result = export_checkpoint(
            args.checkpoint, args.output, args.format,
            model=args.model, merge=args.merge, base_checkpoint=args.base_checkpoint, opset=args.opset,
            return_single_mask=args.return_single_mask, use_stability_score=args.use_stability_score,
            return_extra_metrics=args.return_extra_metrics, gelu_approximate=args.gelu_approximate,
            include_preprocessing=args.include_preprocessing, verify=verify,
        )
    except (CheckpointError, OnnxExportError, ValueError) as err:
        if isinstance(err, CheckpointError) and "cannot infer the model" in str(err) and len(err.args) == 1:
            err.args = (f"{err} (on the command line: --model NAME)",)  # same exception: --traceback shows it
        raise
    loaded = result.loaded
    size_mb = result.output.stat().st_size / 2**20
    merged = " (adapters merged)" if loaded.merged else ""
    print(f"samtune export: wrote {result.output} ({args.format}, model {loaded.name}{merged}, {size_mb:.1f} MB) "
          f"from {loaded.source} ({loaded.kind})")
    if is_onnx:
        print("samtune export: " + ("onnxruntime reproduces PyTorch on example inputs (atol 1e-3)" if verify
                                    else "not verified (onnxruntime not installed or --no-verify)"))
    print(f"samtune export: metadata in {result.metadata_path}")
    return 0
