"""Cached image embeddings: keys (image / preprocessing / weights), storage, corruption, concurrency, the
cached datamodule, equality with the live frozen encoder, the frozen-encoder and same-weights checks, and a
2-step ``samtune fit`` through the CLI."""
from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
import yaml

from samtune.adapt.cache import (
    CacheConfig,
    CacheMissError,
    CorruptCacheError,
    EmbeddingCache,
    check_cached_embeddings,
    encoder_fingerprint,
    file_identity,
    require_frozen_encoder,
)
from samtune.build import build_sam
from samtune.data import SA1BDataset, collate_samples
from samtune.data.cached import (
    CachedEmbeddingDataModule,
    CachedEmbeddingDataset,
    apply_view,
    collate_cached,
    fill_cache,
    preprocessing_spec,
    view_sample,
)
from samtune.data.datamodules import SA1BDataModule
from samtune.data.synth import synthesize_sa1b
from samtune.modeling.sam import Sam
from samtune.prompts import SimulationConfig
from samtune.tasks import PromptableSegmentationTask

SIZE = 256  # sam_tiny input side
SHORT = SimulationConfig(num_iterations=3, num_point_iterations=1, random_mask_only_iteration=False,
                         final_mask_only_iteration=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Four synthetic SA-1B images, 96 x 128 (rectangular: views that swap axes are visible)."""
    root = tmp_path_factory.mktemp("cache_data") / "sa1b"
    synthesize_sa1b(root, 4, image_size=(96, 128), seed=3)
    return root


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam("sam_tiny").image_encoder.requires_grad_(False).eval()


def make_cached(root: Path, cache_dir: Path, encoder: torch.nn.Module, views=("identity",), train: bool = False,
                storage_dtype: str = "float32", identity: str = "content", **dataset_options) -> CachedEmbeddingDataset:
    options = dict(image_size=SIZE, max_masks_per_image=4) | dataset_options
    dataset = SA1BDataset(root, train=train, **options)
    config = CacheConfig(encoder_fingerprint(encoder), preprocessing_spec(dataset), storage_dtype, identity)
    return CachedEmbeddingDataset(dataset, EmbeddingCache(cache_dir, config), views)


def copy_data(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


# --------------------------------------------------------------------------------------------------- keys
def test_hits_and_misses_follow_image_preprocessing_and_weights(data_dir, encoder, tmp_path):
    root = copy_data(data_dir, tmp_path / "images")
    cache_dir = tmp_path / "cache"
    base = make_cached(root, cache_dir, encoder)
    assert fill_cache(base, encoder) == 4  # cold cache: every image
    assert fill_cache(make_cached(root, cache_dir, encoder), encoder) == 0  # warm: all hits

    # image content changed -> that image misses, the others hit
    image_path = root / "sa_2.jpg"
    key_before = make_cached(root, cache_dir, encoder).keys(1)["identity"]
    image = cv2.imread(str(image_path))
    image[10:20, 10:20] = 255 - image[10:20, 10:20]
    cv2.imwrite(str(image_path), image)
    changed = make_cached(root, cache_dir, encoder)
    assert changed.image_path(1) == image_path and changed.keys(1)["identity"] != key_before
    assert fill_cache(changed, encoder) == 1

    # preprocessing changed: input size, normalisation, intensity preset, band selection -> a new configuration
    for options in ({"image_size": 128}, {"normalization": "minmax"}, {"intensity": "percentile"},
                    {"bands": [2, 1, 0]}):
        other = make_cached(root, cache_dir, encoder, **options)
        assert other.cache.directory != base.cache.directory, options
        assert other.keys(0)["identity"] != base.keys(0)["identity"], options
    assert fill_cache(make_cached(root, cache_dir, encoder, normalization="minmax"), encoder) == 4

    # encoder weights changed -> every image misses
    torch.manual_seed(1)  # the fixture's encoder is that of seed 0 (and filling draws no random numbers)
    other_encoder = build_sam("sam_tiny").image_encoder.requires_grad_(False).eval()
    assert encoder_fingerprint(other_encoder) != encoder_fingerprint(encoder)
    assert fill_cache(make_cached(root, cache_dir, other_encoder), other_encoder) == 4

    # a view is its own entry
    assert fill_cache(make_cached(root, cache_dir, encoder, views=("identity", "hflip")), encoder) == 4

    manifest = json.loads((base.cache.directory / "manifest.json").read_text())
    assert manifest["encoder_fingerprint"] == encoder_fingerprint(encoder)
    assert manifest["embedding_shape"] == [64, 16, 16] and manifest["preprocessing"]["image_size"] == SIZE


def test_file_identity_modes(data_dir, tmp_path):
    root = copy_data(data_dir, tmp_path / "a")
    moved = copy_data(data_dir, tmp_path / "b")
    path = root / "sa_1.jpg"
    content, stat = file_identity(path, "content"), file_identity(path, "stat")
    assert file_identity(moved / "sa_1.jpg", "content") == content  # content identity survives a copy
    assert file_identity(moved / "sa_1.jpg", "stat") != stat  # stat identity names the path
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # touched, same bytes
    assert file_identity(path, "content") == content and file_identity(path, "stat") != stat
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    assert file_identity(path, "content") != content
    # replaced by a file of the same size and mtime (tar, rsync, cp -p + mv): the content identity, memoised per
    # process, still notices it
    changed, info = file_identity(path, "content"), path.stat()
    replacement = root / "new.jpg"
    replacement.write_bytes(path.read_bytes()[:-1] + b"\x01")
    os.utime(replacement, ns=(info.st_atime_ns, info.st_mtime_ns))
    os.replace(replacement, path)
    assert path.stat().st_size == info.st_size and path.stat().st_mtime_ns == info.st_mtime_ns
    assert file_identity(path, "content") != changed
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        file_identity(root / "missing.jpg")


class _ChannelMean(torch.nn.Module):
    """A stand-in image encoder: the mean of each input channel, as a ``[3, 1, 1]`` embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True) * self.scale


def test_regions_of_one_raster_are_separate_entries(tmp_path):
    """train_region / val_region of one file share the preprocessing spec but not their cache entries."""
    from samtune.data.mask_folder import MaskFolderDataset

    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    image = np.zeros((64, 128, 3), np.uint8)
    image[:, :64], image[:, 64:] = 30, 220  # left half dark, right half bright
    labels = np.zeros((64, 128), np.uint8)
    labels[10:20, 10:20], labels[10:20, 90:100] = 1, 2
    cv2.imwrite(str(tmp_path / "img/a.png"), image)
    cv2.imwrite(str(tmp_path / "lbl/a.png"), labels)
    options = dict(image_size=32, names=["a"])
    train = MaskFolderDataset(tmp_path / "img", tmp_path / "lbl", train=True, region=(0, 0, 64, 64), **options)
    val = MaskFolderDataset(tmp_path / "img", tmp_path / "lbl", region=(64, 0, 128, 64), **options)
    whole = MaskFolderDataset(tmp_path / "img", tmp_path / "lbl", **options)
    spec = preprocessing_spec(train)
    assert preprocessing_spec(val) == spec == preprocessing_spec(whole)  # the datamodule's setup check holds
    encoder = _ChannelMean().eval()
    cache = EmbeddingCache(tmp_path / "cache", CacheConfig(encoder_fingerprint(encoder), spec))
    cached = {name: CachedEmbeddingDataset(ds, cache) for name, ds in
              (("train", train), ("val", val), ("whole", whole))}
    assert len({c.keys(0)["identity"] for c in cached.values()}) == 3
    # a whole image's key is that of its file, as before regions entered the key
    assert cached["whole"].keys(0)["identity"] == cache.key(file_identity(tmp_path / "img/a.png"), "identity")
    assert fill_cache(cached["val"], encoder) == 1  # the datamodule fills validation first
    assert fill_cache(cached["train"], encoder) == 1  # not a hit on the validation region's entry
    for name, ds in (("train", train), ("val", val)):
        live = encoder(ds[0]["image"][None])[0]
        torch.testing.assert_close(cached[name][0]["image_embedding"], live)
    assert cached["train"][0]["image_embedding"].mean() < cached["val"][0]["image_embedding"].mean()


def test_an_image_whose_drawn_masks_vanish_is_still_cached(tmp_path):
    """Filling read each training image through one random mask draw: an image whose drawn masks all vanished at
    the input size was skipped (on_error=skip), and a later training draw of it failed with a cache miss."""
    from samtune.data.mask_folder import MaskFolderDataset

    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    labels = np.zeros((128, 128), np.uint8)
    labels[10:60, 10:60] = 1
    for j in range(20):  # single pixels off the nearest-neighbour grid of a 32-pixel input: they vanish
        labels[71 + 2 * (j // 10), 6 + 10 * (j % 10)] = 2 + j
    cv2.imwrite(str(tmp_path / "img/a.png"), image)
    cv2.imwrite(str(tmp_path / "lbl/a.png"), labels)
    cv2.imwrite(str(tmp_path / "img/b.png"), image[::-1].copy())
    cv2.imwrite(str(tmp_path / "lbl/b.png"), (labels == 1).astype(np.uint8))
    dataset = MaskFolderDataset(tmp_path / "img", tmp_path / "lbl", names=["a", "b"], image_size=32, train=True,
                                max_masks_per_image=1, on_error="skip")
    encoder = _ChannelMean().eval()
    cache = EmbeddingCache(tmp_path / "cache", CacheConfig(encoder_fingerprint(encoder), preprocessing_spec(dataset)))
    cached = CachedEmbeddingDataset(dataset, cache)
    torch.manual_seed(0)
    assert fill_cache(cached, encoder) == 2  # both images, whatever the draw
    assert all(cache.contains(key) for key in cached.keys(0).values())
    ids = {cached[0]["image_id"] for _ in range(200)}  # a draw of the big mask (1 in 21) reads image a's entry
    assert ids == {"a", "b"}
    torch.testing.assert_close(cached[1]["image_embedding"], encoder(dataset._get(1)["image"][None])[0])


# --------------------------------------------------------------------------------------------------- storage
def test_storage_dtypes_and_roundtrip(encoder, tmp_path):
    spec = {"image_size": SIZE}
    emb = torch.randn(64, 16, 16)
    for dtype, tol in (("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3)):
        cache = EmbeddingCache(tmp_path, CacheConfig(encoder_fingerprint(encoder), spec, dtype))
        key = cache.key("sha256:x")
        path = cache.save(key, emb, {"image": "x.jpg"})
        assert path.stat().st_size < emb.numel() * (4 if dtype == "float32" else 2) + 1024
        out = cache.load(key)
        assert out.dtype == torch.float32 and out.shape == emb.shape
        assert ((out - emb).abs() <= tol * emb.abs().clamp_min(1)).all(), dtype
    with pytest.raises(ValueError, match="storage_dtype"):
        CacheConfig("f", spec, "int8")  # type: ignore[arg-type]


def test_corrupt_files_are_named_and_recomputed(data_dir, encoder, tmp_path, caplog):
    cached = make_cached(data_dir, tmp_path / "cache", encoder)
    assert fill_cache(cached, encoder) == 4
    key = cached.keys(0)["identity"]
    path = cached.cache.path(key)
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CorruptCacheError, match=str(path)):
        cached[0]
    with caplog.at_level("WARNING", logger="samtune.adapt"):
        assert fill_cache(cached, encoder) == 1  # a damaged header is noticed in setup and recomputed
    assert "corrupt cache file" in caplog.text and str(path) in caplog.text
    assert cached[0]["image_embedding"].shape == (64, 16, 16)

    damaged = bytearray(path.read_bytes())
    damaged[-5] ^= 0xFF  # one flipped byte in the tensor data: the header is intact
    path.write_bytes(bytes(damaged))
    with pytest.raises(CorruptCacheError, match="SHA-256"):
        cached[0]
    assert fill_cache(cached, encoder, verify="header") == 0  # a header check cannot see it
    assert fill_cache(cached, encoder, verify="full") == 1  # a full check can
    cached[0]

    other = cached.keys(1)["identity"]
    cached.cache.path(other).write_bytes(good)  # a valid file under the wrong name
    with pytest.raises(CorruptCacheError, match="expected"):
        cached[1]

    cached.cache.path(cached.keys(2)["identity"]).unlink()
    with pytest.raises(CacheMissError, match="sa_3.jpg"):
        cached[2]


def test_a_damaged_manifest_is_named(encoder, tmp_path):
    """A manifest of valid JSON without a usable embedding_shape (or not an object) raised a bare KeyError /
    AttributeError naming no file when the next embedding was stored."""
    config = CacheConfig(encoder_fingerprint(encoder), {"image_size": SIZE})
    cache = EmbeddingCache(tmp_path, config)
    cache.save(cache.key("sha256:a"), torch.randn(64, 16, 16))
    manifest = json.loads(cache.manifest_path.read_text())
    for text in (json.dumps({k: v for k, v in manifest.items() if k != "embedding_shape"}),
                 json.dumps(dict(manifest, embedding_shape="64x16x16")), "[1]"):
        cache.manifest_path.write_text(text)
        with pytest.raises(CorruptCacheError, match="manifest.json"):
            EmbeddingCache(tmp_path, config).save(cache.key("sha256:b"), torch.randn(64, 16, 16))


def test_concurrent_fills_share_one_cache(data_dir, encoder, tmp_path):
    """Two fillers (as two DDP ranks) at once: each ends with a complete, valid cache; no temporary files left."""
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            cached = make_cached(data_dir, tmp_path / "cache", encoder, views=("identity", "rot90"))
            results[rank] = fill_cache(cached, encoder, batch_size=1, rank=rank, world_size=2)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert 8 <= results[0] + results[1] <= 16
    cached = make_cached(data_dir, tmp_path / "cache", encoder, views=("identity", "rot90"))
    assert fill_cache(cached, encoder, verify="full") == 0
    assert not list((tmp_path / "cache").rglob("*.tmp"))


@pytest.mark.filterwarnings("ignore:.*pin_memory.*")
def test_a_cold_cache_gives_the_training_samples_of_a_warm_one(data_dir, encoder, tmp_path):
    """Filling drew training samples (``_get``) from torch's global generator: the same seed then gave other
    training batches on a cold cache than on a warm one."""
    cached = make_cached(data_dir, tmp_path / "direct", encoder, train=True)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert fill_cache(cached, encoder) == 4
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]

    def train_batches() -> list:
        L.seed_everything(0, verbose=False)
        dm = CachedEmbeddingDataModule(
            SA1BDataModule(str(data_dir), image_size=SIZE, num_workers=0, pin_memory=False, max_masks_per_image=2,
                           val_fraction=0.25),
            cache_dir=str(tmp_path / "cache"), model="sam_tiny", device="cpu",
        )
        dm.setup("fit")
        return [(b["image_id"], b["instance_ids"].tolist()) for b in dm.train_dataloader()]

    cold = train_batches()
    assert cold == train_batches()


def test_cached_training_loader_keeps_a_batch_on_every_distributed_rank(data_dir, tmp_path):
    """The cached datamodule drops the last partial batch by the same rule as the datamodules: only when each
    process's shard holds a full batch (3 training images, batch 2: dropped with 1 process, kept with 2)."""
    from types import SimpleNamespace

    dm = CachedEmbeddingDataModule(
        SA1BDataModule(str(data_dir), image_size=SIZE, num_workers=0, pin_memory=False, batch_size=2,
                       val_fraction=0.25),
        cache_dir=str(tmp_path / "cache"), model="sam_tiny", device="cpu",
    )
    for world_size, drop in ((1, True), (2, False)):
        dm.trainer = SimpleNamespace(world_size=world_size)
        assert dm._loader([0, 1, 2], shuffle=True).drop_last is drop  # the loader's settings: no cache to fill


# --------------------------------------------------------------------------------------------------- views
def test_views_transform_image_masks_and_boxes_together(data_dir):
    sample = SA1BDataset(data_dir, image_size=SIZE)._get(0)
    h, w = sample["input_size"].tolist()
    assert (h, w) == (192, 256)
    sample["ignore_mask"] = sample["masks"][-1].clone()  # void pixels (validation samples) turn with the masks
    for view in ("hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose"):
        out = view_sample(sample, view, SIZE)
        nh, nw = out["input_size"].tolist()
        assert (nh, nw) == ((w, h) if view in ("rot90", "rot270", "transpose", "antitranspose") else (h, w))
        expected = np.ascontiguousarray({
            "hflip": lambda a: a[..., ::-1], "vflip": lambda a: a[..., ::-1, :],
            "rot90": lambda a: np.rot90(a, 1, (-2, -1)), "rot180": lambda a: np.rot90(a, 2, (-2, -1)),
            "rot270": lambda a: np.rot90(a, 3, (-2, -1)), "transpose": lambda a: np.swapaxes(a, -2, -1),
            "antitranspose": lambda a: np.swapaxes(np.rot90(a, 2, (-2, -1)), -2, -1),
        }[view](sample["masks"][:, :h, :w].numpy()))
        assert torch.equal(out["masks"][:, :nh, :nw], torch.from_numpy(expected))
        assert torch.equal(out["ignore_mask"], out["masks"][-1])
        assert not out["masks"][:, nh:].any() and not out["masks"][:, :, nw:].any()
        assert torch.equal(out["image"][:, :nh, :nw], apply_view(sample["image"][:, :h, :w], view))
        ys, xs = np.nonzero(expected[0])
        assert out["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
    with pytest.raises(ValueError, match="unknown view"):
        apply_view(sample["image"], "rot45")


# --------------------------------------------------------------------------------------------------- task
def _loss(task: PromptableSegmentationTask, batch: dict) -> torch.Tensor:
    task._train_step_counter = 0  # prompts are drawn from (simulation seed, step counter, rank): same step, same prompts
    return task.training_step(batch, 0)


@pytest.mark.filterwarnings("ignore:.*self.log.*")
@pytest.mark.parametrize("view", ["identity", "rot90"])
def test_cached_training_step_equals_live_frozen_encoder(data_dir, tmp_path, view):
    """Same batch, same prompts: the loss from cached embeddings equals the loss with the live frozen encoder,
    and so do the decoder's gradients."""
    torch.manual_seed(0)
    task = PromptableSegmentationTask("sam_tiny", simulation=SHORT, freeze_image_encoder=True)
    encoder = task.model.image_encoder
    cached = make_cached(data_dir, tmp_path / "cache", encoder, views=(view,), max_masks_per_image=3)
    fill_cache(cached, encoder, batch_size=3)
    indices = [0, 2, 3]
    cached_batch = collate_cached([cached[i] for i in indices])
    assert "images" not in cached_batch
    live_batch = collate_samples([view_sample(cached.dataset._get(i), view, SIZE) for i in indices])
    for key in ("masks", "boxes", "mask_valid", "input_size", "original_size"):
        assert torch.equal(cached_batch[key], live_batch[key]), key
    with torch.no_grad():
        live_embeddings = encoder(live_batch["images"])
    assert torch.allclose(cached_batch["image_embeddings"], live_embeddings, atol=1e-5, rtol=0)

    live = _loss(task, live_batch)
    live.backward()
    live_grads = [p.grad.clone() for p in task.model.mask_decoder.parameters()]
    task.zero_grad()
    cached_loss = _loss(task, cached_batch)
    cached_loss.backward()
    assert abs(cached_loss.item() - live.item()) <= 1e-5, (cached_loss.item(), live.item())
    for p, g in zip(task.model.mask_decoder.parameters(), live_grads):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in encoder.parameters())


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_cached_embeddings_need_a_frozen_encoder_with_the_same_weights(data_dir, tmp_path):
    torch.manual_seed(0)
    frozen = PromptableSegmentationTask("sam_tiny", simulation=SHORT, freeze_image_encoder=True)
    cached = make_cached(data_dir, tmp_path / "cache", frozen.model.image_encoder)
    fill_cache(cached, frozen.model.image_encoder)
    batch = collate_cached([cached[0], cached[1]])

    trainable = PromptableSegmentationTask("sam_tiny", simulation=SHORT, freeze_image_encoder=False)
    trainable.model.load_state_dict(frozen.model.state_dict())
    with pytest.raises(ValueError, match="needs a frozen image encoder.*freeze_image_encoder: true"):
        trainable.training_step(batch, 0)
    trainable.model.image_encoder.requires_grad_(False)  # frozen, but dropout / drop path would be live
    with pytest.raises(ValueError, match="eval mode"):
        require_frozen_encoder(trainable.model.image_encoder)

    _loss(frozen, batch)  # the same weights: accepted
    with torch.no_grad():  # weights changed in place (e.g. a checkpoint loaded): the memoised hash notices
        next(frozen.model.image_encoder.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="different weights"):
        frozen.training_step(batch, 0)
    with pytest.raises(KeyError, match="embedding_fingerprint"):
        check_cached_embeddings(frozen.model.image_encoder, {"image_embeddings": batch["image_embeddings"]})


# --------------------------------------------------------------------------------------------------- datamodule
def test_datamodule_rejects_augmentation_and_other_weights(data_dir, tmp_path):
    augmented = CachedEmbeddingDataModule(
        SA1BDataModule(str(data_dir), image_size=SIZE, num_workers=0, augmentation="natural", val_fraction=0.25),
        cache_dir=str(tmp_path / "cache"), model="sam_tiny",
    )
    with pytest.raises(ValueError, match="augmentation: none.*views"):
        augmented.setup("fit")
    cropped = CachedEmbeddingDataModule(
        SA1BDataModule(str(data_dir), image_size=SIZE, num_workers=0, crop_size=64, val_fraction=0.25),
        cache_dir=str(tmp_path / "cache"), model="sam_tiny",
    )
    with pytest.raises(ValueError, match="crop_size"):
        cropped.setup("fit")
    with pytest.raises(ValueError, match="checkpoint is given without model"):
        CachedEmbeddingDataModule(SA1BDataModule(str(data_dir)), cache_dir="c", checkpoint="x.pth")
    with pytest.raises(ValueError, match="unknown views"):
        CachedEmbeddingDataModule(SA1BDataModule(str(data_dir)), cache_dir="c", views=["mirror"])  # type: ignore[list-item]

    # model given, but the task was built with other weights: refused in setup, before any embedding is computed
    torch.manual_seed(1)
    task = PromptableSegmentationTask("sam_tiny", simulation=SHORT, freeze_image_encoder=True)
    torch.manual_seed(2)
    dm = CachedEmbeddingDataModule(
        SA1BDataModule(str(data_dir), image_size=SIZE, num_workers=0, val_fraction=0.25),
        cache_dir=str(tmp_path / "cache2"), model="sam_tiny",
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="differs from the task's"):
        trainer.fit(task, datamodule=dm)
    assert not (tmp_path / "cache2").exists()


@pytest.mark.parametrize(("options", "message"), [
    (dict(image_size=64), r"image_size=64, normalization='sam', resize_interpolation='bilinear', but the image "
                          r"encoder takes image_size=256, normalization='sam', resize_interpolation='bilinear'"),
    (dict(normalization="minmax"), r"image_size=256, normalization='minmax', resize_interpolation='area', but the "
                                   r"image encoder takes image_size=256, normalization='sam', "
                                   r"resize_interpolation='bilinear'"),
])
def test_datamodule_rejects_data_prepared_for_another_model_input(data_dir, tmp_path, options, message):
    """Embeddings of 64-px inputs for a 256-px model used to fail later, in the decoder, with a size mismatch."""
    dm = CachedEmbeddingDataModule(
        SA1BDataModule(str(data_dir), **(dict(image_size=SIZE) | options), num_workers=0, val_fraction=0.25),
        cache_dir=str(tmp_path / "cache"), model="sam_tiny", device="cpu",
    )
    with pytest.raises(ValueError, match=rf"the data is prepared for {message} \(model 'sam_tiny'\)"):
        dm.setup("fit")
    assert not (tmp_path / "cache").exists()


@pytest.mark.filterwarnings("ignore:.*pin_memory.*")
def test_datamodule_batches_and_views(data_dir, tmp_path):
    dm = CachedEmbeddingDataModule(
        SA1BDataModule(str(data_dir), image_size=SIZE, num_workers=0, batch_size=2, val_fraction=0.25,
                       max_masks_per_image=3),
        cache_dir=str(tmp_path / "cache"), model="sam_tiny", views=["identity", "hflip", "rot90"],
        storage_dtype="float16", device="cpu",
    )
    dm.setup("fit")
    assert len(list(dm.cache.directory.rglob("*.safetensors"))) == 3 * 3 + 1  # 3 train images x 3 views + 1 val
    train = next(iter(dm.train_dataloader()))
    assert train["image_embeddings"].shape == (2, 64, 16, 16) and train["image_embeddings"].dtype == torch.float32
    assert "images" not in train and train["masks"].shape[1:] == (3, SIZE, SIZE)
    val = next(iter(dm.val_dataloader()))
    assert val["images"].shape == (1, 3, SIZE, SIZE) and val["image_embeddings"].shape == (1, 64, 16, 16)
    seen = {dm.train_dataset._pick_view(0) for _ in range(40)}
    assert seen == {"identity", "hflip", "rot90"}


# --------------------------------------------------------------------------------------------------- CLI
def test_samtune_fit_on_cached_embeddings(data_dir, tmp_path, monkeypatch):
    """``samtune fit`` with the cached datamodule: the task never runs its encoder (Sam.encode_image is broken
    for the run), the cache is filled once, and a second run reuses it."""
    from samtune.cli import main

    def no_encoder(self, images):
        raise AssertionError("the image encoder ran although cached embeddings were given")

    monkeypatch.setattr(Sam, "encode_image", no_encoder)
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "model": {"class_path": "PromptableSegmentationTask", "init_args": {
            "model": "sam_tiny", "freeze_image_encoder": True, "freeze_prompt_encoder": True,
            "simulation": {"num_iterations": 2, "num_point_iterations": 1, "random_mask_only_iteration": False,
                           "final_mask_only_iteration": False},
            "val_num_clicks": 1}},
        "data": {"class_path": "samtune.data.cached.CachedEmbeddingDataModule", "init_args": {
            "data": {"class_path": "SA1BDataModule", "init_args": {
                "root": str(data_dir), "image_size": SIZE, "batch_size": 2, "num_workers": 0,
                "pin_memory": False, "max_masks_per_image": 4, "val_fraction": 0.25}},
            "cache_dir": "cache", "views": ["identity", "vflip"]}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "enable_checkpointing": False},
    }
    path = tmp_path / "cached.yaml"
    path.write_text(yaml.safe_dump(config))
    for run in range(2):
        try:
            main(["fit", "--config", str(path)])
        except SystemExit as exc:
            assert not exc.code, f"run {run}: exit code {exc.code}"
        files = sorted((tmp_path / "cache").rglob("*.safetensors"))
        assert len(files) == 3 * 2 + 1, run  # 3 training images x 2 views + 1 validation image
        if run == 0:
            stamps = [f.stat().st_mtime_ns for f in files]
    assert [f.stat().st_mtime_ns for f in files] == stamps  # the second run only read the cache


def test_lora_encoder_error_advises_a_configuration_that_exists():
    """LoRA / adapters always sit in the image encoder (an AdaptationConfig cannot put them on the decoder only), so
    the refusal must not advise "LoRA / adapters on the decoder only" but the adaptation that does keep the encoder
    frozen, and that one must pass the check."""
    from samtune.adapt import apply_adaptation
    from samtune.adapt.cache import require_frozen_encoder

    model = apply_adaptation(build_sam("sam_tiny"), dict(method="lora", freeze_policy="frozen"))
    with pytest.raises(ValueError, match="needs a frozen image encoder") as info:
        require_frozen_encoder(model.image_encoder)
    assert "decoder only" not in str(info.value)
    assert "method 'none'" in str(info.value)
    frozen = apply_adaptation(build_sam("sam_tiny"), dict(method="none", freeze_policy="decoder_only"))
    require_frozen_encoder(frozen.image_encoder.eval())
