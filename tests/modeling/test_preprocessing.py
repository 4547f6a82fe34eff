"""Input normalisation conventions (samtune.modeling.preprocessing)."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from samtune.modeling.preprocessing import normalize_image


@pytest.mark.parametrize("normalization", ["sam", "minmax"])
def test_normalize_already_padded_image_equals_normalize_then_pad(normalization) -> None:
    """An image padded before normalising (``valid_hw``) gives the model input of normalising, then zero padding."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 40, 28, generator=g) * 200 + 30  # no zero pixel: min-max must ignore the padding
    pad = (0, 64 - 28, 0, 64 - 40)
    expected = F.pad(normalize_image(image, normalization), pad)
    got = normalize_image(F.pad(image, pad), normalization, valid_hw=(40, 28))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
