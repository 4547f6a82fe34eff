"""Reading and writing SAM weights.

* Reads official SAM ``.pth`` files, MobileSAM and LiteMedSAM files, safetensors, samtune exports, and
  Lightning checkpoints of samtune tasks (``state_dict`` with a ``model.`` prefix), always with
  ``torch.load(weights_only=True)``: an untrusted file cannot execute code.
* Writes the official key layout (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), so that
  ``segment_anything.sam_model_registry[...](checkpoint=path)`` loads a samtune-written file strictly.
* Initialises the ViT image encoder from an MAE-pretrained ViT (timm ``vit_*_patch16_224.mae`` state dicts or
  the MAE repository's ``mae_pretrain_vit_*.pth``), as the SAM paper does.
* Downloads official checkpoints (URL + sha256 from the registry) for users with internet.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from samtune.files import atomic_write

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "load_checkpoint",
    "load_into",
    "save_checkpoint",
    "cpu_state",
    "check_has_data",
    "init_encoder_from_mae",
    "MaeInitReport",
    "download_checkpoint",
    "infer_model_name",
]

_CONTAINER_KEYS = ("model", "state_dict", "module", "model_state_dict")
# Lightning checkpoints of the task: how the training data mapped image files to the model's 8-bit RGB input
# (``samtune.data.io.prepare_image`` keyword arguments; see ``SegmentationDataModule.input_mapping``).
INPUT_MAPPING_KEY = "samtune_input_mapping"
_SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


class CheckpointError(ValueError):
    """A weights file cannot be read or does not fit the model. The message names the file and the problem."""


def _list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # first byte of a pickle stream (protocol >= 2): legacy torch.save and plain pickles


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON header starting with ``{``."""
    return len(head) >= 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({err})") from err


def _unpickling_problem(err: Exception) -> str:
    """The informative line of torch's weights-only error (the refused Python object, or the bad opcode)."""
    text = str(err)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return (
            f"refused to load: it contains the Python object {refused.group(1)}, and checkpoints are read with "
            "weights_only=True (tensors and plain containers only), so an untrusted file cannot execute code; "
            "re-save the weights as a plain state_dict of tensors"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text) or re.search(r"Unsupported operand \d+", text)
    reason = (detail.group(1) if detail.groups() else detail.group(0)).strip() if detail else text.splitlines()[0]
    return f"not a readable PyTorch checkpoint: corrupt or unsupported pickle data ({reason})"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor dict from ``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors`` without executing code.

    The format is recognised from the file's content (a safetensors file named ``.pth`` reads too).
    Containers are unwrapped: ``{"model": ...}`` (MAE), ``{"state_dict": ...}`` (Lightning), the first of them
    that holds tensors (``{"model": <config>, "state_dict": <weights>}`` gives the weights). A Lightning
    checkpoint of a samtune task keeps its ``model.`` prefix; :func:`load_into` strips it.

    Raises:
        CheckpointError: missing file, empty file, not a checkpoint, truncated/corrupt file, a pickle of
            arbitrary Python objects (refused by ``weights_only=True``), or no tensors inside.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a file (a directory?); pass the path of a weights file")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise CheckpointError(f"checkpoint {path}: the file is empty (an interrupted download or save?)")
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return _read_safetensors(path)
    if not head.startswith(_ZIP_MAGIC) and head[0] != _PICKLE_PROTO:
        raise CheckpointError(
            f"checkpoint {path}: not a PyTorch checkpoint or safetensors file (it starts with {head[:8]!r}; "
            "expected a torch.save zip archive, a pickle or safetensors)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path}: {_unpickling_problem(err)}") from err
    except Exception as err:  # torch.load raises many types on corrupt input (RuntimeError, EOFError, KeyError, ...)
        first = str(err).splitlines()[0].split(". ")[0] if str(err) else "no details"
        raise CheckpointError(
            f"checkpoint {path}: not a valid PyTorch checkpoint, or truncated/corrupt ({type(err).__name__}: {first})"
        ) from err
    for key in _CONTAINER_KEYS:  # the first container that holds tensors (a "model" entry may be a config dict)
        inner = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path}: contains no state dict of tensors (got {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "sam.")


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``model.``, ``module.``, ``_orig_mod.``, ``sam.``, nested) when that makes keys match.

    Keys without the wrapper prefix belong to other parts of the wrapper (e.g. a Lightning task's loss or
    metric buffers next to ``model.*``) and are dropped with it. When no stripping makes any key match the
    model, ``state`` is returned unchanged (so that errors show the keys as they are in the file).
    """
    if any(k in expected for k in state):
        return state
    for prefix in _WRAPPER_PREFIXES:
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if stripped:
            candidate = _strip_prefix(stripped, expected)
            if any(k in expected for k in candidate):
                return candidate
    return state


def _resize_position_tables(model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resample the position tables of weights trained at another input size to the model's shapes.

    The file's grid is that of its ``pos_embed`` ``[1, H, W, C]`` (bicubic to the model's grid). Relative-position
    tables are resampled (linearly) only where they belong to that change: global-attention tables, ``2 H - 1``
    rows in the file and ``2 H' - 1`` in the model. Window tables depend on the window size alone, so a mismatch
    there (or any table of an encoder whose grid is the same) means another architecture, and stays an error.
    """
    out = dict(state)
    grids: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}  # key prefix -> (file grid, model grid)
    for key, value in state.items():
        target = model_state.get(key)
        if target is None or target.shape == value.shape or not key.endswith("pos_embed") or value.dim() != 4:
            continue
        out[key] = F.interpolate(
            value.permute(0, 3, 1, 2).float(), size=target.shape[1:3], mode="bicubic", align_corners=False
        ).permute(0, 2, 3, 1).to(value.dtype)
        grids[key[: -len("pos_embed")]] = (tuple(value.shape[1:3]), tuple(target.shape[1:3]))
    for key, value in state.items():
        target = model_state.get(key)
        if target is None or target.shape == value.shape or not key.endswith(("rel_pos_h", "rel_pos_w")):
            continue
        prefix = next((p for p in grids if key.startswith(p)), None)
        if prefix is None or value.dim() != 2:
            continue
        axis = 0 if key.endswith("rel_pos_h") else 1
        file_side, model_side = grids[prefix][0][axis], grids[prefix][1][axis]
        if value.shape[0] == 2 * file_side - 1 and target.shape[0] == 2 * model_side - 1:
            out[key] = F.interpolate(value.t()[None].float(), size=target.shape[0], mode="linear")[0].t().to(value.dtype)
    return out


def _is_position_table(key: str) -> bool:
    return key.endswith(("pos_embed", "rel_pos_h", "rel_pos_w"))


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    strict: bool = True,
    source: str = "state dict",
    resize_positions: bool = False,
) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``model`` with a readable report of what does not fit.

    Args:
        model: the target module.
        state: tensors by key.
        strict: raise when any key is missing, unexpected or mis-shaped.
        source: name used in error messages (the file path).
        resize_positions: resample the position tables of a checkpoint trained at another input size (its
            ``pos_embed`` grid differs; see :func:`_resize_position_tables`); other mismatches stay errors.

    Returns:
        ``(missing, unexpected)`` keys (both empty when ``strict``).

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped keys.
    """
    model_state = model.state_dict()
    state = _strip_prefix(state, set(model_state))
    if resize_positions:
        state = _resize_position_tables(model_state, state)
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    misshaped = sorted(
        f"{k} (file {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)})"
        for k in set(state) & set(model_state)
        if state[k].shape != model_state[k].shape
    )
    if misshaped or (strict and (missing or unexpected)):
        parts: list[str] = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_list(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped keys: {_list(misshaped)}")
        hint = ""
        if any(marker in k for k in (*missing, *unexpected) for marker in (*_ADAPTER_MARKERS, ".base_layer.")):
            hint = (" (a checkpoint of a LoRA/adapter run: load it with samtune.adapt.load_adapter_checkpoint or "
                    "Predictor.from_checkpoint, which rebuild the base and the adaptation)")
        elif missing and state and not (unexpected or misshaped):
            hint = (f" (the file holds only part of the model, {len(state)} of {len(model_state)} tensors: the "
                    "checkpoint of a run that stores its trainable weights only? load it with "
                    "samtune.adapt.load_adapter_checkpoint or Predictor.from_checkpoint, which rebuild the frozen "
                    "base from its base checkpoint; strict=False loads just these tensors)")
        elif unexpected and missing and any(k.startswith(_SAM_PREFIXES) for k in unexpected):
            hint = " (is it a checkpoint of another model? check the model name)"
        elif (misshaped and not (missing or unexpected) and not resize_positions
              and all(_is_position_table(k.split(" ")[0]) for k in misshaped)
              and any(k.split(" ")[0].endswith("pos_embed") for k in misshaped)):
            hint = " (trained at another input size? pass resize_positions=True to resample the position tables)"
        raise CheckpointError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(parts) + hint)
    model.load_state_dict(state, strict=False)
    return missing, unexpected


def load_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = True, resize_positions: bool = False) -> None:
    """Read a weights file (any supported format) and load it into ``model``. See :func:`load_into`."""
    load_into(model, read_state_dict(path), strict=strict, source=str(path), resize_positions=resize_positions)


def check_has_data(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise ValueError naming the tensors of ``state`` on the meta device (shapes only, no data), if any.

    ``what`` starts the message (e.g. ``"cannot write model.pth"``).
    """
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise ValueError(
            f"{what}: {len(meta)} of {len(state)} tensors are on the meta device, which holds shapes but no data "
            f"({_list(meta, 6)}); load or initialise the weights first (e.g. model.to_empty(device='cpu') then "
            "load_state_dict)"
        )


def cpu_state(state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """``state``'s tensors detached, on the CPU and contiguous, ready to be written to ``path``.

    Raises:
        ValueError: tensors on the meta device (a model built under ``torch.device("meta")``), which hold no data
            to write; the message names them.
    """
    check_has_data(state, f"cannot write {path}")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s weights in the official SAM key layout (``.pth``) or as safetensors.

    The file is written to a temporary name and renamed, so an interrupted save never leaves a corrupt file.

    Args:
        model: a :class:`samtune.modeling.Sam` (or any module; keys are written as they are).
        path: destination; the suffix ``.safetensors`` selects safetensors, anything else ``torch.save``.

    Returns:
        The path written.

    Raises:
        ValueError: weights on the meta device (no data; see :func:`cpu_state`).
    """
    path = Path(path)
    state = cpu_state(model.state_dict(), path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


@dataclass
class MaeInitReport:
    """What :func:`init_encoder_from_mae` did: loaded keys, keys left at their SAM initialisation, ignored keys, and
    a patch embedding resampled to the encoder's patch size."""

    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)  # "key (14, 14) -> (16, 16)": a patch embedding resized

    def __str__(self) -> str:
        text = (
            f"MAE init: {len(self.loaded)} tensors loaded, {len(self.new)} new ({_list(self.new, 6)}), "
            f"{len(self.ignored)} ignored ({_list(self.ignored, 6)})"
        )
        return text + (f", resampled: {', '.join(self.resampled)}" if self.resampled else "")


def init_encoder_from_mae(encoder: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> MaeInitReport:
    """Initialise a SAM ViT image encoder from MAE-pretrained ViT weights, as the SAM paper does.

    The class token is dropped, the absolute position embedding (14x14 for patch 16 at 224 px, 16x16 for patch 14)
    is interpolated (bicubic) to the encoder's grid, ``mlp.fc1/fc2`` become ``mlp.lin1/lin2``; relative-position
    tables are zero-initialised and the neck keeps its fresh initialisation. A patch embedding of another patch
    size is resampled to the encoder's with FlexiViT's pseudo-inverse resize (timm's ``resample_patch_embed``):
    the public MAE ViT-H is ViT-H/14 (``mae_pretrain_vit_huge.pth``, timm ``vit_huge_patch14_224.mae``), SAM's
    ViT-H has 16 px patches. Keys without a SAM counterpart (final norm, head, MAE decoder, mask token) are ignored.

    Args:
        encoder: a :class:`samtune.modeling.ImageEncoderViT`.
        source: a timm ``vit_*_patch{14,16}_224.mae`` state dict, or a path to one, or to the MAE repository's
            ``mae_pretrain_vit_*.pth`` (with its ``model`` key).

    Returns:
        A report of loaded, new and ignored keys.

    Raises:
        CheckpointError: a mis-shaped tensor (e.g. ViT-L weights for a ViT-B encoder).
    """
    state = read_state_dict(source) if not isinstance(source, dict) else dict(source)
    name = str(source) if not isinstance(source, dict) else "MAE state dict"
    target = encoder.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    report = MaeInitReport()
    for key, value in state.items():
        new_key = key.replace("mlp.fc1.", "mlp.lin1.").replace("mlp.fc2.", "mlp.lin2.")
        if key == "pos_embed":
            tokens = value[:, 1:] if value.shape[1] == int(value.shape[1] ** 0.5) ** 2 + 1 else value
            side = int(tokens.shape[1] ** 0.5)
            grid = tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
            size = target["pos_embed"].shape[1:3]
            value = F.interpolate(grid, size=size, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        if key == "patch_embed.proj.weight" and key in target and value.shape[:2] == target[key].shape[:2] \
                and value.shape[2:] != target[key].shape[2:]:
            from timm.layers import resample_patch_embed

            value = resample_patch_embed(value.float(), list(target[key].shape[2:]))
            report.resampled.append(f"{key} {tuple(state[key].shape[2:])} -> {tuple(value.shape[2:])}")
        if new_key not in target:
            report.ignored.append(key)
            continue
        if value.shape != target[new_key].shape:
            raise CheckpointError(
                f"MAE weights {name}: {key} has shape {tuple(value.shape)}, the encoder expects "
                f"{tuple(target[new_key].shape)} (is it the right ViT size?)"
            )
        mapped[new_key] = value.to(target[new_key].dtype)
        report.loaded.append(new_key)
    if not mapped:
        raise CheckpointError(f"MAE weights {name}: no ViT tensor matched the encoder (keys like {_list(sorted(state), 5)})")
    for key, value in target.items():
        if key in mapped:
            continue
        report.new.append(key)
        if "rel_pos" in key:
            mapped[key] = torch.zeros_like(value)
    encoder.load_state_dict(mapped, strict=False)
    report.ignored.sort()
    return report


def sha256sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_checkpoint(name: str, directory: str | Path | None = None) -> Path:
    """Download the official weights of a registered model, verify their sha256, return the local path.

    Files go to ``directory`` or ``$SAMTUNE_CACHE`` or ``~/.cache/samtune``; an existing file with the right
    checksum is reused. A model registered without ``sha256`` is downloaded (or reused) unverified, with a
    warning. Tests never download.
    """
    from samtune.build import get_config

    cfg = get_config(name)
    if cfg.url is None:
        raise CheckpointError(f"model {name!r} has no download URL: {cfg.notes or 'pass a local checkpoint path'}")
    if cfg.sha256 is None:
        warnings.warn(f"model {name!r} is registered without a sha256: {cfg.url} is used unverified (a truncated or "
                      "altered file is not detected); set SamConfig.sha256", stacklevel=2)
    directory = Path(directory or os.environ.get("SAMTUNE_CACHE", Path.home() / ".cache" / "samtune"))
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / cfg.url.rsplit("/", 1)[-1]
    if dest.is_file() and (cfg.sha256 is None or sha256sum(dest) == cfg.sha256):
        return dest

    def download(tmp: Path) -> None:  # a unique temporary file: processes downloading at once do not collide
        torch.hub.download_url_to_file(cfg.url, str(tmp), progress=True)
        if cfg.sha256 is not None and (digest := sha256sum(tmp)) != cfg.sha256:
            raise CheckpointError(f"download of {cfg.url}: sha256 {digest} does not match the expected {cfg.sha256}")

    return atomic_write(dest, download)


# --------------------------------------------------------------------------------------------- model inference
_ADAPTER_MARKERS = ("lora_", ".adapter", "adapter.", "adapters.")


def _sam_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with wrapper prefixes (``model.``, ``module.``, ...) stripped until the SAM prefixes appear.

    Keys outside the wrapper (a Lightning task's loss or metric buffers) are dropped with it.
    """
    while state and not any(k.startswith(_SAM_PREFIXES) for k in state):
        for prefix in _WRAPPER_PREFIXES:
            inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if inner:
                state = inner
                break
        else:
            return {}
    return {k: v for k, v in state.items() if k.startswith(_SAM_PREFIXES)}


_SHAPE_CACHE: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}


def _registered_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of registered model ``name`` (built on the meta device when possible)."""
    from samtune.build import build_sam_from_config, get_config

    cfg = get_config(name)
    cache_key = (name, hash(cfg))
    if cache_key not in _SHAPE_CACHE:
        try:
            with torch.device("meta"):
                model = build_sam_from_config(cfg)
        except (NotImplementedError, RuntimeError):  # modules whose __init__ reads tensor values (TinyViT)
            model = build_sam_from_config(cfg)
        _SHAPE_CACHE[cache_key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _SHAPE_CACHE[cache_key]


def _describe(state: dict[str, torch.Tensor]) -> str:
    """What the SAM keys of a state dict say about its architecture (for error messages)."""
    parts: list[str] = []
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if blocks and patch is not None:
        pos = state.get("image_encoder.pos_embed")
        grid = f", grid {tuple(pos.shape[1:3])}" if pos is not None else ""
        parts.append(f"ViT encoder (embed dim {patch.shape[0]}, depth {len(blocks)}, patch {patch.shape[-1]}{grid})")
    elif any(k.startswith("image_encoder.layers.") for k in state):
        stages: dict[int, set[int]] = {}
        for k in state:
            if m := re.match(r"image_encoder\.layers\.(\d+)\.blocks\.(\d+)\.", k):
                stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        depths = [len(stages[i]) for i in sorted(stages)]
        stem = state.get("image_encoder.patch_embed.seq.0.c.weight")
        stem_text = f", stem kernel {stem.shape[-1]}x{stem.shape[-1]}" if stem is not None else ""
        parts.append(f"TinyViT encoder (stage depths {depths}{stem_text})")
    elif any(k.startswith("image_encoder.") for k in state):
        parts.append("an image encoder of unknown structure")
    else:
        parts.append("no image encoder")
    token = state.get("mask_decoder.iou_token.weight")
    parts.append(f"decoder width {token.shape[1]}" if token is not None else "no mask decoder")
    if not any(k.startswith("prompt_encoder.") for k in state):
        parts.append("no prompt encoder")
    return ", ".join(parts)


def infer_model_name(state: dict[str, torch.Tensor], source: str = "state dict") -> str:
    """The registered model whose architecture fits ``state`` exactly (same keys, same shapes).

    Works for official SAM ``.pth`` files (vit_b/l/h differ in embed dim and depth), MobileSAM ``vit_t``,
    LiteMedSAM (TinyViT with a stride-1 stem of 1x1 convolutions and a 256 input), safetensors, samtune
    exports and Lightning checkpoints (wrapper prefixes such as ``model.`` are stripped). Only shapes are
    compared; registered models are built on the meta device (no memory) where their code allows it.

    Args:
        state: tensors by key (e.g. from :func:`read_state_dict`).
        source: name used in error messages (the file path).

    Returns:
        A name accepted by :func:`samtune.build.build_sam`.

    Raises:
        CheckpointError: no registered model fits (the message says what was recognised and the closest
            model with its mismatched keys), or several fit equally.
    """
    from samtune.build import available_models, get_config

    sam = _sam_keys(state)
    if not sam:
        raise CheckpointError(
            f"cannot infer the model of {source}: no SAM keys (image_encoder.*, prompt_encoder.*, mask_decoder.*) "
            f"found; its keys look like: {_list(sorted(state), 6)}"
        )
    shapes = {k: tuple(v.shape) for k, v in sam.items()}
    encoder_type = "vit" if any(k.startswith("image_encoder.blocks.") for k in shapes) else "tiny_vit"
    token = shapes.get("mask_decoder.iou_token.weight")
    matches: list[str] = []
    scored: list[tuple[int, str, list[str]]] = []
    for name in available_models():
        cfg = get_config(name)
        if cfg.encoder_type != encoder_type or (token is not None and token[1] != cfg.prompt_embed_dim):
            continue
        expected = _registered_shapes(name)
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        misshaped = sorted(f"{k} (file {shapes[k]} vs {expected[k]})" for k in set(shapes) & set(expected) if shapes[k] != expected[k])
        if not (missing or unexpected or misshaped):
            matches.append(name)
        else:
            problems = [f"{len(missing)} missing keys: {_list(missing, 4)}"] if missing else []
            problems += [f"{len(unexpected)} unexpected keys: {_list(unexpected, 4)}"] if unexpected else []
            problems += [f"{len(misshaped)} mis-shaped keys: {_list(misshaped, 3)}"] if misshaped else []
            scored.append((len(missing) + len(unexpected) + len(misshaped), name, problems))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CheckpointError(
            f"cannot infer the model of {source}: the weights fit several registered models ({', '.join(matches)}); "
            "pass the model name explicitly"
        )
    recognised = _describe(sam)
    hint = ""
    if any(marker in k for k in shapes for marker in _ADAPTER_MARKERS):
        hint = " It holds LoRA/adapter tensors: load it as an adapter checkpoint (samtune.adapt)."
    if scored:
        _, closest, problems = min(scored)
        detail = f"closest registered model: {closest} ({'; '.join(problems)})"
    else:
        detail = f"no registered model has a {'ViT' if encoder_type == 'vit' else 'TinyViT'} encoder with that decoder width"
    raise CheckpointError(
        f"cannot infer the model of {source}: recognised {recognised}; {detail}. Pass the model name explicitly "
        f"(available: {', '.join(available_models())}), or register the architecture with samtune.build.register_model."
        + hint
    )
