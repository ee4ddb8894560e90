"""The JEI-DNN objective's losses (METHOD §5) and the gate's uncertainty features (§1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from jei.heads.gates import UncertaintyGate
from jei.heads.uncertainty import uncertainty_features
from jei.objectives.jei import JEIObjective


def random_outputs(seed: int, gates: int = 3, batch: int = 6, classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(gates + 1, batch, classes, generator=generator) * 3
    gate_logits = torch.randn(batch, gates, generator=generator) * 3
    labels = torch.randint(0, classes, (batch,), generator=generator)
    costs = torch.linspace(0.25, 1.0, gates + 1)
    return logits, gate_logits, labels, costs


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.0, 10.0))
def test_losses_are_finite_and_non_negative(seed, cost_weight):
    logits, gate_logits, labels, costs = random_outputs(seed)
    objective = JEIObjective(cost_weight=cost_weight)
    for loss in (
        objective.warmup_loss(logits[:-1], labels),
        objective.gate_loss(logits, gate_logits, labels, costs),
        objective.im_loss(logits[:-1], gate_logits, labels),
    ):
        assert torch.isfinite(loss) and loss >= 0


def test_im_loss_is_exit_0_cross_entropy_when_every_sample_exits_there():
    logits, _, labels, _ = random_outputs(0)
    gate_logits = torch.full((6, 3), -50.0)
    gate_logits[:, 0] = 50.0  # g_0 = 1: all mass on exit 0
    loss = JEIObjective().im_loss(logits[:-1], gate_logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0], labels))


def test_im_loss_ignores_samples_whose_mass_is_on_the_backbone_head():
    logits, _, labels, _ = random_outputs(1)
    gate_logits = torch.full((6, 3), -50.0)  # no gate fires: pi_G = 1
    assert JEIObjective().im_loss(logits[:-1], gate_logits, labels).item() == pytest.approx(0.0, abs=1e-12)
    uniform = JEIObjective(im_weighting="uniform").im_loss(logits[:-1], gate_logits, labels)
    expected = torch.stack([F.cross_entropy(z, labels) for z in logits[:-1]]).mean()
    torch.testing.assert_close(uniform, expected)


def test_im_loss_sends_no_gradient_to_the_gates():
    logits, gate_logits, labels, _ = random_outputs(2)
    logits.requires_grad_(True)
    gate_logits.requires_grad_(True)
    JEIObjective().im_loss(logits[:-1], gate_logits, labels).backward()
    assert gate_logits.grad is None or torch.all(gate_logits.grad == 0)


def test_gate_loss_sends_no_gradient_to_the_ims():
    logits, gate_logits, labels, costs = random_outputs(3)
    logits.requires_grad_(True)
    gate_logits.requires_grad_(True)
    JEIObjective(cost_weight=0.5).gate_loss(logits, gate_logits, labels, costs).backward()
    assert logits.grad is None or torch.all(logits.grad == 0)


def test_zero_cost_weight_targets_the_most_accurate_exit():
    logits, _, labels, costs = random_outputs(4)
    best = JEIObjective(cost_weight=0.0).best_exits(logits, labels, costs)
    losses = torch.stack([F.cross_entropy(z, labels, reduction="none") for z in logits], dim=-1)
    assert torch.equal(best, losses.argmin(-1))


def test_warmup_weights_favour_early_exits():
    """w_l = G + 1 - l, normalised: with equal per-exit losses the weighting is neutral."""
    logits = torch.zeros(3, 4, 5)
    labels = torch.zeros(4, dtype=torch.long)
    assert JEIObjective().warmup_loss(logits, labels).item() == pytest.approx(math.log(5))
    logits[0, :, 0] = 5.0  # exit 0 becomes accurate: its weight 4/(4+3+2) of the loss drops
    drop = math.log(5) - F.cross_entropy(logits[0], labels).item()
    assert JEIObjective().warmup_loss(logits, labels).item() == pytest.approx(math.log(5) - drop * 4 / 9)


def test_positive_weights_come_from_validation():
    objective = JEIObjective(cost_weight=0.0)
    logits, _, labels, costs = random_outputs(5, batch=50)
    objective.update_from_validation(logits, labels, costs)
    assert objective.pos_weight.shape == (3,) and (objective.pos_weight > 0).all()
    assert (objective.pos_weight <= 5.0).all()


def test_correct_gate_target_is_plain_bce_on_whether_each_exit_is_right():
    logits, gate_logits, labels, costs = random_outputs(6, batch=40)
    objective = JEIObjective(cost_weight=7.0, gate_target="correct")
    objective.update_from_validation(logits, labels, costs)  # no class weights for these targets
    assert objective.pos_weight is None
    correct = (logits[:-1].argmax(-1) == labels).T.float()  # [B, G]
    expected = F.binary_cross_entropy_with_logits(gate_logits, correct)
    torch.testing.assert_close(objective.gate_loss(logits, gate_logits, labels, costs), expected)
    # the cost weight does not enter the targets
    other = JEIObjective(cost_weight=0.0, gate_target="correct").gate_loss(logits, gate_logits, labels, costs)
    torch.testing.assert_close(other, expected)
    gate_logits.requires_grad_(True)
    objective.gate_loss(logits, gate_logits, labels, costs).backward()
    assert gate_logits.grad.abs().sum() > 0  # a gradient whatever the class balance


def test_one_class_correctness_targets_are_reported(caplog):
    logits = torch.zeros(3, 4, 2)
    labels = torch.tensor([0, 1, 0, 1])
    logits[0, :, 0] = 5.0  # exit 0 predicts class 0: right on half the samples
    logits[1, torch.arange(4), labels] = 5.0  # exit 1 is always right
    with caplog.at_level("WARNING"):
        JEIObjective(gate_target="correct").warn_one_class_correctness(logits, labels)
    assert "gate(s) [1]: exit is right on every training sample" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"cost_weight": -0.1}, "cost_weight"), ({"cost_weight": float("nan")}, "cost_weight"),
     ({"im_weighting": "mean"}, "im_weighting"), ({"pos_weight_cap": 0}, "pos_weight_cap"),
     ({"gate_target": "best"}, "gate_target"), ({"gate_solver": "adam"}, "gate_solver"),
     ({"gate_solver": "lbfgs"}, "gate_solver"),  # lbfgs fits gates on fixed IMs only (train_ims=False)
     ({"gate_solver": "lbfgs", "train_ims": False, "gate_weight_decay": -1.0}, "gate_weight_decay")],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"objective.{field}"):
        JEIObjective(**kwargs)


def test_uncertainty_features_on_known_distributions():
    uniform = uncertainty_features(torch.zeros(1, 4))[0]
    torch.testing.assert_close(uniform, torch.tensor([0.25, math.log(4), 0.0, math.log(4)]))
    certain = uncertainty_features(torch.tensor([[1e4, 0.0, 0.0]]))[0]
    torch.testing.assert_close(certain, torch.tensor([1.0, 0.0, 1.0, 0.0]))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 40), st.integers(2, 12), st.floats(0.01, 100.0))
def test_uncertainty_features_equal_the_stated_formulas_bit_for_bit(seed, batch, classes, scale):
    """The few-operation implementation computes exactly the four statistics as written
    (softmax, xlogy entropies, top-2 margin, q = softmax(2 log p)): trained gates do not move."""
    logits = torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed)) * scale
    p = torch.softmax(logits, dim=-1)
    q = torch.softmax(2.0 * torch.log_softmax(logits, dim=-1), dim=-1)
    top2 = p.topk(2, dim=-1).values
    entropy = lambda d: -torch.special.xlogy(d, d).sum(dim=-1)  # noqa: E731
    expected = torch.stack([top2[:, 0], entropy(p), top2[:, 0] - top2[:, 1], entropy(q)], dim=-1)
    assert torch.equal(uncertainty_features(logits), expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.floats(1.0, 1e4))
def test_gate_is_finite_for_extreme_logits_and_detached(seed, scale):
    logits = (torch.randn(5, 7, generator=torch.Generator().manual_seed(seed)) * scale).requires_grad_(True)
    gate = UncertaintyGate(num_classes=7)
    out = gate(logits)
    assert out.shape == (5,) and torch.isfinite(out).all()
    out.sum().backward()
    assert logits.grad is None  # the features are detached: the gate reads, not shapes, the IM
