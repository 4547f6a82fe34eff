"""Image embeddings of a frozen encoder, computed once and stored on disk (frozen-encoder training).

When the image encoder is frozen, its output for a given (un-augmented) image never changes, so the encoder, by
far the most expensive part of SAM, can run once per image instead of once per training step.
:class:`EmbeddingCache` stores those embeddings; :mod:`samtune.data.cached` fills it from a dataset and feeds
batches of ``"image_embeddings"`` to the task, which then skips the encoder (see
:func:`check_cached_embeddings`).

Layout of a cache folder::

    <cache_dir>/<config_id>/manifest.json              what every file of the folder was computed with
    <cache_dir>/<config_id>/<key[:2]>/<key>.safetensors  one image (one view), tensor "embedding" [C, h, w]

* ``config_id`` = hash of (format version, encoder fingerprint, preprocessing, storage dtype, file identity mode):
  a change of the encoder weights (:func:`encoder_fingerprint`, a hash of the state dict), of the preprocessing
  (model input size, normalisation, resize filter, intensity preset, band selection: the dict built by
  :func:`samtune.data.cached.preprocessing_spec`) or of the storage dtype selects another folder.
* ``key`` = hash of (``config_id``, image identity, view). The image identity (:func:`file_identity`) is either
  ``"content"`` (default: SHA-256 of the file's bytes; survives moving or copying the dataset, notices any
  change) or ``"stat"`` (resolved path + size + modification time in ns; no reading, for huge datasets on slow
  file systems, but it misses a file replaced with the same size and mtime, and moving the dataset invalidates
  the cache). A dataset restricted to a ``region`` of its images (a spatial train/val split of one raster) adds
  the region to the identity (:meth:`samtune.data.cached.CachedEmbeddingDataset.keys`).
* Each file carries its key, source image, view, dtype and a SHA-256 of the tensor bytes in the safetensors
  metadata; :meth:`EmbeddingCache.load` checks all of them and raises :class:`CorruptCacheError` naming the file.
  safetensors holds raw tensors only: loading never executes code.
* Writes are atomic (a private temporary file in the same folder, fsync, ``os.replace``): readers never see a
  partial file, and several processes (DDP ranks) filling the same cache at once at worst compute an entry
  twice; the last rename wins with identical content.

Storage dtype: ``float32`` by default (cached training is then bit-for-bit the live frozen encoder's up to
batching round-off); ``float16`` / ``bfloat16`` halve the disk and read volume (4 MiB -> 2 MiB per 256x64x64
embedding) at a relative error of ~5e-4 (fp16) / ~4e-3 (bf16) per value; embeddings are returned as float32.
"""
from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from samtune.files import atomic_write

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheConfig",
    "CacheError",
    "CacheMissError",
    "CorruptCacheError",
    "EmbeddingCache",
    "FileIdentity",
    "StorageDtype",
    "Verify",
    "check_cached_embeddings",
    "encoder_fingerprint",
    "file_identity",
    "memoized_encoder_fingerprint",
    "require_frozen_encoder",
]

logger = logging.getLogger("samtune.adapt")

CACHE_FORMAT_VERSION = 1
TENSOR_NAME = "embedding"
MANIFEST = "manifest.json"

StorageDtype = Literal["float32", "float16", "bfloat16"]
FileIdentity = Literal["content", "stat"]
Verify = Literal["header", "full"]

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------- errors
class CacheError(RuntimeError):
    """A problem with one cache file or folder; the message names it.

    Args:
        path: the offending file or folder.
        problem: what is wrong and what to do; None when ``path`` already is the whole message.
    """

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        # One argument is a complete message: DataLoader re-raises worker errors as ``type(exc)(message)``.
        self.path = str(path)
        self.problem = problem
        super().__init__(self.path if problem is None else f"{self.path}: {problem}")

    def __reduce__(self):  # survive pickling between processes intact
        return (type(self), (self.path, self.problem))


class CorruptCacheError(CacheError):
    """A cache file that cannot be read or does not hold what its name promises."""


class CacheMissError(CacheError):
    """No cached embedding for an image (the image changed after the cache was filled, or it was never filled)."""


# --------------------------------------------------------------------------------------------------- hashing
def _sha256(*parts: Any) -> str:
    """SHA-256 hex digest of a canonical JSON encoding of ``parts``."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bf16 included) without a Python-level copy beyond ``.cpu()``."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def encoder_fingerprint(encoder: nn.Module) -> str:
    """SHA-256 of an encoder's class and state dict (names, dtypes, shapes and values of every tensor).

    Two encoders with the same fingerprint compute the same function (same architecture class, same weights and
    persistent buffers). Cost: one pass over the weights (~1 s per GB).

    Args:
        encoder: the image encoder (any device).

    Returns:
        64 hex characters.
    """
    digest = hashlib.sha256()
    digest.update(f"{type(encoder).__module__}.{type(encoder).__qualname__}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], str]]" = weakref.WeakKeyDictionary()


def _state_version(encoder: nn.Module) -> tuple[Any, ...]:
    """Changes whenever a tensor of the encoder is replaced (``.to``, new Parameter) or modified in place
    (``load_state_dict``, optimiser steps: autograd's version counter)."""
    return tuple((t.data_ptr(), t._version, t.dtype) for t in encoder.state_dict(keep_vars=True).values())


def memoized_encoder_fingerprint(encoder: nn.Module) -> str:
    """:func:`encoder_fingerprint`, recomputed only when a tensor of the encoder changed since the last call."""
    version = _state_version(encoder)
    known = _FINGERPRINTS.get(encoder)
    if known is not None and known[0] == version:
        return known[1]
    fingerprint = encoder_fingerprint(encoder)
    _FINGERPRINTS[encoder] = (version, fingerprint)
    return fingerprint


_CONTENT_HASHES: dict[str, tuple[tuple[int, ...], str]] = {}


def file_identity(path: str | Path, mode: FileIdentity = "content") -> str:
    """Identity of an image file for cache keys.

    Args:
        path: the image file.
        mode: ``"content"``: SHA-256 of the bytes (memoised per process by path, size, mtime, inode and ctime, so
            a file is read once unless it changes; ctime also moves when a rewrite restores the old mtime);
            ``"stat"``: resolved path, size and modification time (ns).

    Returns:
        A string that changes when the file does (see the module docstring for what each mode notices).

    Raises:
        FileNotFoundError: the file does not exist (named).
        ValueError: an unknown mode.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    if mode == "stat":
        return f"stat:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if mode != "content":
        raise ValueError(f"file_identity must be 'content' or 'stat', got {mode!r}")
    name = str(path.resolve())
    version = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    known = _CONTENT_HASHES.get(name)
    if known is not None and known[0] == version:
        return known[1]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    identity = f"sha256:{digest.hexdigest()}"
    _CONTENT_HASHES[name] = (version, identity)
    return identity


# --------------------------------------------------------------------------------------------------- task side
def require_frozen_encoder(encoder: nn.Module, purpose: str = "training on cached image embeddings") -> None:
    """Raise unless no parameter of ``encoder`` is trainable and every submodule is in eval mode.

    A trainable encoder (full fine-tuning, LoRA or adapters inside it) changes its output at every step, and
    dropout / drop path in training mode make it random: a cached embedding is then not what the live encoder
    computes.

    Raises:
        ValueError: naming the number of trainable parameters or the modules in training mode.
    """
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    if trainable:
        shown = ", ".join(trainable[:3]) + (", ..." if len(trainable) > 3 else "")
        raise ValueError(
            f"{purpose} needs a frozen image encoder, but {len(trainable)} of its parameter tensors require grad "
            f"({shown}); set `freeze_image_encoder: true` on the task, with no adaptation or one that leaves the "
            "encoder frozen (method 'none' with freeze_policy decoder_only or prompt_decoder: LoRA and adapters always "
            "sit in the image encoder), or train on images instead of cached embeddings"
        )
    training = [name or type(encoder).__name__ for name, m in encoder.named_modules() if m.training]
    if training:
        raise ValueError(
            f"{purpose} needs the image encoder in eval mode, but {len(training)} of its modules are in training "
            f"mode (e.g. {training[0]}); `freeze_image_encoder: true` keeps it in eval mode"
        )


def check_cached_embeddings(encoder: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's cached embeddings, after checking they are what ``encoder`` computes.

    Checks: ``encoder`` is frozen and in eval mode (:func:`require_frozen_encoder`), and the batch's
    ``"embedding_fingerprint"`` (the encoder hash stored with the cache) equals ``encoder``'s
    (:func:`encoder_fingerprint`, recomputed only when its weights change, e.g. after a checkpoint is loaded).

    Args:
        encoder: the task's image encoder.
        batch: with ``"image_embeddings"`` ``[B, C, h, w]`` and ``"embedding_fingerprint"`` (str, or a list of
            B equal strings).

    Returns:
        ``batch["image_embeddings"]`` ``[B, C, h, w]``.

    Raises:
        ValueError: trainable / training-mode encoder, different encoder, wrong tensor rank.
        KeyError: no fingerprint in the batch.
    """
    require_frozen_encoder(encoder)
    embeddings = batch["image_embeddings"]
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 4:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"batch['image_embeddings'] must be a [B, C, h, w] tensor, got {shape}")
    if "embedding_fingerprint" not in batch:
        raise KeyError(
            "batch has 'image_embeddings' but no 'embedding_fingerprint' (the hash of the encoder that computed "
            "them); use samtune.data.cached.CachedEmbeddingDataModule / collate_cached"
        )
    given = batch["embedding_fingerprint"]
    given_set = {given} if isinstance(given, str) else set(given)
    mine = memoized_encoder_fingerprint(encoder)
    if given_set != {mine}:
        theirs = ", ".join(sorted(f[:12] for f in given_set))
        raise ValueError(
            f"the cached image embeddings were computed by encoder {theirs} but the task's image encoder is "
            f"{mine[:12]} (different weights): give the cached datamodule the task's model and checkpoint (or "
            "leave its `model` unset to use the task's own encoder) and let it refill the cache"
        )
    return embeddings


# --------------------------------------------------------------------------------------------------- storage
@dataclass(frozen=True)
class CacheConfig:
    """What a cache folder's embeddings were computed with.

    Attributes:
        encoder_fingerprint: :func:`encoder_fingerprint` of the image encoder.
        preprocessing: JSON-able description of the data layer's preprocessing (input size, normalisation,
            resize filter, intensity, bands; see :func:`samtune.data.cached.preprocessing_spec`).
        storage_dtype: dtype of the stored tensors.
        file_identity: how images are identified (see :func:`file_identity`).
        model: registry name of the model, for people reading the manifest (not part of the identity: the
            fingerprint is).
    """

    encoder_fingerprint: str
    preprocessing: Mapping[str, Any]
    storage_dtype: StorageDtype = "float32"
    file_identity: FileIdentity = "content"
    model: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.storage_dtype not in _DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(_DTYPES)}, got {self.storage_dtype!r}")
        if self.file_identity not in ("content", "stat"):
            raise ValueError(f"file_identity must be 'content' or 'stat', got {self.file_identity!r}")
        json.dumps(dict(self.preprocessing))  # must be plain data (raises TypeError naming the bad value)

    @property
    def config_id(self) -> str:
        """16 hex characters naming the cache sub-folder of this configuration."""
        return _sha256(CACHE_FORMAT_VERSION, self.encoder_fingerprint, dict(self.preprocessing),
                       self.storage_dtype, self.file_identity)[:16]

    def identity(self) -> dict[str, Any]:
        """The fields that define the folder (what the manifest must agree on)."""
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "encoder_fingerprint": self.encoder_fingerprint,
            "preprocessing": json.loads(json.dumps(dict(self.preprocessing))),
            "storage_dtype": self.storage_dtype,
            "file_identity": self.file_identity,
        }


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (fsync + rename)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


class EmbeddingCache:
    """One configuration's folder of cached embeddings (see the module docstring for the layout and keys).

    Args:
        root: the cache folder (created on first write); several configurations can share it.
        config: what the embeddings are computed with.
    """

    def __init__(self, root: str | Path, config: CacheConfig) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"cache_dir {self.root} exists and is not a folder")
        self.config = config
        self.directory = self.root / config.config_id
        self.dtype = _DTYPES[config.storage_dtype]
        self._shape: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.directory)!r}, dtype={self.config.storage_dtype})"

    # ------------------------------------------------------------------------------ keys and manifest
    def key(self, identity: str, view: str = "identity") -> str:
        """40 hex characters for one image (``identity`` from :func:`file_identity`) seen through ``view``."""
        return _sha256(self.config.config_id, identity, view)[:40]

    def path(self, key: str) -> Path:
        """File of ``key``."""
        return self.directory / key[:2] / f"{key}.safetensors"

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when the folder has none yet.

        Raises:
            CorruptCacheError: unreadable, or written for another configuration.
        """
        path = self.manifest_path
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CorruptCacheError(path, f"unreadable cache manifest ({err}); delete the folder {self.directory}")
        if not isinstance(manifest, dict):
            raise CorruptCacheError(path, f"cache manifest is not a JSON object; delete the folder {self.directory}")
        expected = self.config.identity()
        found = {k: manifest.get(k) for k in expected}
        if found != expected:
            differing = sorted(k for k in expected if found[k] != expected[k])
            raise CorruptCacheError(
                path, f"manifest disagrees with this configuration on {differing}; delete the folder {self.directory}"
            )
        shape = manifest.get("embedding_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and v > 0 for v in shape)):
            raise CorruptCacheError(
                path, f"manifest has no valid embedding_shape (got {shape!r}); delete the folder {self.directory}"
            )
        return manifest

    def embedding_shape(self) -> tuple[int, ...] | None:
        """``(C, h, w)`` of every embedding in the folder (from the manifest), None before the first write."""
        if self._shape is None:
            manifest = self.read_manifest()
            if manifest is not None:
                self._shape = tuple(int(v) for v in manifest["embedding_shape"])
        return self._shape

    def _ensure_manifest(self, shape: tuple[int, ...]) -> None:
        known = self.embedding_shape()
        if known is not None:
            if known != shape:
                raise CorruptCacheError(self.manifest_path,
                                        f"embeddings of shape {known} in the manifest, but the encoder gives {shape}")
            return
        manifest = dict(self.config.identity(), embedding_shape=list(shape), model=self.config.model,
                        layout="<key[:2]>/<key>.safetensors, tensor 'embedding' [C, h, w]")
        _atomic_write(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
        self._shape = shape

    # ------------------------------------------------------------------------------ files
    def save(self, key: str, embedding: torch.Tensor, metadata: Mapping[str, str] | None = None) -> Path:
        """Store one embedding ``[C, h, w]`` (converted to the storage dtype) atomically.

        Args:
            key: from :meth:`key`.
            embedding: ``[C, h, w]``, any device.
            metadata: extra strings stored with it (e.g. the image path, the view).

        Returns:
            The file written.
        """
        from safetensors.torch import save

        if embedding.dim() != 3:
            raise ValueError(f"an embedding must be [C, h, w], got {tuple(embedding.shape)}")
        tensor = embedding.detach().to("cpu", self.dtype).contiguous()
        self._ensure_manifest(tuple(tensor.shape))
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta.update(key=key, dtype=self.config.storage_dtype,
                    sha256=hashlib.sha256(_tensor_bytes(tensor)).hexdigest())
        path = self.path(key)
        _atomic_write(path, save({TENSOR_NAME: tensor}, metadata=meta))
        return path

    def _read(self, path: Path, key: str, data: bool) -> torch.Tensor | None:
        """Check the header (and with ``data`` the tensor and its SHA-256); the tensor when ``data``."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = self._check_header(handle, path, key)
                if not data:
                    return None
                try:
                    tensor = handle.get_tensor(TENSOR_NAME)
                except Exception as err:  # noqa: BLE001
                    raise CorruptCacheError(path, f"tensor data unreadable ({err})") from None
        except CorruptCacheError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad headers
            raise CorruptCacheError(path, f"not a readable safetensors file ({err})") from None
        if hashlib.sha256(_tensor_bytes(tensor)).hexdigest() != meta.get("sha256"):
            raise CorruptCacheError(path, "tensor bytes do not match their SHA-256 (damaged file)")
        return tensor

    def _check_header(self, handle: Any, path: Path, key: str) -> dict[str, str]:
        meta = handle.metadata() or {}
        shape = self.embedding_shape()
        if meta.get("key") != key:
            raise CorruptCacheError(path, f"holds key {meta.get('key')!r}, expected {key!r}")
        if TENSOR_NAME not in handle.keys():
            raise CorruptCacheError(path, f"no tensor {TENSOR_NAME!r} (has {sorted(handle.keys())})")
        info = handle.get_slice(TENSOR_NAME)
        if info.get_dtype() != _SAFETENSORS_DTYPES[self.config.storage_dtype]:
            raise CorruptCacheError(path, f"dtype {info.get_dtype()}, expected {self.config.storage_dtype}")
        if shape is not None and tuple(info.get_shape()) != shape:
            raise CorruptCacheError(path, f"shape {tuple(info.get_shape())}, expected {shape} (the manifest's)")
        return meta

    def load(self, key: str, source: str = "") -> torch.Tensor:
        """The embedding of ``key``, fully checked (key, dtype, shape, SHA-256 of the bytes).

        Args:
            key: from :meth:`key`.
            source: the image it belongs to, named in errors.

        Returns:
            ``[C, h, w]`` float32.

        Raises:
            CacheMissError: no file for ``key``.
            CorruptCacheError: the file is unreadable or does not match (named, with what to do).
        """
        path = self.path(key)
        if not path.is_file():
            raise CacheMissError(
                path, f"no cached embedding for {source or 'this image'}: the image changed after the cache was "
                "filled, or the cache was not filled for it (the datamodule fills it in setup)"
            )
        try:
            tensor = self._read(path, key, data=True)
        except CorruptCacheError as err:
            raise CorruptCacheError(
                err.path, f"{err.problem}; image: {source or '?'}. Delete the file (or run the datamodule with "
                "verify='full', which recomputes damaged entries in setup)"
            ) from None
        return tensor.float()

    def contains(self, key: str, verify: Verify = "header") -> bool:
        """Whether a valid file exists for ``key``; a damaged one is reported (warning) and counts as missing.

        Args:
            key: from :meth:`key`.
            verify: ``"header"`` checks the safetensors header and metadata (cheap); ``"full"`` also reads the
                data and checks its SHA-256.
        """
        if verify not in ("header", "full"):
            raise ValueError(f"verify must be 'header' or 'full', got {verify!r}")
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            self._read(path, key, data=verify == "full")
        except CorruptCacheError as err:
            logger.warning("corrupt cache file, recomputing it: %s", err)
            return False
        return True

    # ------------------------------------------------------------------------------ filling
    @torch.no_grad()
    def encode_and_store(
        self,
        encoder: nn.Module,
        items: Iterable[tuple[str, torch.Tensor, Mapping[str, str]]],
        batch_size: int = 8,
        device: torch.device | str | None = None,
    ) -> int:
        """Run ``encoder`` over images and store the embeddings.

        Args:
            encoder: the frozen image encoder, in eval mode, on ``device``.
            items: ``(key, image [3, S, S] preprocessed, metadata)`` of the entries to compute.
            batch_size: images per encoder call.
            device: where to run (default: the encoder's device).

        Returns:
            Number of embeddings written.
        """
        if batch_size <= 0:
            raise ValueError(f"encode_batch_size must be positive, got {batch_size}")
        require_frozen_encoder(encoder, "filling the embedding cache")
        if device is None:
            device = next(encoder.parameters()).device
        written = 0
        pending: list[tuple[str, torch.Tensor, Mapping[str, str]]] = []

        def flush() -> None:
            nonlocal written
            images = torch.stack([image for _, image, _ in pending]).to(device, torch.float32)
            out = encoder(images)
            for (key, _, meta), embedding in zip(pending, out):
                self.save(key, embedding, meta)
            written += len(pending)
            pending.clear()

        for item in items:
            pending.append(item)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        return written

