"""What keeps real early exit cheap (jei.model.stream_exits), and that it stays exact: no
compaction at an exit nobody leaves, no segment after everyone left, one host read per exit,
no gate evaluated for a policy that ignores gates; plus a smoke run of the speed benchmark's
measurements."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from jei.model import predict_from_outputs
from jei.policies import ConfidenceThreshold, GateThreshold, JEIRule, Patience, confidence

from .helpers import tiny_network

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def counting(network):
    """Wrap the backbone's run_segment/select and the gates to count their calls."""
    calls = {"segments": [], "select": 0, "gates": 0}
    backbone = network.backbone
    run_segment, select = backbone.run_segment, backbone.select

    def counted_segment(index, state):
        calls["segments"].append(index)
        return run_segment(index, state)

    def counted_select(state, keep):
        calls["select"] += 1
        return select(state, keep)

    backbone.run_segment, backbone.select = counted_segment, counted_select
    for gate in network.gates:
        gate.register_forward_hook(lambda *_: calls.__setitem__("gates", calls["gates"] + 1))
    return calls


def inputs(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_nothing_is_compacted_when_nobody_leaves():
    network = tiny_network(0)
    network.policy = ConfidenceThreshold("max_prob", float("inf"))
    calls = counting(network)
    result = network.early_exit(inputs(16))
    assert calls["select"] == 0 and calls["segments"] == [0, 1, 2, 3]
    assert (result.exit_index == network.num_gates).all()


def test_no_segment_runs_once_everyone_left():
    network = tiny_network(0)
    network.policy = ConfidenceThreshold("max_prob", 0.0)  # everyone leaves at exit 0
    calls = counting(network)
    result = network.early_exit(inputs(16))
    assert calls["segments"] == [0] and calls["select"] == 0
    assert (result.exit_index == 0).all()


def test_gates_run_only_for_policies_that_read_them():
    network = tiny_network(0)
    calls = counting(network)
    network.policy = ConfidenceThreshold("max_prob", float("inf"))
    network.early_exit(inputs(8))
    assert calls["gates"] == 0
    network.policy = JEIRule()
    with torch.no_grad():
        expected = predict_from_outputs(network(inputs(8)), network.policy)
    calls["gates"] = 0
    network.early_exit(inputs(8))
    assert calls["gates"] == int((expected.exit_index.clamp(max=network.num_gates - 1) + 1).max())


class HostReads(TorchFunctionMode):
    """Counts the tensor operations that read values back to the host (a sync on a GPU)."""

    READS: ClassVar[set[str]] = {"item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero", "unique"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy", [JEIRule(), ConfidenceThreshold("max_prob", 0.3), Patience(2)])
def test_one_host_read_per_exit(policy):
    """The temperatures once, then one count per exit visited: nothing else syncs."""
    network = tiny_network(2, gate_bias=-1.0)
    network.policy = policy
    batch = inputs(32)
    with torch.no_grad():
        expected = predict_from_outputs(network(batch), policy)
    visited = min(int(expected.exit_index.max()) + 1, network.num_gates)
    with HostReads() as mode:
        result = network.early_exit(batch)
    assert torch.equal(result.exit_index, expected.exit_index)
    assert len(mode.reads) == 1 + visited, mode.reads


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 12), st.sampled_from(["jei", "max_prob", "gate", "patience"]), st.booleans())
def test_exact_with_temperature_and_ensemble(seed, batch, kind, ensemble):
    """The fast paths (uncompacted runs, skipped unit temperatures, ensembles) stay exact."""
    network = tiny_network(seed % 7, gate_bias=(seed % 5) - 2.0)
    network.ensemble_decay = 0.5 if ensemble else 0.0
    temperature = 1.0 + torch.rand(4, generator=torch.Generator().manual_seed(seed))
    temperature[seed % 4] = 1.0  # one exact 1: its division is skipped
    network.temperature.copy_(temperature)
    network.policy = {
        "jei": JEIRule(), "max_prob": ConfidenceThreshold("max_prob", [0.3, 0.25, 0.3]),
        "gate": GateThreshold(0.5), "patience": Patience(2),
    }[kind]
    x = inputs(batch, seed)
    with torch.no_grad():
        expected = predict_from_outputs(network(x), network.policy)
    actual = network.early_exit(x)
    assert torch.equal(actual.exit_index, expected.exit_index)
    assert actual.exit_index.device == actual.logits.device
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_select_default_gathers_rows_in_order():
    network = tiny_network(0)
    state = torch.arange(24.0).view(6, 4)
    keep = torch.tensor([4, 0, 5])
    assert torch.equal(network.backbone.select(state, keep), state[keep])


def test_speed_measurements_run_on_the_tiny_network():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import speed_common
    finally:
        sys.path.remove(str(BENCHMARKS))
    network = tiny_network(3, gate_bias=-0.5)
    costs = speed_common.exit_costs(network, inputs(2))
    device = torch.device("cpu")
    batch = speed_common.measure_batches(network, [inputs(16), inputs(16, 2)], 2, costs, device)
    latency = speed_common.measure_latency(network, [inputs(1, s) for s in range(6)], costs, device, warmup=1)
    for result in (batch, latency):
        assert result.segment_shares[-1] == pytest.approx(1.0)
        assert all(b >= a for a, b in zip(result.segment_shares, result.segment_shares[1:]))
        assert 0 < result.ideal <= 1 and result.ideal <= result.ideal_with_heads
        assert 0 < result.expected_cost <= 1 and sum(result.exit_fractions) == pytest.approx(1.0)
    assert batch.samples == 32 and batch.time_ratio > 0 and batch.running_ideal > 0
    assert latency.backbone_ms["p99"] >= latency.backbone_ms["p50"] > 0
    table = speed_common.markdown_tables([speed_common.Row("tiny", "jei", batch, latency)])
    assert table.count("| tiny | jei |") == 2
    assert speed_common.ideal_ratio([0.5, 0.5], [0.25, 1.0]) == pytest.approx(0.625)


def test_running_segments_run_each_segment_on_the_samples_still_running(monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import speed_common
    finally:
        sys.path.remove(str(BENCHMARKS))
    network = tiny_network(3)
    backbone, seen = network.backbone, []
    run_segment = backbone.run_segment

    def recording(index, state):
        seen.append((index, len(state)))
        return run_segment(index, state)

    monkeypatch.setattr(backbone, "run_segment", recording)
    exit_index = torch.tensor([0, 3, 1, 1, 3, 0])
    assert speed_common.timed_running_segments(network, inputs(6), exit_index, lambda: None) > 0
    assert seen == [(0, 6), (1, 4), (2, 2), (3, 2)]
    seen.clear()
    speed_common.timed_running_segments(network, inputs(3), torch.tensor([0, 1, 1]), lambda: None)
    assert seen == [(0, 3), (1, 2)]  # nobody left after exit 1: no later segment runs


def test_early_exit_runs_in_inference_mode_but_returns_ordinary_tensors():
    """The loop runs under inference mode (cheaper small operations); callers still get tensors
    they can modify in place or feed to autograd, whether everyone left at one exit or not."""
    network = tiny_network(3)
    x = inputs(20)
    with torch.no_grad():
        scores = confidence(network(x).logits[0], "max_prob")
    modes = []
    run_segment = network.backbone.run_segment
    network.backbone.run_segment = lambda index, state: modes.append(torch.is_inference_mode_enabled()) or run_segment(index, state)
    for threshold in (0.0, float(scores.median()), float("inf")):  # all at exit 0, split, none early
        network.policy = ConfidenceThreshold("max_prob", threshold)
        result = network.early_exit(x)
        assert not result.logits.is_inference() and not result.exit_index.is_inference()
        result.logits.mul_(2.0)
        (result.logits.requires_grad_() * 2).sum().backward()
    assert modes and all(modes)
