"""Property tests for jei.conformal: the quantile rule, set construction, Mondrian policies, metrics."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jei.conformal import (
    APS,
    RAPS,
    MondrianConformal,
    SplitConformal,
    conformal_rank,
    coverage,
    coverage_by_group,
    empty_set_rate,
    expected_calibration_error,
    make_score,
    mean_set_size,
    reliability_diagram,
    set_size_by_group,
    size_stratified_coverage,
    split_conformal_threshold,
)

PROPS = settings(deadline=None, max_examples=30)
DETERMINISTIC_SCORES = ["lac", "aps", "raps"]

alphas = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True)
seeds = st.integers(0, 2**31 - 1)


@st.composite
def score_vectors(draw: st.DrawFn, max_n: int = 200) -> torch.Tensor:
    """Seeded calibration scores: continuous, on a wide range, or with many ties."""
    n = draw(st.integers(1, max_n))
    rng = np.random.default_rng(draw(seeds))
    kind = draw(st.sampled_from(["uniform", "wide", "ties"]))
    if kind == "ties":
        return torch.from_numpy(rng.integers(-3, 4, n).astype(np.float64))
    return torch.from_numpy(rng.random(n) if kind == "uniform" else 1e3 * rng.standard_normal(n))


@st.composite
def prob_tensors(draw: st.DrawFn, max_n: int = 40, max_k: int = 8) -> torch.Tensor:
    """Softmax of seeded random logits (fast to draw); integer logits produce tied probabilities.

    Built in numpy: tiny torch reductions are slow when their thread pool competes for cores.
    """
    n, k = draw(st.integers(1, max_n)), draw(st.integers(2, max_k))
    rng = np.random.default_rng(draw(seeds))
    scale = draw(st.sampled_from([0.0, 0.1, 1.0, 5.0, 20.0, None]))
    logits = (
        rng.integers(-2, 3, (n, k)).astype(np.float64)
        if scale is None
        else scale * rng.standard_normal((n, k))
    )
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return torch.from_numpy(weights / weights.sum(axis=1, keepdims=True))


@st.composite
def calibration_data(draw: st.DrawFn, max_n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    probs = draw(prob_tensors(max_n=max_n))
    labels = np.random.default_rng(draw(seeds)).integers(0, probs.shape[1], probs.shape[0])
    return probs, torch.from_numpy(labels)


# --- the quantile rule -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "alpha", "rank"),
    [(9, 0.1, 9), (99, 0.1, 90), (9, 0.3, 7), (18, 0.1, 18), (8, 0.1, 9), (1, 0.5, 1), (0, 0.5, 1)],
)
def test_conformal_rank_hand_cases(n: int, alpha: float, rank: int) -> None:
    assert conformal_rank(n, alpha) == rank


@PROPS
@given(n=st.integers(0, 10_000), milli=st.integers(1, 999))
def test_conformal_rank_matches_integer_arithmetic(n: int, milli: int) -> None:
    # ceil((n+1)(1 - milli/1000)) with integers only: an oracle free of float rounding.
    assert conformal_rank(n, milli / 1000) == -(-(n + 1) * (1000 - milli) // 1000)


@PROPS
@given(scores=score_vectors(), alpha=alphas)
@example(scores=torch.zeros(1, dtype=torch.float64), alpha=0.5)
def test_threshold_is_the_rank_k_order_statistic(scores: torch.Tensor, alpha: float) -> None:
    n = scores.shape[0]
    threshold = split_conformal_threshold(scores, alpha)
    # +inf exactly when ceil((n+1)(1-alpha)) > n, i.e. when alpha < 1/(n+1).
    assert math.isinf(threshold) == (Fraction(repr(alpha)) < Fraction(1, n + 1))
    if math.isinf(threshold):
        return
    k = conformal_rank(n, alpha)
    assert int((scores <= threshold).sum()) >= k > int((scores < threshold).sum())


@PROPS
@given(scores=score_vectors(), alpha=alphas)
def test_threshold_covers_at_least_one_minus_alpha_of_calibration(scores: torch.Tensor, alpha: float) -> None:
    threshold = split_conformal_threshold(scores, alpha)
    assert (scores <= threshold).double().mean().item() >= 1 - alpha


@PROPS
@given(scores=score_vectors(), a=alphas, b=alphas)
def test_threshold_non_increasing_in_alpha(scores: torch.Tensor, a: float, b: float) -> None:
    low, high = min(a, b), max(a, b)
    assert split_conformal_threshold(scores, low) >= split_conformal_threshold(scores, high)


@PROPS
@given(scores=score_vectors(), alpha=alphas, seed=seeds)
def test_threshold_permutation_invariant(scores: torch.Tensor, alpha: float, seed: int) -> None:
    perm = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(seed))
    assert split_conformal_threshold(scores[perm], alpha) == split_conformal_threshold(scores, alpha)


# --- scores and sets -----------------------------------------------------------------------


def _aps_oracle(probs: torch.Tensor, penalty: float = 0.0, k_reg: int = 0) -> torch.Tensor:
    """Naive APS/RAPS: mass of classes strictly more probable, plus p_y, plus the rank penalty."""
    out = torch.empty_like(probs)
    for i, row in enumerate(probs.tolist()):
        for y, p_y in enumerate(row):
            above = [p for p in row if p > p_y]
            out[i, y] = sum(above) + p_y + penalty * max(0, len(above) + 1 - k_reg)
    return out


@PROPS
@given(probs=prob_tensors(max_n=10), penalty=st.floats(0, 1), k_reg=st.integers(0, 9))
def test_aps_and_raps_match_naive_oracle(probs: torch.Tensor, penalty: float, k_reg: int) -> None:
    torch.testing.assert_close(APS().score_all(probs), _aps_oracle(probs))
    torch.testing.assert_close(RAPS(penalty, k_reg).score_all(probs), _aps_oracle(probs, penalty, k_reg))
    torch.testing.assert_close(make_score("lac").score_all(probs), 1 - probs)


@PROPS
@given(
    data=calibration_data(), name=st.sampled_from(DETERMINISTIC_SCORES), randomized=st.booleans(), seed=seeds
)
def test_score_equals_score_all_at_label(
    data: tuple[torch.Tensor, torch.Tensor], name: str, randomized: bool, seed: int
) -> None:
    probs, labels = data
    kwargs = {} if name == "lac" else {"randomized": randomized}
    at_label = (
        make_score(name, **kwargs, **_generator(name, seed)).score_all(probs).gather(1, labels[:, None])
    )
    assert torch.equal(
        make_score(name, **kwargs, **_generator(name, seed)).score(probs, labels), at_label[:, 0]
    )


def _generator(name: str, seed: int) -> dict[str, torch.Generator]:
    return {} if name == "lac" else {"generator": torch.Generator().manual_seed(seed)}


@PROPS
@given(
    data=calibration_data(),
    test=prob_tensors(),
    name=st.sampled_from(DETERMINISTIC_SCORES),
    a=alphas,
    b=alphas,
)
def test_sets_nested_in_alpha(
    data: tuple[torch.Tensor, torch.Tensor], test: torch.Tensor, name: str, a: float, b: float
) -> None:
    probs, labels = data
    k = min(probs.shape[1], test.shape[1])
    probs, labels, test = _renormalise(probs[:, :k]), labels % k, _renormalise(test[:, :k])
    larger = SplitConformal(name, alpha=min(a, b)).calibrate(probs, labels).predict(test)
    smaller = SplitConformal(name, alpha=max(a, b)).calibrate(probs, labels).predict(test)
    assert torch.all(larger | ~smaller), "a smaller alpha must give a superset"


def _renormalise(probs: torch.Tensor) -> torch.Tensor:
    return probs / probs.sum(dim=1, keepdim=True)


@PROPS
@given(data=calibration_data(), name=st.sampled_from(DETERMINISTIC_SCORES), alpha=alphas)
def test_sets_keep_every_class_at_least_as_probable_as_a_member(
    data: tuple[torch.Tensor, torch.Tensor], name: str, alpha: float
) -> None:
    probs, labels = data
    # allow_empty=True: pure thresholding (the arg-max fill-in keeps one class of a tie).
    sets = SplitConformal(name, alpha=alpha, allow_empty=True).calibrate(probs, labels).predict(probs)
    # Smallest probability inside each set; every class at least that probable must be inside.
    floor = torch.where(sets, probs, torch.inf).min(dim=1, keepdim=True).values
    assert torch.equal(sets, probs >= floor)


@PROPS
@given(
    data=calibration_data(max_n=30), name=st.sampled_from(DETERMINISTIC_SCORES), fraction=st.floats(0.01, 1.0)
)
def test_infinite_threshold_gives_full_sets(
    data: tuple[torch.Tensor, torch.Tensor], name: str, fraction: float
) -> None:
    probs, labels = data
    alpha = fraction / (probs.shape[0] + 1.5)  # below 1/(n+1), so the rank exceeds n
    cp = SplitConformal(name, alpha=alpha).calibrate(probs, labels)
    assert cp.threshold == math.inf
    assert cp.predict(probs).all()


@PROPS
@given(data=calibration_data(), name=st.sampled_from(["aps", "raps"]), alpha=alphas, seed=seeds)
def test_allow_empty_false_fills_empty_sets_with_argmax(
    data: tuple[torch.Tensor, torch.Tensor], name: str, alpha: float, seed: int
) -> None:
    probs, labels = data

    def sets(allow_empty: bool) -> torch.Tensor:
        cp = SplitConformal(
            name, alpha, allow_empty, randomized=True, generator=torch.Generator().manual_seed(seed)
        )
        return cp.calibrate(probs, labels).predict(probs)

    raw, filled = sets(True), sets(False)
    empty = ~raw.any(dim=1)
    expected = raw.clone()
    expected[empty, probs[empty].argmax(dim=1)] = True
    assert torch.equal(filled, expected)
    assert empty_set_rate(filled) == 0.0


def test_randomized_scores_reproducible_with_generator() -> None:
    probs = torch.softmax(torch.randn(50, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    first = APS(randomized=True, generator=torch.Generator().manual_seed(7)).score_all(probs)
    again = APS(randomized=True, generator=torch.Generator().manual_seed(7)).score_all(probs)
    assert torch.equal(first, again)
    assert not torch.equal(first, APS().score_all(probs))


def test_low_precision_probs_are_accepted() -> None:
    probs = torch.softmax(torch.randn(200, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = probs.argmax(dim=1)
    for dtype in (torch.float16, torch.bfloat16):
        sets = SplitConformal("aps", alpha=0.2).calibrate(probs.to(dtype), labels).predict(probs.to(dtype))
        assert sets.dtype == torch.bool and sets.shape == probs.shape


# --- Mondrian ----------------------------------------------------------------------------


@st.composite
def grouped_data(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    probs, labels = draw(calibration_data(max_n=80))
    num_groups = draw(st.integers(1, 5))
    groups = torch.from_numpy(
        draw(hnp.arrays(np.int64, probs.shape[0], elements=st.integers(0, num_groups - 1)))
    )
    return probs, labels, groups, num_groups + draw(st.integers(0, 2))  # some groups may be absent


@PROPS
@given(
    data=grouped_data(),
    name=st.sampled_from(DETERMINISTIC_SCORES),
    alpha=st.floats(0.05, 0.5),
    min_group_size=st.integers(0, 30),
    policy=st.sampled_from(["pool", "full_set"]),
)
def test_mondrian_small_group_policy(
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
    name: str,
    alpha: float,
    min_group_size: int,
    policy: str,
) -> None:
    probs, labels, groups, num_groups = data
    cp = MondrianConformal(name, alpha, min_group_size, policy).calibrate(probs, labels, groups, num_groups)
    scores = make_score(name).score(probs, labels)
    pooled = split_conformal_threshold(scores, alpha)
    counts = torch.bincount(groups, minlength=num_groups)
    assert torch.equal(cp.group_counts, counts)
    assert cp.fallback_groups == [g for g in range(num_groups) if counts[g] <= min_group_size]
    assert cp.pooled_threshold == pooled
    for g in range(num_groups):
        if g in cp.fallback_groups:
            assert cp.thresholds[g] == (pooled if policy == "pool" else math.inf)
        else:
            assert cp.thresholds[g] == split_conformal_threshold(scores[groups == g], alpha)
    sets = cp.predict(probs, groups)
    if policy == "full_set":
        assert sets[torch.isin(groups, torch.tensor(cp.fallback_groups, dtype=torch.long))].all()
    summary = json.loads(json.dumps(cp.summary(), allow_nan=False))
    assert summary["small_group_policy"] == policy and summary["min_group_size"] == min_group_size
    assert [row["fell_back"] for row in summary["groups"]] == [
        g in cp.fallback_groups for g in range(num_groups)
    ]
    assert [row["n"] for row in summary["groups"]] == counts.tolist()


@PROPS
@given(data=calibration_data(), test=prob_tensors(), name=st.sampled_from(DETERMINISTIC_SCORES), alpha=alphas)
def test_mondrian_with_one_group_equals_split(
    data: tuple[torch.Tensor, torch.Tensor], test: torch.Tensor, name: str, alpha: float
) -> None:
    probs, labels = data
    k = min(probs.shape[1], test.shape[1])
    probs, labels, test = _renormalise(probs[:, :k]), labels % k, _renormalise(test[:, :k])
    split = SplitConformal(name, alpha).calibrate(probs, labels)
    mondrian = MondrianConformal(name, alpha, min_group_size=0).calibrate(
        probs, labels, torch.zeros_like(labels)
    )
    assert mondrian.thresholds.tolist() == [split.threshold]
    assert torch.equal(
        mondrian.predict(test, torch.zeros(test.shape[0], dtype=torch.long)), split.predict(test)
    )


def test_mondrian_pool_versus_full_set_on_a_small_group() -> None:
    probs = torch.softmax(torch.randn(100, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.randint(0, 4, (100,), generator=torch.Generator().manual_seed(2))
    groups = torch.cat([torch.zeros(90, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    pool = MondrianConformal("lac", 0.1, min_group_size=20, small_group_policy="pool")
    full = MondrianConformal("lac", 0.1, min_group_size=20, small_group_policy="full_set")
    pool.calibrate(probs, labels, groups, num_groups=3)
    full.calibrate(probs, labels, groups, num_groups=3)
    assert pool.fallback_groups == full.fallback_groups == [1, 2]
    assert (
        pool.thresholds[1]
        == pool.thresholds[2]
        == split_conformal_threshold(1 - probs.gather(1, labels[:, None])[:, 0], 0.1)
    )
    assert full.thresholds[1:].tolist() == [math.inf, math.inf]
    assert full.summary()["groups"][2] == {"group": 2, "n": 0, "threshold": None, "fell_back": True}
    assert full.predict(probs, torch.full((100,), 2)).all()


# --- metrics ---------------------------------------------------------------------------------

SETS = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
LABELS = torch.tensor([0, 2, 1, 2])
GROUPS = torch.tensor([0, 0, 1, 1])


def test_set_metrics_on_hand_made_example() -> None:
    assert coverage(SETS, LABELS) == 0.5
    assert mean_set_size(SETS) == 1.5
    assert empty_set_rate(SETS) == 0.25
    torch.testing.assert_close(
        coverage_by_group(SETS, LABELS, GROUPS, 3),
        torch.tensor([0.5, 0.5, math.nan], dtype=torch.float64),
        equal_nan=True,
    )
    torch.testing.assert_close(
        set_size_by_group(SETS, GROUPS, 3),
        torch.tensor([1.5, 1.5, math.nan], dtype=torch.float64),
        equal_nan=True,
    )
    assert size_stratified_coverage(SETS, LABELS) == {
        0: {"coverage": 0.0, "count": 1},
        1: {"coverage": 1.0, "count": 1},
        2: {"coverage": 0.0, "count": 1},
        3: {"coverage": 1.0, "count": 1},
    }


def _two_level_calibrated() -> tuple[torch.Tensor, torch.Tensor]:
    """20 binary predictions: confidence 0.6 with 6/10 correct and 0.9 with 9/10 correct."""
    conf = torch.tensor([0.6] * 10 + [0.9] * 10, dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], dim=1)
    labels = torch.tensor([0] * 6 + [1] * 4 + [0] * 9 + [1], dtype=torch.long)
    return probs, labels


@pytest.mark.parametrize(("binning", "n_bins"), [("equal_width", 15), ("equal_width", 10), ("equal_mass", 2)])
def test_ece_zero_when_perfectly_calibrated(binning: str, n_bins: int) -> None:
    probs, labels = _two_level_calibrated()
    assert expected_calibration_error(probs, labels, n_bins, binning) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_overconfident_example() -> None:
    probs, _ = _two_level_calibrated()
    wrong = torch.ones(20, dtype=torch.long)  # accuracy 0 everywhere: ECE = mean confidence
    assert expected_calibration_error(probs, wrong) == pytest.approx(0.75)
    diagram = reliability_diagram(probs, wrong, n_bins=15)
    assert sum(diagram["count"]) == 20 and len(diagram["bin_edges"]) == 16
    assert [c for c in diagram["count"] if c] == [10, 10]


@PROPS
@given(probs=prob_tensors(max_n=200), n_bins=st.integers(1, 20), seed=seeds)
def test_equal_mass_bins_have_near_equal_counts(probs: torch.Tensor, n_bins: int, seed: int) -> None:
    labels = torch.randint(
        0, probs.shape[1], (probs.shape[0],), generator=torch.Generator().manual_seed(seed)
    )
    diagram = reliability_diagram(probs, labels, n_bins, "equal_mass")
    counts = diagram["count"]
    assert sum(counts) == probs.shape[0] and max(counts) - min(counts) <= 1
    edges = diagram["bin_edges"]
    assert edges[0] == 0.0 and edges[-1] == 1.0 and edges == sorted(edges)
    for lo, hi, conf, count in zip(edges[:-1], edges[1:], diagram["confidence"], counts, strict=True):
        assert count == 0 or lo - 1e-12 <= conf <= hi + 1e-12
    assert 0.0 <= expected_calibration_error(probs, labels, n_bins, "equal_mass") <= 1.0


@PROPS
@given(probs=prob_tensors(max_n=200), n_bins=st.integers(1, 20), seed=seeds)
def test_equal_width_bins_contain_their_confidences(probs: torch.Tensor, n_bins: int, seed: int) -> None:
    labels = torch.randint(
        0, probs.shape[1], (probs.shape[0],), generator=torch.Generator().manual_seed(seed)
    )
    diagram = reliability_diagram(probs, labels, n_bins, "equal_width")
    assert sum(diagram["count"]) == probs.shape[0]
    edges = diagram["bin_edges"]
    for lo, hi, conf, count in zip(
        edges[:-1], edges[1:], diagram["confidence"], diagram["count"], strict=True
    ):
        assert (count == 0 and math.isnan(conf)) or lo - 1e-12 <= conf <= hi + 1e-12
