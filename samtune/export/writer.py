"""``samtune export``'s engine: read a checkpoint, write official ``.pth``, safetensors or ONNX with metadata."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from samtune.checkpoints import cpu_state, save_checkpoint, sha256sum
from samtune.export.loading import LoadedCheckpoint, load_sam
from samtune.files import atomic_write
from samtune.export.metadata import FORMAT, FORMAT_VERSION, SAFETENSORS_KEY, preprocessing_info, write_sidecar
from samtune.modeling.sam import Sam

__all__ = ["ExportFormat", "FORMATS", "ExportResult", "export_pth", "export_safetensors", "export_checkpoint", "build_metadata"]

ExportFormat = Literal["pth", "safetensors", "onnx", "onnx-encoder"]
FORMATS: tuple[str, ...] = ("pth", "safetensors", "onnx", "onnx-encoder")
# Options of export_checkpoint that only some formats take (a value other than the default elsewhere is an error).
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "opset": ("onnx", "onnx-encoder"),
    "return_single_mask": ("onnx",),
    "use_stability_score": ("onnx",),
    "return_extra_metrics": ("onnx",),
    "gelu_approximate": ("onnx",),
    "include_preprocessing": ("onnx-encoder",),
    "verify": ("onnx", "onnx-encoder"),
}


def inapplicable_options(format: str, given: dict[str, Any]) -> list[str]:
    """The names in ``given`` (option -> value; None / False = not given) that ``format`` does not take."""
    return [name for name, value in given.items()
            if value not in (None, False) and format not in FORMAT_OPTIONS.get(name, FORMATS)]


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    output: Path
    metadata_path: Path
    metadata: dict[str, Any]
    loaded: LoadedCheckpoint


def export_pth(model: Sam, path: str | Path) -> Path:
    """Write the official SAM ``.pth``: a plain state dict with ``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*`` keys that ``segment_anything.sam_model_registry[...](checkpoint=path)`` loads strictly."""
    path = Path(path)
    if path.suffix == ".safetensors":
        raise ValueError(f"output {path}: a .safetensors name for the pth format; use --format safetensors")
    return save_checkpoint(model, path)


def export_safetensors(model: Sam, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the weights (official key layout) as safetensors, with ``metadata`` as JSON in the header."""
    from safetensors.torch import save_file

    state = cpu_state(model.state_dict(), path)
    header = {"format": "pt"}
    if metadata is not None:
        header[SAFETENSORS_KEY] = json.dumps(metadata, default=str)
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))


def _version() -> str:
    import samtune

    return str(getattr(samtune, "__version__", "unknown"))


def build_metadata(loaded: LoadedCheckpoint, weights_format: str, onnx: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata of an export (see :mod:`samtune.export.metadata` for the keys)."""
    source = loaded.source
    adaptation = None
    if loaded.adaptation is not None:
        adaptation = {"config": loaded.adaptation, "merged": loaded.merged}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": loaded.name,
        "weights_format": weights_format,
        "preprocessing": preprocessing_info(loaded.model),
        "samtune_version": _version(),
        "torch_version": torch.__version__,
        "source_checkpoint": {"path": str(source.resolve()), "kind": loaded.kind, "sha256": sha256sum(source)},
        "training_config": loaded.training_config,
        "adaptation": adaptation,
        "input_mapping": loaded.input_mapping,
    }
    if onnx is not None:
        meta["onnx"] = onnx
    return meta


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    format: ExportFormat,
    *,
    model: str | None = None,
    merge: bool = False,
    base_checkpoint: str | Path | None = None,
    opset: int | None = None,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    gelu_approximate: bool = False,
    include_preprocessing: bool = False,
    verify: bool = False,
) -> ExportResult:
    """Read ``checkpoint`` (any kind :func:`samtune.export.load_sam` reads) and write it as ``format``.

    Args:
        checkpoint: input weights.
        output: output file; its metadata goes to ``output + ".json"`` (and into the safetensors header).
        format: ``pth`` (official SAM layout), ``safetensors``, ``onnx`` (prompt encoder + mask decoder with
            the official ONNX interface), ``onnx-encoder`` (image encoder).
        model: registry name (None: inferred).
        merge: merge LoRA/adapters into the base weights. Required for ``pth`` and ONNX when the checkpoint is
            adapted (those formats hold plain SAM weights only); without it a safetensors export keeps the
            adapter tensors and records their config in the metadata.
        base_checkpoint: base weights of an adapter-only checkpoint.
        opset / return_single_mask / use_stability_score / return_extra_metrics / gelu_approximate: ONNX
            decoder options (:func:`samtune.export.onnx.export_onnx_decoder`); ``opset`` (default 17) >= 14 for
            both ONNX formats.
        include_preprocessing: ``onnx-encoder`` takes resized 0-255 images and normalises/pads in-graph.
        verify: compare the ONNX file with PyTorch in onnxruntime.

    Returns:
        The paths written and the metadata.

    Raises:
        CheckpointError: the input cannot be read or its model cannot be inferred, or ``model`` differs from
            the model an adapter checkpoint records.
        ValueError: unknown format, an option the format does not take (:data:`FORMAT_OPTIONS`), an ONNX
            ``opset`` below 14, an ``output`` that is a directory, or an adapted checkpoint exported to pth/ONNX
            without ``merge``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    given = dict(opset=opset, return_single_mask=return_single_mask, use_stability_score=use_stability_score,
                 return_extra_metrics=return_extra_metrics, gelu_approximate=gelu_approximate,
                 include_preprocessing=include_preprocessing, verify=verify)
    wrong = inapplicable_options(format, given)
    if wrong:
        raise ValueError(f"format {format!r} does not take "
                         + ", ".join(f"{n} (only {' / '.join(FORMAT_OPTIONS[n])})" for n in wrong))
    opset = 17 if opset is None else opset
    output = Path(output)
    if output.is_dir():  # before the (possibly slow) load and export
        raise ValueError(f"output {output} is a directory; give the path of the file to write (e.g. "
                         f"{output / ('model.' + format.removesuffix('-encoder'))})")
    if format in ("onnx", "onnx-encoder"):
        from samtune.export.onnx import check_opset

        check_opset(opset)  # before the (possibly slow) load
    loaded = load_sam(checkpoint, model, base_checkpoint=base_checkpoint, merge_adapters=merge)
    if loaded.adaptation is not None and not loaded.merged and format != "safetensors":
        method = loaded.adaptation.get("method")
        remedy = ("pass --merge (merge=True) to merge the LoRA weights into them" if method != "adapter" else
                  "bottleneck adapters cannot be merged into them: export with --format safetensors (base + "
                  "adapters in one file, loaded unmerged by Predictor.from_checkpoint and "
                  "samtune.export.load_sam(path, merge_adapters='auto')), or ship the adapter checkpoint itself "
                  "with its base weights")
        raise ValueError(f"checkpoint {checkpoint} is adapted ({method}); the {format} format holds plain SAM "
                         f"weights only: {remedy}")
    sam = loaded.model.float()
    onnx_info: dict[str, Any] | None = None
    if format in ("onnx", "onnx-encoder"):
        from samtune.export import onnx as onnx_export

        if format == "onnx":
            onnx_export.export_onnx_decoder(
                sam, output, opset=opset, return_single_mask=return_single_mask,
                use_stability_score=use_stability_score, return_extra_metrics=return_extra_metrics,
                gelu_approximate=gelu_approximate, verify=verify,
            )
            onnx_info = {
                "part": "prompt_encoder+mask_decoder",
                "opset": opset,
                "inputs": list(onnx_export.DECODER_INPUT_NAMES),
                "outputs": list(onnx_export.decoder_output_names(return_extra_metrics)),
                "return_single_mask": return_single_mask,
                "use_stability_score": use_stability_score,
                "return_extra_metrics": return_extra_metrics,
                "gelu_approximate": gelu_approximate,
                "point_coords_frame": "model input pixels (ResizeLongestSide applied); box = points labelled 2, 3; "
                                      "without a box append (0, 0) labelled -1",
            }
        else:
            onnx_export.export_onnx_encoder(sam, output, opset=opset, include_preprocessing=include_preprocessing, verify=verify)
            onnx_info = {
                "part": "image_encoder",
                "opset": opset,
                "inputs": ["input_image" if include_preprocessing else "x"],
                "outputs": ["image_embeddings"],
                "include_preprocessing": include_preprocessing,
                "input_convention": (
                    "[1, 3, h, w] float RGB 0-255, resized so that the longest side is image_size, not normalised, "
                    "not padded" if include_preprocessing else "[B, 3, S, S] float, normalised and padded"
                ),
            }
        metadata = build_metadata(loaded, format, onnx_info)
    else:
        metadata = build_metadata(loaded, format)
        if format == "pth":
            export_pth(sam, output)
        else:
            export_safetensors(sam, output, metadata)
    side = write_sidecar(output, metadata)
    return ExportResult(output, side, metadata, loaded)
