"""Backbone cache: trained once per settings, verified on load, optional, and a hit changes nothing."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jei.backbone_cache import backbone_key, read_entry, trained_backbone
from jei.checkpoint import rng_state
from jei.registry import BACKBONES
from jei.tracking import TrainingLog
from jei.train import BackboneTraining, OptimizerSettings

from .test_train import toy_data

CPU = torch.device("cpu")
TRAINING = BackboneTraining(epochs=2, batch_size=32, augment=True, optimizer=OptimizerSettings("adam", 3e-3, 1e-5, 0.0, 0.0))


def fresh_backbone(seed: int = 0):
    torch.manual_seed(seed)
    return BACKBONES.build("small_cnn", in_channels=1, num_classes=5, widths=(4, 6, 6, 8), strides=(1, 2, 1, 1),
                           exits=(1, 2, 3))


def noisy(x: torch.Tensor) -> torch.Tensor:
    return x + 0.1 * torch.randn_like(x)  # draws from the global generator, as augmentations do


def stage(run_dir: Path, cache_dir: Path | None, seed: int = 0, training: BackboneTraining = TRAINING):
    backbone = fresh_backbone(seed)
    tracker = TrainingLog(run_dir)
    history = trained_backbone(backbone, toy_data(augment_fn=noisy), training, CPU, seed, run_dir, cache_dir=cache_dir,
                               data_fingerprint="toy", backbone_config={"name": "small_cnn"}, tracker=tracker)
    return backbone, history, rng_state()["torch"], tracker


def test_a_second_run_loads_the_trained_backbone_and_goes_on_as_if_it_had_trained_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jei")
    cache = tmp_path / "cache"
    trained, history, rng_after_training, _ = stage(tmp_path / "a", cache)
    assert "trained backbone saved to cache" in caplog.text and "backbone cache hit" not in caplog.text
    [entry] = list(cache.iterdir())
    caplog.clear()
    loaded, cached_history, rng_after_hit, tracker = stage(tmp_path / "b", cache)
    assert "backbone cache hit" in caplog.text and "backbone  epoch" not in caplog.text  # not trained again
    assert cached_history == history
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(rng_after_hit, rng_after_training)  # the IMs built next get the same initial weights
    assert [row["epoch"] for row in tracker.rows] == [0, 1]  # the training log still shows the backbone's epochs
    for run in ("a", "b"):  # every run folder has its backbone, loadable as plain weights
        state = load_file(str(tmp_path / run / "backbone.safetensors"))
        assert set(state) == set(trained.state_dict())
    assert (tmp_path / "b" / "backbone.safetensors").stat().st_ino == entry.stat().st_ino  # a hard link


def test_the_key_covers_what_the_trained_weights_depend_on():
    data = toy_data()

    def key(seed=0, training=TRAINING, fingerprint="toy", config=None, init_seed=0):
        backbone = fresh_backbone(init_seed)
        torch.manual_seed(123)
        return backbone_key(backbone, data, training, seed, CPU, fingerprint, config or {"name": "small_cnn"})

    base = key()
    assert key() == base
    longer = BackboneTraining(epochs=3, batch_size=32, optimizer=TRAINING.optimizer)
    variants = [key(seed=1), key(training=longer), key(fingerprint="other"), key(config={"name": "x"}), key(init_seed=1)]
    assert base not in variants and len(set(variants)) == len(variants)
    backbone = fresh_backbone(0)
    torch.manual_seed(124)  # another random state at the start of training
    assert backbone_key(backbone, data, TRAINING, 0, CPU, "toy", {"name": "small_cnn"}) != base


def test_a_damaged_entry_is_retrained_and_replaced(tmp_path, caplog):
    cache = tmp_path / "cache"
    trained, _, _, _ = stage(tmp_path / "a", cache)
    [entry] = list(cache.iterdir())
    entry.unlink()  # keep run a's hard link intact
    entry.write_bytes(b"not a safetensors file")
    caplog.set_level(logging.INFO, logger="jei")
    again, _, _, _ = stage(tmp_path / "b", cache)
    assert "is unreadable" in caplog.text and "trained backbone saved to cache" in caplog.text
    read_entry(entry, load_key(entry), again)  # valid again
    for name, tensor in trained.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor)


def load_key(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["key"]


def test_an_unwritable_cache_warns_and_the_run_goes_on(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    caplog.set_level(logging.INFO, logger="jei")
    _, history, _, _ = stage(tmp_path / "run", blocker / "backbones")
    assert "backbone cache: cannot write" in caplog.text and "trainer.backbone_cache=false" in caplog.text
    assert len(history["loss"]) == 2 and (tmp_path / "run" / "backbone.safetensors").is_file()


def test_without_a_cache_the_run_folder_still_gets_its_backbone(tmp_path):
    _, history, _, _ = stage(tmp_path / "run", None)
    assert (tmp_path / "run" / "backbone.safetensors").is_file() and len(history["val_accuracy"]) == 2


@pytest.mark.slow
def test_a_sweep_of_three_cost_weights_trains_the_backbone_once(tmp_path):
    script = Path(sys.executable).with_name("jei-train")
    result = subprocess.run(
        [str(script), "-m", "objective.cost_weight=0.1,1,3", "data.max_per_split=80", "trainer.backbone.epochs=2",
         "trainer.exits.warmup_epochs=2", "trainer.exits.epochs=2", f"paths.cache_dir={tmp_path / 'cache'}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={"HYDRA_FULL_ERROR": "0", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("trained backbone saved to cache") == 1
    assert output.count("backbone cache hit") == 2
    assert output.count("backbone  epoch 1/2") == 1  # one job trained it, the other two did not
    assert len(list((tmp_path / "cache" / "backbones").iterdir())) == 1
    runs = [tmp_path / "sweep" / str(job) for job in range(3)]
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
    assert [m["config"]["objective"]["cost_weight"] for m in metrics] == [0.1, 1, 3]
    assert len({m["backbone_accuracy"] for m in metrics}) == 1
    assert all(m["history"]["backbone"] == metrics[0]["history"]["backbone"] for m in metrics)
    weights = [(run / "backbone.safetensors").read_bytes() for run in runs]
    assert weights[1] == weights[0] and weights[2] == weights[0]
