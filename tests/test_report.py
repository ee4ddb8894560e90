"""``jei-report``: a table for every objective (no knob assumed), run / data / backbone / method
columns, the accuracy-vs-cost plot, and the summary a sweep writes when it ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jei.report import main, table


def metrics(accuracy: float, cost: float, config: dict) -> dict:
    return {
        "accuracy": accuracy, "expected_cost": cost, "backbone_accuracy": 0.96,
        "config": config, "calibration": {"ece_gated_equal_width": 0.02},
        "conformal": {"n_test_per_exit": [300, 10], "results": [{
            "alpha": 0.1, "global": {"coverage": 0.9},
            "per_exit": {"coverage": 0.91, "mean_set_size": 1.5, "per_exit_coverage": [0.89, 0.5]}}]},
    }


def write_run(folder: Path, accuracy: float, cost: float, objective: dict, policy: dict, record_policy: str | None = None):
    folder.mkdir(parents=True)
    config = {"data": {"name": "tu", "dataset": "MUTAG", "seed": 0}, "backbone": {"name": "cifar_resnet", "depth": 56},
              "objective": objective, "policy": policy, "paths": {"data_dir": str(folder)}}
    (folder / "metrics.json").write_text(json.dumps(metrics(accuracy, cost, config)))
    if record_policy is not None:
        (folder / "run.json").write_text(json.dumps({"policy": record_policy}))


@pytest.fixture
def mixed(tmp_path):
    """Runs of three objectives, only one of which has a cost_weight."""
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", 0.90, 0.50, {"name": "jei", "cost_weight": 0.5}, {"name": "auto"}, record_policy="jei")
    write_run(sweep / "1", 0.95, 0.90, {"name": "jei", "cost_weight": 0.1}, {"name": "auto"}, record_policy="jei")
    write_run(sweep / "2", 0.93, 0.70, {"name": "sdn"}, {"name": "max_prob", "threshold": 0.9})
    write_run(sweep / "3", 0.80, 0.30, {"name": "sdn"}, {"name": "max_prob", "threshold": 0.5})
    write_run(sweep / "4", 0.85, 0.40, {"name": "l2w"}, {"name": "auto"})  # no run.json: the registry's default
    return sweep


def test_table_works_for_every_objective_and_names_run_data_backbone_and_method(mixed):
    lines = table([mixed]).splitlines()
    assert lines[0].startswith("| run | data | backbone | method | settings | accuracy (%) | expected cost |")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == 5
    # Sorted by method, then expected cost; the settings column lists what varies between runs.
    assert [row[:5] for row in rows] == [
        ["0", "tu:MUTAG", "cifar_resnet56", "jei / jei", "cost_weight=0.5"],
        ["1", "tu:MUTAG", "cifar_resnet56", "jei / jei", "cost_weight=0.1"],
        ["4", "tu:MUTAG", "cifar_resnet56", "l2w / budgeted", "-"],
        ["3", "tu:MUTAG", "cifar_resnet56", "sdn / max_prob", "threshold=0.5"],
        ["2", "tu:MUTAG", "cifar_resnet56", "sdn / max_prob", "threshold=0.9"],
    ]
    assert rows[0][5:] == ["90.00", "0.500", "96.00", "91.00", "89.00", "1.50", "90.00", "2.00"]


def test_jei_report_prints_the_table_and_draws_the_plot(mixed, capsys, tmp_path):
    main([str(mixed)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run |") and len(out) == 2 + 5 + 1
    assert out[-1] == f"accuracy-vs-cost plot: {(mixed / 'summary.png').resolve()}"
    assert (mixed / "summary.png").read_bytes()[:4] == b"\x89PNG"
    target = tmp_path / "plots" / "mine.png"
    main([str(mixed / "0"), str(mixed / "2"), "--plot", str(target)])
    assert target.read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.splitlines()[-1].endswith("mine.png")


def test_jei_report_without_runs_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path)])
    assert info.value.code == 2
    assert "no finished runs (metrics.json) under" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sweep_over_objectives_prints_where_its_summary_is(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("jei-train")), "-m", "data.max_per_split=80", "trainer.backbone.epochs=2",
         "trainer.exits.warmup_epochs=2", "trainer.exits.epochs=2", "trainer.feature_cache=false",
         "objective=jei,sdn", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"HYDRA_FULL_ERROR": "0", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"sweep summary: {sweep / 'summary.md'} (table), {sweep / 'summary.png'} (accuracy vs cost)" in result.stdout
    rows = (sweep / "summary.md").read_text().splitlines()[2:]
    assert [row.split("|")[4].strip() for row in rows] == ["jei / jei", "sdn / max_prob"]
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"
    for job in ("0", "1"):
        assert (sweep / job / "jei-train.log").is_file() and (sweep / job / "run.json").is_file()
