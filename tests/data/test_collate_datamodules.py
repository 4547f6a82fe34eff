import sys

import pytest
import torch

from samtune.data import SA1BDataset, collate_samples
from samtune.data.datamodules import COCODataModule, MaskFolderDataModule, SA1BDataModule, split_by_ratio
from tests.data.conftest import write_mask_folder


def test_collate_pads_variable_mask_counts(sa1b_dir):
    ds = SA1BDataset(sa1b_dir, image_size=32, return_original_masks=True)
    samples = [ds[0], ds[1]]
    counts = [s["masks"].shape[0] for s in samples]
    batch = collate_samples(samples)
    kmax = max(counts)
    assert batch["images"].shape == (2, 3, 32, 32)
    assert batch["masks"].shape == (2, kmax, 32, 32) and batch["masks"].dtype == torch.bool
    assert batch["boxes"].shape == (2, kmax, 4)
    assert batch["mask_valid"].sum(1).tolist() == counts
    assert (batch["instance_ids"][~batch["mask_valid"]] == -1).all()
    assert not batch["masks"][~batch["mask_valid"]].any()
    assert batch["original_size"].shape == (2, 2) and batch["input_size"].shape == (2, 2)
    assert batch["image_id"] == ["sa_1", "sa_2"]
    assert isinstance(batch["original_masks"], list) and batch["original_masks"][1].shape[0] == counts[1]


def test_collate_keeps_a_mask_slot_when_empty(sa1b_dir):
    sample = SA1BDataset(sa1b_dir, image_size=32)[0]
    empty = dict(sample, masks=sample["masks"][:0], boxes=sample["boxes"][:0],
                 instance_ids=sample["instance_ids"][:0])
    batch = collate_samples([empty])
    assert batch["masks"].shape[1] == 1 and not batch["mask_valid"].any()


def test_split_by_ratio_is_seeded_and_disjoint():
    train, val = split_by_ratio(list(range(20)), 0.25, seed=1)
    assert len(val) == 5 and not set(train) & set(val) and split_by_ratio(list(range(20)), 0.25, 1) == (train, val)


def test_datamodules_build_loaders(sa1b_dir, coco_file, tmp_path):
    dm = SA1BDataModule(str(sa1b_dir), image_size=32, batch_size=2, num_workers=0, val_fraction=0.34,
                        augmentation="natural_lsj", max_masks_per_image=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 32, 32) and batch["masks"].shape[1] <= 3
    assert len(dm.val_dataset) == 2 and len(dm.train_dataset) == 4
    coco = COCODataModule(str(coco_file), image_size=32, num_workers=0, val_fraction=0.5, pin_memory=False)
    coco.setup("fit")
    assert len(coco.train_dataset) + len(coco.val_dataset) == 2
    images, masks = write_mask_folder(tmp_path / "mf", n=5)
    split = tmp_path / "val.txt"
    split.write_text("img0\nimg3\n")
    folder = MaskFolderDataModule(str(images), str(masks), val_split=str(split), image_size=32, num_workers=0,
                                  return_original_masks=True, batch_size=2)
    val = next(iter(folder.val_dataloader()))
    assert val["image_id"] == ["img0", "img3"] and len(val["original_masks"]) == 2
    assert folder.train_dataset.names == ["img1", "img2", "img4"] and folder.num_skipped == 0


def test_missing_split_list_names_the_setting_and_the_working_directory(tmp_path, monkeypatch):
    """A recipe's relative split path run from another folder: the error names the key and where it looked."""
    images, masks = write_mask_folder(tmp_path / "mf", n=3)
    monkeypatch.chdir(tmp_path)
    folder = MaskFolderDataModule(str(images), str(masks), train_split="recipes/splits/train.txt", image_size=32,
                                  num_workers=0)
    with pytest.raises(ValueError, match=r"MaskFolderDataModule\.train_split: split list not found: "
                                         r"recipes/splits/train\.txt \(relative to the working directory "):
        folder.setup("fit")


def test_datamodule_loaders_bind_the_rank_for_their_workers(tmp_path, monkeypatch):
    """Loaders built on rank 1 hand that rank to their workers (which cannot find it themselves)."""
    images, masks = write_mask_folder(tmp_path / "mf", n=4)
    folder = MaskFolderDataModule(str(images), str(masks), image_size=32, num_workers=1, val_fraction=0.25)
    monkeypatch.setenv("RANK", "1")
    for loader in (folder.train_dataloader(), folder.val_dataloader()):
        assert loader.worker_init_fn.keywords == {"rank": 1}


def test_small_training_sets_keep_a_batch_on_every_distributed_rank(tmp_path):
    """6 images, batch 4, 2 ranks: each rank's shard holds 3 images, and drop_last (set because 6 >= 4) left every
    rank with no training batch at all."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, DistributedSampler

    images, masks = write_mask_folder(tmp_path / "mf", n=7)
    folder = MaskFolderDataModule(str(images), str(masks), image_size=32, num_workers=0, batch_size=4,
                                  val_fraction=0.15, pin_memory=False)
    folder.trainer = SimpleNamespace(world_size=2)
    loader = folder.train_dataloader()
    assert len(folder.train_dataset) == 6
    for rank in range(2):  # the loader as Lightning shards it: a DistributedSampler, the loader's other arguments
        sampler = DistributedSampler(folder.train_dataset, num_replicas=2, rank=rank, shuffle=True)
        sharded = DataLoader(folder.train_dataset, batch_size=loader.batch_size, sampler=sampler,
                             drop_last=loader.drop_last, collate_fn=loader.collate_fn)
        assert len(sharded) == 1
    folder.trainer = SimpleNamespace(world_size=1)
    assert folder.train_dataloader().drop_last  # one process: full batches only, as before


def test_datasets_do_not_import_lightning(tmp_path):
    import subprocess

    code = ("import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None; "
            "import samtune.data, samtune.data.synth")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_coco_ratio_split_draws_from_the_images_left_by_the_filters(coco_file, tmp_path):
    """The split was drawn over every image entry and the filters applied afterwards: a split could end up empty
    (image 3 has no annotation; category 1 is on image 1 only), silently."""
    import json

    import pytest

    for seed in range(6):
        coco = COCODataModule(str(coco_file), image_size=32, num_workers=0, val_fraction=0.5, split_seed=seed)
        coco.setup("fit")
        assert sorted(coco.train_dataset.image_ids + coco.val_dataset.image_ids) == [1, 2]
        assert len(coco.train_dataset.image_ids) == len(coco.val_dataset.image_ids) == 1
    with pytest.raises(ValueError, match=r"annotations\.json: 1 of its 3 image\(s\) have annotations left by "
                                         r"include_crowd=False, category_ids=\[1\]; a ratio split .* at least 2"):
        COCODataModule(str(coco_file), category_ids=[1], num_workers=0).setup("fit")
    data = json.loads(coco_file.read_text())
    (coco_file.parent / "val.json").write_text(json.dumps(dict(data, annotations=data["annotations"][3:4])))  # crowd
    with pytest.raises(ValueError, match=r"the validation split is empty: none of the 3 image\(s\) of .*val\.json has "
                                         r"annotations left by include_crowd=False, category_ids=None"):
        COCODataModule(str(coco_file), val_annotations=str(coco_file.parent / "val.json"), num_workers=0).setup()
    del data["images"][1]["id"]
    (tmp_path / "no_id.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no_id\.json: images\[1\] has no 'id'"):  # was a bare KeyError('id')
        COCODataModule(str(tmp_path / "no_id.json"), num_workers=0).setup()


def test_validation_under_ddp_sees_each_sample_once(tmp_path):
    """3 validation images on 2 ranks: Lightning's DistributedSampler pads rank 1's share with a repeat of image 0,
    which the summed validation metrics then counted twice; the datamodule's sampler shares them 2 + 1."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler, SequentialSampler

    images, masks = write_mask_folder(tmp_path / "mf", n=8)
    folder = MaskFolderDataModule(str(images), str(masks), image_size=32, num_workers=0, batch_size=2,
                                  val_fraction=0.375, pin_memory=False)
    seen = []
    for rank in range(2):
        folder.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = folder.val_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # so Lightning keeps it instead of padding
        seen += [name for batch in loader for name in batch["image_id"]]
    assert len(folder.val_dataset) == 3 and sorted(seen) == sorted(folder.val_dataset.names)
    folder.trainer = SimpleNamespace(world_size=4, global_rank=0)  # fewer samples than ranks: Lightning's sampler
    assert isinstance(folder.val_dataloader().sampler, SequentialSampler)
    folder.trainer = SimpleNamespace(world_size=1, global_rank=0)
    assert isinstance(folder.val_dataloader().sampler, SequentialSampler)
