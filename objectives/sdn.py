"""Shallow-Deep Networks (Kaya et al., ICML 2019): IMs trained without gates, exits by confidence.

On a frozen backbone the IMs are independent, so SDN's weighted cross-entropy trains each IM on
its own; each keeps its best weights by validation loss (early stopping per IM), so the IMs end
near convergence. The thresholds are the exit policy's business (``max_prob`` by default;
``entropy``, ``budgeted``, ``penalized`` and ``patience`` run on the same IMs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from jei.im_phases import converged_ims, exit_losses, ims_phase
from jei.types import Phase, TrainBatch
from jei.validate import choice

WEIGHTINGS = ("uniform", "early", "depth")


def exit_weights(weighting: str, costs: Tensor) -> Tensor:
    """Per-IM loss weights, normalised to sum to one: ``uniform``; ``early`` (G + 1 - l, JEI's
    warm-up); ``depth`` (proportional to the exit's cost, SDN's weights grow with depth)."""
    num_gates = len(costs) - 1
    if weighting == "uniform":
        weights = torch.ones(num_gates)
    elif weighting == "early":
        weights = torch.arange(num_gates + 1, 1, -1, dtype=torch.float32)
    else:
        weights = costs[:-1].float().cpu()
    return weights / weights.sum()


class SDNObjective:
    """Weighted cross-entropy over the IMs; no gate is trained.

    Args:
        weighting: ``"uniform"``, ``"early"`` or ``"depth"`` (see ``exit_weights``).

        ims: fit the IMs to convergence with their own optimiser and calibrate them
            (``jei.im_phases.ConvergedIMs`` fields), instead of the trainer's budget.

    Schedule: one phase of ``warmup_epochs + epochs`` (the trainer's budget), early stopping
    per IM on validation loss with patience ``warmup_patience``.
    """

    default_policy = "max_prob"
    ensemble_decay = 0.0

    def __init__(self, weighting: str = "uniform", ims: dict[str, Any] | None = None) -> None:
        choice(weighting, "objective.weighting", WEIGHTINGS)
        self.weighting = weighting
        self.ims = converged_ims(ims)

    def phases(self, network: nn.Module, schedule: Any, costs: Tensor) -> list[Phase]:
        weights = exit_weights(self.weighting, costs).to(costs.device)
        if self.ims is not None:
            return self.ims.phases(network, weights * len(weights))

        def loss(batch: TrainBatch, active: Tensor) -> Tensor:
            return (weights * active.to(weights) * exit_losses(batch)).sum() * len(weights)

        return [ims_phase(network, "ims", schedule.warmup_epochs + schedule.epochs, schedule.warmup_patience, loss)]

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        return None
