"""samtune.build: registry configs that do not fit together fail at build time, naming the mismatch."""
from __future__ import annotations

import pytest

from samtune.build import available_models, build_sam_from_config, get_config, with_overrides


@pytest.mark.parametrize("name", ["sam_tiny", "sam_tiny_vit_t"])
def test_image_size_that_does_not_give_the_embedding_grid_is_a_build_error(name) -> None:
    """Another image size without the matching embedding grid: the encoder's output would not fit the prompt
    encoder's grid (a shape error deep in the decoder); both encoder types refuse it when built."""
    with pytest.raises(ValueError, match=r"image_size 128 / .* != embedding grid"):
        build_sam_from_config(with_overrides(name, image_size=128))


def test_registered_tiny_vit_models_build() -> None:
    """The check refuses none of the registered TinyViT models (MobileSAM at 1024, LiteMedSAM at 256, the tiny one)."""
    names = [name for name in available_models() if get_config(name).encoder_type == "tiny_vit"]
    assert len(names) >= 3, names
    for name in names:
        build_sam_from_config(get_config(name))
