"""IMs trained to convergence, then calibrated: phases any objective can start its schedule with.

On a frozen backbone the IMs see cached features, so training each one until its validation
loss stops improving is cheap; the paper's fixed warm-up of about 6 SGD epochs leaves linear IMs
far from converged and under-confident (METHOD §8). A second, parameter-free phase then fits one
temperature per IM on the validation split (``jei.temperature``).

Two solvers fit the IMs (``ConvergedIMs.solver``): ``adamw``, mini-batch AdamW with early
stopping per IM on validation loss; and ``lbfgs``, for linear IMs, a full-batch L-BFGS fit of
each IM's cross-entropy plus an L2 penalty on its weights, for every value of a weight-decay
grid, keeping per IM the value with the lowest validation loss (``fit_linear_ims``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jei.full_batch import lbfgs
from jei.temperature import calibrate_network
from jei.train import OptimizerSettings, PerExitBest, per_exit_val_loss
from jei.types import ExitOutputs, FeatureSource, Phase, Step, TrainBatch
from jei.validate import choice, integer, number, sequence

log = logging.getLogger(__name__)

SOLVERS = ("adamw", "lbfgs", "auto")


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
        ims_only=True,
    )


def exit_losses(batch: TrainBatch) -> Tensor:
    """``[G]`` mean cross-entropy of every IM on the batch."""
    return per_exit_val_loss(batch.outputs, batch.labels)


def _all_rows(features: FeatureSource, device: torch.device) -> tuple[list[Tensor], Tensor]:
    """Every exit's pooled features (float32, on ``device``) and the labels of a whole split."""
    pooled, _, labels = features.batch(torch.arange(len(features)), device)
    return [p.float() for p in pooled], labels


@dataclass
class LinearFit:
    """One IM's L-BFGS fit: the decay kept, and per decay of the grid (in the order fitted,
    largest first) the validation loss and the L-BFGS iterations used."""

    weight_decay: float
    val_losses: dict[float, float] = field(default_factory=dict)
    iterations: dict[float, int] = field(default_factory=dict)


def _fit_linear_im(
    layer: nn.Linear,
    temperature: float,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    weight_decays: Sequence[float],
    max_iter: int,
    tolerance: float,
) -> LinearFit:
    """Fit ``layer`` (logits ``layer(x) / temperature``) on ``train`` for each decay; keep the
    weights of the decay with the lowest validation cross-entropy.

    Minimised: mean CE + weight_decay / 2 * ||W||^2 (the bias is not penalised). L-BFGS works in
    centred, unit-variance coordinates of the inputs: W = V / s and b = c - W m, where m and s are
    the training mean and standard deviation of each input; the penalty is written on W, so the
    objective and its minimiser are exactly those of the raw parametrisation, only better
    conditioned (about 4x fewer iterations on ResNet-56's exits). Decays are fitted from the
    largest down, each one started from the previous one's solution (from zero for the first).
    """
    x, y = train
    val_x, val_y = val
    mean = x.mean(dim=0)
    scale = x.std(dim=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant inputs: no rescaling
    v = torch.zeros_like(layer.weight, dtype=torch.float32, requires_grad=True)
    c = torch.zeros_like(layer.bias, dtype=torch.float32, requires_grad=True)

    def raw(v_: Tensor, c_: Tensor) -> tuple[Tensor, Tensor]:
        weight = v_ / scale
        return weight, c_ - weight @ mean

    result = LinearFit(weight_decay=float("nan"))
    best_loss, best = float("inf"), None
    for decay in sorted({float(d) for d in weight_decays}, reverse=True):
        optimizer = lbfgs([v, c], max_iter, tolerance)

        def closure(optimizer: torch.optim.LBFGS = optimizer, decay: float = decay) -> Tensor:
            optimizer.zero_grad()
            weight, bias = raw(v, c)
            loss = F.cross_entropy((x @ weight.T + bias) / temperature, y) + 0.5 * decay * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            weight, bias = raw(v, c)
            val_loss = F.cross_entropy((val_x @ weight.T + bias) / temperature, val_y).item()
        result.val_losses[decay] = val_loss
        result.iterations[decay] = int(optimizer.state[v].get("n_iter", 0))
        if val_loss < best_loss:  # ties keep the larger decay (fitted first)
            best_loss, best = val_loss, (weight.detach().clone(), bias.detach().clone())
            result.weight_decay = decay
    if best is None:
        raise ValueError(
            "objective.ims.solver=lbfgs: the validation loss is not finite for any weight decay; "
            "check objective.ims.weight_decays and the features"
        )
    with torch.no_grad():
        layer.weight.copy_(best[0].to(layer.weight))
        layer.bias.copy_(best[1].to(layer.bias))
    return result


def _im_layers(network: nn.Module) -> list[nn.Module]:
    return [getattr(im, "classifier", im) for im in network.ims]


def lbfgs_obstacle(network: nn.Module, weights: Tensor | None = None) -> str | None:
    """Why ``fit_linear_ims`` cannot fit this network's IMs with per-IM loss ``weights`` (it needs
    independent linear IMs with a bias and positive weights), or None when it can."""
    if getattr(network, "ensemble_decay", 0.0) != 0.0:
        return ("objective.ims.solver=lbfgs fits each IM on its own, which needs IMs that do not depend on "
                f"each other (ensemble_decay 0, got {network.ensemble_decay}); use solver=adamw")
    for index, layer in enumerate(_im_layers(network)):
        if not isinstance(layer, nn.Linear) or layer.bias is None:
            return (f"objective.ims.solver=lbfgs fits linear IMs (im=pool_linear); IM {index} is a "
                    f"{type(layer).__name__}: use solver=adamw")
    if weights is not None and not bool((weights > 0).all()):
        return f"objective.ims.solver=lbfgs needs positive per-IM loss weights, got {weights.tolist()}"
    return None


def fit_linear_ims(
    network: nn.Module,
    train: FeatureSource,
    val: FeatureSource,
    device: torch.device,
    weight_decays: Sequence[float],
    max_iter: int = 1000,
    tolerance: float = 1e-6,
) -> list[LinearFit]:
    """Fit every linear IM of ``network`` on its own, full batch, by L-BFGS (``_fit_linear_im``),
    choosing its weight decay on ``val``; returns what was chosen per IM.

    On a frozen backbone without an ensemble (``ensemble_decay`` 0) IM l's logits depend on IM l's
    parameters only, so a loss sum_l w_l CE_l over the IMs is minimised by minimising each CE_l
    on its own: a positive per-IM weight w_l scales IM l's objective (cross-entropy and penalty
    alike) without moving its minimiser, and the decay is chosen per IM on validation anyway.
    The pooled features of both splits are gathered once, in float32, on ``device``.
    """
    obstacle = lbfgs_obstacle(network)
    if obstacle is not None:
        raise ValueError(obstacle)
    layers = _im_layers(network)
    train_pooled, train_labels = _all_rows(train, device)
    val_pooled, val_labels = _all_rows(val, device)
    temperatures = network.temperature.tolist()
    fits = []
    for index, layer in enumerate(layers):
        fit = _fit_linear_im(
            layer, temperatures[index], (train_pooled[index], train_labels), (val_pooled[index], val_labels),
            weight_decays, max_iter, tolerance,
        )
        log.info("IM %d: L-BFGS weight decay %g (val loss %.4f, %d iterations)", index, fit.weight_decay,
                 fit.val_losses[fit.weight_decay], fit.iterations[fit.weight_decay])
        fits.append(fit)
    return fits


@dataclass
class ConvergedIMs:
    """How the IMs are fitted, by ``solver``:

    - ``adamw``: mini-batch training for at most ``max_epochs``, each IM stopped when its
      validation loss has not improved for ``patience`` epochs (and restored to its best), with
      ``optimizer``;
    - ``lbfgs`` (linear IMs): each IM fitted full batch by L-BFGS to convergence (at most
      ``max_iter`` iterations, until the largest gradient entry is below ``tolerance``) on
      cross-entropy + weight_decay / 2 * ||W||^2, for each of ``weight_decays``, keeping per IM
      the decay of lowest validation loss (``fit_linear_ims``); ``max_epochs``, ``patience`` and
      ``optimizer`` are not used;
    - ``auto``: ``lbfgs`` where it applies (linear, independent IMs, positive per-IM loss
      weights), ``adamw`` otherwise.

    Then per-IM temperature scaling when ``temperature``.
    """

    max_epochs: int = 100
    patience: int = 5
    optimizer: dict[str, Any] | None = None  # OptimizerSettings fields; None: AdamW 3e-3 -> 1e-5
    temperature: bool = True
    solver: str = "adamw"
    # lbfgs: one decade apart, spanning what the exits of the CIFAR-10 ResNet-56 choose (1e-6 to 1e-3)
    weight_decays: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    max_iter: int = 1000
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.patience < 1:
            raise ValueError(f"objective.ims: max_epochs and patience must be >= 1, got {self.max_epochs}, {self.patience}")
        settings = {"name": "adamw", "lr": 3e-3, "min_lr": 1e-5, "momentum": 0.0, "weight_decay": 1e-4}
        self.optimizer_settings = OptimizerSettings(**{**settings, **(self.optimizer or {})})
        choice(self.solver, "objective.ims.solver", SOLVERS)
        decays = sequence(self.weight_decays, "objective.ims.weight_decays", "[1e-5, 1e-4, 1e-3]", min_length=1)
        self.weight_decays = tuple(
            float(number(d, f"objective.ims.weight_decays[{i}]", minimum=0.0)) for i, d in enumerate(decays)
        )
        integer(self.max_iter, "objective.ims.max_iter", minimum=1)
        number(self.tolerance, "objective.ims.tolerance", above=0.0)

    def phases(self, network: nn.Module, weights: Tensor | None = None) -> list[Phase]:
        """``weights``: per-IM loss weights ``[G]`` (uniform when None). With ``solver=lbfgs``
        each IM is fitted on its own, where a positive weight does not change the minimiser."""
        obstacle = lbfgs_obstacle(network, weights)
        solver = self.solver
        if solver == "auto":
            solver = "adamw" if obstacle is not None else "lbfgs"
        if solver == "lbfgs":
            if obstacle is not None:
                raise ValueError(obstacle)

            def fit(train: FeatureSource, val: FeatureSource, device: torch.device) -> None:
                fit_linear_ims(network, train, val, device, self.weight_decays, self.max_iter, self.tolerance)

            phases = [Phase("ims", 0, [], fit=fit, ims_only=True)]
        else:
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
