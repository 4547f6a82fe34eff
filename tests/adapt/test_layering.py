"""samtune.adapt is pure PyTorch + peft: it imports without Lightning (DESIGN.md layering)."""
from __future__ import annotations

import subprocess
import sys

from tests.test_layering import BLOCKER


def test_adapt_imports_without_lightning():
    code = BLOCKER + "import samtune.adapt\nimport samtune.adapt.checkpoint\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
