import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import yaml

from samtune.data import MaskFolderDataset
from samtune.data.transforms import Augmenter, large_scale_jitter, load_pipeline
from samtune.modeling.preprocessing import PIXEL_MEAN, PIXEL_STD
from tests.data.conftest import write_mask_folder

GREY = {k: 40 * k + 20 for k in range(1, 4)}


def _check_alignment(sample):
    """Images encode their masks (instance k has grey 40k + 20): every mask pixel must carry its grey."""
    h, w = sample["input_size"].tolist()
    image = sample["image"][0, :h, :w] * PIXEL_STD[0] + PIXEL_MEAN[0]  # back to 0-255 grey
    for mask, ident in zip(sample["masks"], sample["instance_ids"].tolist()):
        assert not mask[h:].any() and not mask[:, w:].any()
        inside = mask[:h, :w]
        # pixels whose 4 neighbours are in the mask too: no interpolation blends their value with the outside
        interior = inside.clone()
        interior[1:] &= inside[:-1]
        interior[:-1] &= inside[1:]
        interior[:, 1:] &= inside[:, :-1]
        interior[:, :-1] &= inside[:, 1:]
        # on the content's border the outside neighbour may have been cropped away (jitter): not interior
        interior[[0, -1]] = False
        interior[:, [0, -1]] = False
        values = image[interior]
        assert ((values - GREY[ident]).abs() < 1.5).all(), (ident, values)
        # and the mask is not shifted: pixels just outside the mask do not all carry its grey
        assert inside.sum() > 0


@pytest.mark.parametrize("preset", ["natural", "overhead", "natural_lsj", "overhead_lsj"])
def test_augmented_masks_stay_aligned(tmp_path, preset):
    images, masks = write_mask_folder(tmp_path, n=2, size=(48, 64))
    ds = MaskFolderDataset(images, masks, image_size=64, normalization="sam", intensity="none", train=True,
                           augmentation=preset, seed=3)
    # brightness/contrast would change the encoding: test geometry with colour augmentation off
    ds.augmenter.compose.transforms = [t for t in ds.augmenter.compose.transforms
                                       if not isinstance(t, A.RandomBrightnessContrast)]
    for _ in range(8):
        _check_alignment(ds[0])


def test_user_pipeline_from_yaml(tmp_path):
    pipeline = A.Compose([A.Transpose(p=1.0), A.RandomCrop(32, 32, p=1.0)])
    spec = tmp_path / "aug.yaml"
    spec.write_text(yaml.safe_dump(A.to_dict(pipeline)))
    images, masks = write_mask_folder(tmp_path, n=2, size=(48, 64))
    ds = MaskFolderDataset(images, masks, image_size=64, normalization="sam", intensity="none", train=True,
                           augmentation_pipeline=str(spec), on_error="raise")
    sample = ds[0]
    assert sample["input_size"].tolist() == [32, 32]  # crops are not scaled back up
    _check_alignment(sample)
    with pytest.raises(ValueError, match="not a valid albumentations pipeline"):
        load_pipeline({"__class_fullname__": "NoSuchTransform"})
    with pytest.raises(ValueError, match="file not found"):
        load_pipeline(tmp_path / "missing.yaml")


def test_malformed_pipeline_files_are_value_errors_naming_the_file(tmp_path):
    """A YAML / JSON syntax error raised yaml's ParserError ('in "<unicode string>"') or a bare JSONDecodeError,
    naming neither the file nor the argument."""
    (tmp_path / "bad.yaml").write_text("transform:\n  transforms: [\n")
    (tmp_path / "bad.json").write_text('{"transform": {')
    for name in ("bad.yaml", "bad.json"):
        with pytest.raises(ValueError, match=rf"augmentation_pipeline .*{name}: invalid JSON/YAML"):
            load_pipeline(tmp_path / name)


def test_masks_emptied_by_augmentation_are_dropped():
    image = np.zeros((64, 64, 3), np.uint8)
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[0, :8, :8] = 1
    masks[1, 30:40, 30:40] = 1
    crop = Augmenter("none", {"__class_fullname__": "Compose", "transforms": [
        {"__class_fullname__": "Crop", "x_min": 20, "y_min": 20, "x_max": 50, "y_max": 50, "p": 1.0}]}, image_size=64)
    out_image, out_masks = crop(image, masks, np.random.default_rng(0))
    assert out_image.shape == (30, 30, 3) and out_masks.reshape(2, -1).any(1).tolist() == [False, True]


def test_large_scale_jitter_bounds():
    rng = np.random.default_rng(0)
    image = np.zeros((48, 64, 3), np.uint8)
    masks = np.ones((1, 48, 64), np.uint8)
    sizes = [large_scale_jitter(image, masks, rng, 64)[1].shape[1:] for _ in range(30)]
    assert max(max(s) for s in sizes) <= 64 and min(min(s) for s in sizes) < 20


def _pixel_after(augmenter, image, masks, rng):
    """Where the single mask pixel ends up, and whether the image's values were changed."""
    out_image, out_masks = augmenter(image, masks, rng)
    ys, xs = np.nonzero(out_masks[0])
    return (int(ys[0]), int(xs[0])), bool((out_image != image).any())


def test_preset_transforms_draw_independently():
    """Every transform of the preset (and of a user pipeline on top) draws its own numbers: one shared seed made
    the flips of ``overhead`` fire together (4 of the 8 dihedral outcomes) and tied colour jitter to flipping."""
    image = np.full((8, 8, 3), 100, np.uint8)
    masks = np.zeros((1, 8, 8), np.uint8)
    masks[0, 0, 1] = 1  # row 0, column 1: the 8 dihedral images of this pixel are all distinct
    overhead = Augmenter("overhead", None, 64)
    rng = np.random.default_rng(0)
    outcomes = [_pixel_after(overhead, image, masks, rng)[0] for _ in range(400)]
    counts = {p: outcomes.count(p) for p in set(outcomes)}
    assert len(counts) == 8 and min(counts.values()) > 25, counts

    flips = Augmenter("none", A.to_dict(A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])), 64)
    outcomes = [_pixel_after(flips, image, masks, rng)[0] for _ in range(400)]
    counts = {p: outcomes.count(p) for p in set(outcomes)}
    assert set(counts) == {(0, 1), (0, 6), (7, 1), (7, 6)} and min(counts.values()) > 60, counts

    natural = Augmenter("natural", None, 64)
    outcomes = [_pixel_after(natural, image, masks, rng) for _ in range(400)]
    combos = {(pixel[1] == 6, coloured) for pixel, coloured in outcomes}
    assert combos == {(False, False), (False, True), (True, False), (True, True)}

    # a user pipeline's own flip no longer always undoes the preset's
    stacked = Augmenter("natural", A.to_dict(A.Compose([A.HorizontalFlip(p=0.5)])), 64)
    columns = [_pixel_after(stacked, image, masks, rng)[0][1] for _ in range(200)]
    assert 60 < columns.count(6) < 140


def test_augmentation_is_reproducible_from_the_generator():
    image = np.random.default_rng(1).integers(0, 255, (16, 12, 3), dtype=np.uint8)
    masks = np.zeros((2, 16, 12), np.uint8)
    masks[0, 1:5, 2:4] = 1
    masks[1, 9:14, 6:11] = 1
    pipeline = A.to_dict(A.Compose([A.OneOf([A.Transpose(), A.Rotate(limit=30)], p=0.7), A.GaussNoise(p=0.5)]))

    def run(seed):
        augmenter, rng = Augmenter("overhead_lsj", pipeline, 16), np.random.default_rng(seed)
        return [np.concatenate([o.ravel() for o in augmenter(image, masks, rng)]) for _ in range(10)]

    first, again, other = run(5), run(5), run(6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("model_name", ["sam_tiny", "sam_tiny_vit_t"])
@pytest.mark.parametrize("hw", [(90, 140), (400, 330)], ids=["enlarged", "shrunk"])
def test_dataset_input_is_what_the_predictor_feeds_the_model(model_name, hw, tmp_path):
    """A dataset resizes with the model's filter (PIL bilinear for SAM, OpenCV area for min-max models such as
    LiteMedSAM), so a model trains on the inputs samtune.Predictor gives it at inference, enlarged or shrunk."""
    from PIL import Image

    from samtune import Predictor, build_sam
    from samtune.data import MaskFolderDataset

    model = build_sam(model_name).eval()
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), (5, 5), 1.5)
    labels = np.zeros(hw, np.uint8)
    labels[20:60, 30:80] = 1
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    Image.fromarray(image).save(tmp_path / "im" / "a.png")
    Image.fromarray(labels).save(tmp_path / "lb" / "a.png")
    dataset = MaskFolderDataset(tmp_path / "im", tmp_path / "lb", image_size=model.image_size,
                                normalization=model.normalization)
    assert dataset.resize_interpolation == model.resize_interpolation
    got = dataset[0]["image"]
    resized = Predictor(model, precision="fp32").transform.apply_image(image)
    expected = model.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())[0]
    torch.testing.assert_close(got, expected, atol=0.0, rtol=0)
