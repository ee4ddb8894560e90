"""Full-batch L-BFGS gate fits (``jei.full_batch.lbfgs_phase`` via ``objective.gate_solver=lbfgs``):
they reach a lower training loss than the paper's SGD gate steps, train nothing but the gates,
and start from the IMs the objective fixed."""

from __future__ import annotations

import torch

from jei.features import compute_split
from jei.registry import OBJECTIVES
from jei.train import exit_outputs, fit_exits
from jei.types import TrainBatch

from .helpers import tiny_network
from .test_lbfgs_ims import COSTS, CPU, DECAYS, SCHEDULE, noisy_data

IMS = {"solver": "lbfgs", "weight_decays": DECAYS}


def fitted(gate_solver: str, gate_target: str):
    data = noisy_data()
    network = tiny_network(0)
    train = compute_split(network, data, "train", 64, CPU)
    val = compute_split(network, data, "val", 64, CPU)
    objective = OBJECTIVES.build("jei", ims=IMS, train_ims=False, gate_solver=gate_solver, gate_target=gate_target)
    history = fit_exits(network, objective, train, val, COSTS, SCHEDULE, CPU, 0)
    return network, objective, train, history


def gate_loss(network, objective, split) -> float:
    outputs = exit_outputs(network, split, CPU)
    pooled, final, labels = split.batch(torch.arange(len(split)), CPU)
    batch = TrainBatch(pooled, final, labels, outputs)
    return objective.gate_loss(batch.outputs.logits, batch.outputs.gate_logits, labels, COSTS).item()


def test_lbfgs_gates_reach_a_lower_training_loss_than_sgd_gate_steps():
    for target in ("correct", "oracle"):
        lbfgs, objective, train, history = fitted("lbfgs", target)
        sgd, sgd_objective, _, _ = fitted("sgd", target)
        assert list(history) == ["ims", "temperature", "gates"]
        assert gate_loss(lbfgs, objective, train) < gate_loss(sgd, sgd_objective, train)


def test_lbfgs_gate_fit_trains_the_gates_only():
    lbfgs, *_ = fitted("lbfgs", "correct")
    sgd, *_ = fitted("sgd", "correct")
    for a, b in zip(lbfgs.ims.parameters(), sgd.ims.parameters()):  # the same converged IMs
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(lbfgs.temperature, sgd.temperature)
    assert all(p.requires_grad for p in lbfgs.ims.parameters())  # held parameters are given back
