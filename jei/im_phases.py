"""IMs trained to convergence, then calibrated: phases any objective can start its schedule with.

On a frozen backbone the IMs see cached features, so training each one until its validation
loss stops improving is cheap; the paper's fixed warm-up of about 6 SGD epochs leaves linear IMs
far from converged and under-confident (METHOD §8). A second, parameter-free phase then fits one
temperature per IM on the validation split (``jei.temperature``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from jei.exits import per_exit_losses
from jei.temperature import calibrate_network
from jei.train import OptimizerSettings, PerExitBest, per_exit_val_loss
from jei.types import ExitOutputs, Phase, Step, TrainBatch


@dataclass
class ConvergedIMs:
    """How the IMs are fitted: at most ``max_epochs``, each IM stopped when its validation loss
    has not improved for ``patience`` epochs (and restored to its best), with ``optimizer``;
    then per-IM temperature scaling when ``temperature``."""

    max_epochs: int = 100
    patience: int = 5
    optimizer: dict[str, Any] | None = None  # OptimizerSettings fields; None: AdamW 3e-3 -> 1e-5
    temperature: bool = True

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.patience < 1:
            raise ValueError(f"objective.ims: max_epochs and patience must be >= 1, got {self.max_epochs}, {self.patience}")
        settings = {"name": "adamw", "lr": 3e-3, "min_lr": 1e-5, "momentum": 0.0, "weight_decay": 1e-4}
        self.optimizer_settings = OptimizerSettings(**{**settings, **(self.optimizer or {})})

    def phases(self, network: nn.Module, weights: Tensor | None = None) -> list[Phase]:
        """``weights``: per-IM loss weights ``[G]`` (uniform when None)."""
        best = PerExitBest(list(network.ims), self.patience)

        def loss(batch: TrainBatch) -> Tensor:
            losses = per_exit_losses(batch.outputs.logits[:-1], batch.labels).mean(dim=0)
            scale = best.active.to(losses) if weights is None else best.active.to(losses) * weights.to(losses)
            return (scale * losses).sum()

        phases = [
            Phase(
                "ims", self.max_epochs, [Step("ims", list(network.ims.parameters()), loss)],
                optimizer=self.optimizer_settings,
                on_epoch_end=lambda epoch, outputs, labels: best.update(-per_exit_val_loss(outputs, labels)),
                on_end=best.restore,
            )
        ]
        if self.temperature:
            num_gates = len(network.ims)

            def calibrate(outputs: ExitOutputs, labels: Tensor) -> None:
                calibrate_network(network, outputs.logits, labels, slice(0, num_gates))

            phases.append(Phase("temperature", 0, [], on_start=calibrate))
        return phases


def converged_ims(settings: dict[str, Any] | ConvergedIMs | None) -> ConvergedIMs | None:
    """An objective's ``ims`` option: None (its own schedule) or the converged-IM settings."""
    if settings is None or isinstance(settings, ConvergedIMs):
        return settings
    return ConvergedIMs(**settings)
