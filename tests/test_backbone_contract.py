"""The backbone adapter contract, checked on every adapter with a tiny configuration.

To cover a new adapter, add one ``BackboneCase`` to ``CASES``: its registry name, constructor
kwargs (num_classes included, no weights) and a function making a batch of inputs.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from jei.backbones.base import FrozenBackbone
from jei.registry import BACKBONES
from jei.types import ExitSpec


@dataclass(frozen=True)
class BackboneCase:
    name: str  # registry name
    kwargs: dict[str, Any]  # constructor kwargs, num_classes included, no weights
    make_inputs: Callable[[int, torch.Generator], Any]  # (batch size, generator) -> what begin() takes

    @property
    def id(self) -> str:
        return f"{self.name}-{'-'.join(f'{k}={v}' for k, v in self.kwargs.items())}"


def images(channels: int, size: int) -> Callable[[int, torch.Generator], Tensor]:
    """Random [B, channels, size, size] images."""
    return lambda batch, gen: torch.randn(batch, channels, size, size, generator=gen)


def graphs(in_channels: int, pe_dim: int, edge_dim: int | None) -> Callable[[int, torch.Generator], Any]:
    """A PyG Batch of random graphs of 1..6 nodes, with the random-walk PE slot GraphGPS reads."""

    def make(batch: int, gen: torch.Generator) -> Any:
        from torch_geometric.data import Batch, Data

        items = []
        for _ in range(batch):
            n = int(torch.randint(1, 7, (1,), generator=gen))
            edges = {"edge_index": torch.randint(0, n, (2, 2 * n), generator=gen)}
            if edge_dim is not None:
                edges["edge_attr"] = torch.randn(2 * n, edge_dim, generator=gen)
            pe = torch.rand(n, pe_dim, generator=gen)
            items.append(Data(x=torch.randn(n, in_channels, generator=gen), random_walk_pe=pe, **edges))
        return Batch.from_data_list(items)

    return make


CASES = [
    BackboneCase(
        "small_cnn",
        {"in_channels": 1, "num_classes": 5, "widths": (8, 8, 8), "strides": (1, 2, 1), "exits": (1, 2)},
        images(1, 8),
    ),
    BackboneCase("cifar_resnet", {"depth": 8, "num_classes": 7, "exit_every": 1}, images(3, 16)),
    BackboneCase("cifar_resnet", {"depth": 8, "num_classes": 3, "exit_every": None, "exits": [2]}, images(3, 9)),
    BackboneCase("timm", {"model_name": "test_vit", "num_classes": 4, "token": "mean"}, images(3, 32)),
    BackboneCase("timm", {"model_name": "test_resnet", "num_classes": 4, "exits": [1, 3]}, images(3, 32)),
    BackboneCase("t2t_vit", {"variant": "t2t_vit_7", "num_classes": 4, "img_size": 32}, images(3, 32)),
]
if importlib.util.find_spec("torch_geometric") is not None:  # the optional [graph] extra
    CASES.append(
        BackboneCase(
            "graph_gps",
            {"num_classes": 3, "in_channels": 4, "hidden": 8, "layers": 3, "heads": 2, "pe_dim": 3, "edge_dim": 2},
            graphs(4, 3, 2),
        )
    )
IDS = [case.id for case in CASES]


def build(case: BackboneCase) -> FrozenBackbone:
    torch.manual_seed(0)
    return BACKBONES.build(case.name, **case.kwargs).freeze()


def check_feature(feature: Tensor, spec: ExitSpec, batch: int, inputs: Any) -> None:
    assert feature.shape[0] == batch, f"exit {spec.name}: batch axis {feature.shape[0]} != {batch}"
    assert not torch.isnan(feature).any(), f"exit {spec.name} has NaNs"
    if spec.kind == "map":
        assert feature.ndim == 4 and feature.shape[1] == spec.channels, f"{spec}: got {tuple(feature.shape)}"
        if isinstance(inputs, Tensor) and inputs.ndim == 4 and spec.reduction:
            for size, full in zip(feature.shape[2:], inputs.shape[2:]):
                assert size <= math.ceil(full / spec.reduction) + 1, f"{spec}: spatial {tuple(feature.shape)}"
    elif spec.kind == "tokens":
        assert feature.ndim == 3 and feature.shape[2] == spec.channels, f"{spec}: got {tuple(feature.shape)}"
    else:
        assert spec.kind == "vector", f"unknown exit kind {spec.kind!r}"
        assert feature.ndim == 2 and feature.shape[1] == spec.channels, f"{spec}: got {tuple(feature.shape)}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_agree_with_exit_specs(case: BackboneCase) -> None:
    model = build(case)
    inputs = case.make_inputs(3, torch.Generator().manual_seed(0))
    batch = model.batch_size(inputs)
    out = model.forward_exits(inputs)
    assert model.num_gates >= 1
    assert len(out.features) == len(model.exit_specs) == model.num_gates
    assert [spec.index for spec in model.exit_specs] == list(range(model.num_gates))
    assert len({spec.name for spec in model.exit_specs}) == model.num_gates
    for feature, spec in zip(out.features, model.exit_specs):
        check_feature(feature, spec, batch, inputs)
    assert out.logits.shape == (batch, case.kwargs["num_classes"]) and model.num_classes == case.kwargs["num_classes"]
    assert not torch.isnan(out.logits).any()
    torch.testing.assert_close(model(inputs), out.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_frozen_backbone_stays_frozen_in_eval_mode(case: BackboneCase) -> None:
    model = build(case)
    assert model.frozen
    assert all(not p.requires_grad for p in model.parameters())
    wrapper = nn.ModuleDict({"backbone": model, "head": nn.Linear(2, 2)})
    wrapper.train()  # as a trainer does on the whole early-exit network
    model.train()
    assert wrapper["head"].training
    assert not any(module.training for module in model.modules())


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(deadline=None, max_examples=20)
@given(data=st.data())
def test_dropping_samples_between_segments_keeps_their_rows(case: BackboneCase, data: st.DataObject) -> None:
    """Early-exit inference drops exited samples with ``select``; the rest must not change."""
    model = build(case)
    batch = data.draw(st.integers(1, 4), label="batch")
    inputs = case.make_inputs(batch, torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed")))
    full = model.forward_exits(inputs)

    alive = torch.arange(batch)
    with torch.no_grad():
        state = model.begin(inputs)
        for index in range(model.num_gates):
            state = model.run_segment(index, state)
            torch.testing.assert_close(model.represent(index, state), full.features[index][alive], atol=1e-5, rtol=1e-5)
            keep_mask = data.draw(st.lists(st.booleans(), min_size=len(alive), max_size=len(alive)), label="keep")
            if not any(keep_mask):
                return  # everyone exited: inference stops here
            # select() must honour any order, not only the sorted one inference uses.
            kept = [position for position, flag in enumerate(keep_mask) if flag]
            keep = torch.tensor(data.draw(st.permutations(kept), label="order"))
            state, alive = model.select(state, keep), alive[keep]
        logits = model.run_segment(model.num_gates, state)
    torch.testing.assert_close(logits, full.logits[alive], atol=1e-5, rtol=1e-5)


def test_every_builtin_backbone_has_a_case() -> None:
    """A built-in adapter whose module exists must be covered by CASES."""
    covered = {case.name for case in CASES}
    missing = []
    for name in BACKBONES.names():
        try:
            factory = BACKBONES.get(name)
        except ImportError:
            continue  # not written yet, or its optional dependency is absent
        if factory.__module__.startswith("jei.") and name not in covered:
            missing.append(name)
    assert not missing, f"add a BackboneCase to CASES for: {', '.join(missing)}"
