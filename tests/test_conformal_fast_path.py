"""The optimised jei.conformal paths give exactly the sets of a plain reference computation.

The reference below is the textbook computation, written independently of the package: every
label's score from its definition (sorted cumulative sums, a search for the number of more
probable classes), the true-label score gathered from it, the k-th smallest calibration score
as threshold, ``scores <= threshold`` as set and the arg-max for empty sets. Inputs include
ties, exact zeros, subnormals, low precision and thresholds that equal a test score.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jei.conformal import APS, LAC, RAPS, MondrianConformal, SplitConformal, conformal_rank, make_score
from jei.conformal import scores as scores_module
from jei.conformal._checks import check_probs
from jei.conformal.scores import _lac_cutoffs

# The sort-path fixture only sets a module flag, so sharing it across examples is fine.
PROPS = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
SCORE_KWARGS = [
    ("lac", {}),
    ("aps", {}),
    ("aps", {"randomized": True}),
    ("raps", {}),
    ("raps", {"randomized": True}),
    ("raps", {"penalty": 0.2, "k_reg": 1}),
    ("raps", {"penalty": 0.0, "k_reg": 0, "randomized": True}),
]
SCORE_IDS = [name + "".join(f"-{key}={value}" for key, value in kw.items()) for name, kw in SCORE_KWARGS]


@pytest.fixture(params=["numpy_sort", "torch_sort"])
def sort_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test with numpy's sort (CPU default) and with torch.sort (the path used on GPUs)."""
    monkeypatch.setattr(scores_module, "_USE_NUMPY_SORT", request.param == "numpy_sort")
    return request.param


# --- the reference ---------------------------------------------------------------------------


def _reference_score_all(
    name: str, probs: torch.Tensor, kwargs: dict, u: torch.Tensor | None
) -> torch.Tensor:
    if name == "lac":
        return 1.0 - probs
    n, k = probs.shape
    descending = probs.sort(dim=1, descending=True).values
    top_mass = torch.cat([probs.new_zeros(n, 1), descending.cumsum(dim=1)], dim=1)
    n_above = k - torch.searchsorted(descending.flip(1).contiguous(), probs.contiguous(), right=True)
    scores = top_mass.gather(1, n_above) + probs
    if u is not None:
        scores = scores - u * probs
    if name == "raps":
        penalty, k_reg = kwargs.get("penalty", 0.01), kwargs.get("k_reg", 5)
        scores = scores + float(penalty) * (n_above + 1 - k_reg).clamp(min=0).to(scores.dtype)
    return scores


def _reference_prep(probs: torch.Tensor) -> torch.Tensor:
    return probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs


def _reference_threshold(scores: torch.Tensor, alpha: float) -> float:
    k = conformal_rank(scores.shape[0], alpha)
    return math.inf if k > scores.shape[0] else float(scores.sort().values[k - 1])


def _reference_sets(
    scores: torch.Tensor, probs: torch.Tensor, thresholds: float | torch.Tensor, allow_empty: bool
) -> torch.Tensor:
    sets = scores <= thresholds
    if not allow_empty:
        for i in (~sets.any(dim=1)).nonzero().squeeze(1).tolist():
            sets[i, int(probs[i].argmax())] = True
    return sets


class _Draws:
    """The uniforms a randomised score draws, replayed from the same seed: one (n, 1) per call."""

    def __init__(self, seed: int, randomized: bool) -> None:
        self.generator = torch.Generator().manual_seed(seed) if randomized else None

    def __call__(self, probs: torch.Tensor) -> torch.Tensor | None:
        if self.generator is None:
            return None
        return torch.rand((probs.shape[0], 1), generator=self.generator, dtype=probs.dtype)


def _reference_split(
    name: str,
    kwargs: dict,
    cal: torch.Tensor,
    labels: torch.Tensor,
    test: torch.Tensor,
    alpha: float,
    allow_empty: bool,
    seed: int,
) -> tuple[float, torch.Tensor]:
    draws = _Draws(seed, kwargs.get("randomized", False))
    cal, test = _reference_prep(cal), _reference_prep(test)
    cal_scores = _reference_score_all(name, cal, kwargs, draws(cal)).gather(1, labels[:, None])[:, 0]
    threshold = _reference_threshold(cal_scores, alpha)
    test_scores = _reference_score_all(name, test, kwargs, draws(test))
    return threshold, _reference_sets(test_scores, test, threshold, allow_empty)


def _ours(name: str, kwargs: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed) if kwargs.get("randomized") else None
    return {**kwargs, "generator": generator} if name != "lac" else kwargs


# --- inputs ------------------------------------------------------------------------------------

KINDS = ["gaussian", "peaked", "integer_ties", "quantised", "zeros", "uniform_rows", "near_one"]


def _probs(kind: str, n: int, k: int, rng: np.random.Generator, dtype: torch.dtype) -> torch.Tensor:
    if kind == "gaussian":
        logits = rng.standard_normal((n, k)) * rng.choice([0.3, 1.0, 3.0])
    elif kind == "peaked":  # softmax underflows: exact zeros and subnormals in float32
        logits = rng.standard_normal((n, k)) * 60.0
    elif kind == "integer_ties":
        logits = rng.integers(-2, 3, (n, k)).astype(np.float64)
    elif kind == "quantised":  # few distinct values per row: many ties after normalisation
        weights = rng.integers(0, 4, (n, k)).astype(np.float64)
        weights[np.arange(n), rng.integers(0, k, n)] += 1
        return torch.from_numpy(weights / weights.sum(axis=1, keepdims=True)).to(dtype)
    elif kind == "zeros":  # one-hot or two-hot rows
        weights = np.zeros((n, k))
        weights[np.arange(n), rng.integers(0, k, n)] = 1.0
        weights[np.arange(n), rng.integers(0, k, n)] += rng.random(n)
        return torch.from_numpy(weights / weights.sum(axis=1, keepdims=True)).to(dtype)
    elif kind == "uniform_rows":
        return torch.full((n, k), 1.0 / k, dtype=dtype)
    else:  # near_one: sums off by up to 5e-4 (inside the tolerance), probabilities just above 1 too
        p = rng.dirichlet(np.full(k, 0.2), size=n) * (1 + rng.uniform(-5e-4, 5e-4, (n, 1)))
        return torch.from_numpy(p).to(dtype)
    probs = torch.softmax(torch.from_numpy(logits), dim=1)
    return probs.to(dtype)


@st.composite
def problems(draw: st.DrawFn, max_n: int = 120, max_k: int = 12) -> dict:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k = draw(st.integers(1, max_k))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    kind = draw(st.sampled_from(KINDS))
    n_cal, n_test = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
    cal = _probs(kind, n_cal, k, rng, dtype)
    # Test rows partly copied from calibration, so that thresholds equal some test scores exactly.
    test = torch.cat([_probs(kind, n_test, k, rng, dtype), cal[: n_test // 2]])
    return {
        "cal": cal,
        "labels": torch.from_numpy(rng.integers(0, k, n_cal)),
        "test": test,
        "alpha": draw(st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 0.99])),
        "allow_empty": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


# --- split and Mondrian sets equal the reference ------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs"), SCORE_KWARGS, ids=SCORE_IDS)
@PROPS
@given(problem=problems())
def test_split_sets_equal_reference(sort_path: str, name: str, kwargs: dict, problem: dict) -> None:
    p = problem
    threshold, expected = _reference_split(
        name, kwargs, p["cal"], p["labels"], p["test"], p["alpha"], p["allow_empty"], p["seed"]
    )
    cp = SplitConformal(name, p["alpha"], p["allow_empty"], **_ours(name, kwargs, p["seed"]))
    sets = cp.calibrate(p["cal"], p["labels"]).predict(p["test"])
    assert cp.threshold == threshold
    assert sets.dtype == torch.bool and torch.equal(sets, expected)


@pytest.mark.parametrize(("name", "kwargs"), SCORE_KWARGS, ids=SCORE_IDS)
@PROPS
@given(problem=problems(), num_groups=st.integers(1, 4), data=st.data())
def test_mondrian_sets_equal_reference(
    sort_path: str, name: str, kwargs: dict, problem: dict, num_groups: int, data: st.DataObject
) -> None:
    p = problem
    rng = np.random.default_rng(p["seed"])
    cal_groups = torch.from_numpy(rng.integers(0, num_groups, p["cal"].shape[0]))
    test_groups = torch.from_numpy(rng.integers(0, num_groups, p["test"].shape[0]))
    policy = data.draw(st.sampled_from(["pool", "full_set"]))
    min_size = data.draw(st.integers(0, 10))

    draws = _Draws(p["seed"], kwargs.get("randomized", False))
    cal, test = _reference_prep(p["cal"]), _reference_prep(p["test"])
    cal_scores = _reference_score_all(name, cal, kwargs, draws(cal)).gather(1, p["labels"][:, None])[:, 0]
    pooled = _reference_threshold(cal_scores, p["alpha"])
    thresholds = torch.tensor(
        [
            _reference_threshold(cal_scores[cal_groups == g], p["alpha"])
            if int((cal_groups == g).sum()) > min_size
            else (pooled if policy == "pool" else math.inf)
            for g in range(num_groups)
        ],
        dtype=torch.float64,
    )
    test_scores = _reference_score_all(name, test, kwargs, draws(test))
    expected = _reference_sets(test_scores, test, thresholds[test_groups][:, None], p["allow_empty"])

    ours = _ours(name, kwargs, p["seed"])
    cp = MondrianConformal(name, p["alpha"], min_size, policy, p["allow_empty"], **ours)
    cp.calibrate(p["cal"], p["labels"], cal_groups, num_groups)
    assert torch.equal(cp.thresholds, thresholds)
    assert torch.equal(cp.predict(p["test"], test_groups), expected)


@pytest.mark.parametrize(("name", "kwargs"), SCORE_KWARGS, ids=SCORE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_large_problems_equal_reference(sort_path: str, name: str, kwargs: dict, kind: str) -> None:
    """Benchmark-like shapes (K=100) with a fixed seed: float32, many near-threshold rows."""
    rng = np.random.default_rng(KINDS.index(kind))
    cal = _probs(kind, 3000, 100, rng, torch.float32)
    test = torch.cat([_probs(kind, 2000, 100, rng, torch.float32), cal[:1000]])
    labels = torch.from_numpy(rng.integers(0, 100, 3000))
    for alpha in (0.05, 0.1, 0.5):
        threshold, expected = _reference_split(name, kwargs, cal, labels, test, alpha, False, 11)
        cp = SplitConformal(name, alpha, **_ours(name, kwargs, 11)).calibrate(cal, labels)
        assert cp.threshold == threshold
        assert torch.equal(cp.predict(test), expected)


# --- the scores themselves -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs"), SCORE_KWARGS, ids=SCORE_IDS)
@PROPS
@given(problem=problems())
def test_scores_equal_reference_bit_for_bit(sort_path: str, name: str, kwargs: dict, problem: dict) -> None:
    p = problem
    probs, labels = _reference_prep(p["cal"]), p["labels"]
    u = _Draws(p["seed"], kwargs.get("randomized", False))(probs)
    expected_all = _reference_score_all(name, probs, kwargs, u)
    score = make_score(name, **_ours(name, kwargs, p["seed"]))
    assert torch.equal(score.score_all(p["cal"]), expected_all)
    again = make_score(name, **_ours(name, kwargs, p["seed"]))
    assert torch.equal(again.score(p["cal"], labels), expected_all.gather(1, labels[:, None])[:, 0])


def test_scores_keep_autograd_and_empty_inputs(sort_path: str) -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits, dim=1).requires_grad_()
    for score in (LAC(), APS(), RAPS()):
        scored = score.score_all(probs)
        assert scored.requires_grad
        scored.sum().backward()
        assert score.score_all(probs[:0].detach()).shape == (0, 4)
        assert score.score(probs[:0].detach(), torch.zeros(0, dtype=torch.long)).shape == (0,)


# --- LAC's cut-off on probabilities ----------------------------------------------------------------


@pytest.mark.parametrize("bracket", [4.0, 0.0, 0.01, 1e6])  # 4 is used; the others force every branch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lac_cutoff_is_the_exact_switch_point(
    dtype: torch.dtype, bracket: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scores_module, "_CUTOFF_BRACKET", bracket)
    rng = np.random.default_rng(0)
    eps32 = float(np.finfo(np.float32).eps)
    special = [0.0, -0.0, 1.0, 0.5, 1e-12, 1 - 1e-12, 1 - eps32 / 4, 1 - eps32, 1 + 1e-12, 2.0, -1e-3]
    special += [-5.0, 1e-45, 5e-324, 0.999999, 0.1, math.inf, -math.inf, math.nan, 1e300, -1e300]
    probes = torch.from_numpy(rng.random(200)).to(dtype)
    thresholds = special + (1.0 - probes).double().tolist() + rng.random(50).tolist()
    for t in thresholds:
        (c,) = _lac_cutoffs(t, dtype)
        _check_cutoff(c, lambda p: (1.0 - p) <= t, dtype)
    per_group = torch.tensor(thresholds, dtype=torch.float64)
    cutoffs = _lac_cutoffs(per_group, dtype)
    for t, c in zip(per_group, cutoffs, strict=True):
        # float64 tensor thresholds compare in float64, as per-row thresholds do
        _check_cutoff(c, lambda p: (1.0 - p) <= t.reshape(1), dtype)


def _check_cutoff(c: torch.Tensor, passes, dtype: torch.dtype) -> None:
    top = torch.tensor([torch.finfo(dtype).max, math.inf], dtype=dtype)
    if math.isnan(float(c)):
        assert not passes(top).any()
        return
    assert float(c) >= 0.0 and passes(c.reshape(1)).all()
    below = torch.nextafter(c.reshape(1), torch.tensor([-math.inf], dtype=dtype))
    assert float(c) == 0.0 or not passes(below).any()


def test_lac_sets_at_every_float_around_the_threshold() -> None:
    """Probabilities on a dense float32 grid around each calibrated threshold: same membership."""
    base = torch.tensor([0.3, 0.9, 1e-6, 0.5], dtype=torch.float32)
    steps = torch.arange(-300, 301)
    for center in base:
        bits = (center.view(torch.int32).long() + steps).to(torch.int32)
        column = bits.view(torch.float32).unsqueeze(1)
        probs = torch.cat([column, 1 - column], dim=1)
        groups = torch.zeros(probs.shape[0], dtype=torch.long)
        thresholds = [float(1 - center)] + [float(1 - column[i, 0]) for i in (0, 150, 300, 450, 600)]
        for t in thresholds:
            sets, _ = LAC()._raw_sets(probs, t, need_empty=False)
            assert torch.equal(sets, (1.0 - probs) <= t)
            per_group = (torch.tensor([t], dtype=torch.float64), groups)
            sets, _ = LAC()._raw_sets(probs, per_group, need_empty=False)
            row_thresholds = torch.full((probs.shape[0], 1), t, dtype=torch.float64)
            assert torch.equal(sets, (1.0 - probs) <= row_thresholds)


# --- validation: the same inputs pass and fail, with the same message --------------------------------


def _reference_check(probs: torch.Tensor, name: str = "probs") -> str:
    """The plain checks: isfinite, a sign test and float64 row sums; the message it fails with."""
    tol = max(1e-3, 4 * torch.finfo(probs.dtype).eps)
    if probs.dtype in (torch.float16, torch.bfloat16):
        probs = probs.float()
    if not torch.isfinite(probs).all():
        return f"{name} contains NaN or inf; pass softmax(logits, dim=1) computed from finite logits"
    if (probs < 0).any():
        return (
            f"{name} contains negative values (min {probs.min().item():.3g}); "
            f"it must hold probabilities: pass softmax(logits, dim=1)"
        )
    row_sums = probs.sum(dim=1, dtype=torch.float64)
    worst = int((row_sums - 1.0).abs().argmax())
    if abs(float(row_sums[worst]) - 1.0) > tol:
        return (
            f"rows of {name} must sum to 1 (tolerance {tol:.1e}), but row {worst} sums to "
            f"{float(row_sums[worst]):.6g}; pass softmax(logits, dim=1), not logits or unnormalised scores"
        )
    return "ok"


def _our_check(probs: torch.Tensor) -> str:
    try:
        check_probs(probs)
    except ValueError as err:
        return str(err)
    return "ok"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 10, 100, 1000])
def test_validation_decides_exactly_as_the_float64_reference(dtype: torch.dtype, k: int) -> None:
    """Rows scaled to sit just inside, on and just outside the tolerance; poisoned entries."""
    offsets = [0.0, 1e-6, 9.9e-4, 9.99e-4, 1e-3, 1.0001e-3, 1.01e-3, 3.9e-3, 3.9063e-3, 4e-3, 8e-3, 1e-2]
    for seed, offset, sign, poison in itertools.product(
        range(3), offsets, (1.0, -1.0), (None, math.nan, math.inf, -math.inf, -1e-8, -0.0)
    ):
        rng = np.random.default_rng(seed)
        p = rng.dirichlet(np.full(k, 0.5), size=8)
        p[rng.integers(0, 8)] *= 1 + sign * offset
        probs = torch.from_numpy(p).to(dtype)
        if poison is not None:
            probs[rng.integers(0, 8), rng.integers(0, k)] = poison
        assert _our_check(probs) == _reference_check(probs), (seed, offset, sign, poison)


def test_empty_rows_with_nan_scores_follow_the_comparison() -> None:
    """A NaN score is never a member; the row-minimum shortcut must not hide the other members."""
    scores = torch.tensor([[math.nan, 0.1, 0.9], [math.nan, 0.8, 0.9], [0.2, 0.3, 0.4], [0.7, 0.8, 0.9]])
    for threshold in (0.5, math.inf, (torch.tensor([0.5, 0.85]), torch.tensor([0, 1, 1, 0]))):
        row_thresholds = scores_module._row_thresholds(threshold, scores.device)
        sets = scores <= row_thresholds
        empty = scores_module._rows_without_member(scores, row_thresholds, sets)
        assert torch.equal(empty, ~sets.any(dim=1))


@pytest.mark.parametrize("name", ["lac", "aps", "raps"])
def test_degenerate_thresholds_give_the_reference_sets(sort_path: str, name: str) -> None:
    """NaN, +-inf and out-of-range thresholds (never calibrated, but set by hand) still match."""
    probs = _probs("integer_ties", 40, 5, np.random.default_rng(3), torch.float32)
    groups = torch.arange(40) % 4
    scores = _reference_score_all(name, probs, {}, None)
    score = make_score(name)
    for t in (math.nan, math.inf, -math.inf, -1.0, 5.0, 0.0):
        for allow_empty in (True, False):
            expected = _reference_sets(scores, probs, t, allow_empty)
            assert torch.equal(score._prediction_sets(probs, t, allow_empty), expected)
    per_group = torch.tensor([math.nan, math.inf, -math.inf, 0.5], dtype=torch.float64)
    for allow_empty in (True, False):
        expected = _reference_sets(scores, probs, per_group[groups][:, None], allow_empty)
        assert torch.equal(score._prediction_sets(probs, (per_group, groups), allow_empty), expected)
