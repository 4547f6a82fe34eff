"""The recipes and config fragments that ship with samtune.

The repository's ``recipes/`` and ``configs/`` folders are installed inside the package (``samtune/recipes``,
``samtune/configs``; see ``[tool.setuptools]`` in pyproject.toml). So after ``pip install samtune``, without a
checkout, ``samtune fit`` still has its default recipe, and ``--config recipes/quickstart.yaml`` or
``--config configs/logger/wandb.yaml`` name the bundled files when the working directory has no such file.
A file in the working directory always wins.
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["BUNDLED_FOLDERS", "bundled_folder", "resolve_config_path"]

BUNDLED_FOLDERS = ("recipes", "configs")
_PACKAGE = Path(__file__).resolve().parent


def bundled_folder(name: str) -> Path | None:
    """The installed copy of the repository folder ``name`` (``"recipes"`` or ``"configs"``): inside the package
    for a wheel install, beside it for a source checkout or an editable install; None when neither exists."""
    if name not in BUNDLED_FOLDERS:
        raise ValueError(f"bundled folder must be one of {BUNDLED_FOLDERS}, got {name!r}")
    for folder in (_PACKAGE / name, _PACKAGE.parent / name):
        # the checkout's folder is recognised by a file only it has, not just by its name beside site-packages
        if (folder / ("quickstart.yaml" if name == "recipes" else "trainer")).exists():
            return folder
    return None


def resolve_config_path(value: str, announce: bool = True) -> str:
    """``value`` itself when that file exists (or is not under ``recipes/`` / ``configs/``); otherwise the bundled
    file of the same relative path when there is one (said on stderr with ``announce``)."""
    path = Path(value)
    if path.exists() or path.is_absolute() or len(path.parts) < 2 or path.parts[0] not in BUNDLED_FOLDERS:
        return value
    folder = bundled_folder(path.parts[0])
    if folder is None:
        return value
    candidate = folder.joinpath(*path.parts[1:])
    if not candidate.is_file():
        return value
    if announce:
        print(f"samtune: {value} is not in the working directory: using samtune's {candidate}", file=sys.stderr)
    return str(candidate)
