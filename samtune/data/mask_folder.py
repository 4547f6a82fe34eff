"""Folders of images and mask images paired by name (medical, microscopy, satellite exports).

``image_dir/<name>.<ext>`` pairs with ``mask_dir/<name><mask_suffix>.<ext>`` (any image extension, TIFF included;
masks must be stored losslessly: JPEG, lossy WebP and JPEG-in-TIFF masks are rejected, see
:func:`samtune.data.io.read_label_map`).
The masks may share the images' folder (``mask_dir == image_dir``, e.g. ``x.png`` + ``x_mask.png``): a file whose stem
is another file's stem plus ``mask_suffix`` (required then) is that file's mask, and not an image; a file whose name
merely ends with the suffix (``scan_mask.png`` without a ``scan.png``) stays an image.
Mask images are read as label maps and turned into instances according to ``mask_type``:

* ``"binary"``: all foreground (non-background, non-ignored) pixels form one instance;
* ``"components"``: each connected component of the foreground is an instance (e.g. EM cells = components of 255);
* ``"instance"``: each distinct non-zero label is an instance (uint16 instance maps, PNG or TIFF);
* ``"semantic"``: each connected component of each class label is an instance.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from samtune.data.base import RawSample, SegmentationDataset, read_name_list
from samtune.data.errors import SampleError
from samtune.data.io import IMAGE_SUFFIXES, read_image, read_label_map
from samtune.data.masks import Connectivity, MaskSource, MaskType, label_map_to_source


def _files_by_stem(folder: Path) -> dict[str, list[Path]]:
    """The image files of ``folder`` by stem, in sorted order: several files where they share a stem (``a.png``
    and ``a.tif``; which of them pairs with the other folder's file is ambiguous)."""
    files: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.setdefault(path.stem, []).append(path)
    return files


def image_files(image_dir: Path, mask_dir: Path, mask_suffix: str,
                listing: dict[str, list[Path]] | None = None) -> dict[str, Path]:
    """The image files of ``image_dir`` by stem (the first in sorted order where several share one), without the
    masks when they share the folder. ``listing``: ``image_dir``'s :func:`_files_by_stem`, if already made.

    Raises:
        ValueError: the folders are the same and ``mask_suffix`` is empty (every image would be its own mask).
    """
    listing = _files_by_stem(image_dir) if listing is None else listing
    files = {stem: paths[0] for stem, paths in listing.items()}
    if image_dir.resolve() != mask_dir.resolve():
        return files
    if not mask_suffix:
        raise ValueError(
            f"image_dir and mask_dir are the same folder ({image_dir}): give mask_suffix (e.g. '_mask') to tell "
            "the masks <name><mask_suffix>.<ext> apart from the images <name>.<ext>"
        )
    return {
        stem: path for stem, path in files.items()
        if not (stem.endswith(mask_suffix) and stem[: -len(mask_suffix)] in files)
    }


class MaskFolderDataset(SegmentationDataset):
    """Image folder + mask folder dataset.

    Args:
        image_dir: folder of images.
        mask_dir: folder of mask images (may be ``image_dir``, see the module docstring).
        names: image stems to use (a split); None for all images in ``image_dir``.
        split_file: text file of stems (alternative to ``names``).
        mask_suffix: appended to the image stem to find its mask (e.g. ``"_mask"``).
        mask_type: how label maps become instances (see the module docstring).
        background: background label.
        ignore_values: labels that are neither background nor object (e.g. 255 in VOC).
        min_area: instances smaller than this many pixels (at the original resolution) are dropped.
        connectivity: 4 or 8 for connected components.
        **base: the common options of :class:`SegmentationDataset`.
    """

    def __init__(
        self,
        image_dir: str | Path,
        mask_dir: str | Path,
        names: Sequence[str] | None = None,
        split_file: str | Path | None = None,
        mask_suffix: str = "",
        mask_type: MaskType = "instance",
        background: int = 0,
        ignore_values: Sequence[int] = (),
        min_area: int = 0,
        connectivity: Connectivity = 8,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                raise ValueError(f"not a folder: {folder}")
        if mask_type not in ("binary", "components", "instance", "semantic"):
            raise ValueError(f"mask_type must be binary/components/instance/semantic, got {mask_type!r}")
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
        if names is not None and split_file is not None:
            raise ValueError("give either names or split_file, not both")
        self.mask_suffix = mask_suffix
        self.mask_type = mask_type
        self.background = background
        self.ignore_values = tuple(ignore_values)
        self.min_area = min_area
        self.connectivity = connectivity
        listings = {folder: _files_by_stem(folder) for folder in {self.image_dir, self.mask_dir}}  # one pass each
        self._images = image_files(self.image_dir, self.mask_dir, mask_suffix, listings[self.image_dir])
        self._masks = {stem: paths[0] for stem, paths in listings[self.mask_dir].items()}
        self._shared_stems = {folder: {stem: paths for stem, paths in listing.items() if len(paths) > 1}
                              for folder, listing in listings.items()}
        if split_file is not None:
            names = read_name_list(split_file)
        self.names = list(names) if names is not None else sorted(self._images)
        self._build_index()

    def _num_images(self) -> int:
        return len(self.names)

    def _image_path(self, i: int) -> Path:
        name = self.names[i]
        return self._images.get(name, self.image_dir / f"{name}.png")

    def _mask_path(self, i: int) -> Path:
        stem = self.names[i] + self.mask_suffix
        return self._masks.get(stem, self.mask_dir / f"{stem}.png")

    def _image_id(self, i: int) -> str:
        return self.names[i]

    def _load(self, i: int) -> RawSample:
        source, image_path = self._load_masks(i)
        return RawSample(read_image(image_path), source, image_path, self._mask_path(i), self.names[i])

    def _load_masks(self, i: int) -> tuple[MaskSource, Path]:
        """The masks alone, from the label image: the image's pixels are not read."""
        image_path, mask_path = self._image_path(i), self._mask_path(i)
        name = self.names[i]
        if name not in self._images:
            stem, suffix = Path(name).stem, Path(name).suffix
            hint = (f": names are file stems without the extension, e.g. {stem!r}"
                    if suffix.lower() in IMAGE_SUFFIXES and stem in self._images else "")
            raise SampleError(self.image_dir / name, f"no image named {name!r} in {self.image_dir}{hint}")
        if name + self.mask_suffix not in self._masks:
            raise SampleError(mask_path, f"no mask for image {image_path} in {self.mask_dir}")
        for folder, stem, kind in ((self.image_dir, name, "image"), (self.mask_dir, name + self.mask_suffix, "mask")):
            shared = self._shared_stems[folder].get(stem)
            if shared:
                raise SampleError(
                    folder / stem, f"{len(shared)} {kind} files share the name {stem!r} "
                    f"({', '.join(p.name for p in shared)}): images and masks pair by name without the extension, so "
                    "which one is meant is ambiguous; keep one of them in the folder",
                )
        labels = read_label_map(mask_path)
        source = label_map_to_source(
            labels, self.mask_type, self.background, self.ignore_values, self.min_area, self.connectivity
        )
        return source, image_path
