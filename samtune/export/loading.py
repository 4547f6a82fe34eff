"""Load any supported checkpoint into a :class:`~samtune.modeling.Sam`, working out which model it is.

Supported files (all read without executing code: ``torch.load(weights_only=True)`` or safetensors):

* official SAM ``.pth`` (vit_b / vit_l / vit_h), MobileSAM ``mobile_sam.pt`` (vit_t), LiteMedSAM
  ``lite_medsam.pth``, any plain state dict or safetensors file of a registered model: the model is inferred
  from the tensor shapes (:func:`samtune.checkpoints.infer_model_name`);
* samtune exports (``samtune export``): the model name comes from their metadata (``OUT.json`` or the
  safetensors header);
* samtune training checkpoints (Lightning ``.ckpt``): the model name comes from the task's hyper-parameters,
  the ``model.`` prefix of the state dict is stripped;
* adapted models: an adapter-only checkpoint (``samtune.adapt.is_adapter_checkpoint``) is loaded by
  ``samtune.adapt.load_adapter_checkpoint``; a full checkpoint whose hyper-parameters (or export metadata)
  carry an ``adaptation`` config with ``method != "none"`` is rebuilt with ``samtune.adapt.apply_adaptation``
  before its weights are loaded. Either is merged into plain weights (``samtune.adapt.merge_adaptation``)
  unless ``merge_adapters=False``.

An explicit ``model`` name always wins over metadata, hyper-parameters and inference, except for an
adapter-only checkpoint: that is rebuilt on the model it records, and a different ``model`` is an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from samtune.build import available_models, build_sam
from samtune.checkpoints import INPUT_MAPPING_KEY, CheckpointError, infer_model_name, load_into, read_state_dict
from samtune.export.metadata import FORMAT, read_export_metadata
from samtune.modeling.sam import Sam

__all__ = ["LoadedCheckpoint", "load_sam", "CheckpointKind"]

CheckpointKind = Literal["state_dict", "safetensors", "lightning", "samtune_export", "adapter"]
_ADAPTER_MARKERS = ("lora_", ".adapter", "adapter.", "adapters.")
_ADAPTER_METADATA_KEY = "samtune_adapter"  # samtune.adapt.checkpoint.METADATA_KEY (not imported: peft is heavy)


@dataclass
class LoadedCheckpoint:
    """A model loaded from a file, with what is known about where it came from.

    Attributes:
        model: the model (CPU, float32, eval mode).
        name: registry name (None only for an unmerged adapter checkpoint whose base cannot be identified).
        source: the file.
        kind: what the file was.
        training_config: hyper-parameters of a Lightning checkpoint (or carried in export metadata).
        adaptation: the adaptation config (LoRA/adapters) of the weights, if any.
        merged: whether that adaptation was merged into the weights.
        metadata: samtune export metadata found with the file.
        input_mapping: how the training data turned image files into the model's 8-bit RGB input
            (:func:`samtune.data.io.prepare_image` keyword arguments), from a task checkpoint or export metadata;
            None where unknown.
    """

    model: Sam
    name: str | None
    source: Path
    kind: CheckpointKind
    training_config: dict[str, Any] | None = None
    adaptation: dict[str, Any] | None = None
    merged: bool = False
    metadata: dict[str, Any] | None = None
    input_mapping: dict[str, Any] | None = None


def _adapt_function(name: str, path: Path, why: str) -> Callable[..., Any]:
    """``samtune.adapt.<name>``, or a clear error saying that this installation lacks it."""
    try:
        from samtune import adapt
    except ImportError as err:
        raise CheckpointError(f"checkpoint {path}: {why}; that needs samtune.adapt, which failed to import ({err})") from err
    fn = getattr(adapt, name, None)
    if fn is None:
        raise CheckpointError(
            f"checkpoint {path}: {why}; that needs samtune.adapt.{name}(), which this version of samtune.adapt "
            "does not provide (adapter support is not installed)"
        )
    return fn


def _merge(sam: Sam, path: Path, why: str, how: bool | Literal["auto"]) -> tuple[Sam, bool]:
    """``samtune.adapt.merge_adaptation(sam)`` and whether it merged. An adaptation that cannot be merged by its
    kind (bottleneck adapters: ``AdapterMergeError``) stays unmerged with ``how="auto"``; that and any other failed
    merge (e.g. LoRA weights that merge to NaN) is a CheckpointError naming the file and how to load it unmerged."""
    merge = _adapt_function("merge_adaptation", path, why)
    try:
        return merge(sam), True
    except ValueError as err:
        # only the kind of adaptation excuses the merge; broken weights must not pass silently as "unmergeable"
        if how == "auto" and type(err).__name__ == "AdapterMergeError":
            return sam, False
        raise CheckpointError(
            f"checkpoint {path}: its adaptation cannot be merged into plain SAM weights ({err}); load it unmerged "
            "(merge_adapters=False), or export it without --merge as safetensors"
        ) from err


def _is_adapter_checkpoint(path: Path) -> bool:
    try:
        from samtune import adapt
    except ImportError:
        return False
    check = getattr(adapt, "is_adapter_checkpoint", None)
    return bool(check(path)) if check is not None else False


def _read_container(path: Path) -> dict[str, Any] | None:
    """The top-level dict of a torch checkpoint (tensors memory-mapped when possible), None for safetensors."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (legacy non-zip files cannot be memory-mapped)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj if isinstance(obj, dict) else None


def _adapter_metadata(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """The ``samtune_adapter`` metadata of an adapter checkpoint, the hyper-parameters of a Lightning checkpoint, and
    the input mapping (beside the metadata in a Lightning checkpoint, in it in a standalone adapter file); None for
    what the file lacks or when it cannot be read (the adapter loader then says why)."""
    try:
        container = _read_container(path)
        if container is None:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(_ADAPTER_METADATA_KEY)
            meta, hp, mapping = (json.loads(raw) if raw is not None else None), None, None
        else:
            meta, hp = container.get(_ADAPTER_METADATA_KEY), container.get("hyper_parameters")
            mapping = _input_mapping(container)
    except Exception:  # noqa: BLE001  (unreadable here: load_adapter_checkpoint reports it)
        return None, None, None
    if mapping is None and isinstance(meta, dict):  # a standalone adapter file keeps it in its metadata
        mapping = _input_mapping(None, meta)
    return (dict(meta) if isinstance(meta, dict) else None), (dict(hp) if isinstance(hp, dict) else None), mapping


def _input_mapping(container: dict[str, Any] | None, metadata: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The input mapping a task checkpoint records (:data:`samtune.checkpoints.INPUT_MAPPING_KEY`), else the
    one in export metadata, else None."""
    mapping = container.get(INPUT_MAPPING_KEY) if container is not None else None
    if not isinstance(mapping, dict) and metadata is not None:
        mapping = metadata.get("input_mapping")
    return dict(mapping) if isinstance(mapping, dict) else None


def _active(adaptation: Any) -> dict[str, Any] | None:
    """The adaptation config when it changes the model (``method`` other than ``"none"``), else None."""
    if adaptation is None:
        return None
    if isinstance(adaptation, dict):
        method = adaptation.get("method", "none")
        return None if method in (None, "none") else adaptation
    raise CheckpointError(f"adaptation config must be a dict with a 'method' key, got {type(adaptation).__name__}: {adaptation!r}")


def _check_name(name: str, where: str, path: Path, hint: str = "; pass the model name explicitly") -> str:
    if name not in available_models():
        raise CheckpointError(
            f"checkpoint {path}: {where} names model {name!r}, which is not registered "
            f"(available: {', '.join(available_models())}){hint}"
        )
    return name


def load_sam(
    path: str | Path,
    model: str | None = None,
    *,
    base_checkpoint: str | Path | None = None,
    merge_adapters: bool | Literal["auto"] = True,
) -> LoadedCheckpoint:
    """Load a checkpoint of any supported kind (see the module docstring).

    Args:
        path: the weights file.
        model: registry name; None: from export metadata, the training hyper-parameters, or the tensor shapes.
        base_checkpoint: base model weights for an adapter-only checkpoint (None: the ones it records).
        merge_adapters: merge LoRA/adapters into plain weights (faster inference, official layout); ``"auto"``:
            merge LoRA, keep bottleneck adapters (which cannot be merged) as modules instead of raising.

    Returns:
        The model (CPU, eval) and what was learned about the file.

    Raises:
        CheckpointError: missing/unreadable file, a model that cannot be inferred or does not fit, an adapter
            checkpoint recorded for another model than ``model``, or an adapted checkpoint without the
            ``samtune.adapt`` functions it needs.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if model is not None:
        _check_name(model, "the model argument", path, hint="")  # a typo: the list names the choices
    try:
        metadata = read_export_metadata(path) if path.is_file() else None
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    if metadata is not None and metadata.get("format") != FORMAT:
        metadata = None

    if _is_adapter_checkpoint(path):
        recorded, hparams, mapping = _adapter_metadata(path)
        recorded_name = recorded.get("model_name") if recorded is not None else None
        if model is not None and recorded_name is not None and model != recorded_name:
            raise CheckpointError(
                f"checkpoint {path}: an adapter checkpoint of model {recorded_name!r} (recorded in its "
                f"'{_ADAPTER_METADATA_KEY}' metadata), but the model argument is {model!r}; the adapter is always "
                f"rebuilt on {recorded_name!r}: drop the model argument (--model) or pass {recorded_name!r}"
            )
        loader = _adapt_function("load_adapter_checkpoint", path, "it is an adapter checkpoint")
        sam = loader(path, base_checkpoint=base_checkpoint)
        adaptation = _active(recorded.get("adaptation")) if recorded is not None else None
        merged = False
        if merge_adapters:
            sam, merged = _merge(sam, path, "merging its adapters", merge_adapters)
        name = model if model is not None else recorded_name
        if name is None and merged:
            try:
                name = infer_model_name(sam.state_dict(), str(path))
            except CheckpointError:
                name = None
        if mapping is None:
            mapping = _input_mapping(None, metadata)
        return LoadedCheckpoint(sam.eval(), name, path, "adapter", hparams, adaptation, merged, metadata, mapping)
    if base_checkpoint is not None:
        raise CheckpointError(
            f"checkpoint {path}: base_checkpoint is only used with adapter-only checkpoints, and this is not one "
            "(or samtune.adapt.is_adapter_checkpoint is not available)"
        )

    state = read_state_dict(path)
    container = _read_container(path)
    hparams: dict[str, Any] | None = None
    kind: CheckpointKind = "safetensors" if container is None else "state_dict"
    if container is not None and isinstance(container.get("state_dict"), dict) and (
        "hyper_parameters" in container or "pytorch-lightning_version" in container
    ):
        kind = "lightning"
        hp = container.get("hyper_parameters")
        hparams = dict(hp) if isinstance(hp, dict) else None
    if metadata is not None:
        kind = "samtune_export"
        if hparams is None and isinstance(metadata.get("training_config"), dict):
            hparams = metadata["training_config"]

    # Which adaptation (if any) the stored weights still need: Lightning hparams, or unmerged export metadata.
    adaptation = None
    if kind == "lightning" and hparams is not None:
        adaptation = _active(hparams.get("adaptation"))
    elif metadata is not None and isinstance(metadata.get("adaptation"), dict) and not metadata["adaptation"].get("merged", False):
        adaptation = _active(metadata["adaptation"].get("config"))

    if model is not None:
        name = model
    elif metadata is not None and metadata.get("model"):
        name = _check_name(str(metadata["model"]), "its export metadata", path)
    elif hparams is not None and hparams.get("model"):
        name = _check_name(str(hparams["model"]), "its hyper-parameters", path)
    else:
        if adaptation is None and any(m in k for k in state for m in _ADAPTER_MARKERS):
            _adapt_function("is_adapter_checkpoint", path, "it holds LoRA/adapter tensors")
        name = infer_model_name(state, str(path))

    sam = build_sam(name)
    merged = False
    if adaptation is not None:
        what = f"its weights are adapted ({adaptation.get('method')})"
        apply = _adapt_function("apply_adaptation", path, what)
        sam = apply(sam, adaptation) or sam
        load_into(sam, state, strict=True, source=str(path))
        if merge_adapters:
            sam, merged = _merge(sam, path, what, merge_adapters)
    else:
        load_into(sam, state, strict=True, source=str(path))
    if metadata is not None and isinstance(metadata.get("adaptation"), dict) and metadata["adaptation"].get("merged"):
        adaptation, merged = metadata["adaptation"].get("config"), True
    return LoadedCheckpoint(sam.eval(), name, path, kind, hparams, adaptation, merged, metadata,
                            _input_mapping(container, metadata))
