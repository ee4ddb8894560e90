"""History gates (issue #8): gate l reads exits 0..l's uncertainty features and whether their
predictions agree. Real early exit equals the all-exits pass with them, for every policy that
reads gates; the paper's gate is unchanged; and a history gate learns what a current-exit gate
cannot."""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch
from omegaconf import OmegaConf

from jei.build import network_factory
from jei.compare import Method, merge_gate
from jei.cost import measure_exit_costs
from jei.heads.gates import UncertaintyGate, history_features
from jei.heads.uncertainty import uncertainty_features
from jei.model import EarlyExitNetwork, predict_from_outputs
from jei.policies import BudgetedThreshold
from jei.registry import BACKBONES, GATES, IMS

from .test_policies import fitted_policies

NUM_CLASSES = 5


def backbone():
    return BACKBONES.build(
        "small_cnn", in_channels=1, num_classes=NUM_CLASSES, widths=(4, 6, 6, 8), strides=(1, 2, 1, 1), exits=(1, 2, 3)
    ).freeze()


def history_network(seed: int, history="all", agreement: bool = True, bias: float = 0.0, past: bool = True) -> EarlyExitNetwork:
    """A tiny frozen CNN whose gates read history, with weights spread so samples leave everywhere."""
    torch.manual_seed(seed)
    trunk = backbone()
    ims = [IMS.build("pool_linear", spec=spec, num_classes=NUM_CLASSES) for spec in trunk.exit_specs]
    gates = [GATES.build("uncertainty", num_classes=NUM_CLASSES, history=history, agreement=agreement, index=spec.index,
                         past_features=past) for spec in trunk.exit_specs]
    for gate in gates:
        torch.nn.init.normal_(gate.linear.weight, std=3.0)
        torch.nn.init.constant_(gate.linear.bias, bias)
    return EarlyExitNetwork(trunk, ims, gates).eval()


def test_the_papers_gate_is_unchanged():
    torch.manual_seed(3)
    gate = UncertaintyGate(NUM_CLASSES, index=2)  # the builder now passes the index; nothing else changes
    torch.manual_seed(3)
    reference = torch.nn.Linear(4, 1)
    assert not gate.reads_history
    assert torch.equal(gate.linear.weight, reference.weight) and torch.equal(gate.linear.bias, reference.bias)
    logits = torch.randn(7, NUM_CLASSES)
    assert torch.equal(gate(logits), reference(uncertainty_features(logits)).squeeze(-1))


@pytest.mark.parametrize(("history", "agreement", "past", "widths"), [
    ("all", True, True, [4, 10, 16]), ("all", False, True, [4, 8, 12]), (1, True, True, [4, 10, 10]),
    (0, True, True, [4, 4, 4]), ("all", True, False, [4, 6, 8]),
])
def test_history_gates_read_the_exits_of_their_window(history, agreement, past, widths):
    gates = [UncertaintyGate(NUM_CLASSES, history=history, agreement=agreement, index=i, past_features=past)
             for i in range(3)]
    assert [g.linear.in_features for g in gates] == widths
    assert all(g.reads_history for g in gates)


def test_history_features_are_the_window_of_features_and_agreements():
    torch.manual_seed(0)
    logits = [torch.randn(6, NUM_CLASSES) for _ in range(3)]
    logits[1][:3] = logits[0][:3] * 2  # same argmax as exit 0 for the first three samples
    gates = [UncertaintyGate(NUM_CLASSES, history="all", index=i) for i in range(3)]
    history = None
    for gate, z in zip(gates, logits):
        _, history = gate.step(z, history)
    assert history.shape == (6, 15)
    inputs = history_features(history, previous=2)
    predicted = torch.stack([z.argmax(-1) for z in logits], dim=-1)
    expected = torch.cat([
        *(uncertainty_features(z) for z in logits),
        (predicted[:, 1:] == predicted[:, :-1]).float(),
        (predicted[:, :-1] == predicted[:, -1:]).float(),
    ], dim=-1)
    assert torch.equal(inputs, expected)
    assert inputs[:3, 12].eq(1).all()  # exits 0 and 1 agree there
    window = history_features(history, previous=1)  # exits 1 and 2 only
    assert torch.equal(window, expected[:, [4, 5, 6, 7, 8, 9, 10, 11, 13, 15]])
    agreement_only = history_features(history, previous=2, past_features=False)  # exit 2's features, agreements
    assert torch.equal(agreement_only, expected[:, 8:])


def test_the_all_exits_pass_threads_the_history():
    network = history_network(1)
    inputs = torch.randn(9, 1, 8, 8)
    outputs = network(inputs)
    history = None
    for index, gate in enumerate(network.gates):
        _, history = gate.step(outputs.logits[index], history)
        expected = gate.linear(history_features(history, gate.previous)).squeeze(-1)
        torch.testing.assert_close(outputs.gate_logits[:, index], expected)


@pytest.mark.parametrize(("history", "agreement", "decay", "past"), [
    ("all", True, 0.0, True), ("all", True, 0.5, True), (1, True, 0.0, True), ("all", False, 0.0, True),
    (0, True, 0.0, True), ("all", True, 0.0, False),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_early_exit_equals_all_exits_pass_with_history_gates(history, agreement, decay, past, seed):
    """Samples leave at every exit, so the history is compacted at every exit, and every
    policy (those that read gates among them) takes the same exits both ways."""
    network = history_network(seed, history, agreement, bias=float(seed) - 1.0, past=past)
    network.ensemble_decay = decay
    inputs = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    outputs = network(inputs)
    # Thresholds fitted on other samples: fitted on these, some score would sit exactly on its
    # threshold, and a batch of another size may round it to the other side (BLAS kernels differ).
    held_out = network(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 100)))
    policies = fitted_policies(held_out)
    budgeted = BudgetedThreshold(0.8, "gate")  # a gate score that sends samples to every exit
    budgeted.fit(held_out, torch.zeros(64, dtype=torch.long), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    policies.append(budgeted)
    assert sum(getattr(p, "uses_gates", False) for p in policies) >= 5
    spread = False
    for policy in policies:
        network.policy = policy
        expected = predict_from_outputs(outputs, policy)
        actual = network.early_exit(inputs)
        assert torch.equal(actual.exit_index, expected.exit_index), type(policy).__name__
        torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
        counts = torch.bincount(expected.exit_index, minlength=4)
        spread |= bool(policy.uses_gates and (counts[:2] > 0).all() and counts[2:].sum() > 0)
    assert spread  # some gate-reading policy drops samples at exits 0 and 1 and keeps others running


def test_streamed_gate_logits_equal_the_all_exits_pass_for_the_samples_still_running():
    """Record the gate logits real early exit computes: each is the all-exits one of its sample."""
    network = history_network(4, bias=-1.0)
    inputs = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    outputs = network(inputs)
    network.policy = BudgetedThreshold(1.0, "gate")  # about a quarter of the samples leave at each exit
    network.policy.fit(outputs, torch.zeros(48, dtype=torch.long), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    exits = predict_from_outputs(outputs, network.policy).exit_index
    seen: list[torch.Tensor] = []
    for gate in network.gates:
        original = gate.step

        def recording(logits, history, original=original):
            result = original(logits, history)
            seen.append(result[0])
            return result

        gate.step = recording
    network.early_exit(inputs)
    for index, streamed in enumerate(seen):
        running = (exits >= index).nonzero().squeeze(-1)
        torch.testing.assert_close(streamed, outputs.gate_logits[running, index], rtol=1e-5, atol=1e-5)
    assert len(seen) == 3 and 48 > len(seen[1]) > len(seen[2]) > 0


def test_a_history_gate_learns_agreement_that_a_current_exit_gate_cannot_see():
    """Exit 1 is right exactly when it agrees with exit 0; every sample's exit-1 distribution is
    the same up to a permutation of the classes, so exit 1's own features carry no signal."""
    generator = torch.Generator().manual_seed(0)
    n = 512
    base = torch.tensor([3.0, 1.0, 0.5, 0.0, -1.0])
    first_class, second_class = (torch.randint(0, NUM_CLASSES, (n,), generator=generator) for _ in range(2))

    def with_top(classes):
        logits = base.repeat(n, 1)
        rows = torch.arange(n)
        top = logits[rows, classes].clone()
        logits[rows, classes] = logits[:, 0]
        logits[:, 0] = top
        return logits

    z0, z1 = with_top(first_class), with_top(second_class)
    target = (first_class == second_class).float()  # exit 1 is good enough only when they agree

    def fit(gate: UncertaintyGate) -> float:
        optimiser = torch.optim.Adam(gate.parameters(), lr=0.05)
        for _ in range(300):
            _, history = gate_zero.step(z0, None)
            logit = gate.step(z1, history)[0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logit, target, pos_weight=(1 - target).sum() / target.sum()
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            _, history = gate_zero.step(z0, None)
            fires = gate.step(z1, history)[0] > 0
        # balanced accuracy: a constant rule gets 0.5
        return 0.5 * (fires[target == 1].float().mean() + (~fires[target == 0]).float().mean()).item()

    torch.manual_seed(0)
    gate_zero = UncertaintyGate(NUM_CLASSES, history="all", index=0)
    current_only = fit(UncertaintyGate(NUM_CLASSES, index=1))
    with_history = fit(UncertaintyGate(NUM_CLASSES, history="all", index=1))
    agreement_only = fit(UncertaintyGate(NUM_CLASSES, history="all", index=1, past_features=False))
    assert current_only <= 0.55
    assert with_history >= 0.99 and agreement_only >= 0.99


def test_the_config_builds_history_gates_for_each_exit_and_costs_count_them():
    gate_node = OmegaConf.create((files("jei.configs") / "gate" / "uncertainty_history.yaml").read_text())
    torch.manual_seed(0)
    make = network_factory({"name": "pool_linear"}, gate_node, NUM_CLASSES)
    network = make(backbone())
    assert [g.index for g in network.gates] == [0, 1, 2]
    assert [g.linear.in_features for g in network.gates] == [4, 10, 16]
    assert network.reads_history
    plain = network_factory({"name": "pool_linear"}, {"name": "uncertainty"}, NUM_CLASSES)(backbone())
    assert not plain.reads_history and all(g.linear.in_features == 4 for g in plain.gates)
    with_history = measure_exit_costs(network, torch.randn(2, 1, 8, 8)).mul_adds
    without = measure_exit_costs(plain, torch.randn(2, 1, 8, 8)).mul_adds
    assert with_history[0] == without[0] and with_history[-1] > without[-1]  # bigger gates, counted
    again = make(backbone())
    again.gates.load_state_dict(network.gates.state_dict())  # a saved run loads into a rebuilt network


def test_bad_history_settings_are_refused():
    for history in (-1, "some", True, 1.5):
        with pytest.raises(ValueError, match="gate.history"):
            UncertaintyGate(NUM_CLASSES, history=history)


def test_a_compare_method_may_override_the_gate_and_is_keyed_by_it():
    sweep = {"group": "policy", "key": "cost_weight", "values": [0.1]}
    plain = Method("a", {"name": "jei"}, {"name": "penalized", "score": "gate"}, sweep)
    history = Method("b", {"name": "jei"}, {"name": "penalized", "score": "gate"}, sweep, {"history": "all"})
    assert plain.identity() == []  # the keys of gate-less methods (and their caches) are as before
    assert history.identity() == [{"gate": {"history": "all"}}]
    base = {"name": "uncertainty"}
    assert merge_gate(base, None) == base
    assert merge_gate(base, {"history": 2}) == {"name": "uncertainty", "history": 2}
    assert merge_gate(base, {"name": "other", "x": 1}) == {"name": "other", "x": 1}
    with pytest.raises(ValueError, match="gate must be a mapping"):
        Method("c", {"name": "jei"}, {"name": "penalized"}, sweep, "all")


def test_compare_config_has_the_history_methods():
    from hydra import compose, initialize_config_module

    with initialize_config_module("jei.configs", version_base="1.3"):
        cfg = compose("compare", overrides=["experiment=cifar10_resnet56_compare"])
    methods = OmegaConf.to_container(cfg.methods, resolve=True)
    method = methods["jei_history_gate_score_penalized"]
    reference = methods["jei_gate_score_penalized"]
    assert method["gate"] == {"name": "uncertainty", "history": "all", "agreement": True}
    assert method["objective"] == reference["objective"] and method["policy"] == reference["policy"]
    assert method["sweep"] == reference["sweep"] and "gate" not in reference


def test_export_refuses_history_gates() -> None:
    # The exported host loop calls each gate on its own exit alone: it must not export a chain
    # that would give other exits than the model.
    from jei.export import ExportError, chain_parts

    with pytest.raises(ExportError, match="gates that read earlier exits"):
        chain_parts(history_network(0))
