"""The pure packages never import Lightning (DESIGN.md layering)."""
from __future__ import annotations

import subprocess
import sys

PURE = ["samtune", "samtune.modeling", "samtune.build", "samtune.checkpoints", "samtune.prompts", "samtune.losses",
        "samtune.inference", "samtune.modeling.tiny_vit", "samtune.adapt", "samtune.evaluation", "samtune.export"]

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_pure_packages_import_without_lightning():
    code = BLOCKER + "".join(f"import {m}\n" for m in PURE) + "print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_blocker_really_blocks():
    code = BLOCKER + "import lightning"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "blocked: lightning" in result.stderr
