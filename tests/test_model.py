"""Real early-exit inference against the all-exits pass, and per-exit cost."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jei.cost import measure_exit_costs
from jei.model import EarlyExitNetwork, predict_from_outputs

from .helpers import tiny_network


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 12), st.floats(-3.0, 3.0))
def test_early_exit_equals_all_exits_pass(seed, batch, gate_bias):
    network = tiny_network(seed, gate_bias=gate_bias)
    inputs = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    expected = predict_from_outputs(network(inputs))
    actual = network.early_exit(inputs)
    assert torch.equal(actual.exit_index, expected.exit_index)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_early_exit_stops_computing_for_exited_samples():
    """Count the samples each segment sees: exited ones must not reach later segments."""
    network = tiny_network(0)

    class FirstLogitGate(torch.nn.Module):  # fires for about half the samples
        def forward(self, logits):
            return logits[:, 0] - logits[:, 0].median()

    network.gates[0] = FirstLogitGate()
    seen: list[int] = []
    original = network.backbone.run_segment

    def counting(index, state):
        seen.append(len(state))
        return original(index, state)

    network.backbone.run_segment = counting
    inputs = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    result = network.early_exit(inputs)
    still_running = [(result.exit_index >= index).sum().item() for index in range(len(seen))]
    assert seen == still_running
    assert 0 < seen[1] < 64  # some samples really left at exit 0


def test_costs_are_positive_strictly_increasing_and_normalised():
    network = tiny_network(0)
    costs = measure_exit_costs(network, torch.randn(3, 1, 8, 8))
    normalized = costs.normalized
    assert normalized[-1] == 1.0 and (normalized > 0).all()
    assert (normalized[1:] > normalized[:-1]).all()
    # The final exit counts the whole backbone plus every IM and gate on the way.
    assert costs.mul_adds[-1] > costs.backbone_mul_adds


def test_cost_counts_real_convolutions():
    """First conv of the tiny CNN: 4 filters x 1 channel x 3x3 taps over 8x8 positions."""
    network = tiny_network(0)
    costs = measure_exit_costs(network, torch.randn(2, 1, 8, 8))
    conv = 4 * 1 * 9 * 64
    im_and_gate = 4 * 5 + 4  # Linear(4 -> 5) and Linear(4 -> 1)
    assert costs.mul_adds[0] == conv + im_and_gate


def test_network_needs_one_im_and_gate_per_exit():
    network = tiny_network(0)
    with pytest.raises(ValueError, match="one IM and one gate per exit"):
        EarlyExitNetwork(network.backbone, list(network.ims)[:2], list(network.gates))
