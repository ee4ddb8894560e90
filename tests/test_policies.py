"""Exit policy contract: streaming decisions equal vectorised ones, and real early exit equals the
all-exits pass, for every built-in policy; plus each policy's own rule."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jei.model import EarlyExitNetwork, predict_from_outputs
from jei.policies import (
    BudgetedThreshold,
    ConfidenceThreshold,
    GateThreshold,
    JEIRule,
    Patience,
    PenalizedThreshold,
    budget_fractions,
    confidence,
    select_state,
)
from jei.registry import POLICIES
from jei.types import ExitOutputs

from .helpers import tiny_network

COSTS = torch.tensor([0.25, 0.5, 0.75, 1.0])


def random_outputs(seed: int, batch: int = 40, gates: int = 3, classes: int = 4, scale: float = 3.0) -> ExitOutputs:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(gates + 1, batch, classes, generator=generator) * scale
    gate_logits = torch.randn(batch, gates, generator=generator) * scale
    return ExitOutputs(logits, gate_logits)


def fitted_policies(outputs: ExitOutputs) -> list:
    """One of every built-in policy, the data-dependent ones fitted on ``outputs``."""
    labels = torch.arange(outputs.logits.shape[1]) % outputs.logits.shape[-1]
    policies = [
        JEIRule(), GateThreshold(0.5), GateThreshold(0.8), ConfidenceThreshold("max_prob", 0.6),
        ConfidenceThreshold("max_prob", [0.9, 0.5, 0.7]), ConfidenceThreshold("entropy", 0.8), Patience(1),
        Patience(2), Patience(3), BudgetedThreshold(0.7), BudgetedThreshold(1.5, "entropy"), PenalizedThreshold(0.3),
        ConfidenceThreshold("gate", 0.6), PenalizedThreshold(0.3, "gate"),
    ]
    costs = torch.linspace(1, outputs.num_exits, outputs.num_exits) / outputs.num_exits
    for policy in policies:
        policy.fit(outputs, labels, costs)
    return policies


def streamed(policy, outputs: ExitOutputs) -> torch.Tensor:
    """Decisions taken exit by exit on the samples still running, as real early exit does."""
    batch = outputs.logits.shape[1]
    active = torch.arange(batch)
    exits = torch.full((batch,), outputs.num_gates, dtype=torch.long)
    state = policy.begin(batch, torch.device("cpu"))
    for index in range(outputs.num_gates):
        leaving, state = policy.step(index, outputs.logits[index, active], outputs.gate_logits[active, index], state)
        exits[active[leaving]] = index
        staying = (~leaving).nonzero().squeeze(-1)
        active, state = active[staying], select_state(state, staying)
    return exits


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 5), st.floats(0.1, 6.0))
def test_streaming_equals_vectorised_for_every_policy(seed, gates, scale):
    outputs = random_outputs(seed, gates=gates, scale=scale)
    for policy in fitted_policies(outputs):
        if isinstance(policy, ConfidenceThreshold) and policy.thresholds.numel() not in (1, gates):
            continue  # a per-exit list made for 3 exits
        assert torch.equal(streamed(policy, outputs), policy.decide(outputs)), type(policy).__name__


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_real_early_exit_equals_all_exits_pass_for_every_policy(decay):
    network = tiny_network(3)
    network.ensemble_decay = decay
    inputs = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    outputs = network(inputs)
    for policy in fitted_policies(outputs):
        network.policy = policy
        expected = predict_from_outputs(outputs, policy)
        actual = network.early_exit(inputs)
        assert torch.equal(actual.exit_index, expected.exit_index), type(policy).__name__
        torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.1, 30.0))
def test_an_exit_a_policy_closes_leaves_nobody_and_keeps_the_state(seed, scale):
    """``may_leave(i)`` False is a promise real early exit acts on (it skips the exit)."""
    outputs = random_outputs(seed, scale=scale)
    closed_somewhere = ConfidenceThreshold("max_prob", [float("inf"), 0.5, float("inf")])
    for policy in [*fitted_policies(outputs), closed_somewhere, ConfidenceThreshold("entropy", [0.5, float("-inf"), 1.0])]:
        state = policy.begin(outputs.logits.shape[1], torch.device("cpu"))
        for index in range(outputs.num_gates):
            leaving, after = policy.step(index, outputs.logits[index], outputs.gate_logits[:, index], state)
            if not policy.may_leave(index):
                assert not leaving.any() and after.keys() == state.keys(), type(policy).__name__
                assert all(torch.equal(after[key], state[key]) for key in state)
            state = after
    assert [closed_somewhere.may_leave(i) for i in range(3)] == [False, True, False]


def test_real_early_exit_skips_closed_exits_unless_a_later_exit_reads_them():
    network = tiny_network(4)
    inputs = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = [0] * network.num_gates
    for index, im in enumerate(network.ims):
        im.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    inf = float("inf")
    for decay, open_exit, expected_calls in [
        (0.0, True, [0, 1, 0]),  # only exit 1 can fire: only its IM runs
        (0.5, True, [1, 1, 1]),  # an ensemble reads every exit
        (0.0, False, [0, 0, 0]),  # everyone to the backbone's head, no IM runs
    ]:
        network.ensemble_decay = decay
        with torch.no_grad():
            outputs = network(inputs)
        median = float(confidence(outputs.logits[1], "max_prob").median())  # half the samples leave at exit 1
        network.policy = ConfidenceThreshold("max_prob", [inf, median if open_exit else inf, inf])
        calls[:] = [0] * network.num_gates
        actual = network.early_exit(inputs)
        assert calls == expected_calls, (decay, open_exit)
        expected = predict_from_outputs(outputs, network.policy)
        assert torch.equal(actual.exit_index, expected.exit_index)
        assert (actual.exit_index == 1).any() == open_exit and (actual.exit_index == 3).any()
        torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
        assert actual.logits.dtype == expected.logits.dtype


def test_editing_thresholds_in_place_reaches_real_early_exit():
    """``may_leave`` and ``step`` follow an in-place edit of ``thresholds``, as ``decide`` does."""
    network = tiny_network(4)
    inputs = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outputs = network(inputs)
    network.policy = ConfidenceThreshold("max_prob", [float("inf")] * 3)
    assert (network.early_exit(inputs).exit_index == 3).all()
    network.policy.thresholds[0] = float(confidence(outputs.logits[0], "max_prob").median())
    expected = predict_from_outputs(outputs, network.policy)
    assert (expected.exit_index == 0).any()
    assert torch.equal(network.early_exit(inputs).exit_index, expected.exit_index)
    with torch.inference_mode():  # a policy built, fitted or loaded under inference mode works too
        built_there = ConfidenceThreshold("max_prob", network.policy.thresholds.tolist())
        built_there.load_state_dict(network.policy.state_dict())
    network.policy = built_there
    assert torch.equal(network.early_exit(inputs).exit_index, expected.exit_index)
    for copied in (copy.deepcopy(network), pickle.loads(pickle.dumps(network))):  # copies, made there too
        with torch.inference_mode():
            copied = copy.deepcopy(copied)
        assert torch.equal(copied.early_exit(inputs).exit_index, expected.exit_index)
        copied.policy.thresholds[0] = float("inf")  # and a copy follows its own edits
        assert (copied.early_exit(inputs).exit_index != 0).all()


def test_every_registered_policy_builds_with_defaults_and_round_trips_its_state():
    outputs = random_outputs(5)
    labels = torch.arange(40) % 4
    for name in POLICIES.names():
        policy = POLICIES.build(name)
        policy.fit(outputs, labels, COSTS)
        again = POLICIES.build(name)
        again.load_state_dict(policy.state_dict())
        assert torch.equal(again.decide(outputs), policy.decide(outputs)), name


def test_gate_threshold_leaves_at_first_gate_over_threshold():
    outputs = random_outputs(0, batch=3)
    outputs.gate_logits = torch.logit(torch.tensor([[0.6, 0.1, 0.9], [0.2, 0.4, 0.3], [0.2, 0.5, 0.9]]))
    assert GateThreshold(0.5).decide(outputs).tolist() == [0, 3, 1]


def test_max_prob_and_entropy_thresholds():
    logits = torch.log(torch.tensor([[[0.9, 0.1], [0.6, 0.4]], [[0.5, 0.5], [0.95, 0.05]], [[0.5, 0.5], [0.5, 0.5]]]))
    outputs = ExitOutputs(logits, torch.zeros(2, 2))
    assert ConfidenceThreshold("max_prob", 0.85).decide(outputs).tolist() == [0, 1]
    assert ConfidenceThreshold("max_prob", [0.95, 0.9]).decide(outputs).tolist() == [2, 1]
    assert ConfidenceThreshold("entropy", 0.35).decide(outputs).tolist() == [0, 1]  # H(0.9, 0.1) = 0.325 nats
    scores = torch.randn(500, 10, generator=torch.Generator().manual_seed(0)) * 5
    # max-prob is exp(max log p) bit for bit (fitted thresholds do not move when the code gets faster)
    assert torch.equal(confidence(scores, "max_prob"), torch.log_softmax(scores, -1).max(-1).values.exp())


def test_patience_leaves_when_predictions_agree():
    # Predicted classes per exit for 3 samples: [0, 0, 1], [1, 0, 0], [0, 1, 0].
    classes = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    logits = torch.nn.functional.one_hot(classes, 2).float() * 5
    outputs = ExitOutputs(torch.cat([logits, logits[-1:]]), torch.zeros(3, 3))
    assert Patience(2).decide(outputs).tolist() == [1, 2, 3]
    assert Patience(1).decide(outputs).tolist() == [0, 0, 0]


def test_budgeted_thresholds_hit_their_target_fractions_on_the_fitting_data():
    outputs = random_outputs(2, batch=1000, gates=3)
    policy = BudgetedThreshold(0.6)
    policy.fit(outputs, torch.zeros(1000, dtype=torch.long), COSTS)
    fractions = torch.bincount(policy.decide(outputs), minlength=4).double() / 1000
    torch.testing.assert_close(fractions, budget_fractions(0.6, 4), atol=0.002, rtol=0)


def test_penalized_thresholds_never_lose_to_the_best_shared_threshold_on_validation():
    outputs = random_outputs(4, batch=400, gates=3, scale=2.0)
    labels = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(0))
    labels[:200] = outputs.logits[-1, :200].argmax(-1)  # a better head, as in real networks
    for weight in (0.0, 0.2, 1.0):
        policy = PenalizedThreshold(weight)
        policy.fit(outputs, labels, COSTS)

        def value(p):
            exits = p.decide(outputs)
            correct = outputs.logits.argmax(-1).gather(0, exits.view(1, -1))[0] == labels
            return correct.double().mean().item() - weight * COSTS.double()[exits].mean().item()

        shared = max(value(ConfidenceThreshold("max_prob", t)) for t in torch.linspace(0, 1, 101).tolist())
        assert value(policy) >= shared - 0.01


@pytest.mark.parametrize(("factory", "kwargs", "field"), [
    (GateThreshold, {"threshold": 1.5}, "policy.threshold"),
    (ConfidenceThreshold, {"score": "max_prob", "threshold": 1.5}, r"policy.threshold must be a probability in \[0, 1\]"),
    (ConfidenceThreshold, {"score": "max_prob", "threshold": [0.9, -0.1]}, "policy.threshold must be a probability"),
    (ConfidenceThreshold, {"score": "entropy", "threshold": -1.0}, "policy.threshold is an entropy"),
    (ConfidenceThreshold, {"score": "max_prob", "threshold": "abc"}, "policy.threshold must be a number"),
    (ConfidenceThreshold, {"score": "margin"}, "policy.score"),
    (BudgetedThreshold, {"q": 0.0}, "policy.q"),
    (PenalizedThreshold, {"cost_weight": -1.0}, "policy.cost_weight"),
    (Patience, {"patience": 0}, "policy.patience"),
])
def test_bad_policy_settings_name_the_field(factory, kwargs, field):
    with pytest.raises(ValueError, match=field):
        factory(**kwargs)


@pytest.mark.parametrize("score", ["max_prob", "entropy"])
def test_fitted_policies_let_nobody_leave_early_until_fitted(score):
    outputs = random_outputs(0, gates=3)
    for policy in (BudgetedThreshold(1.0, score), PenalizedThreshold(0.5, score)):
        assert policy.decide(outputs).tolist() == [3] * outputs.logits.shape[1]
        assert not any(policy.may_leave(index) for index in range(3))


def test_an_infinite_gate_threshold_stays_infinite_on_the_logit_scale():
    """logit(inf) is NaN: the internal threshold must be +inf itself, so no finite gate logit
    passes it (and the rule is not left to NaN comparisons)."""
    policy = ConfidenceThreshold("gate", [float("inf"), 0.5, 0.5])
    assert policy.thresholds.tolist() == [float("inf"), 0.0, 0.0]
    assert (policy.decide(random_outputs(0, gates=3)) != 0).all()


def test_per_exit_thresholds_must_match_the_exits():
    with pytest.raises(ValueError, match="one per exit"):
        ConfidenceThreshold("max_prob", [0.5, 0.5]).decide(random_outputs(0, gates=3))
    network = tiny_network(0)
    network.policy = ConfidenceThreshold("max_prob", [1.0, 1.0])  # (almost) nobody leaves: exit 2 is asked
    with pytest.raises(ValueError, match="one per exit"):
        network.early_exit(torch.randn(4, 1, 8, 8))
    with pytest.raises(ValueError, match="policy.threshold has 2 values but the network has 3"):  # when it is built
        EarlyExitNetwork(network.backbone, network.ims, network.gates, ConfidenceThreshold("max_prob", [0.5, 0.5]))
    for closed in (float("inf"), [0.9, float("inf"), 0.9]):  # inf closes an exit: not an error
        ConfidenceThreshold("max_prob", closed)
    ConfidenceThreshold("entropy", -float("inf"))
