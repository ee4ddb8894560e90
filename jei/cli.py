"""Command-line entry point: ``jei-train`` (Hydra). The composition root."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import jei.run_dir  # noqa: F401  (registers the run-dir resolver)
from jei.build import (
    build_backbone,
    build_data,
    build_objective,
    build_settings,
    network_factory,
    to_plain,
)
from jei.pipeline import run_experiment, seed_everything

log = logging.getLogger(__name__)


def train(cfg: DictConfig, output_dir: Path) -> float:
    """Build everything from ``cfg`` (validating it before any heavy work) and run it."""
    settings = build_settings(cfg)
    seed_everything(settings.seed)  # before any module is built: initial weights are seeded too
    objective = build_objective(cfg.objective)
    data = build_data(cfg.data)
    backbone = build_backbone(cfg.backbone, data)
    make_network = network_factory(cfg.im, cfg.gate, data.num_classes, cfg.policy, objective)
    metrics = run_experiment(data, backbone, make_network, objective, settings, output_dir, config=to_plain(cfg))
    log.info("results written to %s", output_dir)
    return metrics["accuracy"]


@hydra.main(config_path="pkg://jei.configs", config_name="train", version_base="1.3")
def train_main(cfg: DictConfig) -> float:
    return train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    train_main()
