"""Command-line entry point: ``jei-train`` (Hydra). The composition root."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import jei.run_dir  # noqa: F401  (registers the run-dir resolver)
from jei import distributed
from jei.build import (
    build_backbone,
    build_data,
    build_objective,
    build_settings,
    data_input_channels,
    network_factory,
    to_plain,
)
from jei.calibrate import ConformalSettings, calibration_warnings
from jei.data.base import DataSplits
from jei.errors import cli_main, config_errors
from jei.pipeline import run_experiment, seed_everything
from jei.validate import check_backbone_fits, check_data, check_network_builds

log = logging.getLogger(__name__)


def train(cfg: DictConfig, output_dir: Path) -> float:
    """Build everything from ``cfg`` (validating it before any heavy work) and run it; under
    ``torchrun`` on every process of the launch (``jei.distributed``).

    Any error while building is the configuration's: it is raised as ``jei.errors.ConfigError``
    (``train_main`` reports it in one line, exit status 2). Errors of the run itself pass as they are.
    """
    with config_errors():
        settings = build_settings(cfg)
    world, device = distributed.init(settings.device)  # torchrun: join the other processes
    settings = dataclasses.replace(settings, device=device)
    if not world.main:  # one process tells the story (the log file is shared)
        logging.getLogger().setLevel(logging.WARNING)
    with config_errors():
        seed_everything(settings.seed)  # before any module is built: initial weights are seeded too
        objective = build_objective(cfg.objective)
        data = build_data(cfg.data)
        check_data(data, data.num_classes)
        backbone = build_backbone(cfg.backbone, data)
        check_backbone_fits(
            backbone, data, data_name=group_choice(cfg, "data"), backbone_name=group_choice(cfg, "backbone"),
            data_channels=data_input_channels(data),
        )
        make_network = network_factory(cfg.im, cfg.gate, data.num_classes, cfg.policy, objective)
        check_network_builds(make_network, backbone)
    for warning in calibration_warnings(calibration_size(data, settings.conformal), settings.conformal.alphas):
        log.warning(warning)
    try:
        metrics = run_experiment(data, backbone, make_network, objective, settings, output_dir, config=to_plain(cfg))
    finally:
        distributed.shutdown()
    if world.main:
        log.info("results written to %s (%d process%s)", output_dir, world.size, "es" if world.distributed else "")
    return metrics.get("accuracy")


def group_choice(cfg: DictConfig, group: str) -> str:
    """What the user chose for config group ``group`` (``data=mutag``), as errors should name it;
    the node's own ``name`` (``tu``) when Hydra did not compose ``cfg``."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return str(choice)
    return str(cfg[group].name)


def calibration_size(data: DataSplits, conformal: ConformalSettings) -> int:
    """Calibration samples of the (global) conformal sets: the cal split, or half the test split."""
    return data.size("cal") if conformal.calibrate_on == "cal" else data.size("test") // 2


@hydra.main(config_path="pkg://jei.configs", config_name="train", version_base="1.3")
@cli_main("jei-train")
def train_main(cfg: DictConfig) -> float:
    return train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    train_main()
