"""Training loops: the backbone stage (before freezing) and the exit stage, a generic runner of
the phases an objective plugin declares (``jei.types.Phase``) over cached features.

Plain arguments only; no Hydra here (see ``jei.build`` for the config side).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from jei import distributed
from jei.checkpoint import epoch_done, rng_state, set_rng_state
from jei.data.base import DataSplits
from jei.exits import per_exit_losses
from jei.features import AugmentedFeatures, CachedSplit, cpu_threads, to_device
from jei.model import EarlyExitNetwork
from jei.precision import autocast, grad_scaler
from jei.tracking import backbone_rows, describe, exit_rows
from jei.types import ExitOutputs, FeatureSource, Objective, Phase, TrainBatch

if TYPE_CHECKING:
    from jei.checkpoint import StageCheckpoint
    from jei.tracking import TrainingLog

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
        # Field names are relative to "optimizer"; jei.build renames them to the node they came
        # from (trainer.backbone.optimizer.lr, ...).
        from jei.validate import MAX_LR, ConfigError, choice, number

        choice(self.name, "optimizer.name", ("sgd", "adam", "adamw"))
        number(self.lr, "optimizer.lr", above=0, maximum=MAX_LR,
               hint=f"a learning rate above {MAX_LR:g} diverges; typical values are 1e-4 to 0.1")
        number(self.min_lr, "optimizer.min_lr", minimum=0, hint="the cosine schedule's final learning rate")
        if self.min_lr > self.lr:
            raise ConfigError(
                f"optimizer.min_lr must be <= optimizer.lr ({self.lr}), got {self.min_lr}; lower min_lr",
                "optimizer.min_lr",
            )
        number(self.momentum, "optimizer.momentum", minimum=0, below=1, hint="SGD's momentum, e.g. 0.9")
        number(self.weight_decay, "optimizer.weight_decay", minimum=0, maximum=1, hint="typical values are 0 to 5e-4")

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

    def __post_init__(self) -> None:
        # epochs may be 0 here (a backbone that is loaded, not trained); jei.build requires >= 1
        # when this stage runs.
        from jei.validate import ConfigError, boolean, integer

        integer(self.epochs, "trainer.backbone.epochs", minimum=0)
        integer(self.batch_size, "trainer.backbone.batch_size", minimum=1, hint="e.g. 64")
        boolean(self.augment, "trainer.backbone.augment")
        if not isinstance(self.optimizer, OptimizerSettings):
            raise ConfigError(
                f"trainer.backbone.optimizer must be an OptimizerSettings, got {self.optimizer!r}",
                "trainer.backbone.optimizer",
            )


@dataclass
class ExitTraining:
    """Stage 2's budget: batch size, optimiser, and the epoch counts each objective reads for its
    phases (JEI, paper §4.3: an IM warm-up with per-IM early stopping, then alternation)."""

    batch_size: int = 64
    warmup_epochs: int = 6
    warmup_patience: int = 2
    epochs: int = 9  # alternation epochs after the warm-up
    phase_batches: int = 200
    augment: bool = False  # recompute augmented training features every epoch (no feature cache)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)

    def __post_init__(self) -> None:
        from jei.validate import ConfigError, boolean, integer

        for name in ("batch_size", "phase_batches", "warmup_patience"):
            integer(getattr(self, name), f"trainer.exits.{name}", minimum=1)
        for name in ("warmup_epochs", "epochs"):
            integer(getattr(self, name), f"trainer.exits.{name}", minimum=0)
        if self.warmup_epochs + self.epochs == 0:
            # Every objective's phases last warmup_epochs and/or epochs: nothing would be trained,
            # and the run would report random IMs and gates.
            raise ConfigError(
                "trainer.exits.epochs and trainer.exits.warmup_epochs are both 0, so the exits would not be "
                "trained at all; set trainer.exits.epochs (or warmup_epochs) >= 1",
                "trainer.exits.epochs",
            )
        boolean(self.augment, "trainer.exits.augment")
        if not isinstance(self.optimizer, OptimizerSettings):
            raise ConfigError(
                f"trainer.exits.optimizer must be an OptimizerSettings, got {self.optimizer!r}",
                "trainer.exits.optimizer",
            )


def _check_finite(loss: Tensor, where: str, field_name: str) -> Tensor:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{where}: the loss is {loss.item()}; lower {field_name} or check the inputs for NaN/inf"
        )
    return loss


def _step(optimizer: torch.optim.Optimizer, schedule: Any, loss: Tensor, synchronise: list[nn.Parameter]) -> None:
    """One optimiser step; the gradients of ``synchronise`` are first averaged over the processes
    of a torchrun launch (``jei.distributed``; nothing to do for one process)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(synchronise)
    optimizer.step()
    schedule.step()


@torch.no_grad()
def backbone_accuracy(
    backbone: nn.Module, data: DataSplits, split: str, batch_size: int, device: torch.device, precision: str = "fp32"
) -> float:
    was_training = backbone.training
    backbone.eval()
    correct = 0
    for inputs, labels in data.batches(split, batch_size):
        with autocast(device, precision):
            logits = backbone(to_device(inputs, device))
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
    backbone.train(was_training)
    return correct / data.size(split)


def fit_backbone(
    backbone: nn.Module,
    data: DataSplits,
    settings: BackboneTraining,
    device: torch.device,
    seed: int,
    *,
    tracker: TrainingLog | None = None,
    checkpoint: StageCheckpoint | None = None,
    precision: str = "fp32",
) -> dict[str, list[float]]:
    """Train ``backbone`` with cross-entropy; restore its best epoch by validation accuracy.

    ``tracker`` gets a row per epoch (``jei.tracking``); ``checkpoint`` is saved after every
    epoch and, when it holds one, training continues from it with the same result
    (``jei.checkpoint``). ``precision``: ``jei.precision``. Under torchrun the backbone is
    wrapped in ``DistributedDataParallel`` and each process trains on its slice of every
    batch (``jei.distributed``); only rank 0 saves checkpoints.
    """
    backbone.to(device).train()
    world = distributed.current()
    model: nn.Module = backbone
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(backbone, device_ids=[device] if device.type == "cuda" else None)
    scaler = grad_scaler(device, precision)
    steps_per_epoch = math.ceil(data.size("train") / settings.batch_size)
    optimizer, schedule = settings.optimizer.build(backbone.parameters(), settings.epochs * steps_per_epoch)
    best_acc, best_state, history = -1.0, None, {"loss": [], "val_accuracy": []}
    start = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        backbone.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        best_acc, best_state, history, start = saved["best_accuracy"], saved["best_state"], saved["history"], saved["epoch"]
        set_rng_state(saved["rng"])
        log.info("backbone: %d of %d epochs done before the interruption; continuing", start, settings.epochs)
    if tracker is not None:
        for row in backbone_rows(history):
            tracker.record(row, replay=True)
    for epoch in range(start, settings.epochs):
        began = time.perf_counter()
        backbone.train()
        total = 0.0
        batches = data.batches("train", settings.batch_size, shuffle=True, seed=seed + epoch, augment=settings.augment)
        for inputs, labels in tqdm(batches, total=steps_per_epoch, desc=f"backbone epoch {epoch}", leave=False, disable=None):
            rows, share = distributed.local_rows(len(labels), world)
            if world.distributed:
                inputs, labels = distributed.take_rows(inputs, rows), labels[rows]
            with autocast(device, precision):
                loss = F.cross_entropy(model(to_device(inputs, device)), labels.to(device))
            _check_finite(loss, "backbone training", "trainer.backbone.optimizer.lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss * share).backward()  # DDP averages the ranks' gradients in backward
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            total += loss.item() * share
        accuracy = backbone_accuracy(backbone, data, "val", settings.batch_size, device, precision)
        (total,) = distributed.all_mean([total])
        history["loss"].append(total / steps_per_epoch)
        history["val_accuracy"].append(accuracy)
        row = {**backbone_rows(history)[-1], "seconds": time.perf_counter() - began}
        log.info("%s", describe(row, settings.epochs))
        if tracker is not None:
            tracker.record(row)
        if accuracy > best_acc:
            best_acc, best_state = accuracy, copy.deepcopy(backbone.state_dict())
        if checkpoint is not None and world.main:
            checkpoint.save({
                "epoch": epoch + 1, "model": backbone.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "best_accuracy": best_acc, "best_state": best_state,
                "history": history, "rng": rng_state(),
            })
        epoch_done("backbone")
    if best_state is not None:
        backbone.load_state_dict(best_state)
    # Rank 0's best epoch on every process: BatchNorm statistics are each process's own (DDP
    # broadcasts rank 0's before each forward, not after), and so may be their best epochs.
    distributed.broadcast_module(backbone)
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


@dataclass
class PerExitBest:
    """Per-module early stopping on a validation metric (one value per exit, higher is better).

    Keeps each module's best weights; a module whose metric has not improved for ``patience``
    epochs is no longer ``active``. ``restore`` loads every module's best weights back.
    """

    modules: list[nn.Module]
    patience: int

    def __post_init__(self) -> None:
        count = len(self.modules)
        self.best = torch.full((count,), -math.inf)
        self.states = [copy.deepcopy(m.state_dict()) for m in self.modules]
        self.waited = torch.zeros(count, dtype=torch.long)
        self.active = torch.ones(count, dtype=torch.bool)

    def update(self, metric: Tensor) -> bool:
        """Record one epoch's metric per module; True when every module has stopped."""
        improved = metric > self.best
        for index in improved.nonzero().flatten().tolist():
            self.states[index] = copy.deepcopy(self.modules[index].state_dict())
        self.best = torch.where(improved, metric, self.best)
        self.waited = torch.where(improved, torch.zeros_like(self.waited), self.waited + 1)
        self.active &= self.waited < self.patience
        return not bool(self.active.any())

    def restore(self) -> None:
        for module, state in zip(self.modules, self.states):
            module.load_state_dict(state)


def per_exit_accuracy(outputs: ExitOutputs, labels: Tensor) -> Tensor:
    """``[G]`` accuracy of every intermediate exit on all samples."""
    return (outputs.logits[:-1].argmax(-1) == labels).float().mean(dim=1)


def per_exit_val_loss(outputs: ExitOutputs, labels: Tensor) -> Tensor:
    """``[G]`` mean cross-entropy of every intermediate exit on all samples."""
    return per_exit_losses(outputs.logits[:-1], labels).mean(dim=0)


def _step_plan(phase: Phase, steps_per_epoch: int) -> list[int]:
    """Which of the phase's steps each batch runs: blocks of ``block_batches``, in order."""
    total = phase.epochs * steps_per_epoch
    return [(t // max(1, phase.block_batches)) % len(phase.steps) for t in range(total)]


def _run_phase(
    network: EarlyExitNetwork,
    phase: Phase,
    train: CachedSplit | AugmentedFeatures,
    val: CachedSplit,
    settings: ExitTraining,
    device: torch.device,
    seed: int,
    epoch_base: int,
    log_epoch: Callable[[str, int, dict[str, float | None], ExitOutputs, float], dict[str, Any]],
    ims_train: FeatureSource | None = None,
) -> list[dict[str, Any]]:
    history: list[dict[str, Any]] = []
    if phase.ims_only and ims_train is not None:
        train = ims_train
    world = distributed.current()
    if phase.on_start is not None:
        phase.on_start(exit_outputs(network, val, device), val.labels)
    if phase.fit is not None:
        phase.fit(train.for_epoch(epoch_base), val, device)
    if phase.steps:
        steps_per_epoch = math.ceil(len(train) / settings.batch_size)
        plan = _step_plan(phase, steps_per_epoch)
        factory = phase.optimizer or settings.optimizer
        optimizers = []
        for index, step in enumerate(phase.steps):
            if not step.parameters:
                raise ValueError(f"objective phase {phase.name!r}, step {step.name!r}: it trains no parameter")
            optimizers.append(factory.build(step.parameters, plan.count(index)))
        for epoch in range(phase.epochs):
            began = time.perf_counter()
            features = train.for_epoch(epoch_base + epoch)
            order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed + epoch))
            losses: dict[str, list[float]] = {step.name: [] for step in phase.steps}
            starts = range(0, len(features), settings.batch_size)
            for batch_number, start in enumerate(tqdm(starts, desc=f"{phase.name} {epoch}", leave=False, disable=None)):
                index = plan[epoch * steps_per_epoch + batch_number]
                step = phase.steps[index]
                rows = order[start : start + settings.batch_size]
                local, share = distributed.local_rows(len(rows), world)  # all rows, share 1: one process
                pooled, final, labels = features.batch(rows[local], device)
                batch = TrainBatch(pooled, final, labels, network.from_pooled(pooled, final))
                loss = _check_finite(step.loss(batch), f"{phase.name} phase ({step.name})", "trainer.exits.optimizer.lr")
                _step(*optimizers[index], loss * share, step.parameters)
                losses[step.name].append(loss.item() * share)
            val_outputs = exit_outputs(network, val, device)
            if world.distributed:  # the whole batches' mean losses, for the log
                names = [name for name in losses if losses[name]]
                for name, total in zip(names, distributed.all_mean([sum(losses[n]) for n in names])):
                    losses[name] = [total / len(losses[name])] * len(losses[name])
            mean_losses = {name: sum(v) / len(v) if v else None for name, v in losses.items()}
            history.append(log_epoch(phase.name, epoch, mean_losses, val_outputs, time.perf_counter() - began))
            if phase.on_epoch_end is not None and phase.on_epoch_end(epoch, val_outputs, val.labels):
                break
    if phase.on_end is not None:
        phase.on_end()
    return history


def trainable_state(network: EarlyExitNetwork) -> dict[str, Tensor]:
    """Everything of the network but the frozen backbone: IMs, gates, temperature."""
    return {k: v for k, v in network.state_dict().items() if not k.startswith("backbone.")}


def fit_exits(
    network: EarlyExitNetwork,
    objective: Objective,
    train: CachedSplit | AugmentedFeatures,
    val: CachedSplit,
    costs: Tensor,
    settings: ExitTraining,
    device: torch.device,
    seed: int,
    *,
    tracker: TrainingLog | None = None,
    checkpoint: StageCheckpoint | None = None,
    ims_train: FeatureSource | None = None,
) -> dict[str, Any]:
    """Stage 2: run the objective's phases over the training features, then fit the exit policy
    on the validation split. Returns the per-epoch history of every phase.

    ``tracker`` (``jei.tracking.TrainingLog``) gets a row per epoch; ``checkpoint`` is saved at
    every phase boundary and, when it holds one, the finished phases are skipped and training
    continues with the same result (``jei.checkpoint`` explains why phases are its unit).
    ``ims_train``: the features that phases marked ``ims_only`` train on instead of ``train``
    (IMs fitted on a larger split than the gates, e.g. the backbone's training images while
    the gates learn on held-out ones); None: every phase reads ``train``.

    Under torchrun every process runs the same phases on its slice of each batch and the step's
    gradients are averaged over the processes before each update (``jei.distributed``). This
    is DistributedDataParallel's rule, applied by hand: a phase trains a changing subset of
    parameters through losses the objective writes (some differentiate through their own
    virtual steps), so there is no one module whose forward a DDP wrapper could own.
    """
    with cpu_threads(device, 1):  # IMs and gates are tiny ops, where CPU threading only costs
        network.to(device)
        network.backbone.freeze()
        for part in (network.ims, network.gates):  # the same initial exits on every process
            distributed.broadcast_module(part)
        costs = costs.to(device=device, dtype=torch.float32)
        current = {"number": 0, "of": 0, "epochs": 0}  # the phase running, for the console line

        def log_epoch(
            phase: str, epoch: int, losses: dict[str, float | None], outputs: ExitOutputs, seconds: float
        ) -> dict[str, Any]:
            exits = network.policy.decide(outputs)
            predicted = outputs.logits.argmax(-1).gather(0, exits.view(1, -1))[0]
            row = {
                "phase": phase,
                "epoch": epoch,
                **{f"loss_{name}": value for name, value in losses.items()},
                "val_accuracy": (predicted == val.labels).double().mean().item(),
                "val_expected_cost": costs.cpu().double()[exits].mean().item(),
                "val_im_accuracy": per_exit_accuracy(outputs, val.labels).tolist(),
            }
            shown = {"stage": "exits", **row, "seconds": seconds}
            log.info("%s", describe(shown, current["epochs"], (current["number"], current["of"])))
            if tracker is not None:
                tracker.record(shown)
            epoch_done("exits")
            return row

        # Built once, on the initial network and objective, as in an uninterrupted run; a
        # checkpoint's state is loaded afterwards (see jei.checkpoint).
        phases = list(objective.phases(network, settings, costs))
        history: dict[str, Any] = {}
        first = 0
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None and (
            saved.get("phases") != [p.name for p in phases] or set(saved["network"]) != set(trainable_state(network))
        ):
            log.warning("exit checkpoint: it does not match this objective's phases %s or this network; "
                        "starting the exit stage afresh", [p.name for p in phases])
            saved = None
        if saved is not None:
            network.load_state_dict({**network.state_dict(), **saved["network"]})
            objective.load_state_dict(saved["objective"])
            history, first = saved["history"], saved["next_phase"]
            set_rng_state(saved["rng"])
            log.info("exits: phases %s done before the interruption; continuing", [p.name for p in phases[:first]])
        if tracker is not None:
            for row in exit_rows(history):
                tracker.record(row, replay=True)
        epoch_base = sum(phase.epochs for phase in phases[:first])
        for number, phase in enumerate(phases):
            if number < first:
                continue
            current.update(number=number + 1, of=len(phases), epochs=phase.epochs)
            steps = "+".join(step.name for step in phase.steps)
            log.info("exits %d/%d %s: %s", number + 1, len(phases), phase.name,
                     f"up to {phase.epochs} epochs training {steps}" if phase.steps else "no training (hooks only)")
            history[phase.name] = _run_phase(
                network, phase, train, val, settings, device, seed + 1000 * number, epoch_base, log_epoch, ims_train
            )
            if phase.steps and len(history[phase.name]) < phase.epochs:
                log.info("exits %d/%d %s: stopped early after %d of %d epochs", number + 1, len(phases), phase.name,
                         len(history[phase.name]), phase.epochs)
            epoch_base += phase.epochs
            if checkpoint is not None and distributed.current().main:
                checkpoint.save({
                    "phases": [p.name for p in phases], "next_phase": number + 1, "history": history,
                    "network": trainable_state(network), "objective": objective.state_dict(), "rng": rng_state(),
                })
        network.policy.fit(exit_outputs(network, val, device), val.labels, costs.cpu())
        return history
