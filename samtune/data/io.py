"""Reading images and label maps as users have them, and turning them into the model's 3-channel uint8 input.

Images may be 8/16-bit or float, greyscale, RGB(A) or multi-band (TIFF, channel-first or channel-last).
``prepare_image`` selects bands and applies an intensity preset; the result is ``[H, W, 3]`` uint8 on the
0-255 scale that SAM was trained on (16-bit data is quantised after windowing, as in MedSAM's preprocessing).

Intensity presets:

* ``"auto"``: uint8 unchanged, bool scaled to {0, 255}, anything else ``"percentile"``.
* ``"none"``: values used as they are, clipped to [0, 255].
* ``"minmax"``: ``(x - min) / (max - min)`` over the selected bands.
* ``"percentile"``: clip to the ``percentiles`` (default 0.5 / 99.5) then scale: 16-bit satellite and microscopy.
* ``"window"``: clip to a fixed ``window=(low, high)`` in raw units then scale: CT-like data (e.g. (-160, 240)).

Orientation: the EXIF ``Orientation`` tag of JPEG / PNG / WebP files is applied, so images, label maps and
their sizes are those that viewers show and annotation tools (labelme, CVAT) annotate, and that ``cv2.imread``'s
default (the official SAM scripts) reads. A PNG's ``eXIf`` chunk counts wherever it lies, after the pixel data
(``IDAT``) too, as for ``cv2.imread`` and Pillow's ``exif_transpose`` (Pillow's header alone only sees one
before ``IDAT``). TIFFs are read as stored (as GDAL and tifffile do).

Float images holding NaN (e.g. nodata) are rejected with a :class:`SampleError` naming the file (a dataset then
raises or skips it, per ``on_error``), and so are infinities under the presets that take their range from the
data (``auto``, ``minmax``, ``percentile``), which they would turn into an all-black image; ``window`` and
``none`` clip infinities to 0 / 255. Replace such values in the files (or choose a ``window``) to use them.
"""
from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, get_args

import cv2
import numpy as np
import tifffile
from PIL import Image

from samtune.data.errors import SampleError

Intensity = Literal["auto", "none", "minmax", "percentile", "window"]
INTENSITY_PRESETS: tuple[str, ...] = get_args(Intensity)

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
EXIF_ORIENTATION = 0x0112  # EXIF tag number of Orientation
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"  # start-of-image (+ next marker) and end-of-image markers
_PILLOW_LIMIT_LOCK = threading.Lock()


def _open_pillow(fp: Path | io.BytesIO) -> Image.Image:
    """``Image.open`` without Pillow's decompression-bomb limit (``DecompressionBombError`` above about 179 million
    pixels): label maps and headers of large rasters must open as their images do, which OpenCV and tifffile read
    (OpenCV up to 2**30 pixels)."""
    with _PILLOW_LIMIT_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _channel_last(array: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze singleton axes and move a leading band axis (``[C, H, W]`` with C <= 16 < H, W) to the end."""
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[0] <= 16 and array.shape[2] > 16:
        array = np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3):
        raise SampleError(path, f"expected a 2-D image with optional bands, got an array of shape {array.shape}")
    return array


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as it is stored.

    Args:
        path: PNG/JPEG/BMP/WebP (via OpenCV, converted to RGB order) or TIFF (via tifffile).

    Returns:
        ``[H, W]`` or ``[H, W, C]`` array in the file's dtype, channels in RGB order, turned as its EXIF
        orientation says (see the module docstring).

    Raises:
        SampleError: the file is missing, cannot be decoded, or is a JPEG cut short (libjpeg only warns about
            those, and can fill in the missing part).
    """
    path = Path(path)
    if not path.is_file():
        raise SampleError(path, "image file not found")
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            array = tifffile.imread(path)
        except Exception as exc:  # tifffile raises several types for corrupt files
            raise SampleError(path, f"cannot decode TIFF image ({type(exc).__name__}: {exc})") from exc
        return _channel_last(np.asarray(array), path)
    data = path.read_bytes()
    if data.startswith(JPEG_START):
        _check_jpeg_complete(data, path)
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if array is None:
        raise SampleError(path, "cannot decode image (corrupt or unsupported format)")
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    try:
        with _open_pillow(io.BytesIO(data)) as img:  # parses the header only
            orientation = exif_orientation(img, data)
    except Exception:  # noqa: BLE001 - a format Pillow cannot open carries no EXIF it could read
        orientation = 1
    return apply_orientation(array, orientation)


def exif_orientation(img: Image.Image, source: bytes | Path | None = None) -> int:
    """The EXIF ``Orientation`` (1-8) of an opened Pillow image, from its header (no pixels are decoded); 1 when
    the file has none or an invalid one.

    Args:
        img: the opened image.
        source: its file (path or content). A PNG's ``eXIf`` chunk may follow the pixel data, where Pillow only
            finds it once the pixels are decoded: with ``source`` the chunk is found wherever it lies.
    """
    raw = img.info.get("exif")
    if not raw and source is not None and img.format == "PNG":
        raw = png_exif(source)
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block is ignored, as viewers do
        return 1
    return value if 1 <= value <= 8 else 1


def png_exif(source: bytes | Path) -> bytes | None:
    """The content of the first ``eXIf`` chunk of a PNG file (path or bytes), wherever it lies; None when there is
    none or the file is not a PNG. Walks the chunk headers only, seeking over the data (the pixels are not read).
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
    with stream:
        if stream.read(8) != PNG_SIGNATURE:
            return None
        while len(header := stream.read(8)) == 8:
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"eXIf":
                data = stream.read(length)
                return data if len(data) == length else None
            if kind == b"IEND":
                return None
            stream.seek(length + 4, io.SEEK_CUR)  # data and CRC
    return None


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn ``[H, W(, C)]`` as EXIF ``orientation`` says (the result of Pillow's ``ImageOps.exif_transpose``).

    Orientations 5-8 swap height and width; 1 (or an unknown value) returns ``array`` itself.
    """
    if orientation == 2:
        out = array[:, ::-1]
    elif orientation == 3:
        out = array[::-1, ::-1]
    elif orientation == 4:
        out = array[::-1]
    elif orientation == 5:
        out = array.swapaxes(0, 1)
    elif orientation == 6:
        out = np.rot90(array, -1)
    elif orientation == 7:
        out = np.rot90(array, 2).swapaxes(0, 1)
    elif orientation == 8:
        out = np.rot90(array, 1)
    else:
        return array
    return np.ascontiguousarray(out)


def _check_jpeg_complete(data: bytes, path: Path) -> None:
    """Raise :class:`SampleError` when the JPEG ``data`` (of file ``path``) is cut short.

    libjpeg only warns about a truncated file ("Premature end of JPEG file"), and ``cv2.imread`` returns such an
    image with its missing rows filled in. A file ending with the end-of-image marker (after any NUL padding) is
    whole (the fast path: normal files); any other is decoded by Pillow, which raises on missing data but ignores
    bytes after the marker (trailing data some writers append).
    """
    if data.rstrip(b"\x00").endswith(JPEG_END):
        return
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Image.DecompressionBombError:
        return  # beyond Pillow's size limit: left to OpenCV's decoder
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError for truncated data, others for broken files
        raise SampleError(path, f"JPEG file cut short or corrupt: no end-of-image marker, and decoding fails "
                                f"({type(exc).__name__}: {exc})") from exc


def read_label_map(path: str | Path) -> np.ndarray:
    """Read a mask / label image keeping its integer values (palette PNGs give their indices).

    Args:
        path: PNG/BMP/lossless WebP (via Pillow, so palette indices survive) or TIFF (via tifffile).

    Returns:
        ``[H, W]`` integer or bool array, turned as its EXIF orientation says (as :func:`read_image`).

    Grey + alpha and RGBA label images (R = G = B) are read from their grey values when the alpha channel is the
    same everywhere (e.g. fully opaque) or only background (0) pixels are transparent; 16-bit colour / grey +
    alpha PNGs keep all 16 bits (Pillow would cut them to 8).

    Raises:
        SampleError: missing, undecodable, stored with lossy compression (JPEG, lossy WebP, JPEG-compressed TIFF:
            it changes label values and adds noisy edges, which would become invented instances), a colour image
            whose channels differ, or one with transparent pixels that hold labels other than 0 (undefined).
    """
    path = Path(path)
    if not path.is_file():
        raise SampleError(path, "mask file not found")
    lossy = None
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                lossy = _lossy_tiff(tif)
                if lossy is None:
                    array = np.asarray(tif.asarray())
                    # an extra sample is alpha only where the file says so (else e.g. a second label band)
                    has_alpha = any(int(kind) in (1, 2) for kind in tif.pages[0].extrasamples)
        else:
            with _open_pillow(path) as img:
                lossy = _lossy_format(img, path)
                if lossy is None:
                    pixels = _png_16bit_colour(path) if img.format == "PNG" else None
                    if pixels is None:
                        pixels = np.asarray(img)
                    has_alpha = pixels.ndim == 3 and pixels.shape[2] in (2, 4)  # LA / PA / RGBA (16-bit too)
                    array = apply_orientation(pixels, exif_orientation(img, path))
    except Exception as exc:
        raise SampleError(path, f"cannot decode mask image ({type(exc).__name__}: {exc})") from exc
    if lossy is not None:
        raise SampleError(
            path, f"mask file is {lossy}, whose lossy compression changes label values (compression noise would "
            "become invented instances): save masks as PNG, or as TIFF without JPEG compression",
        )
    array = np.squeeze(array)
    if array.ndim == 3:
        array = _single_channel_labels(array, path, has_alpha)
    if array.ndim != 2:
        raise SampleError(path, f"expected a 2-D label image, got shape {array.shape}")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise SampleError(path, "float label image holds non-integer values")
        array = array.astype(np.int64)
    return array


def _single_channel_labels(array: np.ndarray, path: Path, has_alpha: bool) -> np.ndarray:
    """The labels of a ``[H, W, C]`` label image: grey + alpha (C = 2) or RGB(A) (C = 3, 4) with equal colour
    channels and, where there is one (``has_alpha``: the file's last channel is alpha), an alpha channel that is
    the same everywhere or below its maximum only over background (0) pixels; else :class:`SampleError`."""
    channels = array.shape[2]
    if channels not in ((2, 4) if has_alpha else (3,)):
        raise SampleError(path, f"expected a single-channel label image, got shape {array.shape}")
    if channels in (3, 4) and not (np.array_equal(array[..., 0], array[..., 1])
                                   and np.array_equal(array[..., 0], array[..., 2])):
        raise SampleError(path, f"expected a single-channel label image, got shape {array.shape} with colour "
                                "channels that differ (a colour-coded mask): save the labels as one channel")
    if channels in (2, 4):
        alpha = array[..., -1]
        low, high = int(alpha.min()), int(alpha.max())
        # transparency over background (grey 0) only, as cut-out masks have it, leaves the labels unambiguous
        labelled = np.count_nonzero((alpha < high) & (array[..., 0] != 0))
        if low != high and labelled:
            kind = "grey + alpha" if channels == 2 else "RGBA"
            raise SampleError(
                path,
                f"{kind} label image whose alpha channel varies (values {low}..{high}) and whose {labelled} "
                f"pixels below alpha {high} hold labels other than 0: whether those are labelled is undefined. "
                "Save the mask without an alpha channel, first setting transparent pixels to the background label "
                "if they are background (e.g. with NumPy: labels = np.where(alpha > 0, grey, 0))",
            )
    return np.ascontiguousarray(array[..., 0])


def _png_16bit_colour(path: Path) -> np.ndarray | None:
    """The ``[H, W, C]`` pixels (channels in RGB(A) order) of a 16-bit grey + alpha / RGB / RGBA PNG file, read
    through OpenCV: Pillow reads such files as 8-bit, keeping the high byte only (label 300 read as 1). None for
    any other PNG."""
    with open(path, "rb") as f:
        header = f.read(26)
    if len(header) < 26 or header[:8] != PNG_SIGNATURE or header[12:16] != b"IHDR":
        return None
    depth, colour_type = header[24], header[25]
    if depth != 16 or colour_type not in (2, 4, 6):
        return None
    array = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 3:
        raise ValueError("OpenCV cannot decode this 16-bit PNG")
    if colour_type == 4:  # OpenCV expands grey + alpha to BGRA with equal colours
        return np.ascontiguousarray(array[..., [0, 3]])
    return np.ascontiguousarray(array[..., [2, 1, 0, *range(3, array.shape[2])]])


def _lossy_tiff(tif: tifffile.TiffFile) -> str | None:
    """``"JPEG-compressed TIFF"`` when the first page of the opened TIFF is stored with (always lossy) JPEG
    compression, else None. WebP / JPEG XL / JPEG 2000 inside TIFF may be lossless and are not judged."""
    compression = tif.pages[0].compression
    if compression in (tifffile.COMPRESSION.JPEG, tifffile.COMPRESSION.OJPEG):
        return "JPEG-compressed TIFF"
    return None


def _lossy_format(img: Image.Image, path: Path) -> str | None:
    """``"JPEG"`` or ``"lossy WebP"`` when the opened image (of file ``path``) is stored with lossy compression,
    by content (whatever the file's name), else None."""
    if img.format in ("JPEG", "MPO"):
        return "JPEG"
    if img.format == "WEBP":
        with open(path, "rb") as f:  # RIFF chunks: "VP8 " holds lossy data, "VP8L" lossless
            f.seek(12)
            while len(chunk := f.read(8)) == 8:
                if chunk[:4] in (b"VP8 ", b"VP8L"):
                    return "lossy WebP" if chunk[:4] == b"VP8 " else None
                size = int.from_bytes(chunk[4:], "little")
                f.seek(size + (size & 1), 1)
    return None


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, as :func:`read_image` gives it (EXIF orientation applied), read from its header
    only (used to plan tiles).

    Raises:
        SampleError: missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise SampleError(path, "image file not found")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                shape = tuple(int(s) for s in tif.series[0].shape if s != 1)
            if len(shape) == 3 and shape[0] <= 16 and shape[2] > 16:
                shape = shape[1:] + shape[:1]
            return shape[0], shape[1]
        with _open_pillow(path) as img:
            width, height = img.size
            if exif_orientation(img, path) in (5, 6, 7, 8):  # turned by a quarter
                width, height = height, width
        return height, width
    except Exception as exc:
        raise SampleError(path, f"cannot read image header ({type(exc).__name__}: {exc})") from exc


def select_bands(image: np.ndarray, bands: Sequence[int] | None, path: str | Path = "<image>") -> np.ndarray:
    """Pick the bands that make the 3-channel input.

    Args:
        image: ``[H, W]`` or ``[H, W, C]``.
        bands: indices into C (1 or 3 of them); None keeps grey / RGB and drops alpha.
        path: named in errors.

    Returns:
        ``[H, W, 3]`` array of the input dtype (a single band is repeated).
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if bands is not None:
        bands = list(bands)
        if len(bands) not in (1, 3):
            raise SampleError(path, f"bands must name 1 or 3 bands, got {bands}")
        if max(bands) >= image.shape[2] or min(bands) < -image.shape[2]:
            raise SampleError(path, f"bands {bands} out of range for an image with {image.shape[2]} bands")
        image = image[:, :, bands]
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4 and bands is None:
        return image[:, :, :3]
    if channels != 3:
        raise SampleError(path, f"image has {channels} bands; choose 1 or 3 of them with `bands`")
    return image


def normalize_intensity(
    image: np.ndarray,
    intensity: Intensity = "auto",
    percentiles: tuple[float, float] = (0.5, 99.5),
    window: tuple[float, float] | None = None,
    path: str | Path = "<image>",
) -> np.ndarray:
    """Map raw intensities to uint8 0-255 (see the module docstring for the presets).

    Args:
        image: ``[H, W, 3]`` any numeric dtype.
        intensity: preset name.
        percentiles: (low, high) percentiles for ``"percentile"``.
        window: (low, high) raw values for ``"window"`` (required there).
        path: named in errors.

    Returns:
        ``[H, W, 3]`` uint8.

    Raises:
        SampleError: a float image holds NaN, or +-inf under ``auto`` / ``minmax`` / ``percentile``.
        ValueError: an unknown preset, percentiles not ``0 <= low < high <= 100``, or a window not ``low < high``.
    """
    if image.dtype.kind == "f":
        _check_finite(image, intensity, path)
    if intensity == "auto":
        if image.dtype == np.uint8:
            return image
        if image.dtype == np.bool_:
            return image.astype(np.uint8) * 255
        intensity = "percentile"
    if intensity == "none":
        return image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
    if intensity == "minmax":
        low, high = float(image.min()), float(image.max())
    elif intensity == "percentile":
        _check_percentiles(percentiles)
        low, high = (float(v) for v in np.percentile(image, percentiles))
    elif intensity == "window":
        if window is None:
            raise ValueError("intensity='window' needs window=(low, high)")
        _check_window(window)
        low, high = float(window[0]), float(window[1])
    else:
        raise ValueError(f"intensity must be one of {', '.join(INTENSITY_PRESETS)}, got {intensity!r}")
    scale = 255.0 / max(high - low, 1e-8)
    out = (image.astype(np.float32) - low) * scale
    return np.clip(out, 0, 255, out=out).round().astype(np.uint8)


def prepare_image(
    image: np.ndarray,
    bands: Sequence[int] | None = None,
    intensity: Intensity = "auto",
    percentiles: tuple[float, float] = (0.5, 99.5),
    window: tuple[float, float] | None = None,
    path: str | Path = "<image>",
) -> np.ndarray:
    """``select_bands`` then ``normalize_intensity``: ``[H, W(, C)]`` raw -> ``[H, W, 3]`` uint8 (contiguous)."""
    rgb = select_bands(image, bands, path)
    return np.ascontiguousarray(normalize_intensity(rgb, intensity, percentiles, window, path))


INPUT_MAPPING_DEFAULTS: dict[str, Any] = {"bands": None, "intensity": "auto", "percentiles": (0.5, 99.5),
                                          "window": None}


def resolve_input_mapping(recorded: dict[str, Any] | None = None, **given: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`prepare_image` for inference on a trained model.

    Each setting (``bands``, ``intensity``, ``percentiles``, ``window``) is the one given (not None), else the
    one ``recorded`` (the input mapping a training checkpoint or export metadata keeps, see
    :attr:`samtune.data.datamodules.SegmentationDataModule.input_mapping`), else ``prepare_image``'s default.

    Raises:
        ValueError: an invalid combination (see :func:`check_intensity_options`), or ``percentiles`` / ``window``
            given for an intensity preset that does not use them (they would be silently ignored).
    """
    unknown = sorted(set(given) - set(INPUT_MAPPING_DEFAULTS))
    if unknown:
        raise TypeError(f"resolve_input_mapping: unknown settings {unknown}")
    mapping = dict(INPUT_MAPPING_DEFAULTS)
    for source in (recorded or {}, given):
        mapping.update({k: v for k, v in source.items() if k in mapping and v is not None})
    intensity = mapping["intensity"]
    if given.get("percentiles") is not None and intensity not in ("percentile", "auto"):
        raise ValueError(f"percentiles only act with intensity 'percentile' or 'auto', but intensity is {intensity!r}")
    if given.get("window") is not None and intensity != "window":
        raise ValueError(f"window only acts with intensity 'window', but intensity is {intensity!r}")
    check_intensity_options(intensity, mapping["percentiles"], mapping["window"])
    mapping["bands"] = None if mapping["bands"] is None else [int(b) for b in mapping["bands"]]
    mapping["percentiles"] = tuple(float(v) for v in mapping["percentiles"])
    mapping["window"] = None if mapping["window"] is None else tuple(float(v) for v in mapping["window"])
    return mapping


def check_intensity_options(
    intensity: str, percentiles: Sequence[float], window: Sequence[float] | None
) -> None:
    """Raise ValueError naming the argument unless ``intensity`` is a preset, ``percentiles`` is ``(low, high)`` with
    ``0 <= low < high <= 100`` and ``window`` (when given; required by ``"window"``) is finite with ``low < high``.

    Datasets call it when they are built, so that a bad option fails at once instead of in every sample."""
    if intensity not in INTENSITY_PRESETS:
        raise ValueError(f"intensity must be one of {', '.join(INTENSITY_PRESETS)}, got {intensity!r}")
    if intensity == "window" and window is None:
        raise ValueError("intensity='window' needs window=(low, high)")
    _check_percentiles(percentiles)
    if window is not None:
        _check_window(window)


def _check_percentiles(percentiles: Sequence[float]) -> None:
    _check_pair("percentiles", percentiles, "0 <= low < high <= 100", lambda lo, hi: 0 <= lo < hi <= 100)


def _check_window(window: Sequence[float]) -> None:
    _check_pair("window", window, "low < high, both finite (raw image units)",
                lambda lo, hi: bool(np.isfinite(lo) and np.isfinite(hi)) and lo < hi)


def _check_pair(name: str, value: Any, expected: str, valid: Callable[[float, float], bool]) -> None:
    """Raise ValueError naming argument ``name`` unless ``value`` is two numbers ``(low, high)`` that are
    ``valid``."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (low, high) with {expected}, got {value!r}") from None
    if not valid(low, high):
        raise ValueError(f"{name} must be (low, high) with {expected}, got {tuple(value)!r}")


def _check_finite(image: np.ndarray, intensity: str, path: str | Path) -> None:
    """Raise :class:`SampleError` for NaN values (any preset) or infinities (presets whose range comes from the
    data), which would otherwise make the whole image (or those pixels) an arbitrary constant."""
    if np.isfinite(image).all():
        return
    pixels = image.reshape(image.shape[0] * image.shape[1], -1)  # [pixels, bands]
    nan = int(np.isnan(pixels).any(1).sum())
    inf = int(np.isinf(pixels).any(1).sum()) if intensity in ("auto", "minmax", "percentile") else 0
    if nan or inf:
        found = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "+-inf")) if n)
        raise SampleError(
            path,
            f"float image holds NaN/inf values ({found} pixels of {len(pixels)}, e.g. nodata); intensity="
            f"{intensity!r} cannot map them to 0-255: replace them in the file (or on_error='skip' leaves it out)",
        )
