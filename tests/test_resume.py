"""Resume: an interrupted run continues from its checkpoints and ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jei.checkpoint import KILL_ENV, CheckpointError, RunCheckpoints, load, rng_state, save, set_rng_state
from jei.data.base import TensorDataSplits, TensorSplit
from jei.errors import ConfigError
from jei.features import compute_split
from jei.objectives.jei import JEIObjective
from jei.tracking import TrainingLog
from jei.train import BackboneTraining, ExitTraining, OptimizerSettings, exit_outputs, fit_backbone, fit_exits

from .helpers import tiny_network
from .test_backbone_cache import fresh_backbone, noisy
from .test_train import toy_data

CPU = torch.device("cpu")


class Interrupted(Exception):
    pass


class StopAfter(TrainingLog):
    """A training log that interrupts training after ``rows`` new epochs (a kill, in-process)."""

    def __init__(self, folder: Path, rows: int) -> None:
        super().__init__(folder)
        self.left = rows

    def record(self, row, *, replay=False):
        super().record(row, replay=replay)
        if not replay:
            self.left -= 1
            if self.left == 0:
                raise Interrupted


# --- the file format -------------------------------------------------------------------------------


def test_a_checkpoint_holds_nested_state_exactly(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "best": -math.inf, "value": 0.1 + 0.2, "none": None,
             "flags": (True, 1, "x"), 3: [torch.arange(3), {"deep": torch.zeros(2, dtype=torch.bool)}], "rng": rng_state()}
    expected = (torch.rand(3), random.random(), np.random.rand())  # what the saved generators draw next
    save(tmp_path / "c.safetensors", state, "exits", "abc")
    back = load(tmp_path / "c.safetensors", "exits", "abc")
    assert back["best"] == -math.inf and back["value"] == 0.1 + 0.2 and back["none"] is None
    assert back["flags"] == (True, 1, "x") and torch.equal(back[3][0], torch.arange(3))
    assert back[3][1]["deep"].dtype == torch.bool
    assert back["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][key], value)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    set_rng_state(back["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_a_checkpoint_of_another_run_or_a_damaged_one_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save(path, {"x": torch.ones(2)}, "exits", "abc")
    with pytest.raises(CheckpointError, match="another run"):
        load(path, "exits", "other")
    with pytest.raises(CheckpointError, match="'exits' stage, not 'backbone'"):
        load(path, "backbone", "abc")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load(path, "exits", "abc")


def test_resume_modes(tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"trainer.resume=true, but .* holds no checkpoint"):
        RunCheckpoints(tmp_path, {"a": 1}, True)
    assert not RunCheckpoints(tmp_path, {"a": 1, "b": {"c": 2}}, "auto").resuming  # a fresh run
    assert RunCheckpoints(tmp_path, {"a": 1, "b": {"c": 2}}, "auto").resuming  # the same run again
    assert RunCheckpoints(tmp_path, {"a": 1, "b": {"c": 2}}, True).resuming
    with pytest.raises(ConfigError, match=r"from other settings \(b.c\)"):
        RunCheckpoints(tmp_path, {"a": 1, "b": {"c": 3}}, True)
    assert not RunCheckpoints(tmp_path, {"a": 1, "b": {"c": 3}}, "auto").resuming
    assert "from other settings (b.c): not resuming" in caplog.text
    assert not RunCheckpoints(tmp_path, {"a": 1, "b": {"c": 3}}, False).resuming
    with pytest.raises(ConfigError, match="trainer.resume must be auto, true or false"):
        RunCheckpoints(tmp_path, {}, "maybe")


def test_a_changed_setting_is_named_alone_when_the_config_holds_inf(tmp_path, caplog):
    """The marker is JSON, where inf is the string "inf": it still compares equal."""
    RunCheckpoints(tmp_path, {"policy": {"threshold": [0.5, float("inf")]}, "seed": 0}, "auto")
    assert RunCheckpoints(tmp_path, {"policy": {"threshold": [0.5, float("inf")]}, "seed": 0}, "auto").resuming
    assert not RunCheckpoints(tmp_path, {"policy": {"threshold": [0.5, float("inf")]}, "seed": 1}, "auto").resuming
    assert "are from other settings (seed): not resuming" in caplog.text


def test_training_again_in_a_finished_runs_folder_warns_and_unmarks_it(tmp_path, caplog):
    """A finished run keeps no checkpoints: the same command in its folder trains again, says
    so, and removes what marks the folder as finished, so that a run stopped halfway is never
    read as a finished one (its backbone would already be the new one)."""
    RunCheckpoints(tmp_path, {"a": 1}, "auto").clear()  # a run that finished: its checkpoints are gone
    assert "holds a finished run" not in caplog.text
    for name in ("metrics.json", "run.json", "training.csv"):
        (tmp_path / name).write_text("{}")
    assert not RunCheckpoints(tmp_path, {"a": 1}, "auto").resuming
    assert f"{tmp_path} holds a finished run: training it again, so its metrics.json and run.json are removed" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "training.csv"]


# --- in-process interruptions ----------------------------------------------------------------------


def pinned_setup():
    """The seeded run that tests/test_train.py pins to the pre-seam trainer's numbers."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 3
    inputs = torch.randn(96, 1, 8, 8, generator=generator) * 0.8 + 0.7 * labels.view(-1, 1, 1, 1).float()
    order = torch.randperm(96, generator=generator)
    train, val = TensorSplit(inputs[order[:64]], labels[order[:64]]), TensorSplit(inputs[order[64:]], labels[order[64:]])
    data = TensorDataSplits({"train": train, "val": val, "cal": val, "test": val}, 5)
    network = tiny_network(0, gate_init=False)
    return network, compute_split(network, data, "train", 64, CPU), compute_split(network, data, "val", 64, CPU)


SCHEDULE = ExitTraining(batch_size=16, warmup_epochs=6, warmup_patience=2, epochs=3, phase_batches=3,
                        optimizer=OptimizerSettings("sgd", 0.05, 1e-3, 0.9, 5e-4))
COSTS = torch.tensor([0.3, 0.6, 0.8, 1.0])


def train_exits(folder: Path, stop_after: int | None = None):
    network, train, val = pinned_setup()
    objective = JEIObjective(0.3)
    checkpoint = RunCheckpoints(folder, {"run": "pinned"}).stage("exits")
    tracker = StopAfter(folder, stop_after) if stop_after else TrainingLog(folder)
    history = fit_exits(network, objective, train, val, COSTS, SCHEDULE, CPU, 7, tracker=tracker, checkpoint=checkpoint)
    return network, objective, history, exit_outputs(network, val, CPU), tracker


@pytest.mark.parametrize("where", ["warm-up", "alternation"])
def test_an_interrupted_exit_stage_continues_to_the_same_result(tmp_path, where):
    _, objective, history, outputs, _ = train_exits(tmp_path / "whole")
    warmup_epochs = len(history["warmup"])
    stop = 2 if where == "warm-up" else warmup_epochs + 2
    with pytest.raises(Interrupted):
        train_exits(tmp_path / "cut", stop_after=stop)
    assert (tmp_path / "cut" / "checkpoints" / "exits.safetensors").exists() == (where == "alternation")
    _, resumed_objective, resumed_history, resumed, tracker = train_exits(tmp_path / "cut")
    assert resumed_history == history
    torch.testing.assert_close(resumed.logits, outputs.logits, rtol=0, atol=0)
    torch.testing.assert_close(resumed.gate_logits, outputs.gate_logits, rtol=0, atol=0)
    torch.testing.assert_close(resumed_objective.pos_weight, objective.pos_weight, rtol=0, atol=0)
    # The training log holds every epoch once, replayed ones included.
    assert [(r["phase"], r["epoch"]) for r in tracker.rows] == [
        (phase, row["epoch"]) for phase, rows in history.items() for row in rows]


def test_an_interrupted_backbone_stage_continues_to_the_same_weights(tmp_path):
    data = toy_data(augment_fn=noisy)  # augmentation draws from the global generator: restored too
    settings = BackboneTraining(epochs=4, batch_size=32, augment=True,
                                optimizer=OptimizerSettings("adam", 3e-3, 1e-5, 0.0, 1e-4))

    def train(folder: Path, stop_after: int | None = None):
        backbone = fresh_backbone(0)
        checkpoint = RunCheckpoints(folder, {"run": "backbone"}).stage("backbone", "key")
        tracker = StopAfter(folder, stop_after) if stop_after else TrainingLog(folder)
        history = fit_backbone(backbone, data, settings, CPU, 0, tracker=tracker, checkpoint=checkpoint)
        return backbone, history, rng_state()["torch"]

    whole, history, rng = train(tmp_path / "whole")
    with pytest.raises(Interrupted):
        train(tmp_path / "cut", stop_after=2)
    resumed, resumed_history, resumed_rng = train(tmp_path / "cut")
    assert resumed_history == history and torch.equal(resumed_rng, rng)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


# --- jei-train killed with SIGKILL, and run again ----------------------------------------------------

QUICK = [
    "data.max_per_split=80",
    "trainer.backbone.epochs=3",
    "trainer.exits.warmup_epochs=3",
    "trainer.exits.epochs=3",
    "trainer.feature_cache=false",  # and so no backbone cache: the backbone stage runs in every launch
]


def jei_train(run_dir: Path, *extra: str, kill_after: str | None = None) -> subprocess.CompletedProcess:
    env = {"HYDRA_FULL_ERROR": "0", "PATH": "/usr/bin:/bin", "HOME": str(run_dir.parent)}
    if kill_after:
        env[KILL_ENV] = kill_after
    script = Path(sys.executable).with_name("jei-train")
    return subprocess.run([str(script), *QUICK, *extra, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent,
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    result = jei_train(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def killed_then_resumed(run_dir: Path, kill_after: str, *again: str) -> tuple[dict, str]:
    killed = jei_train(run_dir, kill_after=kill_after)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoints").is_dir()
    resumed = jei_train(run_dir, *again)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists()  # deleted once the run finished
    return json.loads((run_dir / "metrics.json").read_text()), resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_a_run_killed_in_the_exit_stage_resumes_to_the_same_metrics(tmp_path, uninterrupted):
    # exits:4 is the first epoch of the alternation (after 3 warm-up epochs): the warm-up's
    # checkpoint is kept, the alternation runs again from its start.
    metrics, log = killed_then_resumed(tmp_path / "run", "exits:4")
    assert "backbone: trained before the interruption" in log and "phases ['warmup'] done" in log
    assert metrics == uninterrupted
    rows = (tmp_path / "run" / "training.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 + 3 + 3  # header, backbone epochs, warm-up and alternation epochs: each once


@pytest.mark.slow
def test_a_run_killed_in_the_backbone_stage_resumes_to_the_same_metrics(tmp_path, uninterrupted):
    metrics, log = killed_then_resumed(tmp_path / "run", "backbone:2", "trainer.resume=true")
    assert "backbone: 2 of 3 epochs done before the interruption" in log
    assert metrics["config"]["trainer"].pop("resume") is True
    uninterrupted = json.loads(json.dumps(uninterrupted))
    assert uninterrupted["config"]["trainer"].pop("resume") == "auto"
    assert metrics == uninterrupted
