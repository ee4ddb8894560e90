"""Objective contract, the same for every built-in method: it trains on a tiny synthetic cache,
improves its exits, and its saved state (with the policy's) reloads to the same predictions."""

from __future__ import annotations

import pytest
import torch

from jei.build import build_policy
from jei.features import compute_split
from jei.model import predict_from_outputs
from jei.pipeline import exits_state
from jei.registry import OBJECTIVES
from jei.train import ExitTraining, OptimizerSettings, exit_outputs, fit_exits

from .helpers import tiny_network
from .test_train import toy_data

SCHEDULE = ExitTraining(
    batch_size=32, warmup_epochs=8, warmup_patience=8, epochs=3, phase_batches=2,
    optimizer=OptimizerSettings("adam", 0.05, 1e-3, 0.0, 0.0),
)
COSTS = torch.tensor([0.3, 0.6, 0.8, 1.0])
SETTINGS = {"l2w": {"meta_interval": 2}}
CONVERGED = {"max_epochs": 30, "patience": 3, "optimizer": {"lr": 0.05}}
VARIANTS = {  # named options measured in jei-compare
    "sdn+converged": ("sdn", {"ims": CONVERGED}),
    "jei+converged": ("jei", {"ims": CONVERGED}),
    "jei+fixed_ims": ("jei", {"ims": CONVERGED, "train_ims": False, "pos_weight_rule": "balanced_nonzero"}),
    "jei+correct_gates": ("jei", {"ims": CONVERGED, "train_ims": False, "gate_target": "correct"}),
    "jei+lbfgs_gates": ("jei", {"ims": CONVERGED, "train_ims": False, "gate_solver": "lbfgs"}),
    "jei+correct_lbfgs_gates": ("jei", {"ims": CONVERGED, "train_ims": False, "gate_target": "correct",
                                        "gate_solver": "lbfgs"}),
}


def build_objective(name: str):
    if name in VARIANTS:
        registered, kwargs = VARIANTS[name]
        return OBJECTIVES.build(registered, **kwargs)
    return OBJECTIVES.build(name, **SETTINGS.get(name, {}))


def trained(name: str, seed: int = 0):
    objective = build_objective(name)
    network = tiny_network(seed)
    network.policy = build_policy(None, objective)
    network.ensemble_decay = objective.ensemble_decay
    data = toy_data()
    split = compute_split(network, data, "train", 64, torch.device("cpu"))
    history = fit_exits(network, objective, split, split, COSTS, SCHEDULE, torch.device("cpu"), 0)
    return objective, network, split, history


@pytest.mark.parametrize("name", ["jei", "sdn", "boosted", "l2w", "product_gates", *VARIANTS])
def test_objective_trains_and_its_state_reloads_to_the_same_predictions(name):
    before = exit_outputs(tiny_network(0), compute_split(tiny_network(0), toy_data(), "train", 64, torch.device("cpu")),
                          torch.device("cpu"))
    objective, network, split, history = trained(name)
    assert history and all(isinstance(rows, list) for rows in history.values())
    outputs = exit_outputs(network, split, torch.device("cpu"))
    accuracy = (outputs.logits[:-1].argmax(-1) == split.labels).float().mean(dim=1)
    initial = (before.logits[:-1].argmax(-1) == split.labels).float().mean(dim=1)
    assert (accuracy > 0.9).all() and (accuracy >= initial).all()  # the toy task is learnable at every exit

    state = exits_state(network, objective)
    fresh_objective = build_objective(name)
    fresh_objective.load_state_dict({k.removeprefix("objective."): v for k, v in state.items() if k.startswith("objective.")})
    fresh = tiny_network(99)
    fresh.policy = build_policy(None, fresh_objective)
    fresh.ensemble_decay = fresh_objective.ensemble_decay
    fresh.ims.load_state_dict({k.removeprefix("ims."): v for k, v in state.items() if k.startswith("ims.")})
    fresh.gates.load_state_dict({k.removeprefix("gates."): v for k, v in state.items() if k.startswith("gates.")})
    fresh.policy.load_state_dict({k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")})
    fresh.temperature.copy_(state["temperature"])
    reloaded = exit_outputs(fresh, split, torch.device("cpu"))
    torch.testing.assert_close(reloaded.logits[:-1], outputs.logits[:-1])
    assert torch.equal(predict_from_outputs(reloaded, fresh.policy).exit_index,
                       predict_from_outputs(outputs, network.policy).exit_index)
    for key, value in objective.state_dict().items():
        torch.testing.assert_close(fresh_objective.state_dict()[key], value)


def test_product_gates_loss_is_the_expected_penalised_loss():
    objective = OBJECTIVES.build("product_gates", cost_weight=0.5)
    logits = torch.randn(3, 4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    gate_logits = torch.full((4, 2), -60.0)  # no gate fires: everything at the head
    head = torch.nn.functional.cross_entropy(logits[-1], labels) + 0.5 * 1.0
    torch.testing.assert_close(objective.joint_loss(logits, gate_logits, labels, torch.tensor([0.2, 0.5, 1.0])), head)


def test_boosted_exits_add_the_detached_previous_ensemble():
    network = tiny_network(0)
    network.ensemble_decay = 0.5
    inputs = torch.randn(4, 1, 8, 8)
    pooled, final = network.pooled_features(inputs)
    out = network.from_pooled(pooled, final)
    plain = [im.classifier(p) for im, p in zip(network.ims, pooled)] + [final]
    expected = plain[0]
    for index in range(1, 4):
        expected = plain[index] + 0.5 * expected
        torch.testing.assert_close(out.logits[index], expected)
    out.logits[1].sum().backward()  # IM 1's loss reaches IM 1 only
    grad_0 = network.ims[0].classifier.weight.grad
    assert grad_0 is None or not grad_0.any()
    assert network.ims[1].classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "kwargs", "field"), [
    ("sdn", {"weighting": "deep"}, "objective.weighting"),
    ("boosted", {"decay": 0.0}, "objective.decay"),
    ("l2w", {"meta_interval": 0}, "objective.meta_interval"),
    ("product_gates", {"cost_weight": -1.0}, "objective.cost_weight"),
])
def test_bad_objective_settings_name_the_field(name, kwargs, field):
    with pytest.raises(ValueError, match=field):
        OBJECTIVES.build(name, **kwargs)


def test_converged_ims_are_calibrated_and_fixed_ims_stay_fixed():
    objective, network, split, history = trained("jei+fixed_ims")
    assert set(history) == {"ims", "temperature", "alternation"}
    assert not torch.allclose(network.temperature[:-1], torch.ones(3)) and network.temperature[-1] == 1
    assert all(set(row) >= {"loss_gates"} and "loss_ims" not in row for row in history["alternation"])


def test_balanced_nonzero_keeps_a_gradient_when_every_target_is_positive():
    from jei.exits import positive_class_weights

    everyone_at_exit_0 = torch.zeros(10, dtype=torch.long)
    assert positive_class_weights(everyone_at_exit_0, 3, 1.0, "balanced").tolist() == [0.0, 0.0, 0.0]
    assert positive_class_weights(everyone_at_exit_0, 3, 1.0, "balanced_nonzero").tolist() == [1.0, 1.0, 1.0]
