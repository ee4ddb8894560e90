"""IMs trained to convergence, then calibrated: phases any objective can start its schedule with.

On a frozen backbone the IMs see cached features, so training each one until its validation
loss stops improving is cheap; the paper's fixed warm-up of about 6 SGD epochs leaves linear IMs
far from converged and under-confident (METHOD §8). A second, parameter-free phase then fits one
temperature per IM on the validation split (``jei.temperature``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from jei.temperature import calibrate_network
from jei.train import OptimizerSettings, PerExitBest, per_exit_val_loss
from jei.types import ExitOutputs, Phase, Step, TrainBatch


def ims_phase(
    network: nn.Module,
    name: str,
    epochs: int,
    patience: int,
    loss: Callable[[TrainBatch, Tensor], Tensor],
    together: bool = False,
    optimizer: Any = None,
    metric: Callable[[ExitOutputs, Tensor], Tensor] | None = None,
) -> Phase:
    """A phase that trains the IMs on ``loss(batch, active)`` with early stopping on a validation
    metric, higher is better (``metric(outputs, labels)``; by default minus the validation loss):
    per IM (``active`` [G] marks the IMs still training; each is restored to its best epoch), or
    all IMs together when exits depend on each other (``active`` is then [1])."""
    best = PerExitBest([network.ims] if together else list(network.ims), patience)

    def negative_loss(outputs: ExitOutputs, labels: Tensor) -> Tensor:
        losses = per_exit_val_loss(outputs, labels)
        return -(losses.mean().view(1) if together else losses)

    metric = metric or negative_loss

    return Phase(
        name, epochs,
        [Step("ims", list(network.ims.parameters()), lambda batch: loss(batch, best.active.to(batch.labels.device)))],
        optimizer=optimizer,
        on_epoch_end=lambda epoch, outputs, labels: best.update(metric(outputs, labels)),
        on_end=best.restore,
    )


def exit_losses(batch: TrainBatch) -> Tensor:
    """``[G]`` mean cross-entropy of every IM on the batch."""
    return per_exit_val_loss(batch.outputs, batch.labels)


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
        def loss(batch: TrainBatch, active: Tensor) -> Tensor:
            scale = active.to(batch.outputs.logits) if weights is None else active * weights.to(active.device)
            return (scale * exit_losses(batch)).sum()

        phases = [ims_phase(network, "ims", self.max_epochs, self.patience, loss, optimizer=self.optimizer_settings)]
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
