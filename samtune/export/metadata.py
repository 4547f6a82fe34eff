"""Metadata written beside exported weights, so that an app knows how to feed the model.

Every export writes ``OUT.json`` (the output path with ``.json`` appended, e.g. ``model.pth.json``); a
safetensors export also embeds the same JSON in its header (``__metadata__["samtune"]``). The official
``.pth`` stays a plain state dict, loadable by ``segment_anything`` unchanged.

Keys: ``format`` (``"samtune-export"``), ``format_version``, ``model`` (registry name), ``weights_format``
(``pth``, ``safetensors``, ``onnx``, ``onnx-encoder``), ``preprocessing`` (``image_size``, ``normalization``,
``pixel_mean`` / ``pixel_std`` on 0-255 RGB or null for min-max, ``resize_interpolation``, ``resize``,
``padding``, ``image_format``), ``samtune_version``, ``source_checkpoint`` (``path``, ``kind``, ``sha256``),
``training_config`` (a Lightning checkpoint's hyper-parameters, or null), ``adaptation`` (the adaptation
config and whether it was merged, or null), ``input_mapping`` (how the training data turned image files into the
8-bit RGB input: ``bands``, ``intensity``, ``percentiles``, ``window``, the keyword arguments of
``samtune.data.io.prepare_image``; null when the source checkpoint does not record it), ``onnx`` (the ONNX
interface, for ONNX exports).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from samtune.files import atomic_write
from samtune.modeling.preprocessing import PIXEL_MEAN, PIXEL_STD
from samtune.modeling.sam import Sam

__all__ = ["FORMAT", "FORMAT_VERSION", "sidecar_path", "preprocessing_info", "write_sidecar", "read_export_metadata"]

FORMAT = "samtune-export"
FORMAT_VERSION = 1
SAFETENSORS_KEY = "samtune"


def sidecar_path(path: str | Path) -> Path:
    """``OUT.json`` for an output ``OUT`` (``model.pth`` -> ``model.pth.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def preprocessing_info(model: Sam) -> dict[str, Any]:
    """The input convention of ``model``: what an app must do to an image before the encoder."""
    sam_norm = model.normalization == "sam"
    return {
        "image_size": int(model.image_size),
        "resize": "longest_side",
        "resize_interpolation": model.resize_interpolation,
        "normalization": model.normalization,
        "pixel_mean": list(PIXEL_MEAN) if sam_norm else None,
        "pixel_std": list(PIXEL_STD) if sam_norm else None,
        "normalization_note": (
            "(pixel - pixel_mean) / pixel_std on 0-255 RGB" if sam_norm
            else "min-max scale the resized image to [0, 1] (no mean/std)"
        ),
        "padding": "bottom_right_zeros",
        "image_format": model.image_format,
        "mask_threshold": float(model.mask_threshold),
        "embedding_grid": list(model.prompt_encoder.image_embedding_size),
        "low_res_mask_size": int(model.low_res_size),
    }


def write_sidecar(path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``metadata`` as ``OUT.json`` beside ``path`` (atomically). Returns the JSON path."""
    text = json.dumps(metadata, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(text))


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata()
    except Exception:  # noqa: BLE001  (not a safetensors file: no embedded metadata)
        return None


def read_export_metadata(path: str | Path) -> dict[str, Any] | None:
    """The samtune export metadata of a weights file: its ``OUT.json`` or its safetensors header; else None.

    Raises:
        ValueError: the sidecar or embedded JSON exists but is not valid JSON (names the file).
    """
    path = Path(path)
    side = sidecar_path(path)
    if side.is_file():
        try:
            data = json.loads(side.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"export metadata {side}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"export metadata {side}: expected a JSON object, got {type(data).__name__}")
        return data
    with open(path, "rb") as fh:
        head = fh.read(9)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        embedded = (_safetensors_metadata(path) or {}).get(SAFETENSORS_KEY)
        if embedded is not None:
            try:
                return json.loads(embedded)
            except json.JSONDecodeError as err:
                raise ValueError(f"export metadata in {path} (safetensors header key {SAFETENSORS_KEY!r}): not valid JSON ({err})") from err
    return None
