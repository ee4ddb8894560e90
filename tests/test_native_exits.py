"""Native exits (``jei.native_exits``): the C++ exit step agrees with the Python path (logits to
float rounding, the same decisions away from a threshold), for every pooling layout and rule, and
for every built-in policy with a native rule on a whole network; networks it cannot run are
refused with the reason, and the cached step follows edits to the network."""

from __future__ import annotations

import copy
import functools
import pickle
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from jei.heads.ims import PoolIM, global_pool
from jei.heads.uncertainty import uncertainty_features
from jei.memory_format import is_channels_last, select_rows, to_channels_last
from jei.native_exits import POOLS, RULES, load_kernel, native_plan
from jei.policies import ConfidenceThreshold, JEIRule, Patience
from jei.registry import GATES, IMS

from .helpers import tiny_network
from .test_policies import fitted_policies

TOLERANCE = 1e-4
EMPTY = torch.empty(0)  # decisions are compared only for samples whose score is farther than this from the threshold


def python_step(features, kind, grid, weight, bias, temperature, rule, threshold, gate_weight, gate_bias, used):
    """What the Python path computes at one exit: (logits, leaving, used after, score - threshold)."""
    logits = F.linear(global_pool(features, kind, grid), weight, bias) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    if rule == "max_prob":
        score = log_probs.amax(dim=-1).exp()
    elif rule == "negative_entropy":
        score = (log_probs.exp() * log_probs).sum(dim=-1)
    else:
        gate_logit = F.linear(uncertainty_features(logits), gate_weight, gate_bias).squeeze(-1)
        score = gate_logit if rule == "gate_logit" else torch.sigmoid(gate_logit)
    if rule != "jei":
        return logits, score >= threshold, used, score - threshold
    remaining = 1.0 - used
    return logits, (remaining > 0) & (score >= 0.5 * remaining), used + score, score - 0.5 * remaining


def in_batch_order(logits, order, used, count, batch):
    """The kernel's outputs back in batch order, with who left; checks ``order`` on the way:
    None when all or none leave, otherwise the staying samples then the leaving ones, each in
    batch order."""
    if order is None:
        assert count in (0, batch)
        return logits, torch.full((batch,), count == batch), used
    stay, leave = order[: batch - count], order[batch - count :]
    assert 0 < count < batch and torch.equal(order.sort().values, torch.arange(batch))
    assert torch.equal(stay, stay.sort().values) and torch.equal(leave, leave.sort().values)
    leaving = torch.zeros(batch, dtype=torch.bool)
    leaving[leave] = True
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(batch)
    return logits[inverse], leaving, used[inverse] if used.numel() else used


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["map", "channels_last", "tokens", "vector", "class_token_norm"]),
    rule=st.sampled_from(sorted(RULES)),
    batch=st.sampled_from([1, 2, 3, 5, 9, 16, 23]),  # from 16 on, the linear layer is one matrix product
    channels=st.integers(1, 12),
    side=st.integers(1, 5),
    grid=st.integers(1, 3),
    classes=st.integers(1, 7),
    temperature=st.sampled_from([1.0, 0.7, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_the_kernel_agrees_with_the_python_path(kind, rule, batch, channels, side, grid, classes, temperature, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"map": (batch, channels, side, side), "channels_last": (batch, channels, side, side),
              "tokens": (batch, side, channels), "vector": (batch, channels), "class_token_norm": (batch, side, channels)}
    features = torch.randn(shapes[kind], generator=generator) * 2 + 0.5
    if kind == "channels_last":
        features = features.contiguous(memory_format=torch.channels_last)
    pool = "map" if kind == "channels_last" else kind
    grid = grid if pool == "map" else 1
    # A ViT's representation: its class token under the final LayerNorm, computed in the kernel.
    norm = (torch.randn(channels, generator=generator), torch.randn(channels, generator=generator), 1e-6)
    represented = F.layer_norm(features[:, 0], (channels,), *norm) if kind == "class_token_norm" else features
    weight, bias = torch.randn(classes, channels * grid**2, generator=generator), torch.randn(classes, generator=generator)
    gate_weight, gate_bias = torch.randn(1, 4, generator=generator) * 3, torch.randn(1, generator=generator)
    used = torch.rand(batch, generator=generator) * 1.2  # some samples with nothing left (r <= 0)
    threshold = {"max_prob": 0.6, "negative_entropy": -0.5, "gate_logit": 0.3, "gate_probability": 0.55, "jei": 0.0}[rule]
    temperatures = torch.tensor([3.0, temperature, 1.0])
    # The backbone state the kernel compacts: the features themselves, or another dense tensor
    # (a ViT's tokens behind a vector representation; a half-precision map).
    state = features if seed % 3 else torch.randn(batch, 3, side, 2, generator=generator).to(torch.float16)
    logits, order, used_after, count, staying = load_kernel().exit_step(
        features, POOLS[pool], grid, weight, bias, temperatures, 1, RULES[rule], threshold, gate_weight, gate_bias,
        used if rule == "jei" else torch.empty(0), state, *(norm if kind == "class_token_norm" else (EMPTY, EMPTY, 0.0)),
    )
    expected, expected_leaving, expected_used, margin = python_step(
        represented, "vector" if kind == "class_token_norm" else pool, grid, weight, bias, temperature, rule, threshold,
        gate_weight, gate_bias, used)
    if order is None:
        assert staying is None
    else:  # the staying samples' state, as the backbone's select_rows gathers it
        selected = select_rows(state, order[: batch - count])
        assert torch.equal(staying, selected) and staying.stride() == selected.stride()
        assert is_channels_last(staying) == is_channels_last(state)
    logits, leaving, used_after = in_batch_order(logits, order, used_after, count, batch)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    clear = margin.abs() > TOLERANCE
    assert torch.equal(leaving[clear], expected_leaving[clear])
    if rule == "jei":
        torch.testing.assert_close(used_after, expected_used, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "pool_size_2"])
def test_native_early_exit_agrees_with_python_for_every_policy_with_a_native_rule(layout):
    network = tiny_network(3)
    if layout == "pool_size_2":  # the default IM keeps a 2 x 2 grid of each map
        torch.manual_seed(3)
        for index, spec in enumerate(network.backbone.exit_specs):
            network.ims[index] = IMS.build("pool_linear", spec=spec, num_classes=5, pool_size=2)
    if layout == "channels_last":
        to_channels_last(network.backbone)
    generator = torch.Generator().manual_seed(1)
    fit_inputs, inputs = torch.randn(96, 1, 8, 8, generator=generator), torch.randn(96, 1, 8, 8, generator=generator)
    network.temperature.copy_(torch.tensor([1.3, 0.8, 1.0, 1.1]))
    with torch.no_grad():
        outputs = network(fit_inputs)
    native = copy.deepcopy(network)
    ran = []
    # Fitted on other samples: a threshold fitted on these would sit exactly on one sample's
    # score, which rounding may put on either side (the documented difference).
    for policy in fitted_policies(outputs):
        network.policy = native.policy = policy
        if isinstance(native_plan(native), str):
            assert isinstance(policy, Patience)  # the one built-in policy without a native rule
            continue
        native.use_native_exits()
        for batch in (inputs, inputs[:1], inputs[5:6]):
            expected, actual = network.early_exit(batch), native.early_exit(batch)
            assert torch.equal(actual.exit_index, expected.exit_index), type(policy).__name__
            torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
            assert not actual.logits.is_inference() and not actual.exit_index.is_inference()
        ran.append(type(policy).__name__)
    assert {"JEIRule", "GateThreshold", "ConfidenceThreshold", "BudgetedThreshold", "PenalizedThreshold"} <= set(ran)


def test_networks_native_exits_cannot_run_are_refused_with_the_reason():
    network = tiny_network(0)
    network.policy = Patience(2)
    with pytest.raises(ValueError, match="Patience has no native_rule"):
        network.use_native_exits()
    network.policy = JEIRule()
    network.ensemble_decay = 0.5
    with pytest.raises(ValueError, match="ensemble"):
        network.use_native_exits()
    network.ensemble_decay = 0.0
    spec = network.backbone.exit_specs[1]
    network.ims[1] = IMS.build("pool_mlp", spec=spec, num_classes=5)
    with pytest.raises(ValueError, match="IM 1 .PoolMLPIM. is not a mean pool and one linear layer"):
        network.use_native_exits()

    class Doubled(PoolIM):  # changes forward without describing itself again
        def forward(self, features):
            return 2 * super().forward(features)

    network.ims[1] = Doubled(spec, torch.nn.Linear(spec.channels, 5))
    with pytest.raises(ValueError, match="IM 1 .Doubled."):
        network.use_native_exits()
    network = tiny_network(0)
    network.gates[2] = GATES.build("uncertainty", num_classes=5, history=1, index=2)
    with pytest.raises(ValueError, match="history gates"):
        network.use_native_exits()
    network.double()
    network.gates[2] = GATES.build("uncertainty", num_classes=5).double()
    with pytest.raises(ValueError, match="not float32 on the CPU"):
        network.use_native_exits()
    assert not network.native_exits


def test_a_network_that_stops_qualifying_warns_and_runs_in_python():
    network = tiny_network(2).use_native_exits()
    inputs = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    network.early_exit(inputs)
    network.policy = Patience(1)
    with pytest.warns(UserWarning, match="running in Python"):
        result = network.early_exit(inputs)
    with torch.no_grad():
        assert torch.equal(result.exit_index, Patience(1).decide(network(inputs)))
    network.policy = JEIRule()
    network.early_exit(inputs)
    network.double()  # moved to float64 after the run was made: its parameters no longer qualify
    with pytest.warns(UserWarning, match="not float32 on the CPU"):
        result = network.early_exit(inputs.double())
    with torch.no_grad():
        assert torch.equal(result.exit_index, JEIRule().decide(network(inputs.double())))


def test_native_exits_follow_edits_copies_and_module_changes():
    network = tiny_network(5)
    inputs = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        outputs = network(inputs)
    median = float(outputs.logits[0].softmax(-1).amax(-1).median())
    network.policy = ConfidenceThreshold("max_prob", [float("inf")] * 3)
    native = copy.deepcopy(network).use_native_exits()

    def agree() -> None:
        expected, actual = network.early_exit(inputs), native.early_exit(inputs)
        assert torch.equal(actual.exit_index, expected.exit_index)
        torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)

    agree()
    for net in (network, native):  # thresholds edited in place
        net.policy.thresholds[0] = median
    agree()
    assert (native.early_exit(inputs).exit_index == 0).any()
    for net in (network, native):  # weights edited in place, temperatures fitted
        with torch.no_grad():
            net.ims[0].classifier.weight.mul_(1.5)
        net.temperature.copy_(torch.tensor([0.5, 1.0, 1.0, 2.0]))
    agree()
    replacement = IMS.build("pool_linear", spec=network.backbone.exit_specs[0], num_classes=5)
    network.ims[0], native.ims[0] = replacement, copy.deepcopy(replacement)  # a module replaced
    agree()
    for copied in (copy.deepcopy(native), pickle.loads(pickle.dumps(native))):  # copies run their own weights
        assert copied.native_exits
        with torch.no_grad():
            copied.ims[0].classifier.bias.add_(100.0)  # class 0 certain at exit 0 on the copy only
        assert (copied.early_exit(inputs).exit_index == 0).all()
        agree()


def test_the_kernel_rejects_inputs_it_cannot_run():
    kernel = load_kernel().exit_step
    empty = torch.empty(0)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        kernel(torch.randn(2, 3, dtype=torch.float64), POOLS["vector"], 1, torch.randn(4, 3), torch.randn(4),
               torch.ones(2), 0, RULES["max_prob"], 0.5, empty, empty, empty, empty, empty, empty, 0.0)
    with pytest.raises(RuntimeError, match="weight is not"):
        kernel(torch.randn(2, 3), POOLS["vector"], 1, torch.randn(4, 5), torch.randn(4), torch.ones(2), 0,
               RULES["max_prob"], 0.5, empty, empty, empty, empty, empty, empty, 0.0)
    with pytest.raises(RuntimeError, match="running gate sum"):
        kernel(torch.randn(2, 3), POOLS["vector"], 1, torch.randn(4, 3), torch.randn(4), torch.ones(2), 0,
               RULES["jei"], 0.0, torch.randn(1, 4), torch.randn(1), torch.zeros(3), empty, empty, empty, 0.0)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_non_finite_logits_never_leave_as_in_python(rule):
    """A NaN or +inf logit makes Python's scores NaN, which pass no threshold; -inf is an ordinary
    zero probability (except to the entropy, 0 * -inf = NaN in Python)."""
    features = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 0.0], [1.0, -1.0], [0.5, 0.5]])
    weight = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0])
    weight_inf = weight.clone()
    weight_inf[2, 0] = float("inf")  # +inf logit where feature 0 > 0, -inf where < 0, NaN at 0
    gate_weight, gate_bias = torch.tensor([[1.0, -1.0, 2.0, 0.5]]), torch.tensor([3.0])  # leaves when features are 0
    threshold = {"max_prob": 0.0, "negative_entropy": -10.0, "gate_logit": -10.0, "gate_probability": 0.0, "jei": 0.0}[rule]
    for w in (weight, weight_inf):
        batch = torch.cat([features, -features[3:4]])
        used = torch.zeros(len(batch))
        logits, order, used_after, count, _ = load_kernel().exit_step(
            batch, POOLS["vector"], 1, w, bias, torch.ones(2), 0, RULES[rule], threshold, gate_weight, gate_bias,
            used if rule == "jei" else torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0), 0.0,
        )
        logits, leaving, used_after = in_batch_order(logits, order, used_after, count, len(batch))
        expected = python_step(batch, "vector", 1, w, bias, 1.0, rule, threshold, gate_weight, gate_bias, used)
        assert torch.equal(leaving, expected[1]), (w is weight_inf, leaving, expected[1])
        if rule == "jei":
            assert torch.equal(used_after.isnan(), expected[2].isnan())


def test_edits_inside_heads_are_seen_or_fall_back_to_python():
    network = tiny_network(7)
    inputs = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    network.policy = JEIRule()
    native = copy.deepcopy(network).use_native_exits()
    native.early_exit(inputs)
    spec = network.backbone.exit_specs[0]
    replacement = torch.nn.Linear(spec.channels, 5)
    with torch.no_grad():
        replacement.bias.copy_(torch.tensor([40.0, 0, 0, 0, 0]))  # certain of class 0 at exit 0
    network.ims[0].classifier, native.ims[0].classifier = replacement, copy.deepcopy(replacement)
    expected, actual = network.early_exit(inputs), native.early_exit(inputs)
    assert torch.equal(actual.exit_index, expected.exit_index)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
    mlp = torch.nn.Sequential(torch.nn.Linear(spec.channels, 5))
    network.ims[0].classifier, native.ims[0].classifier = mlp, copy.deepcopy(mlp)  # no longer native
    with pytest.warns(UserWarning, match="stopped running this network"):
        actual = native.early_exit(inputs)
    assert torch.equal(actual.exit_index, network.early_exit(inputs).exit_index)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next calls run in Python without warning again
        native.early_exit(inputs)


def test_a_deep_exit_that_stopped_qualifying_is_found_before_any_segment_runs():
    """Every exit's form is read at the start of the call: an edit at the last exit sends the
    whole call to Python before the first segment, so no segment runs twice."""
    network = tiny_network(7)
    network.policy = ConfidenceThreshold("max_prob", 1.0)  # (almost) nobody leaves: every exit is reached
    segments = []
    run_segment = network.backbone.run_segment
    network.backbone.run_segment = lambda index, state: (segments.append(index), run_segment(index, state))[1]
    inputs = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    network.use_native_exits().early_exit(inputs)
    assert segments == list(range(network.num_gates + 1))  # bound, and run natively
    segments.clear()
    last = network.num_gates - 1
    network.ims[last].classifier = torch.nn.Sequential(network.ims[last].classifier)  # no longer one linear layer
    with pytest.warns(UserWarning, match="stopped running this network"):
        network.early_exit(inputs)
    assert segments == list(range(network.num_gates + 1))


def test_hooks_overridden_scores_and_float64_temperatures_are_refused():
    network = tiny_network(1)
    handle = network.ims[2].classifier.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="exit 2's IM or gate has forward hooks"):
        network.use_native_exits()
    handle.remove()

    class Shifted(ConfidenceThreshold):  # changes the score without describing itself again
        def _score(self, logits, gate_logit):
            return super()._score(logits, gate_logit) + 0.1

    network.policy = Shifted("max_prob", 0.5)
    with pytest.raises(ValueError, match="Shifted has no native_rule"):
        network.use_native_exits()
    network.policy = JEIRule()
    network.temperature = network.temperature.double()
    with pytest.raises(ValueError, match="temperatures are not float32"):
        network.use_native_exits()


@pytest.mark.parametrize("native", [False, True])
def test_early_exit_records_no_graph_under_grad_mode(native):
    network = tiny_network(4)
    if native:
        network.use_native_exits()
    inputs = torch.randn(16, 1, 8, 8, requires_grad=True)
    with torch.enable_grad():
        result = network.early_exit(inputs)
    assert not result.logits.requires_grad and result.logits.grad_fn is None


def test_a_weight_norm_added_after_switching_on_falls_back_to_python():
    network = tiny_network(9).use_native_exits()
    inputs = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    network.early_exit(inputs)
    torch.nn.utils.parametrizations.weight_norm(network.ims[1].classifier)  # a computed weight
    with pytest.warns(UserWarning, match="stopped running this network"):
        actual = network.early_exit(inputs)
    network.native_exits = False
    assert torch.equal(actual.exit_index, network.early_exit(inputs).exit_index)


def spread_max_prob(network, shape, seed):
    """Random inputs of ``shape`` and a max-prob policy on ``network`` at each exit's median
    confidence on other samples (a threshold on one of these samples' own scores could fall
    either way under rounding): samples leave at several exits, so the batch is compacted.
    Returns the inputs and their early exit on the Python path."""
    generator = torch.Generator().manual_seed(seed)
    fit_inputs, inputs = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    with torch.no_grad():
        confidence = network(fit_inputs).logits[:-1].softmax(-1).amax(-1).median(dim=1).values
    network.policy = ConfidenceThreshold("max_prob", confidence.tolist())
    expected = network.early_exit(inputs)
    assert len(expected.exit_index.unique()) > 2
    return inputs, expected


def test_native_exits_compact_the_state_themselves_unless_select_is_overridden():
    """The base backbone's ``select`` is plain row selection (``selects_rows``): the kernel copies
    the staying rows out and ``select`` is not called. A backbone that overrides ``select``
    keeps it called, with the same exits either way."""
    network = tiny_network(4)
    inputs, expected = spread_max_prob(network, (64, 1, 8, 8), seed=5)
    base = type(network.backbone)
    calls = []

    class OwnSelect(base):
        def select(self, state, keep):
            calls.append(len(keep))
            return super().select(state, keep)

    def wrapped(backbone):  # a wrapper that copies the method's attributes, marker included
        @functools.wraps(backbone.select)
        def select(state, keep):
            calls.append(len(keep))
            return type(backbone).select(backbone, state, keep)

        return select

    def mocked(backbone):
        return mock.MagicMock(side_effect=lambda state, keep: calls.append(len(keep)) or select_rows(state, keep))

    for variant in ("base", "subclass", "wrapped on the instance", "mock on the instance"):
        native = copy.deepcopy(network)
        if variant == "subclass":
            native.backbone.__class__ = OwnSelect
        elif variant != "base":
            native.backbone.select = (wrapped if variant.startswith("wrapped") else mocked)(native.backbone)
        native.use_native_exits()
        calls.clear()
        result = native.early_exit(inputs)
        assert torch.equal(result.exit_index, expected.exit_index)
        torch.testing.assert_close(result.logits, expected.logits, rtol=1e-5, atol=1e-5)
        assert (len(calls) > 0) == (variant != "base"), variant


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # quantized tensors are deprecated, still made
def test_the_kernel_leaves_states_whose_bytes_are_not_their_values_to_select():
    """Lazy conjugate and negative views and quantized tensors are not copied byte for byte
    (their select gives other values than their bytes); plain states of any dtype are."""
    features = torch.tensor([[4.0, 0.0], [0.0, 0.0], [5.0, 0.0]])  # samples 0 and 2 leave
    weight, bias, empty = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2), torch.empty(0)
    kernel = load_kernel().exit_step

    def staying(state):
        *_, count, rows = kernel(features, POOLS["vector"], 1, weight, bias, torch.ones(2), 0, RULES["max_prob"],
                                 0.9, empty, empty, empty, state, empty, empty, 0.0)
        assert count == 2
        return rows

    plain = torch.arange(6.0).view(3, 2)
    assert torch.equal(staying(plain), plain[1:2]) and torch.equal(staying(plain.to(torch.int8)), plain[1:2].to(torch.int8))
    complex_state = torch.complex(plain, plain + 1)
    assert staying(complex_state.conj()) is None and staying(torch._neg_view(plain)) is None
    assert staying(torch.quantize_per_tensor(plain, 0.5, 0, torch.quint8)) is None
    assert staying(plain.t().contiguous().t()) is None  # samples not one contiguous block each


@pytest.mark.parametrize("adapter", ["timm", "t2t_vit"])
def test_a_vits_class_token_norm_runs_in_the_kernel_with_pythons_exits(adapter):
    """A ViT's representation (its class token under the final LayerNorm) is computed in the
    kernel (``native_represent``): ``represent`` is not called, and the exits are Python's. A
    subclass that changes ``represent`` without describing itself again keeps it called."""
    from jei.backbones.t2t_vit import T2TViT
    from jei.backbones.timm_adapter import TimmBackbone

    from .helpers import with_heads

    torch.manual_seed(0)
    backbone = (TimmBackbone("test_vit", num_classes=5) if adapter == "timm"
                else T2TViT("t2t_vit_7", num_classes=5, img_size=32, exits=[1, 3, 5])).freeze()
    with torch.no_grad():  # a norm that is not the identity, so a skipped norm would show
        backbone.norm.weight.normal_() if adapter == "t2t_vit" else backbone.model.norm.weight.normal_()
    network = with_heads(backbone, 5)
    inputs, expected = spread_max_prob(network, (48, 3, 32, 32), seed=2)
    base, calls = type(backbone), []

    class OwnRepresent(base):
        def represent(self, index, state):
            calls.append(index)
            return super().represent(index, state)

    kernel, pools = load_kernel(), []

    class Recording:  # the kernel, recording which representation each call computes
        def exit_step(self, features, pool, *rest):
            pools.append(pool)
            return kernel.exit_step(features, pool, *rest)

    for cls in (base, OwnRepresent):
        native = copy.deepcopy(network)
        native.backbone.__class__ = cls
        with mock.patch("jei.native_exits.load_kernel", Recording):
            native.use_native_exits()
            calls.clear()
            pools.clear()
            for batch in (inputs, inputs[:1], inputs[7:8]):
                result, python = native.early_exit(batch), network.early_exit(batch)
                assert torch.equal(result.exit_index, python.exit_index)
                torch.testing.assert_close(result.logits, python.logits, rtol=1e-4, atol=1e-5)
        assert (len(calls) > 0) == (cls is OwnRepresent)
        assert set(pools) == {POOLS["vector"] if cls is OwnRepresent else POOLS["class_token_norm"]}


def test_a_global_hook_registered_after_binding_sends_the_call_to_python():
    network = tiny_network(5)
    inputs, _ = spread_max_prob(network, (32, 1, 8, 8), seed=6)
    native = copy.deepcopy(network).use_native_exits()
    native.early_exit(inputs)  # bound
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: output * 2 if module is network.ims[0] or module is native.ims[0] else None)
    try:
        expected = network.early_exit(inputs)
        with pytest.warns(UserWarning, match="global forward hooks"):
            result = native.early_exit(inputs)
    finally:
        handle.remove()
    assert torch.equal(result.exit_index, expected.exit_index)
    torch.testing.assert_close(result.logits, expected.logits)


def test_a_vits_representation_stays_in_python_when_the_kernel_would_miss_something():
    """A hook on the norm after it (``fc_norm``), or ``represent`` replaced on the instance: the
    representation runs in Python (``representation_form`` None), with the same results; a
    subclass that overrides ``represent`` passes ``check_backbone``; and the kernel refuses a
    state with no class token."""
    from jei.backbones.timm_adapter import TimmBackbone
    from jei.native_exits import representation_form
    from jei.testing import check_backbone

    from .helpers import with_heads

    torch.manual_seed(0)
    network = with_heads(TimmBackbone("test_vit", num_classes=5).freeze(), 5)
    inputs, _ = spread_max_prob(network, (24, 3, 32, 32), seed=3)
    assert representation_form(network.backbone) is not None
    hooked = copy.deepcopy(network)
    hooked.backbone.model.fc_norm.register_forward_hook(lambda module, args, output: output * 3)
    patched = copy.deepcopy(network)
    plain = patched.backbone.represent
    patched.backbone.represent = lambda index, state: plain(index, state) * 2
    assert hooked.backbone.native_represent(0) is None and representation_form(patched.backbone) is None
    fast, replaced = copy.deepcopy(network), copy.deepcopy(network)
    fast.backbone.model.norm._fast_norm = True  # timm's fast norm: not F.layer_norm
    replaced.backbone.model.norm = torch.nn.Identity()
    assert fast.backbone.native_represent(0) is None and replaced.backbone.native_represent(0) is None
    for changed in (hooked, patched):
        expected = changed.early_exit(inputs)
        result = copy.deepcopy(changed).use_native_exits().early_exit(inputs)
        assert torch.equal(result.exit_index, expected.exit_index)
        torch.testing.assert_close(result.logits, expected.logits, rtol=1e-4, atol=1e-5)

    class Scaled(TimmBackbone):  # its own represent: native exits (and so the contract) leave it to Python
        def represent(self, index, state):
            return 2 * super().represent(index, state)

    torch.manual_seed(0)
    check_backbone(Scaled("test_vit", num_classes=5), torch.randn(2, 3, 32, 32))
    weight = torch.ones(4)
    with pytest.raises(RuntimeError, match="at least one token"):
        load_kernel().exit_step(torch.empty(2, 0, 4), POOLS["class_token_norm"], 1, torch.randn(3, 4), torch.randn(3),
                                torch.ones(2), 0, RULES["max_prob"], 0.5, EMPTY, EMPTY, EMPTY, EMPTY, weight, weight, 1e-6)
