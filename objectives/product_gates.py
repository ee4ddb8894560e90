"""Differentiable product-form gates (Scardapane et al., "Why should we add early exits to neural
networks?", Cognitive Computation 2020).

P(exit l) = g_l * prod_{k<l} (1 - g_k); the backbone head takes the rest. IMs and gates are
trained jointly on the expected cost-penalised loss sum_l P(exit l) (CE_l + cost_weight * c_l);
at inference a sample leaves at the first l with g_l >= 1/2 (``gate_threshold`` policy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from jei.exits import per_exit_losses, product_exit_probabilities
from jei.im_phases import exit_losses, ims_phase
from jei.types import Phase, Step, TrainBatch
from jei.validate import number


class ProductGatesObjective:
    """Args:
        cost_weight: lambda in CE_l + lambda * c_l; higher means earlier exits. >= 0.

    Schedule: an IM warm-up (``warmup_epochs``, early stopping per IM on validation loss),
    then ``epochs`` of joint training of IMs and gates.
    """

    default_policy = "gate_threshold"
    ensemble_decay = 0.0

    def __init__(self, cost_weight: float = 0.5) -> None:
        number(cost_weight, "objective.cost_weight", minimum=0, hint="e.g. 0.5; higher means earlier exits")
        self.cost_weight = float(cost_weight)

    def joint_loss(self, exit_logits: Tensor, gate_logits: Tensor, labels: Tensor, costs: Tensor) -> Tensor:
        """Mean over samples of sum_l P(exit l) (CE_l + cost_weight * c_l), over exits 0..G."""
        probs = product_exit_probabilities(torch.sigmoid(gate_logits))  # [B, G+1]
        losses = per_exit_losses(exit_logits, labels) + self.cost_weight * costs.to(exit_logits)
        return (probs * losses).sum(dim=-1).mean()

    def phases(self, network: nn.Module, schedule: Any, costs: Tensor) -> list[Phase]:
        def warmup(batch: TrainBatch, active: Tensor) -> Tensor:
            losses = exit_losses(batch)
            return (active.to(losses) * losses).sum()

        def joint(batch: TrainBatch) -> Tensor:
            return self.joint_loss(batch.outputs.logits, batch.outputs.gate_logits, batch.labels, costs)

        parameters = [*network.ims.parameters(), *network.gates.parameters()]
        return [
            ims_phase(network, "warmup", schedule.warmup_epochs, schedule.warmup_patience, warmup),
            Phase("joint", schedule.epochs, [Step("ims+gates", parameters, joint)]),
        ]

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        return None
