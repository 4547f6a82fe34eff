"""Shared test fixtures: seeding, the real-asset folder, tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def assets_dir() -> Path | None:
    """The real-asset folder from ``SAMTUNE_ASSETS`` (default ``../shared/assets``), or None when absent."""
    path = Path(os.environ.get("SAMTUNE_ASSETS", REPO_ROOT.parent / "shared" / "assets"))
    return path if path.is_dir() else None


@pytest.fixture
def assets() -> Path:
    path = assets_dir()
    if path is None:
        pytest.skip("real assets not found: set SAMTUNE_ASSETS or place them at ../shared/assets")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
