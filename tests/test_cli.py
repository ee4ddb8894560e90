"""`jei-train` end to end in a subprocess (tiny settings), its outputs and its input checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from jei.cli import train

QUICK = [
    "data.max_per_split=80",
    "trainer.backbone.epochs=2",
    "trainer.exits.warmup_epochs=2",
    "trainer.exits.epochs=2",
    "trainer.feature_cache=false",
]


def jei_train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("jei-train")
    return subprocess.run(
        [str(script), *overrides], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={"HYDRA_FULL_ERROR": "0", "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )


@pytest.mark.slow
def test_main_job_writes_metrics_exits_and_plots(tmp_path):
    run_dir = tmp_path / "run"
    result = jei_train(*QUICK, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("accuracy", "expected_cost", "backbone_accuracy", "exit_fractions", "exit_accuracy", "exit_costs",
                "config", "conformal", "calibration"):
        assert key in metrics
    num_exits = 4  # three IMs and the backbone head
    assert len(metrics["exit_fractions"]) == len(metrics["exit_costs"]) == num_exits
    assert abs(sum(metrics["exit_fractions"]) - 1) < 1e-9
    assert metrics["exit_costs"][-1] == 1.0 and metrics["exit_costs"] == sorted(metrics["exit_costs"])
    assert metrics["early_exit_agreement"] == 1.0
    assert metrics["config"]["objective"]["cost_weight"] == 0.5
    assert [r["alpha"] for r in metrics["conformal"]["results"]] == [0.05, 0.1]
    exits = load_file(str(run_dir / "exits.safetensors"))
    assert {key.split(".")[0] for key in exits} == {"ims", "gates", "objective", "temperature"}  # JEI's rule has no state
    logits = load_file(str(run_dir / "exit_logits.safetensors"))
    for split in ("val", "cal", "test"):
        assert logits[f"{split}.logits"].shape[0] == num_exits
        assert logits[f"{split}.gate_logits"].shape == (len(logits[f"{split}.labels"]), num_exits - 1)
    for png in ("exit_histogram.png", "accuracy_cost.png", "reliability.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_sweep_runs_each_cost_weight(tmp_path):
    result = jei_train("-m", *QUICK, "objective.cost_weight=0.0,5.0", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads((tmp_path / "sweep" / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    assert [run["config"]["objective"]["cost_weight"] for run in runs] == [0.0, 5.0]
    assert runs[1]["expected_cost"] <= runs[0]["expected_cost"]  # a larger cost weight never exits later


BAD_INPUTS = [
    ("objective.cost_weight=-1", "objective.cost_weight must be >= 0"),
    ("backbone.exits=[1,2,9]", "backbone.exits: exit position 9 is outside 1..3"),
    ("data.max_per_split=0", "data.max_per_split must be >= 1"),
    ("data.fractions=[0.9,0.0,0.05,0.05]", "the 'val' split is empty"),
    ("backbone.weights=/nonexistent/weights.safetensors", "backbone.weights: no file at /nonexistent"),
    ("conformal.alphas=[1.5]", "conformal.alphas: 1.5 is outside (0, 1)"),
    ("conformal.small_group_policy=drop", "conformal.small_group_policy must be one of"),
    ("trainer.exits.batch_size=0", "trainer.exits.batch_size must be >= 1"),
    ("+trainer.exits.bogus=1", "trainer.exits: unknown key(s) bogus"),
    ("backbone.name=small_cn", "Unknown backbone 'small_cn'"),
    pytest.param("device=cuda", "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, override, message):
    """In-process (fast): the job's own entry function, on the composed config."""
    with initialize_config_module("jei.configs", version_base="1.3"):
        cfg = compose("train", overrides=[override, "trainer.feature_cache=false"])
    run_dir = tmp_path / "run"
    with pytest.raises(Exception) as info:
        train(cfg, run_dir)
    assert message in str(info.value)
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_bad_input_from_the_command_line_exits_non_zero(tmp_path):
    run_dir = tmp_path / "run"
    result = jei_train("objective.cost_weight=-1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode != 0
    assert "objective.cost_weight must be >= 0" in result.stderr
    assert {p.name for p in run_dir.glob("*")} <= {".hydra", "jei-train.log"}  # Hydra's record of the call only
    assert "objective.cost_weight must be >= 0" in (run_dir / "jei-train.log").read_text()  # the job is jei-train


def test_report_tabulates_finished_runs(tmp_path):
    from jei.report import table

    for job, (cost_weight, accuracy) in enumerate([(0.5, 0.9), (0.1, 0.95)]):
        run = tmp_path / str(job)
        run.mkdir()
        metrics = {"accuracy": accuracy, "expected_cost": 1 - cost_weight, "backbone_accuracy": 0.96,
                   "config": {"objective": {"cost_weight": cost_weight}},
                   "calibration": {"ece_gated_equal_width": 0.02},
                   "conformal": {"n_test_per_exit": [300, 10], "results": [{
                       "alpha": 0.1, "global": {"coverage": 0.9},
                       "per_exit": {"coverage": 0.91, "mean_set_size": 1.5, "per_exit_coverage": [0.89, 0.5]}}]}}
        (run / "metrics.json").write_text(json.dumps(metrics))
    lines = table([tmp_path]).splitlines()
    assert len(lines) == 4
    # Same data, backbone and method: sorted by expected cost; cost_weight is the setting that varies.
    assert lines[2].startswith("| 0 | ? | ? | ? / auto | cost_weight=0.5 | 90.00 | 0.500 |")
    assert lines[3] == "| 1 | ? | ? | ? / auto | cost_weight=0.1 | 95.00 | 0.900 | 96.00 | 91.00 | 89.00 | 1.50 | 90.00 | 2.00 |"
