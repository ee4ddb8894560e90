"""jei.conformal must stay usable on its own: it may import only the standard library, torch and numpy."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

CONFORMAL_DIR = Path(__file__).resolve().parents[1] / "conformal"
ALLOWED_THIRD_PARTY = {"torch", "numpy"}
FORBIDDEN = ("timm", "torch_geometric", "hydra", "omegaconf")


def test_importing_jei_conformal_loads_no_heavy_or_sibling_modules() -> None:
    code = "import json, sys, jei.conformal; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = [m for m in modules if m.split(".")[0] in FORBIDDEN]
    assert not heavy, f"import jei.conformal loaded {heavy}"
    siblings = [m for m in modules if m.startswith("jei.") and not m.startswith("jei.conformal")]
    assert not siblings, f"import jei.conformal loaded other jei modules: {siblings}"


def _imported_roots(path: Path) -> list[str]:
    """Top-level names of every absolute import in a file (relative imports are fine)."""
    roots = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.append(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted(CONFORMAL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_conformal_sources_import_only_stdlib_torch_numpy(path: Path) -> None:
    bad = [
        r for r in _imported_roots(path) if r not in sys.stdlib_module_names and r not in ALLOWED_THIRD_PARTY
    ]
    assert not bad, (
        f"{path.name} imports {bad}; jei.conformal may use only the stdlib, torch, numpy and relative imports"
    )


def test_the_scan_sees_the_package() -> None:
    assert (CONFORMAL_DIR / "__init__.py").is_file()
    assert "torch" in _imported_roots(CONFORMAL_DIR / "scores.py")
