"""Config nodes -> objects. With ``jei.cli``, the only place that knows about OmegaConf.

Components are chosen by registry ``name``; every other key of a component's node is passed
to its factory as a keyword argument (validated against the factory's signature).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from jei.calibrate import ConformalSettings
from jei.data.base import SPLITS, DataSplits
from jei.errors import ConfigError
from jei.model import EarlyExitNetwork
from jei.precision import check_precision
from jei.pipeline import RunSettings, load_exits_state
from jei.registry import BACKBONES, DATASETS, GATES, IMS, OBJECTIVES, POLICIES, Registry
from jei.train import BackboneTraining, ExitTraining, OptimizerSettings
from jei.validate import boolean, choice, integer, number, sequence, string


def to_plain(node: Any) -> Any:
    """Resolve interpolations and drop OmegaConf types, so none leak into modules or files."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def split_component(node: Any, group: str) -> tuple[str, dict[str, Any]]:
    plain = dict(to_plain(node) or {})
    name = plain.pop("name", None)
    if not name:
        raise ValueError(f"{group}.name is required: pick one of the registered {group} components")
    return name, plain


def build_component(registry: Registry, node: Any, group: str, **extra: Any) -> Any:
    name, kwargs = split_component(node, group)
    return registry.build(name, **{**kwargs, **extra})


def build_data(node: Any) -> DataSplits:
    return build_component(DATASETS, node, "data")


def data_input_channels(data: DataSplits) -> int | None:
    """Channels of an image, or node-feature width of a graph dataset, when the data says."""
    for attribute in ("in_channels", "num_node_features"):
        value = getattr(data, attribute, None)
        if value is not None:
            return int(value)
    return None


def backbone_has_weights(node: Any) -> bool:
    """Whether the backbone arrives trained for this task (a new head must still be trained)."""
    plain = to_plain(node) or {}
    loaded = bool(plain.get("weights")) or bool(plain.get("pretrained"))
    return loaded and not plain.get("reset_head", False)


def build_backbone(node: Any, data: DataSplits) -> torch.nn.Module:
    """The adapter named by ``backbone.name``, for ``data``'s classes (and channels if unset)."""
    name, kwargs = split_component(node, "backbone")
    kwargs["num_classes"] = data.num_classes
    if "in_channels" in kwargs and kwargs["in_channels"] is None:
        kwargs["in_channels"] = data_input_channels(data)
    if "edge_dim" in kwargs and kwargs["edge_dim"] is None and getattr(data, "edge_dim", None) is not None:
        kwargs["edge_dim"] = data.edge_dim
    return BACKBONES.build(name, **kwargs)


def build_policy(node: Any, objective: Any) -> Any:
    """The exit policy named by ``policy.name``; ``auto`` (or none) is the objective's own."""
    plain = dict(to_plain(node) or {})
    name = plain.pop("name", None) or "auto"
    if name == "auto":
        if plain:
            raise ValueError(f"policy: settings {sorted(plain)} need a policy name (policy=max_prob, ...), not auto")
        name = objective.default_policy
    return POLICIES.build(name, **plain)


def _parameters(factory: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def network_factory(
    im_node: Any, gate_node: Any, num_classes: int, policy_node: Any = None, objective: Any = None
) -> Callable[[torch.nn.Module], EarlyExitNetwork]:
    """Builds IMs, gates and the exit policy from the backbone's ``exit_specs``, once it is frozen.

    ``objective`` supplies the default policy and the exits' ensembling (BoostedNet).
    """
    im_name, im_kwargs = split_component(im_node, "im")
    gate_name, gate_kwargs = split_component(gate_node, "gate")
    if objective is not None:
        build_policy(policy_node, objective)  # a bad policy setting fails now, before any training

    def make(backbone: torch.nn.Module) -> EarlyExitNetwork:
        ims = [IMS.build(im_name, spec=spec, num_classes=num_classes, **im_kwargs) for spec in backbone.exit_specs]
        # A gate whose factory takes ``index`` (a history gate sizes its input by it) gets its exit's.
        takes_index = "index" in _parameters(GATES.get(gate_name))
        gates = [
            GATES.build(gate_name, num_classes=num_classes, **({"index": spec.index} if takes_index else {}), **gate_kwargs)
            for spec in backbone.exit_specs
        ]
        if objective is None:
            return EarlyExitNetwork(backbone, ims, gates)
        return EarlyExitNetwork(
            backbone, ims, gates, build_policy(policy_node, objective), float(getattr(objective, "ensemble_decay", 0.0))
        )

    return make


# The node a settings dataclass names its fields under when it is built on its own;
# ``_settings`` renames them to the node they were actually read from.
_SETTINGS_PREFIX = {
    OptimizerSettings: "optimizer",
    BackboneTraining: "trainer.backbone",
    ExitTraining: "trainer.exits",
    ConformalSettings: "conformal",
}


def _settings(cls: type, node: Any, field: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    plain = to_plain(node)
    if plain is None:
        plain = {}
    if not isinstance(plain, dict):
        raise ConfigError(f"{field} must be a mapping of settings ({', '.join(sorted(known))}), got {plain!r}", field)
    plain = dict(plain)
    unknown = sorted(set(plain) - known)
    if unknown:
        close = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
        hints = [f"{key} -> {match[0]}?" for key, match in close.items() if match]
        raise ConfigError(
            f"{field}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            + (f" (did you mean {', '.join(hints)})" if hints else ""),
            field,
        )
    if "optimizer" in plain:
        plain["optimizer"] = _settings(OptimizerSettings, plain["optimizer"], f"{field}.optimizer")
    try:
        return cls(**plain)
    except ConfigError as err:
        raise err.rebase(_SETTINGS_PREFIX.get(cls, field), field) from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{field}: {err}", field) from err


DEVICE_HINT = "use device=auto, cpu, cuda or cuda:N"


def resolve_device(name: Any) -> torch.device:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"device must be a device name, got {name!r}; {DEVICE_HINT}", "device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device={name!r} is not a device; {DEVICE_HINT}", "device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto", "device")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device={name!r} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                f"use device=cuda or device=auto",
                "device",
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"device={name!r} but MPS is not available here; use device=cpu or device=auto", "device")
    elif device.type != "cpu":
        raise ConfigError(f"device={name!r}: jei-train runs on cpu, cuda or mps; {DEVICE_HINT}", "device")
    return device


def data_fingerprint(node: Any) -> str:
    return hashlib.sha256(json.dumps(to_plain(node), sort_keys=True, default=str).encode()).hexdigest()[:16]


SEED_MAX = 2**32 - 1  # numpy's seed range (seed_everything seeds numpy too)


def check_seed(value: Any, field: str = "seed") -> int:
    return integer(value, field, minimum=0, maximum=SEED_MAX, hint="e.g. seed=0")


def _factory_default(name: str, argument: str) -> Any:
    """The default of ``argument`` in the data factory ``name`` (inspect.Parameter.empty if none)."""
    try:
        factory = DATASETS.get(name)
        parameter = inspect.signature(factory).parameters.get(argument)
    except (LookupError, ImportError, TypeError, ValueError):  # build_data reports these
        return inspect.Parameter.empty
    return inspect.Parameter.empty if parameter is None else parameter.default


def check_data_settings(node: Any) -> None:
    """The settings every dataset shares, before loading anything: ``fractions`` (a list of
    non-negative numbers summing to <= 1, as many as the dataset's default has: 4 for
    train/val/cal/test, 3 where the official test set is the test split), ``max_per_split``
    and ``seed``. Dataset-specific settings are checked by the dataset's own factory."""
    plain = to_plain(node)
    if not isinstance(plain, dict):
        raise ConfigError(f"data must be a mapping with a name (data=digits, ...), got {plain!r}", "data")
    name = plain.get("name")
    if "fractions" in plain:
        fractions = sequence(plain["fractions"], "data.fractions", "[0.5, 0.15, 0.15, 0.2]", min_length=1)
        for value in fractions:
            number(value, "data.fractions", minimum=0, hint=f"a list of split fractions, got {fractions}")
        default = _factory_default(str(name), "fractions") if name else inspect.Parameter.empty
        if isinstance(default, (list, tuple)) and len(fractions) != len(default):
            names = ", ".join(SPLITS[: len(default)])
            extra = "" if len(default) == len(SPLITS) else "; the dataset's official test images are the test split"
            raise ConfigError(
                f"data.fractions must hold {len(default)} fractions ({names}) for data={name}{extra}, got {fractions}; "
                f"e.g. data.fractions={list(default)}",
                "data.fractions",
            )
        if sum(fractions) > 1 + 1e-9:
            raise ConfigError(
                f"data.fractions must sum to at most 1, got {fractions} (sum {sum(fractions):g})", "data.fractions"
            )
    if plain.get("max_per_split") is not None:
        integer(plain["max_per_split"], "data.max_per_split", minimum=1, hint="or null for no cap")
    if "seed" in plain:
        check_seed(plain["seed"], "data.seed")


def build_settings(cfg: DictConfig) -> RunSettings:
    """Every run setting, checked for type and range before any work (``ConfigError`` names the field)."""
    seed = check_seed(cfg.seed)
    device = resolve_device(cfg.device)
    check_data_settings(cfg.data)
    trainer = cfg.trainer
    train_backbone = trainer.train_backbone
    if train_backbone == "auto":
        train_backbone = not backbone_has_weights(cfg.backbone)
    elif not isinstance(train_backbone, bool):
        raise ConfigError(
            f"trainer.train_backbone must be auto, true or false, got {train_backbone!r}", "trainer.train_backbone"
        )
    backbone_training = _settings(BackboneTraining, trainer.backbone, "trainer.backbone")
    if train_backbone and backbone_training.epochs < 1:
        why = "auto, and the backbone has no weights" if trainer.train_backbone == "auto" else "true"
        raise ConfigError(
            f"trainer.backbone.epochs must be >= 1 when the backbone is trained here (trainer.train_backbone={why}), "
            f"got {backbone_training.epochs}; set trainer.backbone.epochs >= 1, or load trained weights "
            f"(backbone.weights=<file>) with trainer.train_backbone=auto or false",
            "trainer.backbone.epochs",
        )
    cache_dir = None
    if boolean(trainer.feature_cache, "trainer.feature_cache"):
        cache_dir = Path(os.path.expanduser(string(cfg.paths.cache_dir, "paths.cache_dir")))
        cache_dir = cache_dir / "features"
    return RunSettings(
        seed=seed,
        device=device,
        train_backbone=train_backbone,
        backbone_training=backbone_training,
        exit_training=_settings(ExitTraining, trainer.exits, "trainer.exits"),
        feature_cache_dir=cache_dir,
        feature_dtype=choice(trainer.get("feature_dtype", "float32"), "trainer.feature_dtype", ("float32", "float16")),
        data_fingerprint=data_fingerprint(cfg.data),
        eval_batch_size=integer(trainer.eval_batch_size, "trainer.eval_batch_size", minimum=1, hint="e.g. 256"),
        conformal=_settings(ConformalSettings, cfg.conformal, "conformal"),
        precision=check_precision(trainer.get("precision", "fp32"), device),
        channels_last=boolean(trainer.get("channels_last", False), "trainer.channels_last"),
        fold_batchnorm=boolean(trainer.get("fold_batchnorm", False), "trainer.fold_batchnorm"),
    )


def build_objective(node: Any) -> Any:
    return build_component(OBJECTIVES, node, "objective")


def load_run(run_dir: str | Path) -> tuple[DictConfig, DataSplits, EarlyExitNetwork]:
    """A finished run's config, rebuilt data and trained network (CPU, eval mode), for
    re-evaluation and benchmarks; works from any working directory.

    Everything comes from the run's record ``run.json`` (``jei.predict``): the resolved config
    with absolute paths, the backbone weights (the run's ``backbone.safetensors``, or the
    recorded weights file, checked by SHA-256) and ``exits.safetensors`` (IMs, gates, exit
    policy state, temperature). The dataset is rebuilt from the recorded config. To predict on
    new inputs without any dataset, use ``jei.predict.load(run_dir)``.

    A run trained before run records existed (no ``run.json``) is rebuilt from
    ``.hydra/config.yaml``, whose relative paths are then relative to the current directory.
    """
    from jei.predict import RECORD, build_network, read_record

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / RECORD).is_file() and (run_dir / ".hydra" / "config.yaml").is_file():
        return _load_legacy_run(run_dir)
    record = read_record(run_dir)
    cfg = OmegaConf.create(record["config"])
    return cfg, build_data(cfg.data), build_network(record, run_dir)


def _load_legacy_run(run_dir: Path) -> tuple[DictConfig, DataSplits, EarlyExitNetwork]:
    from safetensors.torch import load_file

    exits_file = run_dir / "exits.safetensors"
    if not exits_file.is_file():
        raise FileNotFoundError(f"{exits_file} is missing: is {run_dir} the directory of a finished jei-train run?")
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    trained_backbone = run_dir / "backbone.safetensors"
    if trained_backbone.is_file():
        cfg.backbone.weights = str(trained_backbone)
    data = build_data(cfg.data)
    backbone = build_backbone(cfg.backbone, data).freeze()
    objective = build_objective(cfg.objective)
    network = network_factory(cfg.im, cfg.gate, data.num_classes, cfg.get("policy"), objective)(backbone)
    state = load_file(str(exits_file))

    return cfg, data, load_exits_state(network, state).eval()
