"""The backbone adapter contract (``jei.testing``), checked on every built-in adapter.

To cover a new adapter, add one ``BackboneCase`` to ``CASES``: its registry name, constructor
kwargs (num_classes included, no weights) and a function making a batch of inputs. Plugin
authors call the same ``jei.testing.check_backbone`` from their own tests.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from jei.backbones.base import FrozenBackbone
from jei.registry import BACKBONES, GATES, IMS
from jei.testing import check_backbone, check_gate, check_im, check_select_keeps_rows


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
    BackboneCase("timm", {"model_name": "test_resnet", "num_classes": 4, "exits": [2, 4]}, images(3, 32)),
    BackboneCase("timm", {"model_name": "test_convnext", "num_classes": 4, "exits": {"every": 2}}, images(3, 32)),
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
    return BACKBONES.build(case.name, **case.kwargs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backbone_keeps_the_contract(case: BackboneCase) -> None:
    """Specs before forward, freezing, shapes, segment-by-segment = all-exits pass, select()."""
    model = build(case)
    check_backbone(model, case.make_inputs(4, torch.Generator().manual_seed(0)), num_classes=case.kwargs["num_classes"])
    assert model.frozen  # check_backbone freezes it, as the trainer does


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(deadline=None, max_examples=20)
@given(data=st.data())
def test_dropping_samples_between_segments_keeps_their_rows(case: BackboneCase, data: st.DataObject) -> None:
    """Any keep pattern, in any order (real early exit uses the sorted one), keeps the rows."""
    model = build(case).freeze()
    batch = data.draw(st.integers(1, 4), label="batch")
    inputs = case.make_inputs(batch, torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed")))
    plan, alive = [], batch
    for _ in range(model.num_gates):
        kept = [position for position in range(alive) if data.draw(st.booleans(), label="keep")]
        plan.append(data.draw(st.permutations(kept), label="order"))
        alive = len(kept)
    check_select_keeps_rows(model, inputs, plan)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_builtin_heads_keep_their_contract_on_every_exit(case: BackboneCase) -> None:
    model = build(case).freeze()
    num_classes = case.kwargs["num_classes"]
    out = model.forward_exits(case.make_inputs(3, torch.Generator().manual_seed(1)))
    for im_name in IMS.names():
        for spec, feature in zip(model.exit_specs, out.features):
            check_im(IMS.build(im_name, spec=spec, num_classes=num_classes), spec, feature, num_classes)
    for gate_name in GATES.names():
        check_gate(GATES.build(gate_name, num_classes=num_classes), num_classes)


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
