import cv2
import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from samtune.data import MaskFolderDataset, SampleError
from tests.data.conftest import write_mask_folder


def test_instance_label_maps(tmp_path):
    images, masks = write_mask_folder(tmp_path, n=3)
    ds = MaskFolderDataset(images, masks, image_size=64, return_original_masks=True)
    assert len(ds) == 3
    sample = ds[0]
    labels = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(masks / "img0.png"))
    for mask, ident in zip(sample["original_masks"], sample["instance_ids"].tolist()):
        np.testing.assert_array_equal(mask.numpy(), labels == ident)


def test_missing_mask_and_size_mismatch(tmp_path):
    images, masks = write_mask_folder(tmp_path, n=3)
    (masks / "img1.png").unlink()
    tifffile.imwrite(masks / "img2.tif", np.ones((10, 10), np.uint16))
    (masks / "img2.png").unlink()
    ds = MaskFolderDataset(images, masks, image_size=32)
    with pytest.raises(SampleError, match=r"img1.*no mask for image"):
        ds[1]
    with pytest.raises(SampleError, match=r"img2.tif: mask size 10x10 differs from the image size 48x64"):
        ds[2]
    skipping = MaskFolderDataset(images, masks, image_size=32, on_error="skip")
    assert [skipping[i]["image_id"] for i in range(3)] == ["img0", "img0", "img0"]
    assert skipping.num_skipped == 3


def test_empty_mask_and_split_list(tmp_path):
    images, masks = write_mask_folder(tmp_path, n=3)
    import cv2

    cv2.imwrite(str(masks / "img0.png"), np.zeros((48, 64), np.uint8))
    with pytest.raises(SampleError, match="no masks"):
        MaskFolderDataset(images, masks, image_size=32)[0]
    split = tmp_path / "val.txt"
    split.write_text("# validation\nimg2\nimg_missing\n")
    ds = MaskFolderDataset(images, masks, split_file=split, image_size=32)
    assert ds[0]["image_id"] == "img2"
    with pytest.raises(SampleError, match="no image named 'img_missing'"):
        ds[1]


def test_multiband_16bit_tiff_band_selection(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    image = np.zeros((5, 40, 40), np.uint16)  # channel-first, 5 bands
    image[3, 10:20, 10:20] = 4000
    image[3] += 1000
    labels = np.zeros((40, 40), np.uint16)
    labels[10:20, 10:20] = 1
    tifffile.imwrite(tmp_path / "im" / "a.tif", image)
    tifffile.imwrite(tmp_path / "lb" / "a.tif", labels)
    ds = MaskFolderDataset(tmp_path / "im", tmp_path / "lb", bands=[3], intensity="minmax", image_size=40,
                           normalization="minmax")
    sample = ds[0]
    assert torch.equal(sample["image"][0] > 0.5, sample["masks"][0])
    with pytest.raises(SampleError, match="choose 1 or 3"):
        MaskFolderDataset(tmp_path / "im", tmp_path / "lb", image_size=40)[0]


@pytest.mark.parametrize(("options", "message"), [
    ({"intensity": "window", "window": (240, -160)}, r"window must be .*low < high.*got \(240, -160\)"),
    ({"intensity": "window", "window": (100, 100)}, r"window must be .*got \(100, 100\)"),
    ({"intensity": "percentile", "percentiles": (99.5, 0.5)}, r"percentiles must be .*0 <= low < high <= 100.*"
                                                             r"got \(99\.5, 0\.5\)"),
    ({"intensity": "percentile", "percentiles": (1, 150)}, r"percentiles must be .*got \(1, 150\)"),
    ({"intensity": "auto", "percentiles": (-1, 50)}, r"percentiles must be .*got \(-1, 50\)"),
    ({"percentiles": (1, 2, 3)}, r"percentiles must be two numbers .*got \(1, 2, 3\)"),
    ({"intensity": "bogus"}, r"intensity must be one of auto, none, minmax, percentile, window, got 'bogus'"),
])
def test_intensity_arguments_are_checked_at_construction(tmp_path, options, message):
    """They used to binarise every image silently, or fail per sample (after skipping them all with on_error)."""
    images, masks = write_mask_folder(tmp_path, n=1)
    with pytest.raises(ValueError, match=message):
        MaskFolderDataset(images, masks, image_size=32, on_error="skip", **options)


def test_valid_intensity_arguments_keep_the_image_range(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    tifffile.imwrite(tmp_path / "im" / "a.tif", np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.uint16))
    labels = np.zeros((64, 64), np.uint16)
    labels[5:20, 5:20] = 1
    tifffile.imwrite(tmp_path / "lb" / "a.tif", labels)
    for options in ({"intensity": "window", "window": (-160, 3000)}, {"intensity": "percentile",
                                                                      "percentiles": (0, 100)}):
        image = MaskFolderDataset(tmp_path / "im", tmp_path / "lb", image_size=64, **options)[0]["image"]
        assert len(np.unique(image[0].numpy())) > 200, options


def test_em_membranes_components(assets):
    root = assets / "data" / "em_membrane"
    ds = MaskFolderDataset(root / "image", root / "label", names=["0", "1"], mask_type="components",
                           connectivity=4, image_size=512, normalization="minmax", return_original_masks=True,
                           max_masks_per_image=10_000)
    sample = ds[0]
    import cv2

    label = cv2.imread(str(root / "label" / "0.png"), cv2.IMREAD_UNCHANGED)
    reference, _ = ndimage.label(label == 255)  # 4-connectivity (scipy's default cross), independent of cv2
    assert sample["original_masks"].shape[0] == reference.max()
    union = sample["original_masks"].sum(0)
    assert union.max() == 1 and torch.equal(union.bool(), torch.from_numpy(label == 255))
    areas = sorted(np.bincount(reference.ravel())[1:].tolist())
    assert sorted(sample["original_masks"].sum((1, 2)).tolist()) == areas


def test_nuclei_uint16_instance_tiff(assets, tmp_path):
    root = assets / "data" / "nuclei2d"
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    (tmp_path / "img" / "n.tif").symlink_to(root / "img2d.tif")
    (tmp_path / "msk" / "n.tif").symlink_to(root / "mask2d.tif")
    ds = MaskFolderDataset(tmp_path / "img", tmp_path / "msk", image_size=512, normalization="minmax",
                           max_masks_per_image=1000, return_original_masks=True)
    sample = ds[0]
    labels = tifffile.imread(root / "mask2d.tif")
    assert sample["instance_ids"].tolist() == np.unique(labels)[1:].tolist()  # 125 labels, max 183
    for mask, ident in zip(sample["original_masks"][::20], sample["instance_ids"][::20].tolist()):
        np.testing.assert_array_equal(mask.numpy(), labels == ident)


def test_spacenet_tiles_and_crops(assets, tmp_path):
    root = assets / "data" / "spacenet_buildings"
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    (tmp_path / "img" / "s.tif").symlink_to(root / "image.tif")
    (tmp_path / "msk" / "s.tif").symlink_to(root / "instances.tif")
    val = MaskFolderDataset(tmp_path / "img", tmp_path / "msk", image_size=128, crop_size=300,
                            return_original_masks=True, max_masks_per_image=1000, on_error="skip")
    assert len(val) == 2 * 3  # 600 x 900 in 300 px tiles
    ids = {val[i]["image_id"] for i in range(len(val))}
    assert "s@0,0" in ids and "s@300,600" in ids
    tile = val[0]
    labels = tifffile.imread(root / "instances.tif")[:300, :300]
    assert tile["original_size"].tolist() == [300, 300]
    for mask, ident in zip(tile["original_masks"], tile["instance_ids"].tolist()):
        np.testing.assert_array_equal(mask.numpy(), labels == ident)
    train = MaskFolderDataset(tmp_path / "img", tmp_path / "msk", image_size=128, crop_size=256, train=True,
                              augmentation="overhead")
    sample = train[0]
    assert sample["original_size"].tolist() == [256, 256] and sample["masks"].shape[0] >= 1


def test_validation_tiles_score_every_instance_despite_the_mask_cap(tmp_path):
    """A tile with more instances than max_masks_per_image used to score a subsample (83 of 100 here)."""
    import cv2

    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    cv2.imwrite(str(tmp_path / "i" / "a.png"), np.full((128, 128, 3), 90, np.uint8))
    labels = np.zeros((128, 128), np.uint16)
    for k, (y, x) in enumerate(((y, x) for y in range(4, 124, 12) for x in range(4, 124, 12)), start=1):
        labels[y:y + 6, x:x + 6] = k  # 100 squares of 6 px
    cv2.imwrite(str(tmp_path / "m" / "a.png"), labels)
    options = dict(image_size=64, max_masks_per_image=16, crop_size=64)
    val = MaskFolderDataset(tmp_path / "i", tmp_path / "m", tile_overlap=16, return_original_masks=True, **options)
    samples = [val[i] for i in range(len(val))]
    ids = [i for s in samples for i in s["instance_ids"].tolist()]
    assert sorted(ids) == list(range(1, 101))  # every instance, once
    assert all(1 <= len(s["instance_ids"]) <= 16 for s in samples)
    by_tile: dict[str, list[int]] = {}
    for s in samples:
        by_tile.setdefault(s["image_id"], []).append(len(s["instance_ids"]))
        top, left = (int(v) for v in s["image_id"].split("@")[1].split(","))
        tile_labels = labels[top:top + 64, left:left + 64]
        for mask, ident in zip(s["original_masks"], s["instance_ids"].tolist()):
            np.testing.assert_array_equal(mask.numpy(), tile_labels == ident)
    assert any(len(counts) > 1 for counts in by_tile.values())  # a crowded tile split into several samples
    assert [i for s in (val[i] for i in range(len(val))) for i in s["instance_ids"].tolist()] == ids  # fixed
    train = MaskFolderDataset(tmp_path / "i", tmp_path / "m", train=True, **options)
    assert len(train[0]["instance_ids"]) == 16  # training crops keep the cap


def test_masks_in_the_image_folder_are_not_taken_as_images(tmp_path):
    """``case0.png`` + ``case0_mask.png`` in one folder: the masks were indexed as images too (and then failed:
    'no mask ... case0_mask_mask.png'), in the dataset and in the datamodule's split."""
    from samtune.data.datamodules import MaskFolderDataModule

    labels = np.zeros((32, 32), np.uint8)
    labels[4:20, 4:20] = 1
    for n in range(4):
        tifffile.imwrite(tmp_path / f"case{n}.tif", np.full((32, 32), 100, np.uint8))
        tifffile.imwrite(tmp_path / f"case{n}_mask.tif", labels)
    ds = MaskFolderDataset(tmp_path, tmp_path, mask_suffix="_mask", image_size=32)
    assert ds.names == ["case0", "case1", "case2", "case3"]
    assert [ds[i]["masks"].shape[0] for i in range(4)] == [1, 1, 1, 1]
    dm = MaskFolderDataModule(str(tmp_path), str(tmp_path), mask_suffix="_mask", image_size=32, num_workers=0,
                              val_fraction=0.25)
    dm.setup()
    assert sorted(dm.train_dataset.names + dm.val_dataset.names) == ds.names
    with pytest.raises(ValueError, match=r"image_dir and mask_dir are the same folder .* give mask_suffix"):
        MaskFolderDataset(tmp_path, tmp_path, image_size=32)


def test_an_image_whose_name_ends_with_the_mask_suffix_is_still_an_image(tmp_path):
    """In a shared folder only ``<stem><suffix>`` next to a ``<stem>`` is a mask: ``scan_mask.tif`` without a
    ``scan.tif`` is an image (with its mask ``scan_mask_mask.tif``), it was dropped as a mask."""
    labels = np.zeros((32, 32), np.uint8)
    labels[4:20, 4:20] = 1
    for stem in ("case0", "scan_mask"):
        tifffile.imwrite(tmp_path / f"{stem}.tif", np.full((32, 32), 100, np.uint8))
        tifffile.imwrite(tmp_path / f"{stem}_mask.tif", labels)
    ds = MaskFolderDataset(tmp_path, tmp_path, mask_suffix="_mask", image_size=32)
    assert ds.names == ["case0", "scan_mask"]
    assert [ds[i]["masks"].shape[0] for i in range(2)] == [1, 1]


def test_files_sharing_a_name_are_an_error_naming_them(tmp_path):
    """img1.jpg beside img1.png (or a mask saved twice, as .png and .tif) silently paired the first in sorted order,
    here an empty image or an empty mask, with the other folder's file."""
    images, masks = write_mask_folder(tmp_path, n=3)
    cv2.imwrite(str(images / "img1.jpg"), np.zeros((48, 64), np.uint8))
    tifffile.imwrite(masks / "img2.tif", np.zeros((48, 64), np.uint16))
    ds = MaskFolderDataset(images, masks, image_size=32)
    assert ds[0]["image_id"] == "img0"
    with pytest.raises(SampleError, match=r"images/img1: 2 image files share the name 'img1' \(img1\.jpg, img1\.png\): "
                                          r"images and masks pair by name without the extension"):
        ds[1]
    with pytest.raises(SampleError, match=r"masks/img2: 2 mask files share the name 'img2' \(img2\.png, img2\.tif\)"):
        ds[2]
    skipping = MaskFolderDataset(images, masks, image_size=32, on_error="skip")
    assert [skipping[i]["image_id"] for i in range(3)] == ["img0", "img0", "img0"] and skipping.num_skipped == 3


def test_a_name_given_with_its_extension_is_explained(tmp_path):
    images, masks = write_mask_folder(tmp_path, n=1)
    with pytest.raises(SampleError, match=r"images/img0\.png: no image named 'img0\.png' in .*images: names are file "
                                          r"stems without the extension, e.g. 'img0'$"):
        MaskFolderDataset(images, masks, names=["img0.png"], image_size=32)[0]
