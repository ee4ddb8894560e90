"""BoostedNet (Yu et al., "Boosted Dynamic Neural Networks", AAAI 2023).

Exit s predicts the ensemble F_s = out_s + decay * F_{s-1} (F_{-1} = 0; the backbone head joins
as the last stage), so every exit corrects the ones before it. Each IM is trained against the
detached previous ensemble: loss = sum_s CE(out_s + detach(decay * F_{s-1}), y). The network
computes F_s in both the all-exits pass and real early exit (``ensemble_decay``); exits by a
max-prob threshold on softmax(F_s).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from jei.im_phases import exit_losses, ims_phase
from jei.types import Phase, TrainBatch
from jei.validate import number


class BoostedObjective:
    """Args:
        decay: the weight of the previous ensemble (0.5 in the paper); > 0.

    Schedule: one phase of ``warmup_epochs + epochs``; the IMs are kept together at their best
    epoch by mean validation loss (each exit depends on the earlier IMs), patience
    ``warmup_patience``.
    """

    default_policy = "max_prob"

    def __init__(self, decay: float = 0.5) -> None:
        number(decay, "objective.decay", above=0, hint="the weight of the previous ensemble, 0.5 in the paper")
        self.ensemble_decay = float(decay)

    def phases(self, network: nn.Module, schedule: Any, costs: Tensor) -> list[Phase]:
        def loss(batch: TrainBatch, active: Tensor) -> Tensor:
            # The network already detaches F_{s-1} inside F_s: the gradient reaches IM s only.
            return exit_losses(batch).sum()

        epochs = schedule.warmup_epochs + schedule.epochs
        return [ims_phase(network, "ims", epochs, schedule.warmup_patience, loss, together=True)]

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        return None
