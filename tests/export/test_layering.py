"""samtune.export (and Predictor.from_checkpoint) never import Lightning: export -> modeling, adapt."""
from __future__ import annotations

import subprocess
import sys

from ..test_layering import BLOCKER


def test_export_imports_and_loads_without_lightning(tmp_path) -> None:
    code = BLOCKER + f"""
import torch
import samtune.export, samtune.export.onnx, samtune.export.cli
from samtune import Predictor, build_sam
from samtune.checkpoints import save_checkpoint
path = save_checkpoint(build_sam("sam_tiny"), {str(tmp_path / "w.pth")!r})
assert samtune.export.cli.main(["--checkpoint", str(path), "--format", "safetensors", "--output", str(path) + ".safetensors"]) == 0
assert Predictor.from_checkpoint(str(path) + ".safetensors", precision="fp32").model.image_size == 256
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
