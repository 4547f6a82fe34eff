"""The installed package: what the wheel holds, and the bundled recipes and fragments it runs without a checkout."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile

import pytest
from setuptools import find_packages

from samtune.bundled import bundled_folder, resolve_config_path
from tests.conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_package_list_names_every_samtune_package():
    """pyproject lists its packages (recipes/ and configs/ are mapped into the package), so a new subpackage
    missing from the list would be left out of the wheel."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(REPO_ROOT), include=["samtune", "samtune.*"]))
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == {"samtune.recipes", "samtune.configs"}


def test_config_paths_fall_back_to_the_bundled_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    resolved = resolve_config_path("recipes/quickstart.yaml")
    assert resolved == str(bundled_folder("recipes") / "quickstart.yaml")
    assert "recipes/quickstart.yaml is not in the working directory" in capsys.readouterr().err
    assert resolve_config_path("configs/logger/wandb.yaml") == str(bundled_folder("configs") / "logger" / "wandb.yaml")
    # a file of the working directory wins; other and unknown paths pass through unchanged
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "quickstart.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_path("recipes/quickstart.yaml") == "recipes/quickstart.yaml"
    assert resolve_config_path("recipes/no_such_recipe.yaml") == "recipes/no_such_recipe.yaml"
    assert resolve_config_path("my/recipe.yaml") == "my/recipe.yaml"
    with pytest.raises(ValueError, match="bundled folder must be one of"):
        bundled_folder("tests")


def test_wheel_ships_recipes_and_fragments_that_an_installed_samtune_finds(tmp_path):
    """The wheel holds every recipe, split file and fragment; installed without a checkout, samtune's default
    recipe and `--config recipes/...` resolve to those files (before, `samtune fit` needed the repository)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(REPO_ROOT), "-w", str(tmp_path / "dist")], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("samtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("recipes", "configs"):
        for file in (REPO_ROOT / folder).rglob("*"):
            if file.is_file():
                assert f"samtune/{folder}/{file.relative_to(REPO_ROOT / folder).as_posix()}" in names
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:  # a wheel install is its files unpacked into site-packages
        archive.extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    probe = ("import samtune.cli as c; from samtune.bundled import resolve_config_path as r; "
             "print(c.QUICKSTART); print(r('configs/trainer/cpu.yaml', announce=False))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=work, env=env)
    quickstart, fragment = out.stdout.split()
    assert quickstart == str(site / "samtune" / "recipes" / "quickstart.yaml")
    assert fragment == str(site / "samtune" / "configs" / "trainer" / "cpu.yaml")


def test_fit_arguments_name_the_bundled_files_outside_a_checkout(tmp_path, monkeypatch):
    from samtune.cli import _bundled_configs

    monkeypatch.chdir(tmp_path)
    args = _bundled_configs(["fit", "--config", "recipes/quickstart.yaml", "-c=configs/trainer/cpu.yaml",
                             "--trainer.max_steps", "3"])
    assert args == ["fit", "--config", str(bundled_folder("recipes") / "quickstart.yaml"),
                    f"-c={bundled_folder('configs') / 'trainer' / 'cpu.yaml'}", "--trainer.max_steps", "3"]
