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


def test_adapt_imports_without_lightning_and_loads_peft_only_for_lora():
    """Pure PyTorch + peft (DESIGN.md layering); peft (which pulls in transformers: seconds) is imported only when
    LoRA is used, so tasks and adapter runs do not pay for it."""
    code = BLOCKER + (
        "import samtune.adapt, samtune.adapt.checkpoint\n"
        "from samtune.adapt import apply_adaptation, merge_adaptation\n"
        "from samtune.build import build_sam\n"
        "model = apply_adaptation(build_sam('sam_tiny'), dict(method='none', freeze_policy='full'))\n"
        "merge_adaptation(model)\n"
        "apply_adaptation(build_sam('sam_tiny'), dict(method='adapter'))\n"
        "print('peft' in sys.modules)\n"
        "apply_adaptation(build_sam('sam_tiny'), dict(method='lora'))\n"
        "print('peft' in sys.modules)\n"
    )
    result = run(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True"]
