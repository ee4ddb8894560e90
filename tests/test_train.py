"""The exit trainer: it learns, augmentation redraws features, NaN losses stop it clearly."""

from __future__ import annotations

import pytest
import torch

from jei.data.base import TensorDataSplits, TensorSplit
from jei.features import AugmentedFeatures, CachedSplit, compute_split
from jei.objectives.jei import JEIObjective
from jei.train import ExitTraining, OptimizerSettings, exit_outputs, fit_exits

from .helpers import tiny_network


def toy_data(n: int = 96, augment_fn=None) -> TensorDataSplits:
    """Images whose brightness gives the class (bright or dark): learnable from any exit."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    inputs = torch.randn(n, 1, 8, 8, generator=generator) * 0.3 + 2.0 * labels.view(-1, 1, 1, 1).float() - 1.0
    split = TensorSplit(inputs, labels)
    return TensorDataSplits({name: split for name in ("train", "val", "cal", "test")}, 5, augment_fn)


SETTINGS = ExitTraining(
    batch_size=32, warmup_epochs=15, warmup_patience=15, epochs=4, phase_batches=3,
    optimizer=OptimizerSettings("adam", 0.05, 1e-3, 0.0, 0.0),
)


def test_fit_exits_learns_every_exit():
    network, data = tiny_network(0), toy_data()
    split = compute_split(network, data, "train", 64, torch.device("cpu"))
    costs = torch.tensor([0.3, 0.6, 0.8, 1.0])
    fit_exits(network, JEIObjective(0.1), split, split, costs, SETTINGS, torch.device("cpu"), 0)
    accuracy = (exit_outputs(network, split, torch.device("cpu")).logits[:-1].argmax(-1) == split.labels).float()
    assert (accuracy.mean(dim=1) > 0.9).all()  # chance is 0.5


def test_augmented_features_are_redrawn_each_epoch():
    noisy = toy_data(augment_fn=lambda x: x + torch.randn_like(x))
    network = tiny_network(0)
    features = AugmentedFeatures(network, noisy, 64, torch.device("cpu"), seed=0)
    first, again, second = features.for_epoch(0), features.for_epoch(0), features.for_epoch(1)
    assert len(features) == 96 and torch.equal(first.labels, second.labels)
    torch.testing.assert_close(first.pooled[0], again.pooled[0])  # seeded per epoch
    assert not torch.allclose(first.pooled[0], second.pooled[0])
    costs = torch.tensor([0.3, 0.6, 0.8, 1.0])
    val = compute_split(network, noisy, "val", 64, torch.device("cpu"))
    fit_exits(network, JEIObjective(0.1), features, val, costs, SETTINGS, torch.device("cpu"), 0)


def test_nan_features_stop_training_with_the_field_to_change():
    network = tiny_network(0)
    split = compute_split(network, toy_data(), "train", 64, torch.device("cpu"))
    broken = CachedSplit([p.clone() for p in split.pooled], split.final_logits, split.labels)
    broken.pooled[1][3] = float("nan")
    with pytest.raises(FloatingPointError, match="warmup phase.*trainer.exits.optimizer.lr"):
        fit_exits(network, JEIObjective(0.1), broken, split, torch.tensor([0.3, 0.6, 0.8, 1.0]), SETTINGS,
                  torch.device("cpu"), 0)


@pytest.mark.parametrize(("kwargs", "field"), [({"batch_size": 0}, "batch_size"), ({"epochs": -1}, "epochs")])
def test_invalid_exit_training_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"trainer.exits.{field}"):
        ExitTraining(**kwargs)


def test_jei_schedule_reproduces_the_pre_seam_trainer():
    """The values below were produced by the trainer before the phase runner existed (commit
    e291538, which hard-coded JEI's warm-up and alternation), on this exact seeded run: moving the
    schedule into ``objectives/jei.py`` must not change JEI's results."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 3
    inputs = torch.randn(96, 1, 8, 8, generator=generator) * 0.8 + 0.7 * labels.view(-1, 1, 1, 1).float()
    order = torch.randperm(96, generator=generator)
    train_split, val_split = TensorSplit(inputs[order[:64]], labels[order[:64]]), TensorSplit(inputs[order[64:]], labels[order[64:]])
    data = TensorDataSplits({"train": train_split, "val": val_split, "cal": val_split, "test": val_split}, 5)
    network = tiny_network(0, gate_init=False)
    train = compute_split(network, data, "train", 64, torch.device("cpu"))
    val = compute_split(network, data, "val", 64, torch.device("cpu"))
    schedule = ExitTraining(batch_size=16, warmup_epochs=6, warmup_patience=2, epochs=3, phase_batches=3,
                            optimizer=OptimizerSettings("sgd", 0.05, 1e-3, 0.9, 5e-4))
    objective = JEIObjective(0.3, pos_weight_rule="balanced")  # that trainer's rule (the default is balanced_nonzero since)
    fit_exits(network, objective, train, val, torch.tensor([0.3, 0.6, 0.8, 1.0]), schedule, torch.device("cpu"), 7)
    out = exit_outputs(network, val, torch.device("cpu"))
    assert out.logits.double().sum().item() == pytest.approx(-71.8673924356699, abs=1e-4)
    assert out.gate_logits.double().sum().item() == pytest.approx(-27.770183488726616, abs=1e-4)
    torch.testing.assert_close(out.gate_logits[0], torch.tensor([-1.3766593933105469, 0.711925745010376, -0.2012033760547638]))
    torch.testing.assert_close(objective.pos_weight, torch.tensor([0.523809552192688, 0.0, 0.0]))
