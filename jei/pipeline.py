"""One experiment, end to end: backbone stage, freeze, exit stage, early-exit evaluation.

Takes built objects and plain settings (``jei.build`` makes them from Hydra configs), and
writes its results into ``output_dir``: ``metrics.json``, ``exits.safetensors`` (IMs, gates,
exit policy and objective state), ``exit_logits.safetensors`` (every exit's logits and gate
logits on val, cal and test, so any policy can be evaluated after the fact),
``backbone.safetensors`` when the backbone was trained here, ``training.csv`` (a row per epoch
of every stage and phase, ``jei.tracking``; TensorBoard event files too when it is installed),
and PNG plots. Every file is written atomically, and ``metrics.json`` last, so a failed run
leaves no partial results. While it runs, ``checkpoints/`` lets an interrupted run continue
where it stopped (``jei.checkpoint``); a trained backbone is also kept in the backbone cache
(``jei.backbone_cache``), so the other jobs of a sweep do not train it again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from jei import distributed
from jei.backbone_cache import trained_backbone
from jei.batchnorm_folding import fold_frozen_batchnorm
from jei.calibrate import (
    ConformalSettings,
    Scored,
    calibration_folds,
    calibration_metrics,
    calibration_warnings,
    conformal_metrics,
)
from jei.checkpoint import NOT_RESULTS, RunCheckpoints, comparable, resume_mode, state_digest
from jei.cost import ExitCosts, measure_exit_costs
from jei.data.base import DataSplits
from jei.evaluate import exit_metrics
from jei.features import AugmentedFeatures, CachedSplit, cached_split, to_device
from jei.io import atomic_write, write_json
from jei.memory_format import to_channels_last
from jei.model import EarlyExitNetwork, predict_from_outputs
from jei.precision import autocast
from jei.plots import plot_accuracy_cost, plot_exit_histogram, plot_reliability, plot_training_curves
from jei.predict import write_run_record
from jei.tracking import TrainingLog, tensorboard_mode
from jei.train import BackboneTraining, ExitTraining, exit_outputs, fit_exits
from jei.types import Objective

log = logging.getLogger(__name__)


@dataclass
class RunSettings:
    seed: int
    device: torch.device
    train_backbone: bool
    backbone_training: BackboneTraining
    exit_training: ExitTraining
    feature_cache_dir: Path | None  # None: compute features in memory for this run only
    feature_dtype: str = "float32"  # trainer.feature_dtype: float32 | float16, the features as stored and trained on
    data_fingerprint: str = ""
    eval_batch_size: int = 256
    conformal: ConformalSettings = field(default_factory=ConformalSettings)
    precision: str = "fp32"  # trainer.precision: the backbone's passes (jei.precision)
    channels_last: bool = False  # trainer.channels_last: the backbone's maps in NHWC (jei.memory_format)
    fold_batchnorm: bool = False  # trainer.fold_batchnorm: once frozen (jei.batchnorm_folding)
    # Filled from the config by ``run_experiment`` (``config_options``):
    backbone_cache_dir: Path | None = None  # None: no backbone cache
    backbone_config: Any = None  # the backbone's config, part of the backbone cache key
    resume: str | bool = "auto"  # trainer.resume (jei.checkpoint)
    tensorboard: bool = False  # write TensorBoard event files


def config_options(settings: RunSettings, config: Mapping[str, Any] | None) -> RunSettings:
    """``settings`` with the options a run reads from its config: ``trainer.backbone_cache``
    (under ``paths.cache_dir``/backbones), ``trainer.resume``, ``trainer.tensorboard``, and the
    backbone config for the cache key. Keys the config lacks keep the settings' values."""
    from jei.validate import boolean, string

    if not config:
        return settings
    trainer = config.get("trainer") or {}
    changes: dict[str, Any] = {"backbone_config": config.get("backbone")}
    if "backbone_cache" in trainer:
        cache_dir = None
        if boolean(trainer["backbone_cache"], "trainer.backbone_cache"):
            paths = config.get("paths") or {}
            cache_dir = Path(os.path.expanduser(string(paths.get("cache_dir"), "paths.cache_dir"))) / "backbones"
        changes["backbone_cache_dir"] = cache_dir
    if "resume" in trainer:
        changes["resume"] = resume_mode(trainer["resume"])
    if "tensorboard" in trainer:
        changes["tensorboard"] = tensorboard_mode(trainer["tensorboard"])
    return dataclasses.replace(settings, **changes)


# Settings added after runs with resumable checkpoints existed: left out of the resume record
# while they hold their defaults, so those runs still resume.
LATER_SETTINGS = ("channels_last", "fold_batchnorm")
RUN_SETTING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunSettings) if f.default is not dataclasses.MISSING}


def _is_default(settings: RunSettings, name: str) -> bool:
    return getattr(settings, name) == RUN_SETTING_DEFAULTS[name]


def backbone_options(settings: RunSettings) -> list[str]:
    """The settings that change how the backbone computes, where they are not the default (so
    fingerprints made before they existed still hold)."""
    names = ("precision", "feature_dtype", *LATER_SETTINGS)
    return [f"{name}={getattr(settings, name)}" for name in names if not _is_default(settings, name)]


def resume_record(settings: RunSettings, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """What identifies a run for resuming it: its config (less ``jei.checkpoint.NOT_RESULTS``)
    and the settings that shape its results."""
    return {
        "config": comparable(config),
        "settings": repr({
            f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
            if f.name not in ("feature_cache_dir", "backbone_cache_dir", "resume", "tensorboard")
            and not (f.name in LATER_SETTINGS and _is_default(settings, f.name))
        }),
        "ignored": list(NOT_RESULTS),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_state(module: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


@torch.no_grad()
def early_exit_predictions(
    network: EarlyExitNetwork, data: DataSplits, split: str, batch_size: int, device: torch.device, precision: str = "fp32"
):
    """Real early-exit inference over a split: logits at the exit taken, and the exits."""
    network.eval()
    logits, exits = [], []
    total = (data.size(split) + batch_size - 1) // batch_size
    for inputs, _ in tqdm(data.batches(split, batch_size), total=total, desc=f"early exit[{split}]", leave=False, disable=None):
        with autocast(device, precision):
            result = network.early_exit(to_device(inputs, device))
        logits.append(result.logits.float().cpu())
        exits.append(result.exit_index.cpu())
    return torch.cat(logits), torch.cat(exits)


def evaluate(
    network: EarlyExitNetwork, data: DataSplits, splits: dict[str, CachedSplit], costs: ExitCosts, settings: RunSettings
) -> dict[str, Any]:
    """Test metrics from real early-exit inference, conformal sets calibrated on ``cal``, and
    calibration error; ``early_exit_agreement`` checks real inference against the cached pass."""
    network.eval()
    test_outputs = exit_outputs(network, splits["test"], settings.device)
    cached_prediction = predict_from_outputs(test_outputs, network.policy)
    test_logits, exits = early_exit_predictions(
        network, data, "test", settings.eval_batch_size, settings.device, settings.precision
    )
    predictions = test_logits.argmax(-1)
    labels = splits["test"].labels
    metrics = exit_metrics(exits, predictions, labels, costs.normalized, test_outputs.logits)
    metrics["early_exit_agreement"] = (
        (exits == cached_prediction.exit_index) & (predictions == cached_prediction.logits.argmax(-1))
    ).double().mean().item()
    # Calibration split: disjoint from train/val, not augmented, scored with the final model.
    cal_prediction = predict_from_outputs(exit_outputs(network, splits["cal"], settings.device), network.policy)
    test_probs = torch.softmax(test_logits.double(), dim=-1)
    cal = Scored(torch.softmax(cal_prediction.logits.double(), dim=-1), splits["cal"].labels, cal_prediction.exit_index)
    test = Scored(test_probs, labels, exits)
    folds = calibration_folds(cal, test, settings.conformal.calibrate_on, settings.seed)
    where = "the calibration split" if settings.conformal.calibrate_on == "cal" else "each half of the test split"
    warnings: list[str] = []
    for cal_fold, _ in folds:
        warnings += [w for w in calibration_warnings(len(cal_fold.labels), settings.conformal.alphas, where) if w not in warnings]
    metrics["warnings"] = warnings
    metrics["conformal"] = conformal_metrics(folds, test, network.num_gates + 1, settings.conformal)
    metrics["calibration"] = calibration_metrics(
        test_probs, labels, torch.softmax(test_outputs.logits.double(), dim=-1), settings.conformal.n_bins
    )
    metrics["exit_mul_adds"] = costs.mul_adds
    metrics["backbone_mul_adds"] = costs.backbone_mul_adds
    val = splits["val"]
    metrics["backbone_val_accuracy"] = (val.final_logits.argmax(-1) == val.labels).double().mean().item()
    return metrics


def exits_state(network: EarlyExitNetwork, objective: Objective) -> dict[str, torch.Tensor]:
    """Everything a trained run needs beyond the backbone: IMs, gates, policy and objective state."""
    state = {f"ims.{k}": v for k, v in network.ims.state_dict().items()}
    state.update({f"gates.{k}": v for k, v in network.gates.state_dict().items()})
    state["temperature"] = network.temperature
    state.update({f"policy.{k}": v for k, v in network.policy.state_dict().items()})
    state.update({f"objective.{k}": v for k, v in objective.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_exits_state(network: EarlyExitNetwork, state: dict[str, torch.Tensor]) -> EarlyExitNetwork:
    """The inverse of ``exits_state``: IMs, gates, policy settings and temperatures into
    ``network`` (the objective's state is the objective's to load)."""

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    network.ims.load_state_dict(part("ims."))
    network.gates.load_state_dict(part("gates."))
    network.policy.load_state_dict(part("policy."))
    if "temperature" in state:
        network.temperature.copy_(state["temperature"])
    return network


def save_exit_logits(network: EarlyExitNetwork, splits: dict[str, CachedSplit], costs: ExitCosts, path: Path, device: torch.device) -> None:
    """Every exit's logits ``[G+1, N, K]``, gate logits ``[N, G]`` and labels per split."""
    tensors: dict[str, torch.Tensor] = {"costs": costs.normalized.double().contiguous()}
    for name, split in splits.items():
        outputs = exit_outputs(network, split, device)
        tensors[f"{name}.logits"] = outputs.logits.float().contiguous()
        tensors[f"{name}.gate_logits"] = outputs.gate_logits.float().contiguous()
        tensors[f"{name}.labels"] = split.labels.contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def prepare(
    data: DataSplits,
    backbone: torch.nn.Module,
    make_network: Callable[[torch.nn.Module], EarlyExitNetwork],
    settings: RunSettings,
    output_dir: Path,
    only_test: bool = False,
    *,
    tracker: TrainingLog | None = None,
    checkpoints: RunCheckpoints | None = None,
) -> tuple[EarlyExitNetwork, ExitCosts, dict[str, CachedSplit], CachedSplit | AugmentedFeatures | None, Any]:
    """Everything before exit training: the backbone stage (when needed, saved to
    ``output_dir``; loaded from the backbone cache when ``settings.backbone_cache_dir`` holds
    it), freezing, the network, its exit costs and every split's features (``only_test``: the
    test split's alone, for protocols that cross-fit on it). ``tracker`` logs the backbone's
    epochs; ``checkpoints`` lets an interrupted backbone stage continue (``jei.checkpoint``)."""
    device = settings.device
    backbone.to(device)
    if settings.channels_last:  # before the backbone stage and every key: they depend on it
        to_channels_last(backbone)
    backbone_history = None
    if settings.train_backbone:
        backbone_history = trained_backbone(
            backbone, data, settings.backbone_training, device, settings.seed, Path(output_dir),
            cache_dir=settings.backbone_cache_dir, data_fingerprint=settings.data_fingerprint,
            backbone_config=settings.backbone_config, tracker=tracker, checkpoints=checkpoints,
            precision=settings.precision,
        )
        if tracker is not None and distributed.current().main:
            plot_training_curves(tracker.rows, Path(output_dir) / "training_curves.png")
    backbone.freeze()
    if settings.fold_batchnorm:
        fold_frozen_batchnorm(backbone, warn=distributed.current().main)  # one process tells

    network = make_network(backbone).to(device)
    example, _ = next(iter(data.batches("test", 8)))
    costs = measure_exit_costs(network, to_device(example, device))
    log.info("exit costs (normalised): %s", [round(c, 4) for c in costs.normalized.tolist()])

    def features(split: str) -> CachedSplit:
        return cached_split(
            network, data, split, settings.eval_batch_size, device, settings.feature_cache_dir, settings.data_fingerprint,
            dtype=settings.feature_dtype, precision=settings.precision,
        )

    if only_test:
        return network, costs, {"test": features("test")}, None, backbone_history
    splits = {split: features(split) for split in ("val", "cal", "test")}
    train_features = (
        AugmentedFeatures(
            network, data, settings.eval_batch_size, device, settings.seed, settings.feature_dtype, settings.precision
        )
        if settings.exit_training.augment  # a fresh augmented pass per epoch instead of the cache
        else features("train")
    )
    return network, costs, splits, train_features, backbone_history


def run_experiment(
    data: DataSplits,
    backbone: torch.nn.Module,
    make_network: Callable[[torch.nn.Module], EarlyExitNetwork],
    objective: Objective,
    settings: RunSettings,
    output_dir: Path,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every stage and return the metrics also written to ``output_dir/metrics.json``.

    Seed (``seed_everything``) before building ``backbone`` for a reproducible run.

    Under torchrun (``jei.distributed``) every process runs the backbone stage, the feature
    extraction and the exit stage together; rank 0 alone then evaluates and writes the results
    (``metrics.json`` records ``world_size``); the other ranks return ``{"world_size": N}``.
    """
    output_dir = Path(output_dir)
    settings = config_options(settings, config)
    device = settings.device
    world = distributed.current()
    history: dict[str, Any] = {}
    record = resume_record(settings, config)
    if world.main:  # decides whether the folder resumes (and starts it afresh if not) ...
        checkpoints = RunCheckpoints(output_dir, record, settings.resume)
    distributed.barrier()
    if not world.main:  # ... then the others read the same checkpoints (they never write any)
        checkpoints = RunCheckpoints(output_dir, record, reader=True)
    tracker = TrainingLog(output_dir, tensorboard=settings.tensorboard) if world.main else None
    network, costs, splits, train_features, backbone_history = prepare(
        data, backbone, make_network, settings, output_dir, tracker=tracker, checkpoints=checkpoints
    )
    if backbone_history is not None:
        history["backbone"] = backbone_history
    history["exits"] = fit_exits(
        network, objective, train_features, splits["val"], costs.normalized.float(), settings.exit_training,
        device, settings.seed, tracker=tracker,
        checkpoint=checkpoints.stage("exits", state_digest(network.backbone.state_dict())),
    )
    if not world.main:
        return {"world_size": world.size}
    tracker.close()

    metrics = evaluate(network, data, splits, costs, settings)
    metrics["history"] = history
    metrics["world_size"] = world.size
    metrics["config"] = config or {}

    state = exits_state(network, objective)
    atomic_write(output_dir / "exits.safetensors", lambda tmp: save_file(state, str(tmp)))
    save_exit_logits(network, splits, costs, output_dir / "exit_logits.safetensors", device)
    plot_exit_histogram(metrics, output_dir / "exit_histogram.png")
    plot_accuracy_cost(metrics, output_dir / "accuracy_cost.png")
    plot_reliability(metrics["calibration"], output_dir / "reliability.png")
    plot_training_curves(tracker.rows, output_dir / "training_curves.png")
    write_run_record(output_dir, data, network, splits, settings, metrics)  # run.json, for jei.predict.load
    write_json(output_dir / "metrics.json", metrics)
    checkpoints.clear()  # finished: nothing to resume
    log.info(
        "test accuracy %.4f at expected cost %.4f (backbone %.4f); exits %s",
        metrics["accuracy"], metrics["expected_cost"], metrics["backbone_accuracy"],
        [round(f, 3) for f in metrics["exit_fractions"]],
    )
    return metrics
