"""Fixtures of the export tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from samtune import Sam, build_sam

from ..modeling.reference import randomize_


@pytest.fixture(scope="session")
def tiny_sam() -> Sam:
    """sam_tiny whose every tensor (position tables, norms, biases) is non-trivial."""
    return randomize_(build_sam("sam_tiny"), seed=3).eval()


@pytest.fixture
def lite_medsam_file(assets: Path) -> Path:
    """The real LiteMedSAM weights (skips when the assets are absent)."""
    return assets / "weights/lite_medsam/lite_medsam.pth"
