"""SA-1B: a folder of ``<id>.jpg`` + ``<id>.json`` (the official per-image annotation files).

Each JSON holds ``{"image": {"image_id", "width", "height", "file_name"}, "annotations": [{"id",
"segmentation": {"size": [h, w], "counts": str}, "bbox", "area", ...}]}``. Masks are validated when the JSON is
read and decoded with pycocotools only for the (at most ``max_masks_per_image``) sampled annotations; masks
covering more than 90% of the image are dropped as in the SAM paper.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from samtune.data.base import RawSample, SegmentationDataset, read_name_list
from samtune.data.errors import SampleError
from samtune.data.io import image_shape, read_image
from samtune.data.masks import RLEMaskSource, as_integer, file_label, validate_rle


class SA1BDataset(SegmentationDataset):
    """SA-1B folder dataset.

    Args:
        root: folder with ``<id>.jpg`` and ``<id>.json`` pairs.
        names: ids (file stems) to use; None for every JSON in ``root``.
        split_file: text file of ids, one per line (alternative to ``names``).
        max_mask_area_fraction: masks larger than this fraction of the image are dropped (0.9 as in SAM).
        **base: the common options of :class:`SegmentationDataset` (image size, normalisation, ...).
    """

    def __init__(
        self,
        root: str | Path,
        names: Sequence[str] | None = None,
        split_file: str | Path | None = None,
        *,
        max_mask_area_fraction: float = 0.9,
        **base: Any,
    ) -> None:
        super().__init__(max_mask_area_fraction=max_mask_area_fraction, **base)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"SA-1B root is not a folder: {self.root}")
        if names is not None and split_file is not None:
            raise ValueError("give either names or split_file, not both")
        if split_file is not None:
            names = read_name_list(split_file)
        if names is None:
            names = sorted(p.stem for p in self.root.glob("*.json"))
        self.names = list(names)
        self._build_index()

    def _num_images(self) -> int:
        return len(self.names)

    def _image_path(self, i: int) -> Path:
        return self.root / f"{self.names[i]}.jpg"

    def _image_id(self, i: int) -> str:
        return self.names[i]

    def _load(self, i: int) -> RawSample:
        json_path, record = self._record(i)
        image_path = self._image_path(i)
        image = read_image(image_path)
        height, width = image.shape[:2]
        info = record.get("image", {})
        if "height" in info and "width" in info and (int(info["height"]), int(info["width"])) != (height, width):
            raise SampleError(
                json_path, f"annotated image size {info['height']}x{info['width']} differs from {image_path} "
                f"({height}x{width})"
            )
        return RawSample(image, _mask_source(record, json_path, height, width), image_path, json_path,
                         self.names[i])

    def _load_masks(self, i: int) -> tuple[RLEMaskSource, Path]:
        """The masks alone, sized from the JSON's image record (or the image file's header): no pixels read."""
        json_path, record = self._record(i)
        image_path = self._image_path(i)
        info = record.get("image", {})
        if "height" in info and "width" in info:
            height, width = int(info["height"]), int(info["width"])
        else:
            height, width = image_shape(image_path)
        return _mask_source(record, json_path, height, width), image_path

    def _record(self, i: int) -> tuple[Path, dict[str, Any]]:
        """The image's SA-1B JSON file and its parsed, shape-checked content."""
        json_path = self.root / f"{self.names[i]}.json"
        if not json_path.is_file():
            raise SampleError(json_path, "annotation file not found")
        try:
            record = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SampleError(json_path, f"invalid JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("annotations"), list):
            raise SampleError(json_path, "expected an object with an 'annotations' list (SA-1B format)")
        _check_fields(record, json_path)
        return json_path, record


def _check_fields(record: dict[str, Any], json_path: Path) -> None:
    """Raise :class:`SampleError` naming the JSON file (and the annotation's index) for a field of the wrong type:
    ``"image"`` not an object, its ``height`` / ``width`` not positive integers, an annotation not an object or
    its ``id`` not an integer. (Segmentations are checked when they are decoded.)"""
    info = record.get("image", {})
    if not isinstance(info, dict):
        raise SampleError(json_path, f"'image' must be a JSON object (SA-1B format), got {type(info).__name__}")
    for key in ("height", "width"):
        if key in info and _as_int(info[key], minimum=1) is None:
            raise SampleError(json_path, f"image '{key}' must be a positive integer, got {info[key]!r}")
    for n, ann in enumerate(record["annotations"]):
        where = file_label(json_path, f"annotations[{n}]")
        if not isinstance(ann, dict):
            raise SampleError(where, f"an annotation must be a JSON object (SA-1B format), got {type(ann).__name__}")
        if "id" in ann and _as_int(ann["id"]) is None:
            raise SampleError(where, f"'id' must be an integer, got {ann['id']!r}")


def _as_int(value: Any, minimum: int | None = None) -> int | None:
    """``value`` as an int (see :func:`samtune.data.masks.as_integer`), or None when it is not an integer (at
    least ``minimum``)."""
    number = as_integer(value)
    return number if number is not None and (minimum is None or number >= minimum) else None


def _mask_source(record: dict[str, Any], json_path: Path, height: int, width: int) -> RLEMaskSource:
    rles, ids = [], []
    for n, ann in enumerate(record["annotations"]):
        where = file_label(json_path, f"annotation {ann.get('id', n)}")
        if "segmentation" not in ann:
            raise SampleError(where, "annotation has no 'segmentation'")
        rles.append(validate_rle(ann["segmentation"], height, width, where))
        ids.append(int(ann.get("id", n)))
    return RLEMaskSource(rles, ids, height, width)
