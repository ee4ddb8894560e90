"""`jei.testing`: each contract check catches the bug it is there for, with a clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from jei.backbones.base import SequentialBackbone, resolve_exits
from jei.heads.gates import UncertaintyGate
from jei.heads.ims import PoolLinearIM
from jei.testing import check_backbone, check_gate, check_im
from jei.types import ExitSpec


class ToyNet(SequentialBackbone):
    """Four conv blocks and a linear head: the smallest sequential adapter."""

    def __init__(self, num_classes: int = 3, exits="all", width: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width), nn.Tanh())
            for i in range(4)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
        positions = resolve_exits(exits, len(self.blocks))
        self.exit_specs = tuple(ExitSpec(i, f"blocks.{k - 1}", "map", width, 1) for i, k in enumerate(positions))
        self.set_segments(self.blocks, positions)

    def finish(self, state: Tensor) -> Tensor:
        return self.head(state)


def inputs(batch: int = 4) -> Tensor:
    return torch.randn(batch, 2, 6, 6, generator=torch.Generator().manual_seed(0))


def test_a_correct_sequential_adapter_passes() -> None:
    torch.manual_seed(0)
    model = ToyNet(exits={"every": 2})
    assert [s.name for s in model.exit_specs] == ["blocks.1"]
    check_backbone(model, inputs(), num_classes=3)
    assert model.frozen and not model.training


class UnorderedSelect(ToyNet):
    def select(self, state: Tensor, keep: Tensor) -> Tensor:
        return state[keep.sort().values]  # ignores the order it was given


class MixesSamples(ToyNet):
    def run_segment(self, index: int, state: Tensor) -> Tensor:
        state = super().run_segment(index, state)
        return state if index == self.num_gates else state - state.mean(0, keepdim=True)  # batch statistics


class WrongChannels(ToyNet):
    def __init__(self) -> None:
        super().__init__()
        self.exit_specs = tuple(ExitSpec(s.index, s.name, s.kind, 8, s.reduction) for s in self.exit_specs)


class WrongKind(ToyNet):
    def __init__(self) -> None:
        super().__init__()
        self.exit_specs = tuple(ExitSpec(s.index, s.name, "vector", s.channels) for s in self.exit_specs)


class LazySpecs(ToyNet):
    def __init__(self) -> None:
        super().__init__()
        self._specs = self.exit_specs
        del self.exit_specs

    def forward_exits(self, inputs):
        self.exit_specs = self._specs
        return super().forward_exits(inputs)


class TrainsWhenAsked(ToyNet):
    def train(self, mode: bool = True):
        return nn.Module.train(self, mode)  # undoes the freeze


class InplaceAfterExit(ToyNet):
    def run_segment(self, index: int, state: Tensor) -> Tensor:
        if index > 0:
            state.mul_(2.0)  # changes the tensor the previous exit handed out
        return super().run_segment(index, state)


class HeadIgnoresForward(ToyNet):
    def forward(self, inputs: Tensor) -> Tensor:
        return torch.zeros(len(inputs), self.num_classes)


class WrongLogitWidth(ToyNet):
    def finish(self, state: Tensor) -> Tensor:
        return super().finish(state)[:, :2]


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (UnorderedSelect, r"after dropping samples differs .*select\(state, keep\)"),
        (MixesSamples, r"no segment may mix samples|mixes samples"),
        (WrongChannels, r"ExitSpec says kind='map' \[B, C, H, W\] with C=8, but the representation has shape \(4, 4, 6, 6\)"),
        (WrongKind, r"kind='vector' \[B, C\]"),
        (LazySpecs, r"has no exit_specs: .*before any forward pass"),
        (TrainsWhenAsked, r"in training mode after \.train\(\) on a frozen backbone"),
        (InplaceAfterExit, r"change the state in place"),
        (HeadIgnoresForward, r"backbone\(inputs\) differs from forward_exits"),
        (WrongLogitWidth, r"expected \[batch, num_classes\] = \(4, 3\)"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else "",
)
def test_each_broken_backbone_fails_with_its_rule(broken: type, message: str) -> None:
    torch.manual_seed(0)
    model = broken()
    with pytest.raises(AssertionError, match=message):
        check_backbone(model, inputs())


def test_dropout_left_active_is_caught() -> None:
    class Dropping(ToyNet):
        def finish(self, state: Tensor) -> Tensor:
            return super().finish(nn.functional.dropout(state, 0.5, training=True))

    with pytest.raises(AssertionError, match="must be deterministic"):
        check_backbone(Dropping(), inputs())


def test_exit_specs_themselves_are_checked() -> None:
    model = ToyNet()
    model.exit_specs = (ExitSpec(1, "blocks.0", "map", 4, 1),)
    with pytest.raises(AssertionError, match=r"index is 1; indices must be 0\.\.G-1"):
        check_backbone(model, inputs())
    model.exit_specs = (ExitSpec(0, "a", "map", 4, 1), ExitSpec(1, "a", "map", 4, 1))
    with pytest.raises(AssertionError, match="exit names repeat"):
        check_backbone(model, inputs())
    with pytest.raises(AssertionError, match=r"num_classes is 3, expected 5"):
        check_backbone(ToyNet(), inputs(), num_classes=5)
    with pytest.raises(AssertionError, match="at least 2 samples"):
        check_backbone(ToyNet(), inputs(batch=1))


def test_check_im_accepts_the_builtin_and_names_broken_ims() -> None:
    spec = ExitSpec(0, "blocks.0", "map", 4, 1)
    feature = torch.randn(5, 4, 3, 3)
    check_im(PoolLinearIM(spec, num_classes=3), spec, feature, 3)

    class TrainablePool(PoolLinearIM):
        def __init__(self, spec: ExitSpec, num_classes: int) -> None:
            super().__init__(spec, num_classes)
            self.scale = nn.Parameter(torch.ones(()))

        def pool(self, features: Tensor) -> Tensor:
            return super().pool(features) * self.scale

    with pytest.raises(AssertionError, match="pool has trainable parameters"):
        check_im(TrainablePool(spec, 3), spec, feature, 3)

    class NoPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, features: Tensor) -> Tensor:
            return self.linear(features.mean((2, 3)))

    with pytest.raises(AssertionError, match=r"has no pool\(\)"):
        check_im(NoPool(), spec, feature, 3)
    with pytest.raises(AssertionError, match=r"im\(features\) returned shape \(5, 3\), expected .* \(5, 4\)"):
        check_im(PoolLinearIM(spec, num_classes=3), spec, feature, 4)
    with pytest.raises(AssertionError, match=r"ExitSpec says kind='map'"):
        check_im(PoolLinearIM(spec, num_classes=3), spec, torch.randn(5, 4), 3)


def test_check_gate_accepts_the_builtin_and_names_broken_gates() -> None:
    check_gate(UncertaintyGate(num_classes=4), 4)

    class KeepsDim(UncertaintyGate):
        def forward(self, logits: Tensor) -> Tensor:
            return super().forward(logits).unsqueeze(-1)

    with pytest.raises(AssertionError, match=r"has shape \(8, 1\), expected \[8\]"):
        check_gate(KeepsDim(4), 4)

    class RawExp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(1, 1)

        def forward(self, logits: Tensor) -> Tensor:
            return self.linear(logits.exp().sum(-1, keepdim=True)).squeeze(-1)

    with pytest.raises(AssertionError, match="not finite for extreme IM logits"):
        check_gate(RawExp(), 4)

    class BatchNormed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, logits: Tensor) -> Tensor:
            z = self.linear(logits).squeeze(-1)
            return z - z.mean()

    with pytest.raises(AssertionError, match="depends on the other samples"):
        check_gate(BatchNormed(), 4)


def test_jei_testing_imports_neither_pytest_nor_hypothesis() -> None:
    code = "import sys, jei.testing; print(sorted(m for m in ('pytest', 'hypothesis', '_pytest') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_native_representation_that_does_not_describe_represent_is_caught() -> None:
    """A backbone's ``native_represent`` (the class token's LayerNorm) must be what ``represent``
    computes: native exits would compute it instead."""
    from jei.backbones.timm_adapter import TimmBackbone

    torch.manual_seed(0)
    backbone = TimmBackbone("test_vit", num_classes=3, exits=[1])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    check_backbone(backbone, images)  # the adapter's own form describes its represent
    norm = backbone.model.norm
    backbone.native_represent = lambda index: ("class_token_layer_norm", norm.weight, norm.bias + 1.0, norm.eps)
    with pytest.raises(AssertionError, match=r"native_represent\(0\) does not describe represent"):
        check_backbone(backbone, images)
