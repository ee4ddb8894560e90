"""Config nodes -> objects. With ``jei.cli``, the only place that knows about OmegaConf.

Components are chosen by registry ``name``; every other key of a component's node is passed
to its factory as a keyword argument (validated against the factory's signature).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from jei.calibrate import ConformalSettings
from jei.data.base import DataSplits
from jei.model import EarlyExitNetwork
from jei.pipeline import RunSettings
from jei.registry import BACKBONES, DATASETS, GATES, IMS, OBJECTIVES, POLICIES, Registry
from jei.train import BackboneTraining, ExitTraining, OptimizerSettings


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
        gates = [GATES.build(gate_name, num_classes=num_classes, **gate_kwargs) for _ in backbone.exit_specs]
        if objective is None:
            return EarlyExitNetwork(backbone, ims, gates)
        return EarlyExitNetwork(
            backbone, ims, gates, build_policy(policy_node, objective), float(getattr(objective, "ensemble_decay", 0.0))
        )

    return make


def _settings(cls: type, node: Any, field: str) -> Any:
    plain = dict(to_plain(node) or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(plain) - known)
    if unknown:
        raise ValueError(f"{field}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    if "optimizer" in plain:
        plain["optimizer"] = _settings(OptimizerSettings, plain["optimizer"], f"{field}.optimizer")
    try:
        return cls(**plain)
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from err


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return torch.device(name)


def data_fingerprint(node: Any) -> str:
    return hashlib.sha256(json.dumps(to_plain(node), sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_settings(cfg: DictConfig) -> RunSettings:
    trainer = cfg.trainer
    train_backbone = trainer.train_backbone
    if train_backbone == "auto":
        train_backbone = not backbone_has_weights(cfg.backbone)
    elif not isinstance(train_backbone, bool):
        raise ValueError(f"trainer.train_backbone must be auto, true or false, got {train_backbone!r}")
    cache_dir = None
    if trainer.feature_cache:
        cache_dir = Path(os.path.expanduser(str(cfg.paths.cache_dir))) / "features"
    return RunSettings(
        seed=int(cfg.seed),
        device=resolve_device(str(cfg.device)),
        train_backbone=train_backbone,
        backbone_training=_settings(BackboneTraining, trainer.backbone, "trainer.backbone"),
        exit_training=_settings(ExitTraining, trainer.exits, "trainer.exits"),
        feature_cache_dir=cache_dir,
        data_fingerprint=data_fingerprint(cfg.data),
        eval_batch_size=int(trainer.eval_batch_size),
        conformal=_settings(ConformalSettings, cfg.conformal, "conformal"),
    )


def build_objective(node: Any) -> Any:
    return build_component(OBJECTIVES, node, "objective")


def load_run(run_dir: str | Path) -> tuple[DictConfig, DataSplits, EarlyExitNetwork]:
    """Rebuild a finished run's data and trained network from its directory (config, backbone
    weights if it trained them, and ``exits.safetensors``: IMs, gates, exit policy state)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    exits_file = run_dir / "exits.safetensors"
    for needed in (config_file, exits_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: is {run_dir} the directory of a finished jei-train run?")
    cfg = OmegaConf.load(config_file)
    trained_backbone = run_dir / "backbone.safetensors"
    if trained_backbone.is_file():
        cfg.backbone.weights = str(trained_backbone)
    data = build_data(cfg.data)
    backbone = build_backbone(cfg.backbone, data).freeze()
    objective = build_objective(cfg.objective)
    network = network_factory(cfg.im, cfg.gate, data.num_classes, cfg.get("policy"), objective)(backbone)
    state = load_file(str(exits_file))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    network.ims.load_state_dict(part("ims."))
    network.gates.load_state_dict(part("gates."))
    network.policy.load_state_dict(part("policy."))
    return cfg, data, network.eval()
