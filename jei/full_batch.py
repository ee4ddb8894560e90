"""Full-batch phases: fit one step's parameters on the whole training split at once, by L-BFGS.

Gates reading fixed, calibrated IMs see fixed inputs and fixed targets, so their loss is a
logistic regression, convex in the gates' parameters: a full-batch quasi-Newton fit reaches its
optimum, where a few epochs of SGD (the paper's schedule) stop short of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from jei.types import ExitOutputs, FeatureSource, Phase, Step, TrainBatch

log = logging.getLogger(__name__)


def lbfgs(parameters: list[torch.Tensor], max_iter: int, tolerance: float) -> torch.optim.LBFGS:
    """The project's full-batch L-BFGS: strong Wolfe line search, at most ``max_iter`` iterations,
    stopping when the largest gradient entry is below ``tolerance``."""
    return torch.optim.LBFGS(
        parameters, lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4, tolerance_grad=tolerance,
        tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe",
    )


def lbfgs_phase(
    name: str,
    network: nn.Module,
    step: Step,
    weight_decay: float = 1e-4,
    max_iter: int = 500,
    tolerance: float = 1e-6,
    on_start: Callable[[ExitOutputs, torch.Tensor], None] | None = None,
    inspect: Callable[[TrainBatch], None] | None = None,
) -> Phase:
    """A phase that minimises ``step.loss`` on the whole training split plus
    ``weight_decay / 2`` times the squared norm of the step's weight matrices (biases are not
    penalised; the penalty keeps a separable problem bounded), by L-BFGS from the parameters'
    current values. Every other parameter of ``network`` is held fixed during the fit.
    ``inspect`` sees the whole training batch once, before the fit (e.g. to warn about its
    targets)."""

    def fit(train: FeatureSource, val: FeatureSource, device: torch.device) -> None:
        pooled, final, labels = train.batch(torch.arange(len(train)), device)
        pooled = [p.float() for p in pooled]
        trained = {id(p) for p in step.parameters}
        held = [p for p in network.parameters() if p.requires_grad and id(p) not in trained]
        for parameter in held:  # no gradient is computed for what this phase does not train
            parameter.requires_grad_(False)
        try:
            if inspect is not None:
                with torch.no_grad():
                    inspect(TrainBatch(pooled, final, labels, network.from_pooled(pooled, final)))
            optimizer = lbfgs(step.parameters, max_iter, tolerance)

            last = [float("nan")]  # the loss at the last evaluation, for the log

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                batch = TrainBatch(pooled, final, labels, network.from_pooled(pooled, final))
                penalty = sum(p.square().sum() for p in step.parameters if p.dim() > 1)
                loss = step.loss(batch) + 0.5 * weight_decay * penalty
                loss.backward()
                last[0] = loss.item()
                return loss

            optimizer.step(closure)
        finally:
            for parameter in held:
                parameter.requires_grad_(True)
        log.info("%s: full-batch L-BFGS on %d samples, loss %.4f after %d iterations", name, len(train),
                 last[0], int(optimizer.state[step.parameters[0]].get("n_iter", 0)))

    return Phase(name, 0, [], on_start=on_start, fit=fit)
