"""Instance masks from every annotation form: COCO RLE (compressed / uncompressed), polygons, label maps.

RLEs are validated *before* pycocotools sees them (its C decoder writes past the buffer on run lengths that do
not add up to H*W), then decoded by pycocotools. Label maps become instances with vectorised comparisons and
OpenCV connected components.

Boxes follow the official ``segment_anything.utils.amg.batched_mask_to_box`` (and torchvision's
``masks_to_boxes``) convention: ``(x1, y1, x2, y2)`` are inclusive pixel indices, x1/y1 the first and x2/y2 the
last column/row holding the mask. The prompt encoder adds 0.5, so box corners are the centres of the extreme
pixels, like point prompts. (The COCO/SA-1B ``bbox`` XYWH has ``x + w = x2 + 1``.)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from samtune.data.errors import SampleError
from samtune.modeling.preprocessing import Interpolation, resize_image_to

Connectivity = Literal[4, 8]


# ----------------------------------------------------------------------------------------------- RLE parsing
def parse_compressed_counts(counts: str | bytes) -> np.ndarray:
    """Decode COCO's compressed RLE string into run lengths (vectorised port of the documented format).

    Each value is written in 5-bit groups (char - 48), bit 0x20 marks continuation, bit 0x10 of the last group is
    the sign; from the fourth value on, values are stored as the difference to the value two places before.

    Args:
        counts: the ``counts`` string of a compressed RLE.

    Returns:
        ``[R]`` int64 run lengths, alternating background / foreground, starting with background.

    Raises:
        ValueError: characters outside the alphabet or a truncated last value.
    """
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    chars = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, dtype=np.int64)
    if chars.min() < 0 or chars.max() > 63:
        raise ValueError("compressed RLE counts contain characters outside '0'..'o'")
    last = (chars & 0x20) == 0
    if not last[-1]:
        raise ValueError("compressed RLE counts end inside a value")
    group = np.concatenate([[0], np.cumsum(last)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    position = np.arange(chars.size) - starts[group]
    if position.max() > 11:
        raise ValueError("compressed RLE count too large")
    values = np.zeros(starts.size, dtype=np.int64)
    np.add.at(values, group, (chars & 0x1F) << (5 * position))
    negative = (chars[last] & 0x10) != 0
    values[negative] |= -1 << (5 * (position[last][negative] + 1))
    if values.size > 2:
        values[2::2] = np.cumsum(values[2::2])
        values[1::2] = np.cumsum(values[1::2])
    return values


def validate_rle(rle: dict[str, Any], height: int, width: int, where: str | Path) -> dict[str, Any]:
    """Check an RLE against the image it belongs to and return it in pycocotools' compressed form.

    Args:
        rle: ``{"size": [h, w], "counts": str | bytes | list[int]}``.
        height, width: the image size the mask must have.
        where: file (and annotation) named in errors.

    Returns:
        ``{"size": [h, w], "counts": bytes}`` safe to hand to ``pycocotools.mask.decode``.

    Raises:
        SampleError: wrong size, malformed counts, negative runs, or runs not summing to h*w.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise SampleError(where, "RLE segmentation must be a dict with 'size' and 'counts'")
    size = rle["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise SampleError(where, f"RLE 'size' must be [height, width], got {size!r}")
    try:
        h, w = int(size[0]), int(size[1])
    except (TypeError, ValueError):
        raise SampleError(where, f"RLE 'size' must be [height, width] (integers), got {size!r}") from None
    if (h, w) != (height, width):
        raise SampleError(where, f"RLE size {h}x{w} differs from the image size {height}x{width}")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        try:
            runs = parse_compressed_counts(counts)
        except ValueError as exc:
            raise SampleError(where, f"invalid compressed RLE: {exc}") from exc
        compressed = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    elif isinstance(counts, (list, tuple)):
        runs = np.asarray(counts, dtype=np.float64)
        if runs.size and (not np.all(np.isfinite(runs)) or not np.array_equal(runs, np.round(runs))):
            raise SampleError(where, "invalid uncompressed RLE: counts must be integers")
        runs = runs.astype(np.int64)
        compressed = None
    else:
        raise SampleError(where, f"RLE 'counts' must be a string or a list of ints, got {type(counts).__name__}")
    if runs.size and runs.min() < 0:
        raise SampleError(where, "invalid RLE: negative run length")
    total = int(runs.sum())
    if total != h * w:
        raise SampleError(where, f"invalid RLE: run lengths sum to {total}, expected {h}*{w}={h * w}")
    if compressed is None:
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in runs]}, h, w)
    return compressed


def polygons_to_rle(polygons: Sequence[Any], height: int, width: int, where: str | Path) -> dict[str, Any]:
    """Rasterise COCO polygons (nested ``[[x, y, ...], ...]`` or a flat ``[x, y, ...]``) into one compressed RLE.

    A part with fewer than 3 points (real COCO-style files hold some) encloses no area and is left out, as is an
    empty list: an annotation with nothing else gives an empty mask, which samples and evaluation pass over like
    any empty mask. (pycocotools alone would read a 2-point part as a box.)

    Raises:
        SampleError: odd coordinate counts or non-finite coordinates.
    """
    if len(polygons) and not isinstance(polygons[0], (list, tuple, np.ndarray)):
        polygons = [polygons]  # a flat polygon, not nested
    cleaned: list[list[float]] = []
    for poly in polygons:
        try:
            coords = np.asarray(poly, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise SampleError(where, f"a polygon must be a list of numbers [x1, y1, x2, y2, ...], got "
                                     f"{_short(poly)}") from None
        if coords.size % 2:
            raise SampleError(where, f"polygon needs an even number of coordinates (x, y pairs), got {coords.size}")
        if not np.all(np.isfinite(coords)):
            raise SampleError(where, "polygon has non-finite coordinates")
        if coords.size >= 6:
            cleaned.append(coords.tolist())
    if not cleaned:
        return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
    return mask_utils.merge(mask_utils.frPyObjects(cleaned, height, width))


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about large JSON values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def segmentation_to_rle(segmentation: Any, height: int, width: int, where: str | Path) -> dict[str, Any]:
    """Any COCO ``segmentation`` (polygons, flat polygon, RLE compressed or not) -> validated compressed RLE."""
    if isinstance(segmentation, dict):
        return validate_rle(segmentation, height, width, where)
    if isinstance(segmentation, (list, tuple)):
        return polygons_to_rle(segmentation, height, width, where)
    raise SampleError(where, f"unsupported segmentation type {type(segmentation).__name__}")


def rle_areas(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """``[N]`` int64 pixel counts of compressed RLEs (``pycocotools.mask.area``, called on at most 255 at a time:
    pycocotools 2.0.11 under NumPy 2 raises OverflowError for a list of 256 or more)."""
    chunks = [mask_utils.area(list(rles[i : i + 255])) for i in range(0, len(rles), 255)]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------------------------- sources
class MaskSource(ABC):
    """The candidate instance masks of one image, decoded on demand.

    Attributes:
        height, width: image size the masks belong to.
        ids: ``[N]`` int64 instance ids.
        ignore: ``[H, W]`` bool pixels that are neither object nor background (void labels, ``ignore_values``), or
            None when the image has none; evaluation leaves them out of IoUs and click placement.
    """

    height: int
    width: int
    ids: np.ndarray
    ignore: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @abstractmethod
    def areas(self) -> np.ndarray:
        """``[N]`` int64 pixel counts, without decoding where possible."""

    @abstractmethod
    def decode(self, indices: np.ndarray) -> np.ndarray:
        """Decode the chosen masks.

        Args:
            indices: ``[k]`` positions into this source.

        Returns:
            ``[k, H, W]`` uint8 (0/1) array (may be a strided view).
        """

    def decode_window(self, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Decode the chosen masks inside a window (crops, tiles and regions of large rasters).

        This generic version decodes whole masks and cuts them; the sources here override it (and
        :meth:`window_areas`) to decode only the window, so memory follows the window's size, not the image's.

        Args:
            indices: ``[k]`` positions into this source.
            top, left, height, width: the window, clipped to the image.

        Returns:
            ``[k, h, w]`` uint8 (0/1) array, ``(h, w)`` the clipped window's size.
        """
        return np.ascontiguousarray(self.decode(indices)[:, top : top + height, left : left + width])

    def window_areas(self, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
        """``[k]`` int64 pixel counts of the chosen masks inside a window (clipped to the image)."""
        masks = self.decode_window(indices, top, left, height, width)
        return masks.reshape(len(masks), -1).sum(1, dtype=np.int64)


class RLEMaskSource(MaskSource):
    """Masks held as validated compressed RLEs, decoded by pycocotools only when sampled."""

    def __init__(self, rles: list[dict[str, Any]], ids: Sequence[int], height: int, width: int) -> None:
        self.rles = rles
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.height, self.width = height, width
        self._bboxes: np.ndarray | None = None  # [N, 4] XYWH (pycocotools toBbox), computed when first needed
        self._runs: dict[int, np.ndarray] = {}  # run lengths of the masks decoded by window so far

    def areas(self) -> np.ndarray:
        return rle_areas(self.rles)

    def decode(self, indices: np.ndarray) -> np.ndarray:
        if len(indices) == 0:
            return np.zeros((0, self.height, self.width), dtype=np.uint8)
        decoded = mask_utils.decode([self.rles[int(i)] for i in indices])  # [H, W, k], Fortran order
        return decoded.transpose(2, 0, 1)

    def _touching(self, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Which of the chosen masks have their bounding box overlap the window (``[k]`` bool)."""
        if self._bboxes is None:
            self._bboxes = (np.asarray(mask_utils.toBbox(self.rles), dtype=np.float64).reshape(-1, 4)
                            if self.rles else np.zeros((0, 4)))
        x, y, w, h = self._bboxes[np.asarray(indices, dtype=np.int64)].T
        return (w > 0) & (x < left + width) & (x + w > left) & (y < top + height) & (y + h > top)

    def decode_window(self, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
        height, width = min(height, self.height - top), min(width, self.width - left)
        out = np.zeros((len(indices), height, width), dtype=np.uint8)
        for row in np.flatnonzero(self._touching(indices, top, left, height, width)):
            out[row] = rle_window(self._runs_of(int(indices[row])), self.height, top, left, height, width)
        return out

    def window_areas(self, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
        height, width = min(height, self.height - top), min(width, self.width - left)
        areas = np.zeros(len(indices), dtype=np.int64)
        for row in np.flatnonzero(self._touching(indices, top, left, height, width)):
            window = rle_window(self._runs_of(int(indices[row])), self.height, top, left, height, width)
            areas[row] = int(window.sum(dtype=np.int64))
        return areas

    def _runs_of(self, index: int) -> np.ndarray:
        """Run lengths of mask ``index`` (parsed once: crops retry windows, tiles overlap)."""
        runs = self._runs.get(index)
        if runs is None:
            runs = self._runs[index] = parse_compressed_counts(self.rles[index]["counts"])
        return runs


class DenseMaskSource(MaskSource):
    """Masks already in memory as ``[N, H, W]``."""

    def __init__(self, masks: np.ndarray, ids: Sequence[int]) -> None:
        self.masks = masks
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.height, self.width = int(masks.shape[1]), int(masks.shape[2])

    def areas(self) -> np.ndarray:
        return self.masks.reshape(self.masks.shape[0], -1).sum(1, dtype=np.int64)

    def decode(self, indices: np.ndarray) -> np.ndarray:
        return self.masks[np.asarray(indices, dtype=np.int64)].astype(np.uint8, copy=False)

    def decode_window(self, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
        window = self.masks[:, top : top + height, left : left + width]
        return window[np.asarray(indices, dtype=np.int64)].astype(np.uint8, copy=False)


class LabelMapSource(MaskSource):
    """Masks as the pixels of a label map equal to each instance's label (instance label maps)."""

    def __init__(self, labels: np.ndarray, values: np.ndarray, areas: np.ndarray, ids: Sequence[int]) -> None:
        self.labels = labels
        self.values = np.asarray(values)
        self._areas = np.asarray(areas, dtype=np.int64)
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.height, self.width = int(labels.shape[0]), int(labels.shape[1])

    def areas(self) -> np.ndarray:
        return self._areas

    def decode(self, indices: np.ndarray) -> np.ndarray:
        chosen = self.values[np.asarray(indices, dtype=np.int64)]
        return (self.labels[None] == chosen[:, None, None]).view(np.uint8)

    def decode_window(self, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
        chosen = self.values[np.asarray(indices, dtype=np.int64)]
        window = self.labels[top : top + height, left : left + width]
        return (window[None] == chosen[:, None, None]).view(np.uint8)

    def window_areas(self, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
        chosen = self.values[np.asarray(indices, dtype=np.int64)]
        values, counts = np.unique(self.labels[top : top + height, left : left + width], return_counts=True)
        if values.size == 0:
            return np.zeros(len(chosen), dtype=np.int64)
        at = np.minimum(np.searchsorted(values, chosen), values.size - 1)
        return np.where(values[at] == chosen, counts[at], 0).astype(np.int64)


class WindowMaskSource(MaskSource):
    """Some masks of another source seen through a window of its image (a ``region``), decoded on demand.

    Args:
        source: the whole image's masks.
        keep: ``[N]`` positions into ``source`` of the masks to keep.
        window: ``(top, left, height, width)`` inside ``source``'s image.
        areas: ``[N]`` pixel counts of the kept masks inside the window.
    """

    def __init__(self, source: MaskSource, keep: np.ndarray, window: tuple[int, int, int, int],
                 areas: np.ndarray) -> None:
        self.source = source
        self.keep = np.asarray(keep, dtype=np.int64)
        self.top, self.left, self.height, self.width = window
        self.ids = source.ids[self.keep]
        self._areas = np.asarray(areas, dtype=np.int64)

    def areas(self) -> np.ndarray:
        return self._areas

    def decode(self, indices: np.ndarray) -> np.ndarray:
        return self.decode_window(indices, 0, 0, self.height, self.width)

    def _inner(self, top: int, left: int, height: int, width: int) -> tuple[int, int, int, int]:
        """A window of this source as a window of the underlying image."""
        return self.top + top, self.left + left, min(height, self.height - top), min(width, self.width - left)

    def decode_window(self, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self.source.decode_window(self.keep[np.asarray(indices, dtype=np.int64)],
                                         *self._inner(top, left, height, width))

    def window_areas(self, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self.source.window_areas(self.keep[np.asarray(indices, dtype=np.int64)],
                                        *self._inner(top, left, height, width))


def rle_window(runs: np.ndarray, image_height: int, top: int, left: int, height: int, width: int) -> np.ndarray:
    """The ``[height, width]`` uint8 window at ``(top, left)`` of a mask given as COCO run lengths (column-major,
    alternating background / foreground from background), decoding only the window's columns.

    The window must lie inside the image.
    """
    ends = np.cumsum(runs)
    starts, ends = (ends - runs)[1::2], ends[1::2]  # foreground runs, flat column-major [start, end)
    low = left * image_height
    high = low + width * image_height
    starts, ends = np.clip(starts, low, high) - low, np.clip(ends, low, high) - low
    used = ends > starts
    edges = np.zeros(width * image_height + 1, dtype=np.int32)
    np.add.at(edges, starts[used], 1)
    np.add.at(edges, ends[used], -1)
    columns = np.cumsum(edges[:-1], dtype=np.int32).astype(np.uint8).reshape(width, image_height)
    return np.ascontiguousarray(columns[:, top : top + height].T)


# ----------------------------------------------------------------------------------------------- label maps
MaskType = Literal["binary", "components", "instance", "semantic"]


def label_map_to_source(
    labels: np.ndarray,
    mask_type: MaskType,
    background: int = 0,
    ignore_values: Sequence[int] = (),
    min_area: int = 0,
    connectivity: Connectivity = 8,
) -> LabelMapSource:
    """Turn a label image into instances.

    Args:
        labels: ``[H, W]`` integer/bool label image.
        mask_type: ``"binary"`` all foreground is one instance; ``"components"`` connected components of the
            foreground; ``"instance"`` every distinct label is an instance; ``"semantic"`` connected components
            of each class label.
        background: label of the background.
        ignore_values: labels that are neither background nor objects (e.g. 255 "void" in VOC).
        min_area: instances with fewer pixels are dropped.
        connectivity: 4 or 8 for connected components.

    Returns:
        A :class:`LabelMapSource`; ids are the labels (``"instance"``/``"binary"``) or 1..N in component order;
        its ``ignore`` holds the pixels labelled with an ``ignore_values`` label (None when there are none).
    """
    source = _label_map_instances(labels, mask_type, background, ignore_values, min_area, connectivity)
    if len(ignore_values):
        ignored = np.isin(np.asarray(labels), np.asarray(ignore_values))
        source.ignore = ignored if ignored.any() else None
    return source


def _label_map_instances(
    labels: np.ndarray,
    mask_type: MaskType,
    background: int,
    ignore_values: Sequence[int],
    min_area: int,
    connectivity: Connectivity,
) -> LabelMapSource:
    """The instances of :func:`label_map_to_source`."""
    labels = np.asarray(labels)
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)
    foreground = labels != background
    if len(ignore_values):
        foreground &= ~np.isin(labels, np.asarray(ignore_values))
    if mask_type == "binary":
        fg = foreground.view(np.uint8)
        area = int(fg.sum())
        values, areas = (np.array([1], np.int32), np.array([area])) if area >= max(min_area, 1) else (
            np.zeros(0, np.int32), np.zeros(0, np.int64))
        return LabelMapSource(fg, values, areas, values.astype(np.int64))
    if mask_type == "instance":
        values, counts = np.unique(labels[foreground], return_counts=True)
        keep = counts >= max(min_area, 1)
        return LabelMapSource(labels, values[keep], counts[keep], values[keep].astype(np.int64))
    if mask_type == "components":
        groups = [foreground]
    elif mask_type == "semantic":
        groups = [labels == value for value in np.unique(labels[foreground])]
    else:
        raise ValueError(f"mask_type must be binary/components/instance/semantic, got {mask_type!r}")
    component_map = np.zeros(labels.shape, dtype=np.int32)
    offset = 0
    for group in groups:  # one OpenCV call per class, not per pixel
        count, comp = cv2.connectedComponents(group.view(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S)
        component_map[group] = comp[group] + offset
        offset += count - 1
    values, counts = np.unique(component_map[component_map > 0], return_counts=True)
    keep = counts >= max(min_area, 1)
    values = values[keep]
    return LabelMapSource(component_map, values, counts[keep], np.arange(1, values.size + 1))


# ----------------------------------------------------------------------------------------------- geometry
def masks_to_boxes(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Tight boxes of masks, inclusive pixel indices (see the module docstring).

    Args:
        masks: ``[K, H, W]`` bool/uint8, every mask non-empty.

    Returns:
        ``[K, 4]`` float32 ``(x1, y1, x2, y2)``.
    """
    masks = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    k, h, w = masks.shape
    if k == 0:
        return torch.zeros(0, 4, dtype=torch.float32)
    masks = masks.view(np.uint8) if masks.dtype == np.bool_ else masks
    rows = masks.max(2) > 0  # [K, H]
    cols = masks.max(1) > 0  # [K, W]
    y1 = rows.argmax(1)
    y2 = h - 1 - rows[:, ::-1].argmax(1)
    x1 = cols.argmax(1)
    x2 = w - 1 - cols[:, ::-1].argmax(1)
    return torch.from_numpy(np.stack([x1, y1, x2, y2], 1).astype(np.float32))


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (pixel-centre aligned, ``nearest-exact``) of a stack of masks in one call.

    Args:
        masks: ``[K, H, W]`` uint8 (may be a strided view, e.g. pycocotools' Fortran-order output).
        size: target (h, w).

    Returns:
        ``[K, h, w]`` uint8, C-contiguous.
    """
    k, h0, w0 = masks.shape
    if (h0, w0) == tuple(size):
        return np.ascontiguousarray(masks)
    if k == 0:
        return np.zeros((0, *size), dtype=np.uint8)
    if masks.strides[1] < masks.strides[2]:  # column-major masks: resize the transposed (contiguous) layout
        src = torch.from_numpy(np.ascontiguousarray(masks.transpose(0, 2, 1)))
        out = F.interpolate(src[None], size=(size[1], size[0]), mode="nearest-exact")[0]
        return np.ascontiguousarray(out.transpose(1, 2).numpy())
    src = torch.from_numpy(np.ascontiguousarray(masks))
    return F.interpolate(src[None], size=tuple(size), mode="nearest-exact")[0].numpy()


def resize_image(image: np.ndarray, size: tuple[int, int], interpolation: Interpolation) -> np.ndarray:
    """Resize ``[H, W, 3]`` uint8 to (h, w) with the model's filter, as :class:`samtune.Predictor` resizes its input.

    ``"bilinear"``: PIL's bilinear (anti-aliased when shrinking), the official SAM predictor's; ``"area"``:
    OpenCV's ``INTER_AREA`` on the uint8 image, as LiteMedSAM's reference does. A model
    trained on other resampling than it meets at inference sees other inputs (LiteMedSAM's box IoU on the EM
    asset moves by 0.07 with the filter, see :mod:`samtune.modeling.preprocessing`).
    """
    if image.shape[:2] == tuple(size):
        return image
    out = resize_image_to(image, tuple(size), interpolation)
    if out.dtype != np.uint8:
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def as_integer(value: Any) -> int | None:
    """``value`` as an int when it is an integer: an int, a float without a fractional part (``3.0``, as some
    exporters write ids) or a string of digits; None for anything else (a bool, ``1.7``, ``"a1"``, None), where
    ``int()`` would truncate ``1.7`` to 1 and silently give an annotation to another image."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if np.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def file_label(path: str | Path, detail: str | int | None = None) -> str:
    """``"path"`` or ``"path [detail]"`` for error messages that point at one annotation of a file."""
    return str(path) if detail is None else f"{path} [{detail}]"
