import zlib

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from samtune.data import SampleError
from samtune.data.io import image_shape, normalize_intensity, prepare_image, read_image, read_label_map


def test_read_image_variants(tmp_path):
    grey16 = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 50)
    cv2.imwrite(str(tmp_path / "g.png"), grey16)
    assert read_image(tmp_path / "g.png").dtype == np.uint16
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert read_image(tmp_path / "c.png")[0, 0].tolist() == [200, 0, 0]
    tifffile.imwrite(tmp_path / "m.tif", np.zeros((6, 20, 30), np.float32))
    assert read_image(tmp_path / "m.tif").shape == (20, 30, 6) and image_shape(tmp_path / "m.tif") == (20, 30)
    bands16 = np.arange(4 * 20 * 30, dtype=np.uint16).reshape(4, 20, 30) * 7
    for compression in ("lzw", "zlib", "zstd"):  # GDAL / ImageJ exports: the codecs come with imagecodecs
        tifffile.imwrite(tmp_path / f"{compression}.tif", bands16, compression=compression, photometric="minisblack",
                         planarconfig="separate")
        np.testing.assert_array_equal(read_image(tmp_path / f"{compression}.tif"), np.moveaxis(bands16, 0, -1))
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(SampleError, match=r"bad.tif: (cannot decode TIFF|expected a 2-D image)"):
        read_image(tmp_path / "bad.tif")
    with pytest.raises(SampleError, match="none.png: image file not found"):
        read_image(tmp_path / "none.png")


def test_read_label_map_rejects_colour_masks(tmp_path):
    colour = np.zeros((10, 10, 3), np.uint8)
    colour[..., 2] = 5
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    with pytest.raises(SampleError, match="single-channel"):
        read_label_map(tmp_path / "c.png")


def test_intensity_presets():
    image = np.stack([np.linspace(-1000, 1000, 101)] * 3, -1).reshape(101, 1, 3)
    window = normalize_intensity(image, "window", window=(-100, 100))
    assert window.dtype == np.uint8 and window[0, 0, 0] == 0 and window[-1, 0, 0] == 255
    assert window[50, 0, 0] == 128  # 0 HU at mid-window
    minmax = normalize_intensity(image, "minmax")
    assert minmax.min() == 0 and minmax.max() == 255
    spiky = np.full((100, 100, 3), 1000, np.uint16)
    spiky[:50] = 2000
    spiky[0, 0] = 65535  # one hot pixel must not squash the range
    pct = normalize_intensity(spiky, "percentile", percentiles=(1, 99))
    assert pct[99, 99, 0] == 0 and pct[10, 10, 0] == 255
    assert prepare_image(np.zeros((4, 4), bool) | True).max() == 255
    with pytest.raises(SampleError, match="bands"):
        prepare_image(np.zeros((4, 4, 5), np.uint16), bands=[0, 1])


@pytest.mark.parametrize("intensity", ["auto", "percentile", "minmax"])
def test_non_finite_float_pixels_are_a_sample_error_naming_the_file(tmp_path, intensity):
    """One NaN / inf pixel used to turn a float raster into an all-black input, silently."""
    from samtune.data.mask_folder import MaskFolderDataset

    image = np.random.default_rng(0).uniform(100, 5000, (32, 32)).astype(np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        broken = image.copy()
        broken[0, 0] = bad
        with pytest.raises(SampleError, match=r"a\.tif: float image holds NaN/inf values \(1 .* pixels of 1024"):
            prepare_image(broken, intensity=intensity, path=tmp_path / "a.tif")
    assert len(np.unique(prepare_image(image, intensity=intensity))) > 100  # finite images are unaffected

    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    labels = np.zeros((32, 32), np.uint16)
    labels[4:20, 4:20] = 1
    broken = image.copy()
    broken[5, 5] = np.nan
    for name, pixels in (("a", broken), ("b", image)):
        tifffile.imwrite(tmp_path / "i" / f"{name}.tif", pixels)
        tifffile.imwrite(tmp_path / "m" / f"{name}.tif", labels)
    options = dict(image_size=32, intensity=intensity)
    with pytest.raises(SampleError, match=r"a\.tif: float image holds NaN/inf"):
        MaskFolderDataset(tmp_path / "i", tmp_path / "m", **options)[0]
    skipping = MaskFolderDataset(tmp_path / "i", tmp_path / "m", on_error="skip", **options)
    assert skipping[0]["image_id"] == "b" and skipping.num_skipped == 1
    assert len(np.unique(skipping[0]["image"][0].numpy())) > 100


def test_window_and_none_clip_infinities_but_reject_nan():
    image = np.full((4, 4), 1.0, np.float32)
    image[0, 0], image[0, 1] = np.inf, -np.inf
    assert normalize_intensity(np.repeat(image[..., None], 3, 2), "window", window=(0, 2))[0, :2, 0].tolist() == [
        255, 0]
    image[1, 1] = np.nan
    for intensity, options in (("window", {"window": (0, 2)}), ("none", {})):
        with pytest.raises(SampleError, match=r"x\.tif: float image holds NaN/inf values \(1 NaN pixels"):
            prepare_image(image, intensity=intensity, path="x.tif", **options)


def test_truncated_jpeg_is_a_sample_error_but_trailing_bytes_are_not(tmp_path):
    """libjpeg only warns ("Premature end of JPEG file"): cv2.imread returned the image with a constant bottom."""
    image = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8), (0, 0), 2)
    cv2.imwrite(str(tmp_path / "whole.jpg"), image)
    data = (tmp_path / "whole.jpg").read_bytes()
    expected = read_image(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError, match=r"cut\.jpg: JPEG file cut short or corrupt: .*image file is truncated"):
        read_image(tmp_path / "cut.jpg")
    for name, tail in (("zeros", b"\x00" * 64), ("junk", b"trailing \xff\xda bytes")):  # data after the end marker
        (tmp_path / f"{name}.jpg").write_bytes(data + tail)
        np.testing.assert_array_equal(read_image(tmp_path / f"{name}.jpg"), expected)


def _with_orientation(path, array, orientation, **options):
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation  # EXIF Orientation
    image.save(path, exif=exif, **options)


def test_exif_orientation_is_applied_as_image_viewers_and_annotation_tools_do(tmp_path):
    """A phone photo stored 100x200 with Orientation=6 is shown (and annotated, e.g. by labelme) as 200x100; it was
    read as stored, so its annotations lay rotated on the image."""
    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:, :100] = 255  # left half white: after a 90-degree clockwise turn, the top half
    _with_orientation(tmp_path / "photo.jpg", stored, 6, quality=95)
    image = read_image(tmp_path / "photo.jpg")
    assert image.shape == (200, 100, 3) and image_shape(tmp_path / "photo.jpg") == (200, 100)
    assert image[:90].min() > 200 and image[110:].max() < 50
    with Image.open(tmp_path / "photo.jpg") as shown:
        assert np.abs(image.astype(int) - np.asarray(ImageOps.exif_transpose(shown)).astype(int)).max() <= 2

    # every orientation, lossless (PNG): pixels as Pillow's exif_transpose shows them, label maps alike
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    for orientation in range(1, 9):
        _with_orientation(tmp_path / f"o{orientation}.png", pixels, orientation)
        _with_orientation(tmp_path / f"m{orientation}.png", pixels[..., 0], orientation)
        with Image.open(tmp_path / f"o{orientation}.png") as shown:
            expected = np.asarray(ImageOps.exif_transpose(shown))
        np.testing.assert_array_equal(read_image(tmp_path / f"o{orientation}.png"), expected, err_msg=str(orientation))
        np.testing.assert_array_equal(read_label_map(tmp_path / f"m{orientation}.png"), expected[..., 0])
        assert image_shape(tmp_path / f"o{orientation}.png") == expected.shape[:2]


def test_lossy_mask_files_are_rejected(tmp_path):
    """A 0/255 mask saved as JPEG: compression noise made 14 'instances' of 2 circles (35 components)."""
    labels = np.zeros((32, 32), np.uint8)
    labels[4:12, 4:12], labels[20:30, 18:28] = 255, 255
    cv2.imwrite(str(tmp_path / "a.jpg"), labels)
    (tmp_path / "jpeg_named.png").write_bytes((tmp_path / "a.jpg").read_bytes())
    Image.fromarray(labels).save(tmp_path / "lossy.webp", quality=90)
    Image.fromarray(labels).save(tmp_path / "jpeg.tif", compression="jpeg")  # libtiff's JPEG compression
    for name, kind in (("a.jpg", "JPEG"), ("jpeg_named.png", "JPEG"), ("lossy.webp", "lossy WebP"),
                       ("jpeg.tif", "JPEG-compressed TIFF")):
        with pytest.raises(SampleError, match=rf"{name}: mask file is {kind}, whose lossy compression changes label "
                                              r"values .*: save masks as PNG, or as TIFF without JPEG compression"):
            read_label_map(tmp_path / name)
    Image.fromarray(labels).save(tmp_path / "lossless.webp", lossless=True)
    np.testing.assert_array_equal(read_label_map(tmp_path / "lossless.webp"), labels)
    for compression in ("tiff_deflate", "tiff_lzw", "packbits"):  # lossless TIFF compressions still read
        Image.fromarray(labels).save(tmp_path / f"{compression}.tif", compression=compression)
        np.testing.assert_array_equal(read_label_map(tmp_path / f"{compression}.tif"), labels, err_msg=compression)


def test_large_rasters_open_beyond_pillows_decompression_bomb_limit(tmp_path, monkeypatch):
    """A 13500x13500 PNG (182 million pixels) was read as an image (OpenCV) but its label map and its header
    (tile planning) failed with Pillow's DecompressionBombError, and its EXIF orientation was silently ignored."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the same limit at 2x100 pixels: small files stand in
    labels = np.zeros((20, 30), np.uint8)
    labels[2:8, 3:9] = 4
    Image.fromarray(labels).save(tmp_path / "labels.png")
    np.testing.assert_array_equal(read_label_map(tmp_path / "labels.png"), labels)
    _with_orientation(tmp_path / "turned.png", np.stack([labels] * 3, -1), 6)
    assert read_image(tmp_path / "turned.png").shape == (30, 20, 3) and image_shape(tmp_path / "turned.png") == (30, 20)
    assert Image.MAX_IMAGE_PIXELS == 100  # Pillow's own setting is left as it was


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _write_png(path, array, exif_after_pixels: bytes | None = None):
    """An 8/16-bit grey (``[H, W]``), grey + alpha (``[H, W, 2]``), RGB or RGBA PNG written chunk by chunk, with an
    ``eXIf`` chunk after the pixel data (IDAT) when given: encoders may place it there, where Pillow's header
    parsing does not look."""
    array = np.asarray(array)
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    depth = 16 if array.dtype == np.uint16 else 8
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = array.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 per row
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([depth, colour_type, 0, 0, 0])
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw))
    if exif_after_pixels is not None:
        data += _png_chunk(b"eXIf", exif_after_pixels)
    path.write_bytes(data + _png_chunk(b"IEND", b""))


def test_png_exif_after_the_pixel_data_turns_images_and_masks_alike(tmp_path):
    """An eXIf chunk after IDAT was applied to label maps (Pillow finds it once the pixels are decoded) but not to
    images or image_shape (header only): a 5x7 image with a turned 7x5 mask failed the size check, and a square one
    was silently misaligned with its mask. cv2.imread and Pillow's exif_transpose both apply it."""
    from samtune.data.mask_folder import MaskFolderDataset

    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()[6:]  # the chunk holds the TIFF structure without the JPEG "Exif\0\0" header
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    _write_png(tmp_path / "late.png", pixels, exif_after_pixels=payload)
    with Image.open(tmp_path / "late.png") as shown:
        expected = np.asarray(ImageOps.exif_transpose(shown))
    assert expected.shape == (7, 5, 3)
    np.testing.assert_array_equal(read_image(tmp_path / "late.png"), expected)
    assert image_shape(tmp_path / "late.png") == (7, 5)
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(tmp_path / "late.png")), cv2.COLOR_BGR2RGB), expected)

    # a square image and its label map, both with the eXIf chunk after the pixels: the masks stay on the objects
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    labels = np.zeros((16, 16), np.uint8)
    labels[1:5, 2:12] = 1  # a bar at the top, turned to the right edge
    _write_png(tmp_path / "i" / "a.png", np.where(labels[..., None] > 0, 255, 0).repeat(3, 2).astype(np.uint8),
               exif_after_pixels=payload)
    _write_png(tmp_path / "m" / "a.png", labels, exif_after_pixels=payload)
    sample = MaskFolderDataset(tmp_path / "i", tmp_path / "m", image_size=16, normalization="minmax")[0]
    mask = sample["masks"][0].numpy()
    np.testing.assert_array_equal(mask, np.rot90(labels, -1) > 0)
    assert sample["image"][0][mask].min() == 1.0 and sample["image"][0][~mask].max() == 0.0


def test_label_images_with_alpha_read_their_grey_values_when_the_alpha_is_uniform(tmp_path):
    """Grey + alpha (LA) label PNGs were rejected ("expected a single-channel label image, got shape (H, W, 2)")
    even when fully opaque, and a 16-bit grey + alpha or RGB PNG lost its low byte in Pillow (label 300 read as 1,
    label 7 as 0) and was then accepted as R = G = B: silently wrong instances."""
    labels = np.zeros((6, 8), np.uint8)
    labels[1:3, 2:5], labels[4, 1:7] = 3, 9
    opaque = np.full_like(labels, 255)
    Image.fromarray(np.stack([labels, opaque], -1), mode="LA").save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as written:
        assert written.mode == "LA"
    np.testing.assert_array_equal(read_label_map(tmp_path / "la.png"), labels)
    Image.fromarray(np.stack([labels] * 3 + [opaque], -1), mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_label_map(tmp_path / "rgba.png"), labels)

    wide = (labels.astype(np.uint16) * 100 + (labels > 0) * 7).astype(np.uint16)  # 307 and 907: beyond 8 bits
    _write_png(tmp_path / "la16.png", np.stack([wide, np.full_like(wide, 65535)], -1))
    _write_png(tmp_path / "rgb16.png", np.stack([wide] * 3, -1))
    _write_png(tmp_path / "rgba16.png", np.stack([wide] * 3 + [np.full_like(wide, 65535)], -1))
    for name in ("la16.png", "rgb16.png", "rgba16.png"):
        read = read_label_map(tmp_path / name)
        assert read.dtype == np.uint16, name
        np.testing.assert_array_equal(read, wide, err_msg=name)

    # TIFF: a second band is alpha only where the file declares it (ExtraSamples), else it may be a second label
    Image.fromarray(np.stack([labels, opaque], -1), mode="LA").save(tmp_path / "la.tif")
    np.testing.assert_array_equal(read_label_map(tmp_path / "la.tif"), labels)
    tifffile.imwrite(tmp_path / "two_bands.tif", np.stack([labels, np.ones_like(labels)], -1))
    with pytest.raises(SampleError, match=r"two_bands\.tif: expected a single-channel label image, got shape "
                                          r"\(6, 8, 2\)"):
        read_label_map(tmp_path / "two_bands.tif")

    # transparent background (grey 0 under alpha 0), as cut-out masks have it: the labels are unambiguous
    transparent = np.where(labels > 0, 255, 0).astype(np.uint8)
    Image.fromarray(np.stack([labels, transparent], -1), mode="LA").save(tmp_path / "cutout.png")
    Image.fromarray(np.stack([labels] * 3 + [transparent], -1), mode="RGBA").save(tmp_path / "cutout_rgba.png")
    for name in ("cutout.png", "cutout_rgba.png"):
        np.testing.assert_array_equal(read_label_map(tmp_path / name), labels, err_msg=name)
    # a label under transparency: whether it counts is undefined, so the file is refused with a way out
    hidden = transparent.copy()
    hidden[4, 1:3] = 0  # two pixels of label 9 made transparent
    Image.fromarray(np.stack([labels, hidden], -1), mode="LA").save(tmp_path / "hidden.png")
    Image.fromarray(np.stack([labels] * 3 + [hidden], -1), mode="RGBA").save(tmp_path / "hidden_rgba.png")
    for name, kind in (("hidden.png", "grey \\+ alpha"), ("hidden_rgba.png", "RGBA")):
        with pytest.raises(SampleError, match=rf"{name}: {kind} label image whose alpha channel varies "
                                              r"\(values 0..255\) and whose 2 pixels below alpha 255 hold labels "
                                              r"other than 0: .*Save the mask without an alpha channel"):
            read_label_map(tmp_path / name)


def test_mask_folder_reads_opaque_grey_alpha_masks(tmp_path):
    from samtune.data.mask_folder import MaskFolderDataset

    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    labels = np.zeros((24, 24), np.uint8)
    labels[2:10, 3:12], labels[14:20, 14:22] = 1, 2
    cv2.imwrite(str(tmp_path / "i" / "a.png"), labels * 100)
    Image.fromarray(np.stack([labels, np.full_like(labels, 255)], -1), mode="LA").save(tmp_path / "m" / "a.png")
    sample = MaskFolderDataset(tmp_path / "i", tmp_path / "m", image_size=24, return_original_masks=True)[0]
    assert sample["instance_ids"].tolist() == [1, 2]
    for mask, ident in zip(sample["original_masks"].numpy(), (1, 2)):
        np.testing.assert_array_equal(mask, labels == ident)
