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
from jei.train import PerExitBest, per_exit_val_loss
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
        best = PerExitBest(list(network.ims), schedule.warmup_patience)

        def warmup(batch: TrainBatch) -> Tensor:
            losses = per_exit_losses(batch.outputs.logits[:-1], batch.labels).mean(dim=0)
            return (best.active.to(losses) * losses).sum()

        def joint(batch: TrainBatch) -> Tensor:
            return self.joint_loss(batch.outputs.logits, batch.outputs.gate_logits, batch.labels, costs)

        parameters = [*network.ims.parameters(), *network.gates.parameters()]
        return [
            Phase(
                "warmup", schedule.warmup_epochs, [Step("ims", list(network.ims.parameters()), warmup)],
                on_epoch_end=lambda epoch, outputs, labels: best.update(-per_exit_val_loss(outputs, labels)),
                on_end=best.restore,
            ),
            Phase("joint", schedule.epochs, [Step("ims+gates", parameters, joint)]),
        ]

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        return None
