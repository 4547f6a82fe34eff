"""Bad input files and arguments of the data layer: errors that name the file / argument and what was expected."""
from __future__ import annotations

import numpy as np
import pytest

from samtune.data.coco import load_coco_index
from samtune.data.synth import main as synth_main
from samtune.data.synth import synthesize_image, synthesize_sa1b


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{bad", r"invalid JSON \(Expecting property name.*\); expected a COCO instances file"),
        (b"\xff\xfe\x00 not text", r"invalid JSON \(.*codec can't decode.*\); expected a COCO instances file"),
        (b"[1, 2]", r"expected a JSON object with 'images' and 'annotations' lists .*got a list"),
        (b'{"images": []}', r"expected a list under 'annotations'"),
    ],
)
def test_coco_index_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        load_coco_index(path)


def test_synth_rejects_an_empty_object_range(tmp_path, capsys):
    """``samtune data synth --min-objects 5 --max-objects 1`` said ``ValueError: low >= high``."""
    with pytest.raises(SystemExit) as exit_:
        synth_main(["--out", str(tmp_path / "s"), "--num-images", "1", "--min-objects", "5", "--max-objects", "1"])
    assert exit_.value.code == 2
    assert "--max-objects (1) must be >= --min-objects (5)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth_main(["--out", str(tmp_path / "s"), "--num-images", "1", "--image-size", "8"])
    assert "--image-size must be a side (or height, width) of at least 16 pixels, got 8" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match=r"^max_objects \(1\) must be >= min_objects \(5\)$"):
        synthesize_sa1b(tmp_path / "p", 1, 32, min_objects=5, max_objects=1)
    with pytest.raises(ValueError, match=r"^min_objects must be >= 0, got -1$"):
        synthesize_image(32, np.random.default_rng(0), min_objects=-1, max_objects=2)
    with pytest.raises(ValueError, match=r"^num_images must be >= 0, got -2$"):
        synthesize_sa1b(tmp_path / "p", -2)
    with pytest.raises(ValueError, match=r"^image_size must be .* at least 16 pixels, got \(64, 4\)$"):
        synthesize_sa1b(tmp_path / "p", 1, (64, 4))
    # the edges of the valid range work: exactly min_objects == max_objects, and zero objects (one is guaranteed)
    paths = synthesize_sa1b(tmp_path / "ok", 2, 16, min_objects=0, max_objects=0)
    assert len(paths) == 2
    _, masks = synthesize_image(48, np.random.default_rng(1), min_objects=2, max_objects=2)
    assert masks.shape[0] >= 1
