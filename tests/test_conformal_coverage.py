"""Statistical check of conformal coverage on synthetic exchangeable data (fixed seed).

Labels are drawn from the probabilities themselves, so calibration and test samples are
exchangeable. Split conformal guarantees 1 - alpha <= E[coverage] <= 1 - alpha + 1/(n+1)
(continuous scores). Around that mean, test coverage fluctuates by the test binomial noise
and by the randomness of the calibrated threshold (its coverage is Beta((n+1)(1-alpha) ish)
distributed, variance about alpha(1-alpha)/(n+2)); the band is 4 standard deviations of both.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jei.conformal import MondrianConformal, SplitConformal, coverage, coverage_by_group

pytestmark = pytest.mark.slow

N_CAL, N_TEST, K = 2000, 5000, 10


def _synthetic(
    n: int, rng: np.random.Generator, concentration: float = 0.5, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dirichlet probabilities and labels drawn from ``probs ** (1 / temperature)`` (renormalised).

    temperature 1: a perfectly calibrated model; > 1: the model is over-confident (the truth is
    flatter than its probabilities); < 1: under-confident.
    """
    probs = rng.dirichlet(np.full(K, concentration), size=n)
    truth = probs ** (1 / temperature)
    truth /= truth.sum(axis=1, keepdims=True)
    labels = (truth.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1).clip(max=K - 1)
    return torch.from_numpy(probs).float(), torch.from_numpy(labels)


def _band(alpha: float, n_cal: int, n_test: int) -> tuple[float, float]:
    sd = math.sqrt(alpha * (1 - alpha) * (1 / n_test + 1 / (n_cal + 2)))
    return 1 - alpha - 4 * sd, 1 - alpha + 1 / (n_cal + 1) + 4 * sd


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
@pytest.mark.parametrize(
    ("score", "kwargs"), [("lac", {}), ("aps", {}), ("raps", {}), ("aps", {"randomized": True})]
)
def test_split_conformal_marginal_coverage(alpha: float, score: str, kwargs: dict[str, bool]) -> None:
    rng = np.random.default_rng(1234)
    cal_probs, cal_labels = _synthetic(N_CAL, rng)
    test_probs, test_labels = _synthetic(N_TEST, rng)
    if kwargs.get("randomized"):
        kwargs = {**kwargs, "generator": torch.Generator().manual_seed(5)}
    sets = SplitConformal(score, alpha, **kwargs).calibrate(cal_probs, cal_labels).predict(test_probs)
    low, high = _band(alpha, N_CAL, N_TEST)
    assert low <= coverage(sets, test_labels) <= high


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_mondrian_covers_groups_a_global_threshold_does_not(score: str) -> None:
    alpha = 0.1
    rng = np.random.default_rng(99)
    # Group 0's model is over-confident, group 1's under-confident: like two exits of one network.
    parts = [_synthetic(N_CAL // 2, rng, temperature=t) for t in (2.0, 0.5)]
    test_parts = [_synthetic(N_TEST // 2, rng, temperature=t) for t in (2.0, 0.5)]

    def stack(ps: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        groups = torch.cat([torch.full((len(y),), g) for g, (_, y) in enumerate(ps)])
        return torch.cat([p for p, _ in ps]), torch.cat([y for _, y in ps]), groups

    cal_probs, cal_labels, cal_groups = stack(parts)
    test_probs, test_labels, test_groups = stack(test_parts)
    low, high = _band(alpha, N_CAL // 2, N_TEST // 2)

    global_sets = SplitConformal(score, alpha).calibrate(cal_probs, cal_labels).predict(test_probs)
    global_cov = coverage_by_group(global_sets, test_labels, test_groups, 2)
    assert global_cov[0] < low and global_cov[1] > high, (
        f"a global threshold should miss per group: {global_cov}"
    )

    mondrian = MondrianConformal(score, alpha).calibrate(cal_probs, cal_labels, cal_groups)
    assert mondrian.fallback_groups == []
    per_group = coverage_by_group(mondrian.predict(test_probs, test_groups), test_labels, test_groups, 2)
    assert ((per_group >= low) & (per_group <= high)).all(), f"Mondrian coverage per group: {per_group}"
