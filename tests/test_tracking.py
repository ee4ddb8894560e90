"""Training you can watch: console lines, training.csv, TensorBoard only when installed, curves."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import jei.tracking
from jei.errors import ConfigError
from jei.features import compute_split
from jei.objectives.jei import JEIObjective
from jei.plots import plot_training_curves
from jei.tracking import TrainingLog, backbone_rows, describe, exit_rows, tensorboard_mode
from jei.train import exit_outputs, fit_exits

from .helpers import tiny_network
from .test_train import SETTINGS, toy_data

COSTS = torch.tensor([0.3, 0.6, 0.8, 1.0])
BACKBONE_ROW = {"stage": "backbone", "phase": "backbone", "epoch": 0, "loss": 2.5, "val_accuracy": 0.25, "seconds": 1.0}
WARMUP_ROW = {"stage": "exits", "phase": "warmup", "epoch": 0, "loss_ims": 1.5, "val_accuracy": 0.5,
              "val_expected_cost": 0.3, "val_im_accuracy": [0.5, 0.6, 0.7], "seconds": 0.1}
ALTERNATION_ROW = {**WARMUP_ROW, "phase": "alternation", "loss_ims": None, "loss_gates": 0.25}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_console_line_says_where_training_is_and_how_it_does():
    line = describe(ALTERNATION_ROW, 20, (2, 2))
    assert line.startswith("exits 2/2 alternation  epoch  1/20  loss gates 0.2500")
    assert "val acc 50.00% cost 0.300" in line and "IM acc 50.0 60.0 70.0%" in line and "ims" not in line
    assert describe(BACKBONE_ROW, 10).startswith("backbone  epoch  1/10  loss 2.5000  val acc 25.00%")


def test_the_csv_gets_a_row_per_epoch_and_a_column_per_loss(tmp_path):
    log = TrainingLog(tmp_path)
    for row in (BACKBONE_ROW, WARMUP_ROW, ALTERNATION_ROW):  # each brings new columns
        log.record(row)
    log.record({**ALTERNATION_ROW, "epoch": 1})  # appended
    rows = read_csv(tmp_path / "training.csv")
    assert list(rows[0])[:3] == ["stage", "phase", "epoch"] and list(rows[0])[-1] == "seconds"
    assert [(r["stage"], r["phase"], r["epoch"]) for r in rows] == [
        ("backbone", "backbone", "0"), ("exits", "warmup", "0"), ("exits", "alternation", "0"), ("exits", "alternation", "1")]
    assert rows[0]["loss"] == "2.5" and rows[0]["val_expected_cost"] == "" and rows[0]["val_im_accuracy_0"] == ""
    assert rows[2]["loss_gates"] == "0.25" and rows[2]["loss_ims"] == "" and rows[2]["val_im_accuracy_2"] == "0.7"
    assert not (tmp_path / "tensorboard").exists()


def test_a_resumed_log_replaces_the_interrupted_runs_file(tmp_path):
    first = TrainingLog(tmp_path)
    for epoch in range(3):
        first.record({**WARMUP_ROW, "epoch": epoch})
    again = TrainingLog(tmp_path)  # the resumed run: one epoch survived in its checkpoint
    again.record({**WARMUP_ROW, "epoch": 0}, replay=True)
    again.record({**WARMUP_ROW, "epoch": 1})
    assert [r["epoch"] for r in read_csv(tmp_path / "training.csv")] == ["0", "1"]


def test_history_rows_replay_as_the_rows_that_were_logged():
    assert backbone_rows({"loss": [2.5], "val_accuracy": [0.25]}) == [
        {k: v for k, v in BACKBONE_ROW.items() if k != "seconds"}]
    history = {"warmup": [{k: v for k, v in WARMUP_ROW.items() if k not in ("stage", "seconds")}]}
    assert exit_rows(history) == [{k: v for k, v in WARMUP_ROW.items() if k != "seconds"}]


def test_fit_exits_logs_every_epoch_and_tracking_changes_nothing(tmp_path, monkeypatch):
    """With a log, every epoch of every phase is a row (the history's, plus timing); without one
    (jei-compare) nothing is written; and the trained exits are the same bit for bit."""
    monkeypatch.chdir(tmp_path)
    results = {}
    for name, tracker in (("tracked", TrainingLog(tmp_path / "run")), ("plain", None)):
        network, data = tiny_network(0), toy_data()
        split = compute_split(network, data, "train", 64, torch.device("cpu"))
        history = fit_exits(network, JEIObjective(0.1), split, split, COSTS, SETTINGS, torch.device("cpu"), 0,
                            tracker=tracker)
        results[name] = (history, exit_outputs(network, split, torch.device("cpu")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the untracked run wrote nothing
    history, outputs = results["tracked"]
    assert results["plain"][0] == history
    torch.testing.assert_close(results["plain"][1].logits, outputs.logits, rtol=0, atol=0)
    torch.testing.assert_close(results["plain"][1].gate_logits, outputs.gate_logits, rtol=0, atol=0)
    rows = read_csv(tmp_path / "run" / "training.csv")
    assert [(r["phase"], int(r["epoch"])) for r in rows] == [(r["phase"], r["epoch"]) for r in exit_rows(history)]
    assert len(rows) == sum(len(v) for v in history.values()) and {r["stage"] for r in rows} == {"exits"}
    assert float(rows[-1]["val_accuracy"]) == history["alternation"][-1]["val_accuracy"]


def test_training_curves_are_drawn_from_the_rows(tmp_path):
    rows = [BACKBONE_ROW, {**BACKBONE_ROW, "epoch": 1, "loss": 2.0}, WARMUP_ROW, ALTERNATION_ROW]
    plot_training_curves(rows, tmp_path / "training_curves.png")
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_settings(monkeypatch):
    monkeypatch.setattr(jei.tracking, "tensorboard_installed", lambda: False)
    assert tensorboard_mode("auto") is False and tensorboard_mode(False) is False
    with pytest.raises(ConfigError, match=r'trainer.tensorboard=true, but the tensorboard package is not installed.*jei-dnn\[tensorboard\]'):
        tensorboard_mode(True)
    with pytest.raises(ConfigError, match="trainer.tensorboard must be auto, true or false"):
        tensorboard_mode("sometimes")
    monkeypatch.setattr(jei.tracking, "tensorboard_installed", lambda: True)
    assert tensorboard_mode("auto") is True


def test_without_tensorboard_nothing_of_it_is_imported(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        import jei.pipeline, jei.tracking
        jei.tracking.tensorboard_installed = lambda: False
        log = jei.tracking.TrainingLog({str(tmp_path)!r}, tensorboard=jei.tracking.tensorboard_mode("auto"))
        log.record({json.dumps(WARMUP_ROW)})
        log.close()
        print(sorted(name for name in sys.modules if "tensorboard" in name))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training.csv"]


def test_tensorboard_event_files_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = TrainingLog(tmp_path, tensorboard=True)
    log.record(BACKBONE_ROW)
    log.record(WARMUP_ROW)
    log.record({**WARMUP_ROW, "epoch": 1, "val_accuracy": 0.75})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"backbone/loss", "backbone/val_accuracy", "exits/warmup/loss_ims", "exits/val_accuracy",
            "exits/val_expected_cost", "exits/val_im_accuracy/2"} <= tags
    assert [(e.step, e.value) for e in events.Scalars("exits/val_accuracy")] == [(1, 0.5), (2, 0.75)]
