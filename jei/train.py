"""Training loops: the backbone stage (before freezing) and the JEI exit stage (IMs + gates).

Plain arguments only; no Hydra here (see ``jei.build`` for the config side).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from jei.data.base import DataSplits
from jei.features import AugmentedFeatures, CachedSplit, cpu_threads, to_device
from jei.model import EarlyExitNetwork
from jei.types import ExitOutputs, Objective

log = logging.getLogger(__name__)


@dataclass
class OptimizerSettings:
    """SGD with momentum (the paper's runs), Adam or AdamW, with a cosine schedule.

    Prefer AdamW to Adam with weight decay: Adam adds the decay to the gradient before
    normalising it, so an IM that the gates give little probability (a near-zero loss
    gradient) is shrunk towards zero.
    """

    name: str = "sgd"
    lr: float = 0.01
    min_lr: float = 2e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer name must be 'sgd', 'adam' or 'adamw', got {self.name!r}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")

    def build(self, params: Iterable[nn.Parameter], total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        params = list(params)
        if self.name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        else:
            adam = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
            optimizer = adam(params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps), eta_min=self.min_lr)
        return optimizer, schedule


@dataclass
class BackboneTraining:
    """Stage 1: train the backbone on the target data, keep the best epoch by validation accuracy."""

    epochs: int = 10
    batch_size: int = 64
    augment: bool = False
    optimizer: OptimizerSettings = field(default_factory=lambda: OptimizerSettings("adam", 3e-3, 1e-5, 0.0, 1e-4))


@dataclass
class ExitTraining:
    """Stage 2 (paper §4.3): IM warm-up with per-IM early stopping, then alternating phases."""

    batch_size: int = 64
    warmup_epochs: int = 6
    warmup_patience: int = 2
    epochs: int = 9  # alternation epochs after the warm-up
    phase_batches: int = 200
    augment: bool = False  # recompute augmented training features every epoch (no feature cache)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)

    def __post_init__(self) -> None:
        for name in ("batch_size", "phase_batches", "warmup_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.exits.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.exits.{name} must be >= 0, got {getattr(self, name)}")


def _check_finite(loss: Tensor, where: str, field_name: str) -> Tensor:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{where}: the loss is {loss.item()}; lower {field_name} or check the inputs for NaN/inf"
        )
    return loss


def _step(optimizer: torch.optim.Optimizer, schedule: Any, loss: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()


@torch.no_grad()
def backbone_accuracy(backbone: nn.Module, data: DataSplits, split: str, batch_size: int, device: torch.device) -> float:
    was_training = backbone.training
    backbone.eval()
    correct = 0
    for inputs, labels in data.batches(split, batch_size):
        correct += (backbone(to_device(inputs, device)).argmax(-1).cpu() == labels).sum().item()
    backbone.train(was_training)
    return correct / data.size(split)


def fit_backbone(
    backbone: nn.Module, data: DataSplits, settings: BackboneTraining, device: torch.device, seed: int
) -> dict[str, list[float]]:
    """Train ``backbone`` with cross-entropy; restore its best epoch by validation accuracy."""
    backbone.to(device).train()
    steps_per_epoch = math.ceil(data.size("train") / settings.batch_size)
    optimizer, schedule = settings.optimizer.build(backbone.parameters(), settings.epochs * steps_per_epoch)
    best_acc, best_state, history = -1.0, None, {"loss": [], "val_accuracy": []}
    for epoch in range(settings.epochs):
        backbone.train()
        total = 0.0
        batches = data.batches("train", settings.batch_size, shuffle=True, seed=seed + epoch, augment=settings.augment)
        for inputs, labels in tqdm(batches, total=steps_per_epoch, desc=f"backbone epoch {epoch}", leave=False):
            loss = F.cross_entropy(backbone(to_device(inputs, device)), labels.to(device))
            _step(optimizer, schedule, _check_finite(loss, "backbone training", "trainer.backbone.optimizer.lr"))
            total += loss.item()
        accuracy = backbone_accuracy(backbone, data, "val", settings.batch_size, device)
        history["loss"].append(total / steps_per_epoch)
        history["val_accuracy"].append(accuracy)
        log.info("backbone epoch %d: loss %.4f, val accuracy %.4f", epoch, total / steps_per_epoch, accuracy)
        if accuracy > best_acc:
            best_acc, best_state = accuracy, copy.deepcopy(backbone.state_dict())
    if best_state is not None:
        backbone.load_state_dict(best_state)
    return history


@torch.no_grad()
def exit_outputs(
    network: EarlyExitNetwork, split: CachedSplit, device: torch.device, batch_size: int = 4096
) -> ExitOutputs:
    """All-exits outputs for a whole cached split (IMs and gates applied to cached features)."""
    logits, gates = [], []
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)))
        pooled, final, _ = split.batch(index, device)
        out = network.from_pooled(pooled, final)
        logits.append(out.logits.cpu())
        gates.append(out.gate_logits.cpu())
    return ExitOutputs(logits=torch.cat(logits, dim=1), gate_logits=torch.cat(gates))


def _warmup(
    network: EarlyExitNetwork,
    objective: Objective,
    train: CachedSplit | AugmentedFeatures,
    val: CachedSplit,
    settings: ExitTraining,
    device: torch.device,
    seed: int,
) -> dict[str, list]:
    num_gates = network.num_gates
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    optimizer, schedule = settings.optimizer.build(
        network.ims.parameters(), settings.warmup_epochs * steps_per_epoch
    )
    active = torch.ones(num_gates, dtype=torch.bool)
    best_acc = torch.full((num_gates,), -1.0)
    best_states = [copy.deepcopy(im.state_dict()) for im in network.ims]
    waited = torch.zeros(num_gates, dtype=torch.long)
    history: dict[str, list] = {"loss": [], "val_accuracy": []}
    for epoch in range(settings.warmup_epochs):
        features = train.for_epoch(epoch)
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed + epoch))
        total = 0.0
        for start in tqdm(range(0, len(features), settings.batch_size), desc=f"warm-up {epoch}", leave=False):
            pooled, final, labels = features.batch(order[start : start + settings.batch_size], device)
            out = network.from_pooled(pooled, final)
            loss = objective.warmup_loss(out.logits[:-1], labels, active.to(device))
            _step(optimizer, schedule, _check_finite(loss, "IM warm-up", "trainer.exits.optimizer.lr"))
            total += loss.item()
        accuracy = (exit_outputs(network, val, device).logits[:-1].argmax(-1) == val.labels).float().mean(dim=1)
        improved = accuracy > best_acc
        for index in improved.nonzero().flatten().tolist():
            best_states[index] = copy.deepcopy(network.ims[index].state_dict())
        best_acc = torch.where(improved, accuracy, best_acc)
        waited = torch.where(improved, torch.zeros_like(waited), waited + 1)
        active &= waited < settings.warmup_patience
        history["loss"].append(total / steps_per_epoch)
        history["val_accuracy"].append(accuracy.tolist())
        if not active.any():
            break
    for im, state in zip(network.ims, best_states):
        im.load_state_dict(state)
    return history


def _phase_plan(settings: ExitTraining, steps_per_epoch: int) -> list[str]:
    """The phase of every alternation step: blocks of ``phase_batches``, gates first."""
    total = settings.epochs * steps_per_epoch
    return ["gates" if (step // settings.phase_batches) % 2 == 0 else "ims" for step in range(total)]


def fit_exits(
    network: EarlyExitNetwork,
    objective: Objective,
    train: CachedSplit | AugmentedFeatures,
    val: CachedSplit,
    costs: Tensor,
    settings: ExitTraining,
    device: torch.device,
    seed: int,
) -> dict[str, Any]:
    """Stage 2 from cached features: IM warm-up, then alternating gate and IM phases."""
    with cpu_threads(device, 1):  # IMs and gates are tiny ops, where CPU threading only costs
        network.to(device)
        network.backbone.freeze()
        costs = costs.to(device=device, dtype=torch.float32)
        history: dict[str, Any] = {"warmup": _warmup(network, objective, train, val, settings, device, seed)}

        steps_per_epoch = math.ceil(len(train) / settings.batch_size)
        plan = _phase_plan(settings, steps_per_epoch)
        params = network.exit_parameters()
        optimizers = {
            phase: settings.optimizer.build(params[phase], plan.count(phase)) for phase in ("gates", "ims")
        }
        val_out = exit_outputs(network, val, device)
        objective.update_from_validation(val_out.logits, val.labels, costs.cpu())
        history["alternation"] = []
        for epoch in range(settings.epochs):
            features = train.for_epoch(settings.warmup_epochs + epoch)
            order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed + 1000 + epoch))
            losses: dict[str, list[float]] = {"gates": [], "ims": []}
            for step, start in enumerate(
                tqdm(range(0, len(features), settings.batch_size), desc=f"alternation {epoch}", leave=False)
            ):
                phase = plan[epoch * steps_per_epoch + step]
                pooled, final, labels = features.batch(order[start : start + settings.batch_size], device)
                out = network.from_pooled(pooled, final)
                if phase == "gates":
                    loss = objective.gate_loss(out.logits, out.gate_logits, labels, costs)
                else:
                    loss = objective.im_loss(out.logits[:-1], out.gate_logits, labels)
                _step(*optimizers[phase], _check_finite(loss, f"{phase} phase", "trainer.exits.optimizer.lr"))
                losses[phase].append(loss.item())
            val_out = exit_outputs(network, val, device)
            objective.update_from_validation(val_out.logits, val.labels, costs.cpu())
            summary = {phase: sum(v) / len(v) if v else None for phase, v in losses.items()}
            history["alternation"].append(summary)
            log.info("alternation epoch %d: %s", epoch, summary)
        return history
