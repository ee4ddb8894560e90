"""Every backbone family composes with a matching dataset from config groups alone, and builds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from jei.build import build_backbone, build_data, build_objective, build_settings, network_factory
from jei.features import to_device

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHARED_DATA = Path(os.environ.get("JEI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def compose_train(overrides: list[str]):
    with initialize_config_module("jei.configs", version_base="1.3"):
        return compose("train", overrides=[f"paths.shared_data={SHARED_DATA}", *overrides])


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_resolves(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["task_name"] == experiment
    build_settings(cfg)  # trainer, conformal and device settings validate
    build_objective(cfg.objective)


# (backbone option, data option, extra overrides): one case per backbone family.
FAMILIES = [
    ("small_cnn", "digits", []),
    ("cifar_resnet", "cifar10", ["backbone.depth=20", "backbone.weights=null"]),
    ("timm_resnet", "cifar10", []),
    ("timm_vit", "cifar10", ["backbone.input_size=null",
                             "++backbone.model_kwargs={img_size: 32, patch_size: 8, depth: 3, embed_dim: 32, num_heads: 2}"]),
    ("t2t_vit_7", "cifar10", ["backbone.img_size=32", "backbone.input_size=null"]),
    ("graph_gps", "enzymes", ["im=pool_mlp", "backbone.hidden=16", "backbone.layers=2", "backbone.heads=2"]),
]


@pytest.mark.parametrize(("backbone", "data", "extra"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_backbone_family_builds_from_config_groups(backbone, data, extra, tmp_path):
    if data != "digits" and not SHARED_DATA.is_dir():
        pytest.skip(f"offline data folder {SHARED_DATA} is absent (set JEI_SHARED_DATA)")
    if backbone == "graph_gps":
        pytest.importorskip("torch_geometric")
    cfg = compose_train([f"backbone={backbone}", f"data={data}", "data.max_per_split=4",
                         f"paths.cache_dir={tmp_path}", *extra])
    dataset = build_data(cfg.data)
    model = build_backbone(cfg.backbone, dataset).freeze()
    network = network_factory(cfg.im, cfg.gate, dataset.num_classes)(model)
    inputs, labels = next(dataset.batches("test", 4))
    outputs = network(to_device(inputs, torch.device("cpu")))
    assert outputs.logits.shape == (model.num_gates + 1, len(labels), dataset.num_classes)
    assert outputs.gate_logits.shape == (len(labels), model.num_gates)
