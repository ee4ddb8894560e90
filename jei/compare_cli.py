"""``jei-compare`` (Hydra): the composition root of a comparison (see ``jei.compare``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import jei.run_dir  # noqa: F401  (registers the run-dir resolver)
from jei.build import build_backbone, build_data, build_settings, network_factory, to_plain
from jei.errors import ConfigError, cli_main, config_errors
from jei.compare import Comparison, Method, crossfit_folds, markdown, memorisation_warnings, merge_gate, plot
from jei.io import atomic_write, write_json
from jei.pipeline import backbone_options, prepare, seed_everything
from jei.validate import check_data

log = logging.getLogger(__name__)


def parse_methods(node: Any, include: list[str] | None) -> list[Method]:
    plain = to_plain(node) or {}
    if not isinstance(plain, dict) or not plain:
        raise ValueError("methods must map method names to {objective, policy, sweep}")
    unknown = sorted(set(include or []) - set(plain))
    if unknown:
        raise ValueError(f"include: unknown method(s) {', '.join(unknown)}; configured: {', '.join(plain)}")
    chosen = [name for name in plain if include is None or name in include]
    return [Method(name, dict(plain[name]["objective"]), dict(plain[name]["policy"]), dict(plain[name]["sweep"]),
                   plain[name].get("gate"))
            for name in chosen]


def compare(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Validate the methods, then train and evaluate them all; write compare.json/.md/.png."""
    with config_errors():
        settings = build_settings(cfg)
        methods = parse_methods(cfg.methods, to_plain(cfg.include))
        reference = str(cfg.reference)
        if reference not in [m.name for m in methods]:
            raise ValueError(f"reference={reference!r} is not among the methods compared: {[m.name for m in methods]}")
        budget = cfg.budget
        if budget is not None and not 0 < float(budget) <= 1:
            raise ValueError(f"budget must be a target expected cost in (0, 1], got {budget}")
        protocol = str(cfg.protocol)
        if protocol not in ("standard", "crossfit"):
            raise ConfigError(f"protocol must be 'standard' or 'crossfit', got {protocol!r}", "protocol")
        crossfit_ims = str(cfg.crossfit_ims)
        if crossfit_ims not in ("folds", "train"):
            raise ConfigError(f"crossfit_ims must be 'folds' or 'train', got {crossfit_ims!r}", "crossfit_ims")
        ims_on_train = protocol == "crossfit" and crossfit_ims == "train"
        seed_everything(settings.seed)
        data = build_data(cfg.data)
        check_data(data, data.num_classes)
        backbone = build_backbone(cfg.backbone, data)
    template = network_factory(cfg.im, cfg.gate, data.num_classes)
    network, costs, splits, train, _ = prepare(
        data, backbone, template, settings, output_dir, only_test=protocol == "crossfit" and not ims_on_train
    )
    if protocol == "crossfit":
        folds = crossfit_folds(splits["test"], int(cfg.folds), settings.seed)
        if ims_on_train:  # IM-only phases learn from the training images; everything else from test folds
            folds = [{**fold, "ims_train": train} for fold in folds]
            log.info("crossfit_ims=train: IMs fitted on the %d training images; gates, temperatures, thresholds "
                     "and conformal sets on the test folds", len(train))
    else:
        folds = [{"train": train, **splits}]
    warnings = memorisation_warnings(folds[0]["train"], folds[0]["test"], protocol)
    for warning in warnings:
        log.warning(warning)

    def make_network(objective: Any, policy: dict[str, Any], gate: dict[str, Any] | None = None):
        gate_node = cfg.gate if gate is None else merge_gate(to_plain(cfg.gate), gate)
        return network_factory(cfg.im, gate_node, data.num_classes, policy, objective)(network.backbone).to(settings.device)

    comparison = Comparison(
        make_network, folds, costs.normalized, settings, output_dir, float(cfg.alpha),
        fingerprint=str([to_plain(cfg.data), to_plain(cfg.backbone), to_plain(cfg.im), to_plain(cfg.gate),
                         to_plain(cfg.trainer.exits), protocol, int(cfg.folds) if protocol == "crossfit" else None]
                        + (["ims on train"] if ims_on_train else []) + backbone_options(settings)),
    )
    result = comparison.run(methods, [float(c) for c in cfg.matched_costs], reference,
                            None if budget is None else float(budget), int(cfg.budget_iterations))
    result["protocol"] = protocol
    result["warnings"] = warnings
    result["config"] = to_plain(cfg)
    table = markdown(result, reference)
    atomic_write(output_dir / "compare.md", lambda tmp: tmp.write_text(table))
    plot(result, output_dir / "compare.png")
    write_json(output_dir / "compare.json", result)
    print(table)
    log.info("comparison written to %s", output_dir)
    return result


@hydra.main(config_path="pkg://jei.configs", config_name="compare", version_base="1.3")
@cli_main("jei-compare")
def compare_main(cfg: DictConfig) -> None:
    compare(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    compare_main()
