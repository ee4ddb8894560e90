"""Packaging: the folders map under `jei.*`, and the CLI finds its configs from a built wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    setuptools = _pyproject()["tool"]["setuptools"]
    folders = {name: Path(path) for name, path in setuptools["package-dir"].items()}
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in folders.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *relative)))
    # Subpackages of a mapped folder are found both under their own mapping and under the parent's.
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"


def test_import_jei_stays_light():
    code = "import jei, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'hydra', 'omegaconf', 'torch_geometric')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_cli_finds_its_configs_from_a_built_wheel(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("jei_dnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("jei/configs/train.yaml", "jei/configs/backbone/small_cnn.yaml", "jei/conformal/__init__.py",
                     "jei/csrc/native_exits.cpp"):
        assert expected in names
    assert not any(name.split("/")[0] in ("backbones", "conformal", "configs") for name in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable install's finder
    code = (
        "import sys, jei; from jei.cli import train_main; print(jei.__file__); "
        "sys.argv = ['jei-train', '--cfg', 'job', 'objective.cost_weight=0.3']; train_main()"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    assert first.startswith(str(site))
    assert "cost_weight: 0.3" in "\n".join(rest) and "name: small_cnn" in "\n".join(rest)


@pytest.mark.slow
def test_installed_console_script_uses_packaged_configs(tmp_path):
    script = Path(sys.executable).with_name("jei-train")
    result = subprocess.run(
        [str(script), "--info", "searchpath"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "pkg://jei.configs" in result.stdout


def test_ci_runs_the_readme_install_and_test_commands():
    """`.ci/run` must run exactly what the README tells a new user to run."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [block.strip() for block in quick_start.split("```bash")[1:]]
    commands = [block.split("```", 1)[0].strip() for block in commands]
    install, main_job, tests = commands
    assert install in ci and tests in ci, f"{install!r} and {tests!r} must be lines of .ci/run"
    assert main_job == ".venv/bin/jei-train"
