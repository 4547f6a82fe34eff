"""Adapter checkpoints: the trainable weights of an adapted model plus what is needed to rebuild it.

A standalone adapter file (``.pt`` / ``.pth`` via ``torch.save``, or ``.safetensors``) holds

* metadata ``samtune_adapter``: ``format`` (``"samtune-adapter"``), ``format_version``, ``samtune_version``,
  ``model_name`` (registry name), ``base_checkpoint`` (path of the base weights as given when saving, or None),
  ``mae_checkpoint`` (None unless the base encoder was MAE-initialised), ``base_checkpoint_absolute`` /
  ``mae_checkpoint_absolute`` (the same made absolute at save time; absent in older files; loading prefers them),
  ``adaptation`` (the plain-dict :class:`AdaptationConfig`), ``trainable_keys``, ``base_fingerprint`` (per frozen
  tensor: float64 sum and absolute sum, and dtype, to recognise a wrong base), ``complete`` (whether the tensors
  cover every weight) and, when the training data's input mapping is known, ``input_mapping`` (the
  ``samtune.data.io.prepare_image`` keyword arguments: bands, intensity, percentiles, window; absent in older
  files);
* tensors: :func:`samtune.adapt.trainable_state_dict` only (LoRA / adapter weights, plus whatever the freeze
  policy trains, e.g. the mask decoder).

``.pt`` files are ``{"samtune_adapter": metadata, "state_dict": tensors}`` (plain containers: they load with
``torch.load(weights_only=True)``); safetensors files keep the metadata as JSON under the ``samtune_adapter``
header entry. Lightning checkpoints of an adapted :class:`samtune.tasks.PromptableSegmentationTask` carry the same
metadata and, by default, only the trainable weights (``model.``-prefixed): :func:`load_adapter_checkpoint` and
:func:`is_adapter_checkpoint` accept them too. Their input mapping sits beside that metadata
(:data:`samtune.checkpoints.INPUT_MAPPING_KEY`); :func:`read_adapter_checkpoint` returns it as the metadata's
``input_mapping``, so that files extracted from them keep it. All writes are atomic (temporary file + rename).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from samtune.adapt.config import AdaptationConfig
from samtune.adapt.core import (
    adaptation_of,
    apply_adaptation,
    base_fingerprint,
    compare_fingerprints,
    frozen_keys,
    trainable_state_dict,
)
from samtune.checkpoints import (
    INPUT_MAPPING_KEY,
    CheckpointError,
    check_has_data,
    cpu_state,
    init_encoder_from_mae,
    load_checkpoint,
)
from samtune.files import atomic_write
from samtune.modeling.sam import Sam

__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_FORMAT_VERSION",
    "METADATA_KEY",
    "adapter_metadata",
    "save_adapter_checkpoint",
    "read_adapter_checkpoint",
    "is_adapter_checkpoint",
    "load_adapter_checkpoint",
    "extract_adapter_checkpoint",
    "strip_frozen",
    "restore_frozen",
]

ADAPTER_FORMAT = "samtune-adapter"
ADAPTER_FORMAT_VERSION = 1
METADATA_KEY = "samtune_adapter"
LIGHTNING_PREFIX = "model."
_REQUIRED = ("format", "format_version", "model_name", "base_checkpoint", "adaptation", "trainable_keys",
             "base_fingerprint")


def _samtune_version() -> str:
    import samtune

    return str(getattr(samtune, "__version__", "unknown"))


def _applied_config(model: Sam, config: AdaptationConfig | dict | None, what: str) -> AdaptationConfig:
    applied = adaptation_of(model)
    if applied is None:
        raise ValueError(f"{what}: the model is not adapted (use samtune.adapt.apply_adaptation first)")
    if config is None:
        return applied
    given = AdaptationConfig.coerce(config, name=f"{what}: config")
    if given != applied:
        diff = {k: (v, applied.to_dict()[k]) for k, v in given.to_dict().items() if applied.to_dict()[k] != v}
        raise ValueError(f"{what}: config differs from the adaptation applied to the model in {diff} "
                         "(given, applied); pass the applied config or None")
    return applied


def adapter_metadata(
    model: Sam,
    *,
    model_name: str,
    base_checkpoint: str | os.PathLike | None,
    config: AdaptationConfig | dict | None = None,
    mae_checkpoint: str | os.PathLike | None = None,
    complete: bool = False,
    input_mapping: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata block of an adapter checkpoint (plain values only).

    Args:
        model: the adapted model.
        model_name: registry name of the base model (``samtune.build.available_models()``).
        base_checkpoint: base weights file the model was built from (None: random init).
        config: the applied adaptation (None: the one recorded on the model; a different one is an error).
        mae_checkpoint: MAE weights that initialised the base encoder after ``base_checkpoint``, if any.
        complete: the tensors stored with it cover every weight (no base needed to rebuild).
        input_mapping: how the training data turned image files into the model's input (``bands``,
            ``intensity``, ``percentiles``, ``window``: :attr:`samtune.tasks.PromptableSegmentationTask.input_mapping`);
            recorded under ``input_mapping`` when given.

    Paths are recorded as given and, under ``*_absolute``, resolved against the working directory at save time
    (the directory a training run was launched from), so that loading finds them from any directory.
    """
    from samtune.build import get_config

    config = _applied_config(model, config, "adapter checkpoint")
    get_config(model_name)  # a clear error for an unknown name
    check_has_data(model.state_dict(), "adapter checkpoint")  # the fingerprint reads every frozen tensor
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "samtune_version": _samtune_version(),
        "model_name": model_name,
        "base_checkpoint": None if base_checkpoint is None else str(base_checkpoint),
        "base_checkpoint_absolute": _absolute(base_checkpoint),
        "mae_checkpoint": None if mae_checkpoint is None else str(mae_checkpoint),
        "mae_checkpoint_absolute": _absolute(mae_checkpoint),
        "adaptation": config.to_dict(),
        "trainable_keys": sorted(trainable_state_dict(model)),
        "base_fingerprint": base_fingerprint(model),
        "complete": bool(complete),
    }
    if input_mapping is not None:
        meta["input_mapping"] = _plain_mapping(input_mapping)
    return meta


def _plain_mapping(mapping: Any) -> dict[str, Any]:
    """An input mapping as plain JSON values (tuples become lists), the same in ``.pt`` and safetensors files.

    Raises:
        TypeError: not a dict with string keys and JSON values.
    """
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise TypeError(f"input_mapping must be a dict of prepare_image settings (bands, intensity, percentiles, "
                        f"window), got {type(mapping).__name__}: {mapping!r}")
    try:
        return json.loads(json.dumps(mapping))
    except (TypeError, ValueError) as err:
        raise TypeError(f"input_mapping must hold plain values (numbers, strings, lists, None): {err}") from err


def _absolute(path: str | os.PathLike | None) -> str | None:
    """``path`` made absolute against the current working directory (symbolic links kept); None stays None."""
    return None if path is None else os.path.abspath(os.fspath(path))


def _recorded_path(meta: dict[str, Any], key: str) -> str | None:
    """The file recorded under ``key`` (``base_checkpoint`` / ``mae_checkpoint``) as seen from here.

    The absolute path recorded at save time (``<key>_absolute``; older files lack it) when that file exists, else
    the path as given when saving (a relative one then reads from the current directory). None when none was
    recorded.
    """
    given = meta.get(key)
    if given is None:
        return None
    absolute = meta.get(f"{key}_absolute")
    if isinstance(absolute, str) and Path(absolute).is_file():
        return absolute
    return str(given)


def _write(path: Path, metadata: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    tensors = cpu_state(tensors, path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata)}))
    return atomic_write(path, lambda tmp: torch.save({METADATA_KEY: metadata, "state_dict": tensors}, tmp))


def save_adapter_checkpoint(
    model: Sam,
    path: str | os.PathLike,
    *,
    model_name: str,
    base_checkpoint: str | os.PathLike | None,
    config: AdaptationConfig | dict | None = None,
    mae_checkpoint: str | os.PathLike | None = None,
    input_mapping: dict[str, Any] | None = None,
) -> Path:
    """Write the trainable weights of an adapted model and the metadata to rebuild it (small: MBs).

    Args:
        model: a model adapted with :func:`samtune.adapt.apply_adaptation`.
        path: destination; ``.safetensors`` writes safetensors, any other suffix ``torch.save``.
        model_name: registry name of the base model.
        base_checkpoint: path of the base weights the model was built from; recorded as given (None for a
            randomly initialised base, which then cannot be rebuilt: pass the base when loading).
        config: the applied :class:`AdaptationConfig` (None: the one recorded on the model).
        mae_checkpoint: MAE weights applied to the base encoder after ``base_checkpoint``, if any.
        input_mapping: how the training data turned image files into the model's input (bands, intensity,
            percentiles, window), recorded for inference (``LoadedCheckpoint.input_mapping``,
            ``Predictor.input_mapping``); None: not recorded.

    Returns:
        The path written (atomically).
    """
    metadata = adapter_metadata(model, model_name=model_name, base_checkpoint=base_checkpoint, config=config,
                                mae_checkpoint=mae_checkpoint, input_mapping=input_mapping)
    return _write(Path(path), metadata, trainable_state_dict(model))


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _check_metadata(meta: Any, source: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"checkpoint {source}: not a samtune adapter checkpoint (bad '{METADATA_KEY}' metadata)")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {source}: adapter metadata lacks {missing}")
    version = meta["format_version"]
    if isinstance(version, bool) or not isinstance(version, (int, str)) or not str(version).strip().isdigit():
        raise CheckpointError(f"checkpoint {source}: adapter metadata 'format_version' must be a non-negative "
                              f"integer, got {version!r}")
    if int(version) > ADAPTER_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {source}: adapter format version {meta['format_version']} is newer than this samtune "
            f"reads ({ADAPTER_FORMAT_VERSION}; written by samtune {meta.get('samtune_version')}): upgrade samtune"
        )
    mapping = meta.get("input_mapping")
    if mapping is not None and not isinstance(mapping, dict):
        raise CheckpointError(f"checkpoint {source}: adapter metadata 'input_mapping' must be a dict or null, got "
                              f"{type(mapping).__name__}")
    return meta


def read_adapter_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of an adapter file or of a Lightning checkpoint of an adapted task.

    Lightning state-dict keys lose their ``model.`` prefix; other task entries are dropped, except the input
    mapping they record beside the metadata (:data:`samtune.checkpoints.INPUT_MAPPING_KEY`), returned as the
    metadata's ``input_mapping`` (where the metadata lacks one).

    Raises:
        CheckpointError: missing / unreadable file, or a file without adapter metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({err})") from err
        if METADATA_KEY not in header:
            raise CheckpointError(f"checkpoint {path}: a safetensors file without samtune adapter metadata "
                                  "(plain weights load with samtune.build_sam(name, path))")
        try:
            meta = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"checkpoint {path}: corrupt adapter metadata ({err})") from err
        return _check_metadata(meta, str(path)), tensors
    try:
        obj = _load_torch(path)
    except Exception as err:  # torch.load raises many types on corrupt input or refused objects
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: not a readable weights_only PyTorch checkpoint ({first})") from err
    if not isinstance(obj, dict) or METADATA_KEY not in obj:
        raise CheckpointError(f"checkpoint {path}: no samtune adapter metadata ('{METADATA_KEY}'); it is not an "
                              "adapter checkpoint (plain weights load with samtune.build_sam(name, path))")
    meta = _check_metadata(obj[METADATA_KEY], str(path))
    mapping = obj.get(INPUT_MAPPING_KEY)
    if meta.get("input_mapping") is None and isinstance(mapping, dict):
        meta = {**meta, "input_mapping": dict(mapping)}
    state = obj.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: adapter checkpoint without a 'state_dict' of tensors")
    if meta.get("lightning"):
        state = {k[len(LIGHTNING_PREFIX):]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    return meta, {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def is_adapter_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an adapter checkpoint (standalone file or adapted task's Lightning checkpoint).

    Reads safetensors headers only; ``torch.save`` files are memory-mapped where possible. Never raises for an
    unreadable or missing file (False).
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
        if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(METADATA_KEY)
            return raw is not None and json.loads(raw).get("format") == ADAPTER_FORMAT
        obj = _load_torch(path)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not an adapter checkpoint
        return False
    meta = obj.get(METADATA_KEY) if isinstance(obj, dict) else None
    return isinstance(meta, dict) and meta.get("format") == ADAPTER_FORMAT


BASE_HINT = ("pass base_checkpoint= (Python) or --base-checkpoint (samtune evaluate / amg / export) with the base "
             "weights the adapter was trained on")


def _build_base(meta: dict[str, Any], base_checkpoint: str | os.PathLike | None, source: str,
                given: bool = False, complete: bool = False) -> Sam:
    """The base model of an adapter checkpoint: registry model + base weights (+ MAE init), not yet adapted.

    ``given``: ``base_checkpoint`` was passed by the caller (not the recorded path); only changes the error text.
    ``complete``: the checkpoint stores every weight, so neither the base nor the MAE weights are read (the
    recorded files may be gone).
    """
    from samtune.build import build_sam

    name = meta["model_name"]
    try:
        model = build_sam(name)
    except ValueError as err:
        raise CheckpointError(f"adapter checkpoint {source}: {err}") from err
    if base_checkpoint is not None:
        base = Path(base_checkpoint)
        if not base.is_file():
            if given:
                where = f"given as base_checkpoint= / --base-checkpoint; recorded: {meta['base_checkpoint']}"
            else:
                absolute = meta.get("base_checkpoint_absolute")
                where = (f"as recorded when saved; a relative path is read from the current directory {os.getcwd()}"
                         + (f"; not at {absolute}, where it was when saved, either" if absolute else ""))
            raise CheckpointError(f"adapter checkpoint {source}: base checkpoint {base} not found ({where}); "
                                  f"{BASE_HINT}")
        try:
            load_checkpoint(model, base)
        except CheckpointError as err:
            raise CheckpointError(f"adapter checkpoint {source} (model {name!r}): the base checkpoint does not fit: "
                                  f"{err}") from err
    if meta.get("mae_checkpoint") and not complete:
        init_encoder_from_mae(model.image_encoder, _recorded_path(meta, "mae_checkpoint"))
    return model


def _check_keys(model: Sam, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> None:
    state = model.state_dict()
    trainable = set(trainable_state_dict(model))
    missing = sorted(trainable - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    misshaped = sorted(f"{k} (file {tuple(tensors[k].shape)} vs model {tuple(state[k].shape)})"
                       for k in set(tensors) & set(state) if tensors[k].shape != state[k].shape)
    # A file of trainable weights only: the frozen base comes from the base checkpoint (checked against the
    # fingerprint); a frozen tensor in the file would silently replace that verified base.
    frozen = [] if meta.get("complete") else sorted(set(tensors) & set(state) - trainable)
    if missing or unexpected or misshaped or frozen:
        parts = []
        if missing:
            parts.append(f"{len(missing)} trainable weights missing: {missing[:8]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {unexpected[:8]}")
        if frozen:
            parts.append(f"{len(frozen)} frozen base weights, which a file of trainable weights (not marked "
                         f"complete) must not hold (the base checkpoint provides them): {frozen[:8]}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped: {misshaped[:8]}")
        raise CheckpointError(f"adapter checkpoint {source} does not fit model {meta['model_name']!r} adapted with "
                              f"{meta['adaptation']}: " + "; ".join(parts))


def _check_base(model: Sam, meta: dict[str, Any], source: str, base: str | os.PathLike | None) -> None:
    expected = meta["base_fingerprint"]
    bad = compare_fingerprints(expected, base_fingerprint(model, like=expected))
    if bad:
        raise CheckpointError(
            f"adapter checkpoint {source}: the base weights ({base or 'random init'}) are not the ones the adapter "
            f"was trained on (recorded base: {meta['base_checkpoint']}); {len(bad)} frozen tensors differ, e.g. "
            f"{bad[:4]}. Pass base_checkpoint= the original base weights"
        )


def load_adapter_checkpoint(path: str | os.PathLike, base_checkpoint: str | os.PathLike | None = None) -> Sam:
    """Rebuild an adapted model: registry model + base weights, the recorded adaptation, the stored weights.

    Args:
        path: a standalone adapter file, or a Lightning checkpoint of an adapted task.
        base_checkpoint: base weights to use instead of the recorded path (e.g. the file moved). None: the
            recorded one, at the absolute path it had when saved or else as recorded (relative to the current
            directory).

    Returns:
        The adapted :class:`Sam` in eval mode, on the CPU (merge with :func:`samtune.adapt.merge_adaptation`).

    Raises:
        CheckpointError: not an adapter checkpoint; the base file is missing, does not fit the model, or is not
            the base the adapter was trained on (fingerprint); a file with no recorded base and none given;
            stored weights that do not fit the adapted model.
    """
    source = str(path)
    meta, tensors = read_adapter_checkpoint(path)
    config = AdaptationConfig.coerce(meta["adaptation"], name=f"adapter checkpoint {source}: adaptation")
    complete = bool(meta.get("complete"))
    given = base_checkpoint is not None
    if given and complete:
        warnings.warn(f"adapter checkpoint {source} stores every weight of the model (complete); base_checkpoint "
                      f"{base_checkpoint} is not used", stacklevel=2)
    base = base_checkpoint if given else _recorded_path(meta, "base_checkpoint")
    if base is None and not complete:
        raise CheckpointError(
            f"adapter checkpoint {source} records no base checkpoint (the adapted model started from random "
            "weights, which are not stored): pass base_checkpoint= (Python) or --base-checkpoint (command line)"
        )
    model = _build_base(meta, None if complete else base, source, given, complete=complete)
    apply_adaptation(model, config)
    _check_keys(model, tensors, meta, source)
    if complete:
        missing = sorted(set(model.state_dict()) - set(tensors))
        if missing:
            raise CheckpointError(f"adapter checkpoint {source} is marked complete but lacks {len(missing)} weights: "
                                  f"{missing[:8]}")
    else:
        _check_base(model, meta, source, base)
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def extract_adapter_checkpoint(checkpoint: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write a standalone adapter file from a Lightning checkpoint of an adapted task (or another adapter file).

    Only the trainable weights are kept (no optimiser state); no model is built. The checkpoint must record its
    base weights file: without it the frozen weights of the written file could never be rebuilt.

    Args:
        checkpoint: source checkpoint.
        path: destination (``.safetensors`` or ``torch.save`` by suffix).

    Returns:
        The path written.

    Raises:
        CheckpointError: the checkpoint records no base weights file (the run started from random weights), or
            lacks some of its trainable weights.
    """
    meta, tensors = read_adapter_checkpoint(checkpoint)
    if meta["base_checkpoint"] is None:
        raise CheckpointError(
            f"checkpoint {checkpoint}: the adapted model started from random weights (no base checkpoint), so a "
            "file of its trainable weights alone could never be loaded; load the checkpoint itself "
            "(samtune.adapt.load_adapter_checkpoint), or write the whole model with samtune export"
        )
    keys = list(meta["trainable_keys"])
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint}: lacks trainable weights {missing[:8]}")
    out = {k: v for k, v in meta.items() if k != "lightning"}
    out["complete"] = False
    return _write(Path(path), out, {k: tensors[k] for k in keys})


# ------------------------------------------------------------------------------ Lightning checkpoints of tasks
def strip_frozen(state_dict: dict[str, torch.Tensor], model: Sam, prefix: str = LIGHTNING_PREFIX) -> int:
    """Remove the frozen base weights of ``model`` (keys ``prefix + name``) from a task's state dict, in place.

    Returns:
        The number of entries removed.
    """
    frozen = [prefix + k for k in frozen_keys(model)]
    removed = 0
    for key in frozen:
        if state_dict.pop(key, None) is not None:
            removed += 1
    return removed


def restore_frozen(
    state_dict: dict[str, torch.Tensor], model: Sam, meta: dict[str, Any], source: str,
    prefix: str = LIGHTNING_PREFIX,
) -> int:
    """Put ``model``'s frozen base weights back into a stripped task state dict, after checking the base.

    Args:
        state_dict: the checkpoint's ``state_dict`` (changed in place).
        model: the task's freshly built and adapted model (its base loaded from the task's ``checkpoint``).
        meta: the checkpoint's adapter metadata.
        source: name used in error messages.
        prefix: the task's attribute prefix of the model.

    Returns:
        The number of entries restored.

    Raises:
        CheckpointError: trainable weights missing from the checkpoint, or a base that differs from the one it
            was trained with.
    """
    trainable = set(trainable_state_dict(model))
    missing = sorted(k for k in trainable if prefix + k not in state_dict)
    if missing:
        raise CheckpointError(f"checkpoint {source}: lacks {len(missing)} trainable weights of the adapted model, "
                              f"e.g. {missing[:6]} (was it trained with another adaptation?)")
    _check_base(model, meta, source, meta.get("base_checkpoint"))
    restored = 0
    for key, value in model.state_dict().items():
        if key not in trainable and prefix + key not in state_dict:
            state_dict[prefix + key] = value
            restored += 1
    return restored

