"""COCO instance annotations: one JSON with ``images``, ``annotations`` and ``categories``.

Segmentations may be polygons (nested, or a flat ``[x, y, ...]`` list), uncompressed RLE (``counts`` a list, the
``iscrowd`` form) or compressed RLE (``counts`` a string); polygon parts of fewer than 3 points enclose nothing
and are left out (an annotation made only of them is an empty mask, passed over like any empty mask). Crowd
annotations are left out unless ``include_crowd``; ``category_ids`` keeps only those categories. Images left
without annotations by these filters are not indexed (they are counted in :attr:`COCODataset.num_unannotated`).
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from samtune.data.base import RawSample, SegmentationDataset
from samtune.data.errors import SampleError
from samtune.data.io import image_shape, read_image
from samtune.data.masks import RLEMaskSource, as_integer, file_label, segmentation_to_rle

logger = logging.getLogger("samtune.data")


def load_coco_index(annotation_file: str | Path) -> dict[str, Any]:
    """Read a COCO JSON and check its top-level structure.

    Raises:
        ValueError: missing file, invalid JSON, or missing ``images`` / ``annotations``.
    """
    path = Path(annotation_file)
    if not path.is_file():
        raise ValueError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid JSON ({exc}); expected a COCO instances file") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images' and 'annotations' lists (COCO instances "
                         f"format), got a {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: expected a list under '{key}' (COCO instances format)")
    return data


def _required_int(path: Path, section: str, k: int, entry: Any, key: str) -> int:
    """``entry[key]`` as an int; ValueError naming the file, the entry (``section[k]``, with its ``id``) and the key
    when the entry is not an object, lacks the key or holds something that is not an integer."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {section}[{k}] must be a JSON object, got {type(entry).__name__}")
    where = f"{path}: {section}[{k}]" + (f" (id {entry['id']!r})" if key != "id" and "id" in entry else "")
    if key not in entry:
        raise ValueError(f"{where} has no '{key}' (required by the COCO instances format)")
    value = as_integer(entry[key])
    if value is None:
        raise ValueError(f"{where}: '{key}' must be an integer, got {entry[key]!r}")
    return value


def index_coco(
    annotation_file: str | Path,
    category_ids: Sequence[int] | None = None,
    include_crowd: bool = False,
) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    """Read and check a COCO JSON; the image entries by id and the annotations that the filters keep, by image id.

    Args:
        annotation_file: the COCO JSON.
        category_ids: keep only annotations of these categories; None for all.
        include_crowd: keep ``iscrowd=1`` annotations too.

    Returns:
        ``(images, annotations)``: ``{id: image entry}`` of every image, ``{image id: [annotation, ...]}`` of the
        kept annotations (images without one are absent).

    Raises:
        ValueError: see :class:`COCODataset`.
    """
    path = Path(annotation_file)
    data = load_coco_index(path)
    images: dict[int, dict[str, Any]] = {}
    positions: dict[int, int] = {}
    for k, img in enumerate(data["images"]):
        image_id = _required_int(path, "images", k, img, "id")
        if image_id in positions:
            raise ValueError(f"{path}: images[{k}] repeats the id {image_id} of images[{positions[image_id]}]; image "
                             "ids must be unique (annotations name their image by id, e.g. after merging two files)")
        positions[image_id] = k
        if "file_name" not in img:
            raise ValueError(f"{path}: images[{k}] (id {image_id}) has no 'file_name' (required by the COCO "
                             "instances format: the image's path relative to the image folder)")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise ValueError(f"{path}: images[{k}] (id {image_id}): 'file_name' must be a non-empty path, got "
                             f"{img['file_name']!r}")
        for key in ("height", "width"):
            if key in img and _required_int(path, "images", k, img, key) <= 0:
                raise ValueError(f"{path}: images[{k}] (id {image_id}): '{key}' must be a positive integer, got "
                                 f"{img[key]!r}")
        images[image_id] = img
    wanted_categories = set(int(c) for c in category_ids) if category_ids is not None else None
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    orphans: dict[int, int] = {}  # image id named by annotations but by no image entry -> annotation count
    for k, ann in enumerate(data["annotations"]):
        image_id = _required_int(path, "annotations", k, ann, "image_id")
        if image_id not in images:
            orphans[image_id] = orphans.get(image_id, 0) + 1
        for key in ("id", "category_id"):  # optional here, but integers where given
            if key in ann:
                _required_int(path, "annotations", k, ann, key)
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            where = f"annotations[{k}]" + (f" (id {ann['id']!r})" if "id" in ann else "")
            raise ValueError(f"{path}: {where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        if not include_crowd and crowd:
            continue
        if wanted_categories is not None and int(ann.get("category_id", -1)) not in wanted_categories:
            continue
        by_image[image_id].append(ann)
    if orphans:
        logger.warning("%s: %d annotation(s) name image ids that no entry of 'images' has (%s%s); they are left out",
                       path, sum(orphans.values()), ", ".join(str(i) for i in list(orphans)[:5]),
                       ", ..." if len(orphans) > 5 else "")
    return images, by_image


def filters_text(category_ids: Sequence[int] | None, include_crowd: bool) -> str:
    """The annotation filters, as named in errors."""
    categories = list(category_ids) if category_ids is not None else None
    return f"include_crowd={include_crowd}, category_ids={categories}"


class COCODataset(SegmentationDataset):
    """COCO instances dataset.

    Args:
        annotation_file: the COCO JSON.
        image_dir: folder that ``file_name`` entries are relative to (default: the JSON's folder).
        image_ids: COCO image ids to use (a split); None for all.
        category_ids: keep only annotations of these categories; None for all.
        include_crowd: also use ``iscrowd=1`` annotations as instances.
        **base: the common options of :class:`SegmentationDataset`.

    Raises:
        ValueError: the file is missing or malformed: an image entry without an integer ``id`` or a
            ``file_name``, with the ``id`` of another, or with a ``height`` / ``width`` that is not a positive
            integer; an annotation without an integer ``image_id``, with an ``id`` / ``category_id`` that is not an
            integer or an ``iscrowd`` other than 0 / 1 (named by file, entry and key).
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path | None = None,
        image_ids: Sequence[int] | None = None,
        category_ids: Sequence[int] | None = None,
        include_crowd: bool = False,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir) if image_dir is not None else self.annotation_file.parent
        images, by_image = index_coco(self.annotation_file, category_ids, include_crowd)
        if image_ids is None:
            ids = sorted(images)
        else:
            ids = [int(i) for i in image_ids]
            unknown = [i for i in ids if i not in images]
            if unknown:
                raise ValueError(f"{self.annotation_file}: image ids not in the file: {unknown[:10]}")
        self.image_ids = [i for i in ids if by_image.get(i)]
        self.num_unannotated = len(ids) - len(self.image_ids)
        if self.num_unannotated:
            logger.info("%s: %d images without matching annotations left out", self.annotation_file,
                        self.num_unannotated)
        self.images = images
        self.annotations = by_image
        self._build_index()

    def _num_images(self) -> int:
        return len(self.image_ids)

    def _image_path(self, i: int) -> Path:
        return self.image_dir / self.images[self.image_ids[i]]["file_name"]

    def _image_id(self, i: int) -> str:
        return str(self.image_ids[i])

    def _load(self, i: int) -> RawSample:
        image_id = self.image_ids[i]
        info = self.images[image_id]
        image_path = self._image_path(i)
        image = read_image(image_path)
        height, width = image.shape[:2]
        if "height" in info and "width" in info and (int(info["height"]), int(info["width"])) != (height, width):
            raise SampleError(
                file_label(self.annotation_file, f"image {image_id}"),
                f"annotated size {info['height']}x{info['width']} differs from {image_path} ({height}x{width})",
            )
        return RawSample(image, self._mask_source(image_id, height, width), image_path, self.annotation_file,
                         str(image_id))

    def _load_masks(self, i: int) -> tuple[RLEMaskSource, Path]:
        """The masks alone, sized from the annotation (or the image file's header): no pixels read."""
        image_id, image_path = self.image_ids[i], self._image_path(i)
        info = self.images[image_id]
        if "height" in info and "width" in info:
            height, width = int(info["height"]), int(info["width"])
        else:
            height, width = image_shape(image_path)
        return self._mask_source(image_id, height, width), image_path

    def _mask_source(self, image_id: Any, height: int, width: int) -> RLEMaskSource:
        rles, ids = [], []
        for ann in self.annotations[image_id]:
            where = file_label(self.annotation_file, f"annotation {ann.get('id')} of image {image_id}")
            if "segmentation" not in ann:
                raise SampleError(where, "annotation has no 'segmentation'")
            rles.append(segmentation_to_rle(ann["segmentation"], height, width, where))
            ids.append(int(ann.get("id", len(ids))))
        return RLEMaskSource(rles, ids, height, width)
