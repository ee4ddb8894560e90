"""Exit probabilities, the inference rule and the surrogate targets (METHOD §2, §3, §5)."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from jei.exits import (
    exit_probabilities,
    exit_step,
    expected_cost,
    first_exit,
    gate_targets,
    oracle_exit,
    positive_class_weights,
)


@st.composite
def gate_probabilities(draw, dtype=np.float64, min_gates: int = 1) -> torch.Tensor:
    """[B, G] probabilities with extremes: exact 0 and 1, denormals, values near 0.5."""
    batch = draw(st.integers(1, 8))
    gates = draw(st.integers(min_gates, 8))
    special = st.sampled_from([0.0, 1.0, 0.5, 5e-324 if dtype == np.float64 else 1e-45, 1 - 1e-16, 1e-300])
    elements = st.one_of(st.floats(0.0, 1.0, width=64 if dtype == np.float64 else 32), special)
    array = draw(hnp.arrays(dtype, (batch, gates), elements=elements))
    return torch.from_numpy(np.clip(array, 0.0, 1.0))


@given(gate_probabilities())
@example(torch.zeros(1, 3, dtype=torch.float64))
@example(torch.ones(1, 3, dtype=torch.float64))
def test_exit_probabilities_are_a_distribution(g):
    pi = exit_probabilities(g)
    assert pi.shape == (g.shape[0], g.shape[1] + 1)
    assert torch.isfinite(pi).all()
    assert (pi >= 0).all() and (pi <= 1).all()
    torch.testing.assert_close(pi.sum(-1), torch.ones(g.shape[0], dtype=g.dtype), atol=1e-12, rtol=0)


@given(gate_probabilities(dtype=np.float32))
def test_exit_probabilities_float32(g):
    pi = exit_probabilities(g)
    assert pi.dtype == torch.float32 and torch.isfinite(pi).all() and (pi >= 0).all()
    torch.testing.assert_close(pi.sum(-1), torch.ones(g.shape[0]), atol=1e-5, rtol=0)


@given(gate_probabilities(min_gates=2), st.data())
def test_exit_l_depends_only_on_gates_up_to_l(g, data):
    l = data.draw(st.integers(0, g.shape[1] - 1))
    changed = g.clone()
    changed[:, l + 1 :] = torch.from_numpy(
        data.draw(hnp.arrays(np.float64, changed[:, l + 1 :].shape, elements=st.floats(0, 1)))
    )
    torch.testing.assert_close(exit_probabilities(g)[:, : l + 1], exit_probabilities(changed)[:, : l + 1])


@given(gate_probabilities())
def test_mass_runs_out_then_later_intermediate_exits_get_zero(g):
    pi = exit_probabilities(g)
    spent = torch.cumsum(g, dim=-1)
    for b, l in (spent >= 1).nonzero().tolist():
        assert (pi[b, l + 1 : g.shape[1]] == 0).all()


@given(gate_probabilities())
def test_streaming_equals_vectorised(g):
    used = torch.zeros(g.shape[0], dtype=g.dtype)
    streamed, exits = [], torch.full((g.shape[0],), g.shape[1])
    for l in range(g.shape[1]):
        pi_l, now, used = exit_step(g[:, l], used)
        streamed.append(pi_l)
        fresh = now & (exits == g.shape[1])
        exits[fresh] = l
    assert torch.equal(torch.stack(streamed, -1), exit_probabilities(g)[:, :-1])
    assert torch.equal(exits, first_exit(g))


def _reference_first_exit(pi: list[float]) -> tuple[int, bool]:
    """The rule as METHOD §3 states it, in Python floats: the first l with
    pi_l / (1 - sum_{k<l} pi_k) >= 0.5 while that denominator is positive. Also says whether a
    ratio fell within rounding of 0.5, where two float formulations may disagree."""
    spent, near_tie = 0.0, False
    for l, p in enumerate(pi[:-1]):
        remaining = 1.0 - spent
        if remaining > 0:
            near_tie |= abs(p - 0.5 * remaining) < 1e-9
            if p / remaining >= 0.5:
                return l, near_tie
        spent += p
    return len(pi) - 1, near_tie


@given(gate_probabilities())
def test_first_exit_follows_the_stated_rule(g):
    chosen = first_exit(g)
    for row, pi in zip(chosen.tolist(), exit_probabilities(g).tolist()):
        expected, near_tie = _reference_first_exit(pi)
        assert row == expected or near_tie


def test_worked_examples_of_the_method():
    g = torch.tensor([[0.3, 0.4, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(exit_probabilities(g), torch.tensor([[0.3, 0.4, 0.3, 0.0]], dtype=torch.float64))
    assert first_exit(torch.tensor([[0.3, 0.4, 0.1]])).item() == 1
    assert first_exit(torch.tensor([[0.2, 0.3, 0.6]])).item() == 2
    assert first_exit(torch.tensor([[0.1, 0.1, 0.1]])).item() == 3  # no gate fires: backbone head
    assert first_exit(torch.tensor([[0.6, 0.0, 0.0]])).item() == 0


def test_no_gates_means_the_backbone_head():
    g = torch.zeros(4, 0)
    assert torch.equal(exit_probabilities(g), torch.ones(4, 1))
    assert torch.equal(first_exit(g), torch.zeros(4, dtype=torch.long))


@given(gate_probabilities(), st.data())
def test_expected_cost_is_monotone_in_the_costs(g, data):
    """Raising any exit's cost never lowers the expected cost; it stays within [c_0, c_G]."""
    steps = torch.tensor(data.draw(st.lists(st.floats(1e-3, 1.0), min_size=g.shape[1] + 1, max_size=g.shape[1] + 1)))
    costs = torch.cumsum(steps, 0).double()
    costs = costs / costs[-1]
    pi = exit_probabilities(g)
    base = expected_cost(pi, costs)
    assert (base >= costs[0] - 1e-12).all() and (base <= 1 + 1e-12).all()
    raised = costs.clone()
    raised[data.draw(st.integers(0, g.shape[1]))] += 0.5
    assert (expected_cost(pi, raised) >= base - 1e-12).all()


@given(st.integers(1, 8), st.integers(1, 6), st.data())
def test_gate_targets_are_monotone_steps(batch, gates, data):
    best = torch.tensor(data.draw(st.lists(st.integers(0, gates), min_size=batch, max_size=batch)))
    targets = gate_targets(best, gates)
    assert targets.shape == (batch, gates)
    assert (targets[:, 1:] >= targets[:, :-1]).all()  # once 1, stays 1
    assert torch.equal(targets.sum(-1).long(), (gates - best).clamp(min=0))


def test_oracle_exit_trades_loss_for_cost_and_breaks_ties_early():
    losses = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.3]])
    costs = torch.tensor([0.2, 0.6, 1.0])
    assert oracle_exit(losses, costs, 0.0).tolist() == [2, 0]
    assert oracle_exit(losses, costs, 1.0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="cost_weight"):
        oracle_exit(losses, costs, -0.1)


def test_positive_class_weights():
    best = torch.tensor([0, 0, 1, 3, 3, 3, 3, 3])  # N = 8, n_0 = 2, n_1 = 1, n_2 = 0
    # balanced: gate l's positives are l* <= l: 2, 3, 3 of 8
    torch.testing.assert_close(positive_class_weights(best, 3, cap=5.0), torch.tensor([3.0, 5 / 3, 5 / 3]))
    # exit_share (the authors' code): n_l = #(l* == l); no sample at l = 2 gives the cap
    torch.testing.assert_close(positive_class_weights(best, 3, cap=5.0, rule="exit_share"), torch.tensor([3.0, 5.0, 5.0]))
    with pytest.raises(ValueError, match="pos_weight_rule"):
        positive_class_weights(best, 3, rule="inverse")


@given(st.integers(1, 6), st.data())
def test_balanced_weights_equalise_each_gates_classes(gates, data):
    """With the balanced rule, weighted positives equal negatives for every gate (below the cap)."""
    best = torch.tensor(data.draw(st.lists(st.integers(0, gates), min_size=1, max_size=40)))
    targets = gate_targets(best, gates)
    weights = positive_class_weights(best, gates, cap=1e9)
    positives, negatives = targets.sum(0), (1 - targets).sum(0)
    has_positives = positives > 0
    torch.testing.assert_close((weights * positives)[has_positives], negatives[has_positives])
