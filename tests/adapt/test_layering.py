"""samtune.adapt is pure PyTorch + peft: it imports without Lightning (DESIGN.md layering)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.test_layering import BLOCKER


def run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_adapt_imports_without_lightning():
    code = BLOCKER + "import samtune.adapt\nimport samtune.adapt.checkpoint\nprint('ok')"
    result = run(code)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_peft_is_imported_only_when_lora_is_used():
    """peft (and the transformers it imports) costs seconds: the task and adapters do not load it."""
    code = ("import sys\nimport samtune.tasks\nfrom samtune.adapt import apply_adaptation\n"
            "from samtune.build import build_sam\n"
            "apply_adaptation(build_sam('sam_tiny'), dict(method='adapter'))\n"
            "print('peft' in sys.modules)")
    result = run(code)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
