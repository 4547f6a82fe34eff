"""Training randomness of the datasets: restarted by reseeding, distinct per distributed rank, reproducible."""
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from samtune.data import MaskFolderDataset, collate_samples, seed_worker, worker_init
from samtune.data.collate import global_rank
from tests.data.conftest import write_mask_folder


@pytest.fixture
def train_set(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    images, masks = write_mask_folder(tmp_path, n=1, size=(48, 64))
    return MaskFolderDataset(images, masks, image_size=32, train=True, augmentation="overhead",
                             max_masks_per_image=1, repeats=8)


def _draws(dataset):
    """Chosen instance and its box after augmentation, for every index: one epoch in the main process."""
    return [(s["instance_ids"].tolist(), s["boxes"].tolist()) for s in (dataset[i] for i in range(len(dataset)))]


def _loader_draws(dataset):
    """The same through a DataLoader with two worker processes (batches of 1, in order)."""
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate_samples, worker_init_fn=seed_worker)
    return [(b["instance_ids"][0].tolist(), b["boxes"][0].tolist()) for b in loader]


def test_reseeding_restarts_training_randomness(train_set):
    torch.manual_seed(123)  # what seed_everything(123) does to torch
    first = _draws(train_set)
    torch.manual_seed(123)
    assert _draws(train_set) == first  # the same dataset object, seeded again: the same samples
    assert len({str(d) for d in first}) > 2  # still random from sample to sample
    torch.manual_seed(124)
    assert _draws(train_set) != first


@pytest.mark.parametrize("draws", [_draws, _loader_draws], ids=["main_process", "workers"])
def test_distributed_ranks_draw_different_streams(train_set, monkeypatch, draws):
    """Every DDP process is seeded alike; the rank must still give each its own augmentation/sampling stream."""
    runs = []
    for rank in (None, 0, 1, 1, 2):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", str(rank))
        torch.manual_seed(0)
        runs.append(draws(train_set))
    no_ddp, rank0, rank1, rank1_again, rank2 = runs
    assert rank0 == no_ddp and rank1 == rank1_again  # reproducible per rank, rank 0 as without DDP
    assert rank1 != rank0 and rank2 != rank0 and rank2 != rank1


class _RankSeen(torch.utils.data.Dataset):
    """Each item is the global rank that the process loading it reports."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return global_rank()


def test_workers_keep_the_rank_their_loader_was_built_for(train_set, monkeypatch):
    """DataLoader workers do not see the process's rank (``torch.distributed`` is not initialised in them, and
    Lightning's DDP launcher sets no ``RANK``): the loader binds it when it is built (``worker_init``). Here the
    rank is visible only while the loader is built, as in a Lightning DDP process."""
    def build(rank: int, dataset, **options) -> DataLoader:
        monkeypatch.setenv("RANK", str(rank))
        loader = DataLoader(dataset, num_workers=2, worker_init_fn=worker_init(), **options)
        monkeypatch.delenv("RANK")
        return loader

    assert [int(r) for r in build(1, _RankSeen(), batch_size=None)] == [1, 1, 1, 1]
    unbound = DataLoader(_RankSeen(), batch_size=None, num_workers=2, worker_init_fn=seed_worker)
    assert [int(r) for r in unbound] == [0, 0, 0, 0]

    monkeypatch.setenv("RANK", "1")
    torch.manual_seed(0)
    rank1 = _loader_draws(train_set)  # workers that see RANK=1 themselves
    monkeypatch.delenv("RANK")
    torch.manual_seed(0)
    rank0 = _loader_draws(train_set)
    torch.manual_seed(0)
    bound = build(1, train_set, batch_size=1, collate_fn=collate_samples)
    assert [(b["instance_ids"][0].tolist(), b["boxes"][0].tolist()) for b in bound] == rank1 != rank0


def test_seed_worker_mixes_in_the_rank(monkeypatch):
    np_state, py_state = np.random.get_state(), random.getstate()
    values = {}
    try:
        with torch.random.fork_rng(devices=[]):
            for rank in (0, 1):
                monkeypatch.setenv("RANK", str(rank))
                torch.manual_seed(7)
                seed_worker(0)
                values[rank] = (np.random.random(), random.random(), torch.rand(()).item())
            torch.manual_seed(7)
            np.random.seed(7)
            random.seed(7)
            unchanged = (np.random.random(), random.random(), torch.rand(()).item())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    assert values[0] == unchanged  # rank 0: the worker's own torch seed, as before
    assert all(a != b for a, b in zip(values[0], values[1]))


def test_global_rank_from_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert global_rank() == 0
    monkeypatch.setenv("RANK", "3")
    assert global_rank() == 3


def test_indices_that_name_their_pass_draw_a_function_of_it(train_set, monkeypatch):
    """Indices from the resumable training loader (``samtune.resumable.SampleIndex``) carry ``(seed, epoch)``: the
    sample is a function of (dataset seed, that key, index, rank), whatever the global generator or the order of
    loading (what makes a resumed run, with or without workers, draw what the uninterrupted one drew)."""
    from samtune.resumable import SampleIndex

    def draws(key, order):
        samples = {i: train_set[SampleIndex(i, key)] for i in order}
        return [str((samples[i]["instance_ids"].tolist(), samples[i]["boxes"].tolist())) for i in sorted(samples)]

    torch.manual_seed(0)
    first = draws((0, 0), range(len(train_set)))
    torch.manual_seed(1)
    assert draws((0, 0), reversed(range(len(train_set)))) == first
    assert len(set(first)) > 2  # still random from sample to sample
    assert draws((0, 1), range(len(train_set))) != first  # another epoch
    assert draws((1, 0), range(len(train_set))) != first  # another run seed
    monkeypatch.setenv("RANK", "1")
    assert draws((0, 0), range(len(train_set))) != first  # another rank
    index = SampleIndex(0, (0, 0))
    assert train_set._rng(index) is train_set._rng(index)  # the same visit (e.g. the cached dataset's view choice)
    assert train_set._rng(SampleIndex(0, (0, 0))).random() == train_set._rng(SampleIndex(0, (0, 0))).random()
