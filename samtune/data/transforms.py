"""Joint image/mask transforms: resize-longest-side + normalise + pad (the model input), training augmentation.

Order applied by the datasets (see :class:`samtune.data.base.SegmentationDataset`):

1. resize the longest side to ``S`` with ``get_preprocess_shape`` rounding (image: area/bilinear, masks: nearest);
2. training only: the augmentation preset, then the user's albumentations pipeline, both on the uint8 image and
   the ``[K, h, w]`` masks jointly (albumentations ``masks=`` target, so every spatial op hits both);
   large-scale jitter (``*_lsj`` presets) rescales by U(0.1, 2.0) and random-crops to at most ``S`` x ``S``;
3. an image whose longest side grew beyond ``S`` is resized back to ``S`` (never up: jitter keeps its scale);
4. :func:`to_model_input`: normalise the un-padded content per the model's convention, then zero-pad
   bottom/right to ``S`` x ``S`` (pad after normalising, as the official predictor does).

User pipelines are albumentations' own serialisation (``A.to_dict`` form), given as a dict or a YAML/JSON file.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import numpy as np
import torch
import yaml

from samtune.data.masks import resize_image, resize_masks
from samtune.modeling.preprocessing import Interpolation, Normalization, get_preprocess_shape, normalize_image

AugmentationPreset = Literal["none", "natural", "overhead", "natural_lsj", "overhead_lsj"]
AUGMENTATION_PRESETS: tuple[str, ...] = ("none", "natural", "overhead", "natural_lsj", "overhead_lsj")
LSJ_SCALE: tuple[float, float] = (0.1, 2.0)


def preset_transforms(preset: AugmentationPreset) -> list[A.BasicTransform]:
    """The albumentations transforms of a preset (large-scale jitter is applied separately).

    * ``natural``: horizontal flip, brightness/contrast (photos: no upside-down scenes).
    * ``overhead``: horizontal + vertical flips, 90-degree rotations, brightness/contrast (satellite,
      microscopy, medical slices: no canonical orientation).
    * ``*_lsj``: the same plus the SAM paper's large-scale jitter, scale 0.1-2.0.
    """
    if preset not in AUGMENTATION_PRESETS:
        raise ValueError(f"augmentation must be one of {AUGMENTATION_PRESETS}, got {preset!r}")
    if preset == "none":
        return []
    colour = A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)
    if preset.startswith("natural"):
        return [A.HorizontalFlip(p=0.5), colour]
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0), colour]


def load_pipeline(spec: str | Path | dict[str, Any] | None) -> A.BaseCompose | None:
    """A user albumentations pipeline from its serialised form.

    Args:
        spec: ``A.to_dict(pipeline)`` output (with or without the top ``{"transform": ...}`` wrapper), or the
            path of a YAML/JSON file holding it. A transform written without ``p`` gets its class's default
            probability, which for most albumentations transforms is 0.5, not 1: write ``p: 1.0`` to always apply it.

    Raises:
        ValueError: the file is missing or not valid JSON/YAML, or the dict does not describe an albumentations
            pipeline.
    """
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"augmentation_pipeline: file not found: {path}")
        text = path.read_text()
        try:
            spec = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"augmentation_pipeline {path}: invalid JSON/YAML ({exc})") from exc
        if not isinstance(spec, dict):
            raise ValueError(f"augmentation_pipeline {path}: expected a mapping, got {type(spec).__name__}")
    if "transform" not in spec:
        spec = {"transform": spec}
    try:
        pipeline = A.from_dict(spec)
    except Exception as exc:
        raise ValueError(f"augmentation_pipeline is not a valid albumentations pipeline: {exc}") from exc
    if not isinstance(pipeline, A.BaseCompose):
        pipeline = A.Compose([pipeline])
    return pipeline


class Augmenter:
    """Training augmentation of one resized sample: preset + user pipeline + optional large-scale jitter.

    Args:
        preset: see :func:`preset_transforms`.
        pipeline: extra albumentations pipeline (see :func:`load_pipeline`), applied after the preset.
        image_size: S, the model input size (jitter crops to at most S x S).
        interpolation: the model's resize filter (jitter's rescaling, and pipelines that enlarge the image).
    """

    def __init__(
        self,
        preset: AugmentationPreset = "none",
        pipeline: str | Path | dict[str, Any] | None = None,
        image_size: int = 1024,
        interpolation: Interpolation = "bilinear",
    ) -> None:
        transforms: list[Any] = preset_transforms(preset)
        user = load_pipeline(pipeline)
        if user is not None:
            transforms.append(user)
        self.compose = A.Compose(transforms, p=1.0) if transforms else None
        self.jitter = preset.endswith("_lsj")
        self.image_size = image_size
        self.interpolation = interpolation

    @property
    def active(self) -> bool:
        """Whether this augmenter changes anything."""
        return self.compose is not None or self.jitter

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment jointly.

        Args:
            image: ``[h, w, 3]`` uint8.
            masks: ``[K, h, w]`` uint8.
            rng: source of all randomness (albumentations is re-seeded from it, each transform of the preset and
                the user pipeline with a stream of its own: see :func:`seed_transforms`).

        Returns:
            image ``[h', w', 3]`` uint8 and masks ``[K, h', w']`` uint8 (same K, possibly empty masks) with
            ``max(h', w') <= S``.
        """
        if self.compose is not None:
            seed_transforms(self.compose, int(rng.integers(2**31 - 1)))
            out = self.compose(image=image, masks=masks)
            image, masks = out["image"], np.asarray(out["masks"], dtype=np.uint8).reshape(-1, *out["image"].shape[:2])
        if self.jitter:
            image, masks = large_scale_jitter(image, masks, rng, self.image_size, interpolation=self.interpolation)
        h, w = image.shape[:2]
        if max(h, w) > self.image_size:
            size = get_preprocess_shape(h, w, self.image_size)
            image, masks = resize_image(image, size, self.interpolation), resize_masks(masks, size)
        return image, masks


def seed_transforms(transform: A.BasicTransform | A.BaseCompose, seed: int | np.random.SeedSequence) -> None:
    """Give ``transform`` and every transform nested in it random generators of their own, all derived from ``seed``.

    albumentations' ``set_random_seed`` hands the *same* seed to every transform of a Compose (nested Composes
    included), so every transform draws the same numbers: two ``p=0.5`` transforms always fire together, e.g.
    horizontal and vertical flips only ever happen jointly. Here each node of the tree gets independent numpy and
    Python generators spawned from one :class:`numpy.random.SeedSequence`: the transforms draw independently and
    the whole pipeline stays reproducible from ``seed``.
    """
    sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    children = [t for t in transform.transforms if isinstance(t, (A.BasicTransform, A.BaseCompose))] \
        if isinstance(transform, A.BaseCompose) else []
    own, *child_sequences = sequence.spawn(1 + len(children))
    numpy_sequence, python_sequence = own.spawn(2)
    # on a Compose this also hands the generators down to its children; they are replaced just below
    transform.set_random_state(np.random.default_rng(numpy_sequence),
                               random.Random(int(python_sequence.generate_state(1, np.uint64)[0])))
    for child, child_sequence in zip(children, child_sequences):
        seed_transforms(child, child_sequence)


def large_scale_jitter(
    image: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    image_size: int,
    scale_range: tuple[float, float] = LSJ_SCALE,
    interpolation: Interpolation = "bilinear",
) -> tuple[np.ndarray, np.ndarray]:
    """Large-scale jitter: rescale by s ~ U(scale_range), then random-crop to at most ``S`` x ``S``.

    Args:
        image: ``[h, w, 3]`` uint8, longest side S.
        masks: ``[K, h, w]`` uint8.
        rng: random source.
        image_size: S.
        scale_range: (low, high) scale factors.
        interpolation: the model's resize filter (see :func:`samtune.data.masks.resize_image`).

    Returns:
        image ``[h', w', 3]``, masks ``[K, h', w']`` with h', w' <= S (padding comes later).
    """
    h, w = image.shape[:2]
    scale = float(rng.uniform(*scale_range))
    size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
    image, masks = resize_image(image, size, interpolation), resize_masks(masks, size)
    top = int(rng.integers(0, max(size[0] - image_size, 0) + 1))
    left = int(rng.integers(0, max(size[1] - image_size, 0) + 1))
    window = (slice(top, top + image_size), slice(left, left + image_size))
    return np.ascontiguousarray(image[window]), np.ascontiguousarray(masks[(slice(None), *window)])


def resize_longest(
    image: np.ndarray, masks: np.ndarray, image_size: int, interpolation: Interpolation
) -> tuple[np.ndarray, np.ndarray]:
    """Resize image ``[H, W, 3]`` (with the model's filter ``interpolation``) and masks ``[K, H, W]`` (nearest) so
    the longest side is ``image_size``.

    Returns:
        image ``[h, w, 3]`` uint8 and masks ``[K, h, w]`` uint8 with (h, w) = ``get_preprocess_shape``.
    """
    size = get_preprocess_shape(image.shape[0], image.shape[1], image_size)
    return resize_image(image, size, interpolation), resize_masks(masks, size)


def to_model_input(
    image: np.ndarray, masks: np.ndarray, image_size: int, normalization: Normalization
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise and pad to the model's square input.

    Args:
        image: ``[h, w, 3]`` uint8 with h, w <= S.
        masks: ``[K, h, w]`` uint8/bool.
        image_size: S.
        normalization: ``"sam"`` (mean/std on 0-255) or ``"minmax"`` (content scaled to [0, 1]).

    Returns:
        image ``[3, S, S]`` float32 and masks ``[K, S, S]`` bool, zero/False in the padding.
    """
    h, w = image.shape[:2]
    content = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    normalized = normalize_image(content, normalization)
    out_image = torch.zeros(3, image_size, image_size, dtype=torch.float32)
    out_image[:, :h, :w] = normalized
    out_masks = torch.zeros(masks.shape[0], image_size, image_size, dtype=torch.bool)
    out_masks[:, :h, :w] = torch.from_numpy(np.ascontiguousarray(masks)).bool()
    return out_image, out_masks
