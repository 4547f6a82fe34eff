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


def test_registered_tiny_vit_configs_fit_their_grid() -> None:
    for name in available_models():
        cfg = get_config(name)
        if cfg.encoder_type == "tiny_vit":
            stride = cfg.encoder.stem_stride * 2 ** (len(cfg.encoder.embed_dims) - 2)
            assert cfg.image_size // stride == cfg.embedding_grid, name
