"""The README's "Adding a backbone" recipe works as written.

The code blocks of that section are copied verbatim into a throw-away project: the blocks whose
first line is a ``# <path>`` comment become those files, the ``mkdir``/``touch`` block runs as
is, and the install and ``jei-train`` commands run with only offline flags and tiny training
settings added.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Adding a backbone"
# Tiny settings so the run takes seconds; the recipe's own overrides come first.
QUICK = [
    "data=digits",
    "data.max_per_split=120",
    "trainer.backbone.epochs=1",
    "trainer.exits.warmup_epochs=1",
    "trainer.exits.epochs=1",
    "trainer.feature_cache=false",
]


def recipe() -> str:
    readme = (REPO / "README.md").read_text()
    assert SECTION in readme, f"README.md lost its {SECTION!r} section"
    return readme.split(SECTION, 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(lang, body) for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)]


def recipe_files(text: str) -> dict[str, str]:
    """Blocks that start with a ``# path/to/file`` comment, by path."""
    files = {}
    for lang, body in code_blocks(text):
        first = body.splitlines()[0] if body else ""
        match = re.fullmatch(r"# ([\w./-]+\.(?:py|toml|yaml))", first.strip())
        if lang in ("python", "toml", "yaml") and match:
            files[match.group(1)] = body
    return files


def shell_blocks(text: str) -> list[list[str]]:
    return [[line for line in body.splitlines() if line.strip()] for lang, body in code_blocks(text) if lang == "bash"]


def test_recipe_declares_its_files_entry_point_and_package_data():
    text = recipe()
    files = recipe_files(text)
    assert {"my_pkg/jei_plugin.py", "my_pkg/jei_configs/backbone/tiny_conv.yaml", "pyproject.toml",
            "tests/test_tiny_conv.py"} <= set(files), sorted(files)
    project = tomllib.loads(files["pyproject.toml"])
    (name, target), = project["project"]["entry-points"]["jei.backbones"].items()
    assert target == "my_pkg.jei_plugin:TinyConvNet"
    assert f"name: {name}" in files["my_pkg/jei_configs/backbone/tiny_conv.yaml"]
    assert project["tool"]["setuptools"]["package-data"]["my_pkg.jei_configs"], "the YAML must be package data"
    install, run = shell_blocks(text)[-1]
    assert install == "pip install ."
    assert shlex.split(run)[:2] == ["jei-train", f"backbone={name}"]


def build_project(root: Path) -> None:
    """The recipe's project in ``root``, exactly as the README writes it."""
    root.mkdir()
    text = recipe()
    setup = shell_blocks(text)[0]
    assert all(line.split()[0] in ("mkdir", "touch") for line in setup), setup
    subprocess.run(["bash", "-ec", "\n".join(setup)], cwd=root, check=True)
    for relative, body in recipe_files(text).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """The recipe's package, pip-installed (offline) into a target folder on sys.path."""
    project, site = tmp_path / "my-plugin", tmp_path / "site"
    build_project(project)
    install = shlex.split(shell_blocks(recipe())[-1][0])
    assert install[0] == "pip"
    offline = ["--no-build-isolation", "--no-deps", "--no-index", "--quiet", "--target", str(site)]
    result = subprocess.run(
        [sys.executable, "-m", *install, *offline], cwd=project, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.syspath_prepend(str(site))
    yield project, site
    for module in [m for m in sys.modules if m == "my_pkg" or m.startswith("my_pkg.")]:
        del sys.modules[module]


@pytest.mark.slow
def test_recipe_installs_passes_its_contract_test_and_trains(installed_plugin, tmp_path):
    project, site = installed_plugin
    # What was missing before: the YAML inside the installed package, and the entry point.
    assert (site / "my_pkg" / "jei_configs" / "backbone" / "tiny_conv.yaml").is_file()
    (entry_points,) = site.glob("my_pkg-*.dist-info/entry_points.txt")
    assert "tiny_conv = my_pkg.jei_plugin:TinyConvNet" in entry_points.read_text()

    # The plugin author's own test, as the README writes it, runs jei.testing's contract checks.
    spec = importlib.util.spec_from_file_location("readme_plugin_test", project / "tests" / "test_tiny_conv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.test_tiny_conv_keeps_the_backbone_contract()
    from jei.testing import check_backbone

    plugin = importlib.import_module("my_pkg.jei_plugin")
    import torch

    with pytest.raises(AssertionError, match="select"):  # the checks do look: break select and see
        broken = plugin.TinyConvNet(num_classes=3, in_channels=1)
        broken.select = lambda state, keep: state[keep.sort().values]
        check_backbone(broken, torch.randn(4, 1, 8, 8))

    # The recipe's jei-train command, with the installed package visible and tiny settings.
    command = shlex.split(shell_blocks(recipe())[-1][1])
    run_dir = tmp_path / "run"
    script = Path(sys.executable).with_name(command[0])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(site), "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(
        [str(script), *command[1:], *QUICK, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["backbone"]["name"] == "tiny_conv" and metrics["config"]["backbone"]["exits"] == "all"

    from safetensors.torch import load_file

    backbone = load_file(str(run_dir / "backbone.safetensors"))  # trained first: weights: null
    assert {key.split(".")[0] for key in backbone} == {"blocks", "head"}  # the plugin's own modules
    assert backbone["blocks.2.0.weight"].shape == (64, 32, 3, 3)
    exits = load_file(str(run_dir / "exits.safetensors"))
    assert {key.split(".")[1] for key in exits if key.startswith("ims.")} == {"0", "1"}  # exits after blocks 1, 2
