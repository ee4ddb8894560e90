"""benchmarks/conformal_speed.py runs, with or without TorchCP, and prints its ratio table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "conformal_speed.py"
TINY = ["--n", "300", "--k", "7", "--repeats", "1"]


def _load_benchmark(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the script sets a default; keep it test-local
    spec = importlib.util.spec_from_file_location("conformal_speed_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_says_torchcp_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    benchmark = _load_benchmark(monkeypatch)
    monkeypatch.setattr(benchmark, "import_torchcp", lambda: (None, "not installed (pip install torchcp)"))
    benchmark.main(TINY)
    out = capsys.readouterr().out
    assert "TorchCP: missing, not installed" in out
    assert "LAC sets of jei.conformal and of the bare baseline identical: yes" in out
    rows = [line for line in out.splitlines() if line.startswith(("| LAC", "| APS", "| RAPS"))]
    assert len(rows) == 3
    assert all("| missing | n/a |" in row for row in rows)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchcp") is None, reason="TorchCP is not installed")
def test_benchmark_against_torchcp() -> None:
    # A subprocess: the script may register placeholder modules, which must not leak into this session.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY], capture_output=True, text=True, timeout=600, check=True
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| LAC", "| APS", "| RAPS"))]
    assert len(rows) == 3 and all(row.count("x |") >= 1 for row in rows), result.stdout
    assert "identical: yes" in result.stdout
