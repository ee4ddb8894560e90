"""One numbering for ``backbone.exits`` on every adapter: position k is "after block k", from 1."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from jei.backbones.base import Segments, resolve_exits
from jei.registry import BACKBONES


def test_all_every_and_lists() -> None:
    assert resolve_exits("all", 5) == [1, 2, 3, 4]
    assert resolve_exits({"every": 2}, 5) == [2, 4]
    assert resolve_exits({"every": 3}, 27) == [3, 6, 9, 12, 15, 18, 21, 24]
    assert resolve_exits([1, 3], 5) == [1, 3]
    assert resolve_exits((4,), 5) == [4]


@pytest.mark.parametrize(
    ("exits", "message"),
    [
        ([0], r"backbone\.exits: exit position 0 is outside 1\.\.4 \(position k is after block k"),
        ([5], r"exit position 5 is outside 1\.\.4 .*5 blocks and the last one feeds its own head"),
        ([3, 2], r"strictly increasing"),
        ([2, 2], r"strictly increasing"),
        ([], r"at least one exit position"),
        ([1.5], r"exit positions are integers"),
        ([True], r"exit positions are integers"),
        ("some", r"backbone\.exits must be 'all', \{every: k\} or a list"),
        (None, r"backbone\.exits must be 'all', \{every: k\} or a list .*got None"),
        (3, r"got 3"),
        ({"every": 0}, r"backbone\.exits\.every must be an integer in 1\.\.4"),
        ({"every": 5}, r"backbone\.exits\.every must be an integer in 1\.\.4"),
        ({"each": 2}, r"a mapping must be \{every: k\}"),
    ],
)
def test_bad_choices_name_backbone_exits_and_the_range(exits: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_exits(exits, 5)  # type: ignore[arg-type]


def test_too_shallow_backbones_and_custom_fields() -> None:
    with pytest.raises(ValueError, match="has 1 layer"):
        resolve_exits("all", 1, unit="layer")
    with pytest.raises(ValueError, match=r"my\.field: exit position 3 is outside 1\.\.2 \(position k is after stage k"):
        resolve_exits([3], 3, field="my.field", unit="stage")


def test_segments_cut_blocks_after_each_position() -> None:
    segments = Segments([2, 3], 5)
    assert len(segments) == 3 and segments.bounds == [0, 2, 3, 5]
    assert [list(range(5))[segments.blocks(i)] for i in range(3)] == [[0, 1], [2], [3, 4]]
    with pytest.raises(ValueError, match="strictly inside"):
        Segments([0], 5)


# Every adapter with exits=[2]: the first exit sits after its second block.
AFTER_SECOND_BLOCK = [
    ("small_cnn", {"in_channels": 1, "num_classes": 3, "widths": (4, 4, 4), "strides": (1, 1, 1)}, "blocks.1"),
    ("cifar_resnet", {"depth": 20, "num_classes": 3, "exit_every": None}, "layer1.1"),
    ("t2t_vit", {"variant": "t2t_vit_7", "num_classes": 3, "img_size": 32}, "blocks.1"),
    ("timm", {"model_name": "test_vit", "num_classes": 3}, "blocks.1"),
    ("timm", {"model_name": "test_resnet", "num_classes": 3}, "layer1"),  # tap 1 is the stem (act1)
]
if importlib.util.find_spec("torch_geometric") is not None:
    AFTER_SECOND_BLOCK.append(("graph_gps", {"num_classes": 3, "in_channels": 2, "hidden": 8, "heads": 2}, "layers.1"))


@pytest.mark.parametrize(("name", "kwargs", "module"), AFTER_SECOND_BLOCK, ids=[f"{c[0]}-{c[2]}" for c in AFTER_SECOND_BLOCK])
def test_position_k_means_after_block_k_on_every_adapter(name: str, kwargs: dict, module: str) -> None:
    backbone = BACKBONES.build(name, exits=[2], **kwargs)
    assert [spec.name for spec in backbone.exit_specs] == [module]
    everything = BACKBONES.build(name, exits="all", **kwargs)
    assert everything.exit_specs[1].name == module
    with pytest.raises(ValueError, match=r"backbone\.exits: exit position 99 is outside 1\.\."):
        BACKBONES.build(name, exits=[99], **kwargs)
    every = BACKBONES.build(name, exits={"every": 2}, **kwargs)
    assert every.exit_specs[0].name == module
    assert [spec.name for spec in every.exit_specs] == [spec.name for spec in everything.exit_specs[1::2]]


def _backbone_node(*overrides: str) -> dict:
    with initialize_config_module("jei.configs", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    node = OmegaConf.to_container(cfg.backbone, resolve=True)
    node.pop("weights", None)
    return node


def _exit_names(node: dict, **extra: object) -> list[str]:
    name = node.pop("name")
    torch.manual_seed(0)
    return [spec.name for spec in BACKBONES.build(name, **{**node, **extra}).exit_specs]


def test_shipped_configs_keep_their_exit_modules() -> None:
    # The CIFAR-10 ResNet-56 experiment: after every third residual block, 8 exits.
    names = _exit_names(_backbone_node("experiment=cifar10_resnet56"), num_classes=10)
    assert names == ["layer1.2", "layer1.5", "layer1.8", "layer2.2", "layer2.5", "layer2.8", "layer3.2", "layer3.5"]
    assert len(_exit_names(_backbone_node("backbone=cifar_resnet"), num_classes=10)) == 26
    assert _exit_names(_backbone_node("backbone=timm_resnet"), num_classes=10) == ["layer1", "layer2", "layer3"]
    assert _exit_names(_backbone_node("backbone=small_cnn"), num_classes=10, in_channels=1) == [
        "blocks.0", "blocks.1", "blocks.2"
    ]
    vit = _backbone_node("experiment=cifar10_vit")
    assert _exit_names(vit, num_classes=10) == [f"blocks.{i}" for i in range(5)]
    t2t = _backbone_node("backbone=t2t_vit_7", "backbone.img_size=32", "backbone.input_size=null")
    assert _exit_names(t2t, num_classes=10) == [f"blocks.{i}" for i in range(6)]


def test_shipped_graph_config_exits_after_every_layer_but_the_last() -> None:
    pytest.importorskip("torch_geometric")
    node = _backbone_node("experiment=proteins_gps")
    assert node["exits"] == "all"
    assert _exit_names(node, num_classes=2, in_channels=3) == ["layers.0", "layers.1", "layers.2"]


def test_a_sequential_adapter_with_specs_and_cuts_out_of_step_says_so() -> None:
    from torch import nn

    from jei.backbones.base import SequentialBackbone
    from jei.types import ExitSpec

    class Mismatched(SequentialBackbone):
        def __init__(self) -> None:
            super().__init__()
            self.num_classes = 2
            self.blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
            self.exit_specs = (ExitSpec(0, "blocks.0", "vector", 3),)  # one spec...
            self.set_segments(self.blocks, resolve_exits("all", 3))  # ...for two cuts

        def finish(self, state):
            return state[:, :2]

    with pytest.raises(RuntimeError, match="exit_specs has 1 exits but set_segments cut the blocks into 3 segments"):
        Mismatched().forward_exits(torch.randn(2, 3))
