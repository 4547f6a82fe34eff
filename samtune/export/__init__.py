"""Export: official-format ``.pth``, safetensors, merged LoRA/adapters and ONNX, with metadata; loading of
any supported checkpoint (:func:`load_sam`).

``samtune export`` (:mod:`samtune.export.cli`) is the command line; :mod:`samtune.export.onnx` holds the
ONNX wrappers (imported on use).
"""
from samtune.export.loading import LoadedCheckpoint, load_sam
from samtune.export.metadata import preprocessing_info, read_export_metadata, sidecar_path
from samtune.export.writer import FORMATS, ExportResult, export_checkpoint, export_pth, export_safetensors

__all__ = [
    "LoadedCheckpoint",
    "load_sam",
    "read_export_metadata",
    "sidecar_path",
    "preprocessing_info",
    "FORMATS",
    "ExportResult",
    "export_checkpoint",
    "export_pth",
    "export_safetensors",
]
