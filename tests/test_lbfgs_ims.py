"""ConvergedIMs(solver=lbfgs): full-batch L-BFGS per linear IM over a weight-decay grid, the decay
chosen per IM on validation loss; it fits at least as well as a few AdamW epochs, is
deterministic, and rejects bad options by name."""

from __future__ import annotations

import math

import pytest
import torch

from jei.data.base import TensorDataSplits, TensorSplit
from jei.features import CachedSplit, compute_split
from jei.im_phases import ConvergedIMs, fit_linear_ims
from jei.registry import IMS, OBJECTIVES
from jei.train import ExitTraining, OptimizerSettings, exit_outputs, fit_exits, per_exit_val_loss

from .helpers import tiny_network

CPU = torch.device("cpu")
SCHEDULE = ExitTraining(
    batch_size=32, warmup_epochs=2, warmup_patience=2, epochs=1, phase_batches=2,
    optimizer=OptimizerSettings("adam", 0.05, 1e-3, 0.0, 0.0),
)
COSTS = torch.tensor([0.3, 0.6, 0.8, 1.0])
DECAYS = [1e-4, 1e-3, 1e-2, 1e-1]


def noisy_data(n: int = 160) -> TensorDataSplits:
    """Brightness gives the class, with overlap (a finite minimiser); train and val differ."""
    def split(seed: int) -> TensorSplit:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 2
        inputs = torch.randn(n, 1, 8, 8, generator=generator) * 1.5 + 0.6 * labels.view(-1, 1, 1, 1).float() - 0.3
        return TensorSplit(inputs, labels)

    return TensorDataSplits({"train": split(0), "val": split(1), "cal": split(2), "test": split(3)}, 5)


def cached(network, data) -> tuple[CachedSplit, CachedSplit]:
    return compute_split(network, data, "train", 64, CPU), compute_split(network, data, "val", 64, CPU)


def fitted(ims: dict, seed: int = 0):
    network, data = tiny_network(seed), noisy_data()
    train, val = cached(network, data)
    history = fit_exits(network, OBJECTIVES.build("sdn", ims=ims), train, val, COSTS, SCHEDULE, CPU, 0)
    return network, train, val, history


def im_losses(network, split: CachedSplit) -> torch.Tensor:
    return per_exit_val_loss(exit_outputs(network, split, CPU), split.labels)


def test_lbfgs_fits_at_least_as_well_as_a_few_adamw_epochs():
    lbfgs, train, val, history = fitted({"solver": "lbfgs", "weight_decays": DECAYS, "temperature": False})
    adamw, *_ = fitted({"max_epochs": 3, "patience": 3, "optimizer": {"lr": 0.05}, "temperature": False})
    assert history["ims"] == []  # the fit hook trains; no epoch runs
    total = im_losses(lbfgs, train) + im_losses(lbfgs, val)
    assert (total <= im_losses(adamw, train) + im_losses(adamw, val) + 1e-6).all()
    assert torch.equal(lbfgs.temperature, torch.ones_like(lbfgs.temperature))


def test_each_im_keeps_the_decay_of_lowest_validation_loss_and_its_weights():
    network, data = tiny_network(0), noisy_data()
    train, val = cached(network, data)
    fits = fit_linear_ims(network, train, val, CPU, DECAYS)
    losses = im_losses(network, val)
    for index, fit in enumerate(fits):
        assert list(fit.val_losses) == sorted(DECAYS, reverse=True)  # largest first, warm-started
        assert fit.weight_decay == min(fit.val_losses, key=fit.val_losses.get)
        assert losses[index].item() == pytest.approx(fit.val_losses[fit.weight_decay], rel=1e-5)


def random_split(num_samples: int, widths: list[int], num_classes: int, seed: int, informative: bool) -> CachedSplit:
    """Gaussian features; labels random, or (``informative``) the argmax of a fixed linear map."""
    generator = torch.Generator().manual_seed(seed)
    pooled = [torch.randn(num_samples, width, generator=generator) for width in widths]
    if informative:
        torch.manual_seed(123)
        labels = (pooled[0][:, :num_classes] * 4 + 0.3 * torch.randn(num_samples, num_classes)).argmax(-1)
    else:
        labels = torch.randint(num_classes, (num_samples,), generator=generator)
    return CachedSplit(pooled, torch.randn(num_samples, num_classes, generator=generator), labels)


def linear_network(widths: list[int], num_classes: int):
    """tiny_network's backbone with linear IMs of the given input widths (the features are synthetic)."""
    network = tiny_network(0, num_classes=num_classes)
    network.ims = torch.nn.ModuleList(torch.nn.Module() for _ in widths)
    for im, width in zip(network.ims, widths):
        im.classifier = torch.nn.Linear(width, num_classes)
    return network


def test_a_large_decay_wins_on_noise_and_loses_on_a_learnable_task():
    widths, classes, grid = [12, 12, 12], 5, [1e-5, 1e-3, 10.0]
    network = linear_network(widths, classes)
    noise = fit_linear_ims(network, random_split(30, widths, classes, 0, False),
                           random_split(400, widths, classes, 1, False), CPU, grid)
    assert [fit.weight_decay for fit in noise] == [10.0] * 3  # memorised noise predicts badly
    assert all(fit.val_losses[1e-5] > math.log(classes) for fit in noise)

    learnable = fit_linear_ims(network, random_split(400, widths, classes, 2, True),
                               random_split(400, widths, classes, 3, True), CPU, grid)
    assert learnable[0].weight_decay < 10.0  # IM 0 sees the labels' features
    assert learnable[0].val_losses[10.0] == max(learnable[0].val_losses.values())


def test_the_fit_is_deterministic():
    settings = {"solver": "lbfgs", "weight_decays": DECAYS}
    first, *_ = fitted(settings)
    second, *_ = fitted(settings)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_lbfgs_ims_feed_jei_and_are_calibrated():
    network, data = tiny_network(0), noisy_data()
    train, val = cached(network, data)
    objective = OBJECTIVES.build("jei", ims={"solver": "lbfgs", "weight_decays": DECAYS}, train_ims=False)
    history = fit_exits(network, objective, train, val, COSTS, SCHEDULE, CPU, 0)
    assert list(history) == ["ims", "temperature", "alternation"]
    assert not torch.equal(network.temperature[:-1], torch.ones(3))


@pytest.mark.parametrize(("settings", "field"), [
    ({"solver": "sgd"}, "objective.ims.solver"),
    ({"weight_decays": []}, "objective.ims.weight_decays"),
    ({"weight_decays": 1e-3}, "objective.ims.weight_decays"),
    ({"weight_decays": [1e-3, -1.0]}, r"objective.ims.weight_decays\[1\]"),
    ({"weight_decays": [float("nan")]}, r"objective.ims.weight_decays\[0\]"),
    ({"max_iter": 0}, "objective.ims.max_iter"),
    ({"max_iter": 2.5}, "objective.ims.max_iter"),
    ({"tolerance": 0.0}, "objective.ims.tolerance"),
])
def test_bad_options_are_named(settings, field):
    with pytest.raises(ValueError, match=field):
        ConvergedIMs(**settings)
    with pytest.raises(ValueError, match=field):
        OBJECTIVES.build("sdn", ims=settings)


def test_lbfgs_refuses_what_it_cannot_fit_on_its_own():
    network, data = tiny_network(0), noisy_data()
    train, val = cached(network, data)
    network.ensemble_decay = 0.5
    with pytest.raises(ValueError, match="ensemble_decay"):
        fit_linear_ims(network, train, val, CPU, DECAYS)
    mlp = tiny_network(0)
    mlp.ims = torch.nn.ModuleList(IMS.build("pool_mlp", spec=spec, num_classes=5) for spec in mlp.backbone.exit_specs)
    with pytest.raises(ValueError, match="im=pool_linear"):
        fit_linear_ims(mlp, train, val, CPU, DECAYS)
    with pytest.raises(ValueError, match="positive per-IM loss weights"):
        ConvergedIMs(solver="lbfgs").phases(tiny_network(0), torch.tensor([1.0, 0.0, 1.0]))


def test_ims_only_phases_train_on_the_separate_ims_split_and_the_gates_do_not():
    """fit_exits(ims_train=B): the converged IMs are those fitted on B alone (not on train A),
    while the gates' phase still reads A (gates fitted on A give different gates than on B)."""
    data = noisy_data()
    reference = tiny_network(0)
    train, val = cached(reference, data)
    other = compute_split(reference, data, "cal", 64, CPU)
    ims = {"solver": "lbfgs", "weight_decays": DECAYS}

    def run(train_split, ims_split):
        network = tiny_network(0)
        objective = OBJECTIVES.build("jei", ims=ims, train_ims=False, gate_solver="lbfgs", gate_target="correct")
        fit_exits(network, objective, train_split, val, COSTS, SCHEDULE, CPU, 0, ims_train=ims_split)
        return network

    split_ims = run(train, other)
    on_other = run(other, None)
    on_train = run(train, None)
    for a, b, c in zip(split_ims.ims.parameters(), on_other.ims.parameters(), on_train.ims.parameters()):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)
    torch.testing.assert_close(split_ims.temperature, on_other.temperature)  # both calibrated on val
    gates = [torch.cat([p.flatten() for p in n.gates.parameters()]) for n in (split_ims, on_other)]
    assert not torch.allclose(*gates)


def test_auto_solver_takes_lbfgs_for_linear_ims_and_adamw_otherwise():
    auto = ConvergedIMs(solver="auto", weight_decays=DECAYS)
    assert auto.phases(tiny_network(0))[0].fit is not None  # linear IMs: the full-batch fit
    ensembled = tiny_network(0)
    ensembled.ensemble_decay = 0.5
    assert auto.phases(ensembled)[0].fit is None and auto.phases(ensembled)[0].steps  # epochs of AdamW
    assert auto.phases(tiny_network(0), torch.tensor([1.0, 0.0, 1.0]))[0].fit is None  # a zero-weight IM
