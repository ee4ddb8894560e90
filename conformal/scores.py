"""Non-conformity scores on class probabilities: LAC, APS and RAPS.

A score maps (probabilities, candidate label) to a number that is large when the label is
implausible. Predictors calibrate a threshold on ``score(probs, labels)`` and build a set
from ``score_all(probs) <= threshold``.

The built-in scores compute both faster than the definitions read, with bit-identical
results: calibration computes the true label's score only; LAC sets compare probabilities
with an equivalent cut-off instead of scoring every label; APS/RAPS sets are scored in each
row's sorted order and mapped back to classes. ``tests/test_conformal_fast_path.py`` checks
every shortcut against the plain computation, on both the numpy (CPU) and torch.sort paths.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ._checks import check_labels, check_probs

try:  # optional: numpy's vectorised sort is much faster than torch.sort along short CPU rows
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with the project, but jei.conformal needs only torch
    _np = None

_USE_NUMPY_SORT = True  # tests switch this off to exercise the torch.sort path used on GPUs


def _numpy_sortable(probs: Tensor) -> bool:
    return (
        _USE_NUMPY_SORT
        and _np is not None
        and probs.device.type == "cpu"
        and probs.dtype in (torch.float32, torch.float64)
        and not probs.requires_grad
    )


def _mass_above(probs: Tensor, p_label: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the cumulative sums of the row sorted in descending order, and ``#{j: p_j > p_label}``.

    Any correct sort gives the same sorted values: probs hold no NaN, and the only equal values
    that differ in bits are +0.0 and -0.0, which leave every sum and comparison below unchanged.
    On the CPU the row is sorted by numpy (negated, so that the ascending sort is descending) and
    then worked on in place; elsewhere by ``torch.sort``.
    """
    if _numpy_sortable(probs):
        negated = _np.negative(probs.numpy(), order="C")
        negated.sort(axis=1)
        work = torch.from_numpy(negated)
        n_above = torch.searchsorted(work, -p_label)  # #{j: -p_j < -p_y}
        return work.neg_().cumsum_(dim=1), n_above
    descending = probs.sort(dim=1, descending=True).values
    return descending.cumsum(dim=1), torch.searchsorted(-descending, -p_label)


def _sorted_descending_with_order(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Rows sorted in descending order (a new tensor) and the class at each sorted position (int64)."""
    if _numpy_sortable(probs):
        negated = _np.negative(probs.numpy(), order="C")
        order = torch.from_numpy(_np.argsort(negated, axis=1).astype(_np.int64, copy=False))
        return torch.gather(probs, 1, order, out=torch.from_numpy(negated)), order
    sorted_probs = probs.sort(dim=1, descending=True)
    return sorted_probs.values, sorted_probs.indices


def _row_thresholds(thresholds: float | tuple[Tensor, Tensor], device: torch.device) -> float | Tensor:
    """What scores are compared against: the single float, or from ``(per-group thresholds [G],
    group of each row [N])`` the ``[N, 1]`` float64 threshold of each row."""
    if isinstance(thresholds, tuple):
        per_group, groups = thresholds
        return per_group.to(device)[groups.to(device)].unsqueeze(1)
    return thresholds


def _rows_without_member(scores: Tensor, row_thresholds: float | Tensor, sets: Tensor) -> Tensor:
    """``~sets.any(dim=1)`` for ``sets = scores <= row_thresholds``, from one row minimum.

    A row has a member exactly when its smallest score passes; a NaN score (which never passes)
    poisons the minimum, so such rows are answered from ``sets`` itself.
    """
    smallest = scores.amin(dim=1, keepdim=True)
    empty = ~(smallest <= row_thresholds).squeeze(1)
    nan_rows = smallest.squeeze(1).isnan().nonzero().squeeze(1)
    if nan_rows.numel():
        empty[nan_rows] = ~sets[nan_rows].any(dim=1)
    return empty


class Score(ABC):
    """Base class of non-conformity scores.

    A custom score subclasses this, sets ``name`` and implements ``_score_all``, which receives
    validated probabilities (float32 or wider). ``score`` is derived from it, so calibration
    and set construction always run the identical computation. Built-in scores also override
    the private shortcuts ``_score_at`` and ``_raw_sets``, which must agree with
    ``_score_all`` bit for bit.
    """

    name: str

    def score_all(self, probs: Tensor) -> Tensor:
        """Score of every candidate label, ``[N, K]``, used to build prediction sets."""
        return self._score_all(check_probs(probs))

    def score(self, probs: Tensor, labels: Tensor) -> Tensor:
        """Score of the true label, ``[N]``, used for calibration."""
        probs = check_probs(probs)
        return self._score_at(probs, check_labels(labels, probs))

    @property
    def params(self) -> dict[str, object]:
        """JSON-serialisable hyper-parameters, so results can record which score was used."""
        return {}

    @abstractmethod
    def _score_all(self, probs: Tensor) -> Tensor: ...

    def _score_at(self, probs: Tensor, labels: Tensor) -> Tensor:
        """``_score_all(probs)`` at each row's label, for validated inputs."""
        return self._score_all(probs).gather(1, labels.unsqueeze(1)).squeeze(1)

    def _raw_sets(
        self, probs: Tensor, thresholds: float | tuple[Tensor, Tensor], need_empty: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``score_all(probs) <= thresholds`` and, if asked, which rows came out empty."""
        scores = self._score_all(probs)
        row_thresholds = _row_thresholds(thresholds, scores.device)
        sets = scores <= row_thresholds
        return sets, _rows_without_member(scores, row_thresholds, sets) if need_empty else None

    def _prediction_sets(
        self, probs: Tensor, thresholds: float | tuple[Tensor, Tensor], allow_empty: bool
    ) -> Tensor:
        """Boolean ``[N, K]`` sets for validated ``probs``; unless ``allow_empty``, empty -> {arg-max}."""
        sets, empty = self._raw_sets(probs, thresholds, need_empty=not allow_empty)
        if empty is not None:
            rows = empty.nonzero().squeeze(1)
            if rows.numel():
                sets[rows, probs[rows].argmax(dim=1)] = True
        return sets


class LAC(Score):
    """``1 - p_y`` (Sadinle, Lei & Wasserman 2019): gives the smallest average sets.

    Deterministic: it has no randomised variant, since ties at the threshold have probability
    zero for continuous probabilities.

    Sets are built as ``probs >= c`` instead of ``1 - probs <= threshold``: ``fl(1 - p)`` is
    non-increasing in ``p``, so the floats ``p >= 0`` that pass form a half-line, and ``c``, its
    smallest member in the probabilities' dtype, is found by evaluating the very comparison
    ``(1.0 - p) <= threshold`` on candidate floats. Membership is therefore unchanged.
    """

    name = "lac"

    def _score_all(self, probs: Tensor) -> Tensor:
        return 1.0 - probs

    def _score_at(self, probs: Tensor, labels: Tensor) -> Tensor:
        return 1.0 - probs.gather(1, labels.unsqueeze(1)).squeeze(1)

    def _raw_sets(
        self, probs: Tensor, thresholds: float | tuple[Tensor, Tensor], need_empty: bool
    ) -> tuple[Tensor, Tensor | None]:
        # A row is empty when its largest probability is below the cut-off; a NaN cut-off admits
        # nothing, so it counts as +inf there (probs are finite).
        if isinstance(thresholds, tuple):
            per_group, groups = thresholds
            group_cutoffs = _lac_cutoffs(per_group.cpu(), probs.dtype).to(probs.device)
            groups = groups.to(probs.device)
            sets = probs >= group_cutoffs[groups].unsqueeze(1)
            if not need_empty:
                return sets, None
            row_cutoffs = torch.where(group_cutoffs.isnan(), math.inf, group_cutoffs)[groups]
            return sets, probs.amax(dim=1) < row_cutoffs
        cutoff = _lac_cutoffs(float(thresholds), probs.dtype).item()
        sets = probs >= cutoff
        if not need_empty:
            return sets, None
        return sets, probs.amax(dim=1) < (math.inf if math.isnan(cutoff) else cutoff)


_CUTOFF_BRACKET = 4.0  # half-width of the first bracket around 1 - t, in units of eps * max(1, |t|)


def _lac_cutoffs(thresholds: float | Tensor, dtype: torch.dtype) -> Tensor:
    """For each threshold t, the smallest float ``c >= 0`` of ``dtype`` with ``(1.0 - c) <= t``.

    ``thresholds`` is a Python float (compared as predictors compare a scalar) or a 1-D float64
    CPU tensor (compared as per-row float64 thresholds are). Returns a 1-D CPU tensor of
    ``dtype``; NaN where no float passes, so that ``probs >= c`` is then all False.

    Bisection over the bit patterns of the non-negative floats, which are ordered like the
    floats. It starts from a few roundings around ``1 - t``, and from all of [0, +inf] if the
    switch is not inside them, so the answer never depends on that guess.
    """
    int_type = torch.int32 if dtype == torch.float32 else torch.int64
    t = thresholds if isinstance(thresholds, float) else thresholds.reshape(-1, 1)
    count = 1 if isinstance(thresholds, float) else thresholds.numel()
    inf_bits = torch.tensor([math.inf], dtype=dtype).view(int_type).item()

    def passes(bits: Tensor) -> Tensor:  # bits [count] (int64) of non-negative floats of dtype
        return ((1.0 - bits.to(int_type).view(dtype).unsqueeze(1)) <= t).squeeze(1)

    def bits_of(values: Tensor) -> Tensor:
        return values.nan_to_num(0.0).clamp(0.0, math.inf).to(dtype).view(int_type).to(torch.int64)

    t64 = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(count)
    width = _CUTOFF_BRACKET * torch.finfo(dtype).eps * t64.abs().nan_to_num(1.0).clamp(1.0, 1e300)
    lo, hi = bits_of(1.0 - t64 - width), bits_of(1.0 - t64 + width)
    inside = passes(hi) & ((lo == 0) | ~passes(lo))
    lo = torch.where(inside, lo, 0)
    hi = torch.where(inside, hi, inf_bits)
    while bool((active := lo < hi).any()):
        mid = lo + (hi - lo) // 2
        mid_passes = passes(mid)
        hi = torch.where(active & mid_passes, mid, hi)
        lo = torch.where(active & ~mid_passes, mid + 1, lo)
    cutoffs = lo.to(int_type).view(dtype).clone()
    return cutoffs.masked_fill_(~passes(lo), math.nan)


class APS(Score):
    """Adaptive prediction sets (Romano, Sesia & Candes 2020).

    The score of label y is the probability mass of all classes ranked at or above y:
    ``sum_{j: p_j > p_y} p_j + p_y``. Classes tied with y count as ranked below it, so tied
    classes get equal scores and the score is independent of class order. The randomised
    version subtracts ``U * p_y`` with ``U ~ Uniform[0, 1)`` drawn once per sample, which makes
    coverage exact rather than conservative, at the cost of occasionally empty sets.

    The mass above y is ``top_mass[#{j: p_j > p_y}]``, where ``top_mass`` is the cumulative sum
    of the row sorted in descending order (0 first). Calibration looks up that count for the
    true label only (a binary search in the sorted row); sets are scored in sorted order, where
    the count is the position (or the start of a run of ties), and mapped back to classes.
    """

    name = "aps"

    def __init__(self, randomized: bool = False, generator: torch.Generator | None = None) -> None:
        self.randomized = bool(randomized)
        self.generator = generator

    @property
    def params(self) -> dict[str, object]:
        return {"randomized": self.randomized}

    def _add_penalty_(self, scores: Tensor, rank: Tensor) -> Tensor:
        """Hook for RAPS: add, in place, the term given the 1-based rank ``1 + #{j: p_j > p_y}``."""
        return scores

    def _score_at(self, probs: Tensor, labels: Tensor) -> Tensor:
        n = probs.shape[0]
        p_label = probs.gather(1, labels.unsqueeze(1))
        cumulative, n_above = _mass_above(probs, p_label)
        mass_above = cumulative.gather(1, (n_above - 1).clamp(min=0)).masked_fill_(n_above == 0, 0.0)
        scores = mass_above + p_label
        if self.randomized:
            scores = scores - self._uniform(n, probs) * p_label
        return self._add_penalty_(scores, n_above + 1).squeeze(1)

    def _sorted_scores(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Scores in each row's descending order of probability, and the class at each position.

        Works in place on the sorted copy, with the operations (and their order) of the definition.
        """
        n, k = probs.shape
        scores, order = _sorted_descending_with_order(probs)  # for now the sorted probabilities
        tied = scores[:, 1:] == scores[:, :-1]
        cumulative = scores.cumsum(dim=1)
        randomization = self._uniform(n, probs) * scores if self.randomized else None
        scores[:, 1:] += cumulative[:, :-1]  # p plus the mass strictly above its position
        del cumulative
        if randomization is not None:
            scores -= randomization
        self._add_penalty_(scores, torch.arange(1, k + 1, device=probs.device).unsqueeze(0))
        # Within a run of tied probabilities, the mass above is that above the run's first position.
        if k > 1:
            self._share_run_scores_(scores, tied)
        return scores, order

    @staticmethod
    def _share_run_scores_(scores: Tensor, tied: Tensor) -> None:
        """Give every position of a run of tied probabilities the score of the run's first position."""
        rows = tied.view(torch.uint8).amax(dim=1).nonzero().squeeze(1)  # any(dim=1), a few times faster
        if rows.numel():
            n_rows, k = rows.shape[0], scores.shape[1]
            run_start = torch.ones(n_rows, k, dtype=torch.bool, device=scores.device)
            run_start[:, 1:] = ~tied[rows]
            positions = torch.arange(k, device=scores.device).expand(n_rows, k)
            first = torch.where(run_start, positions, 0).cummax(dim=1).values
            scores[rows] = scores[rows].gather(1, first)

    def _score_all(self, probs: Tensor) -> Tensor:
        scores, order = self._sorted_scores(probs)
        return torch.empty_like(scores).scatter_(1, order, scores)

    def _raw_sets(
        self, probs: Tensor, thresholds: float | tuple[Tensor, Tensor], need_empty: bool
    ) -> tuple[Tensor, Tensor | None]:
        scores, order = self._sorted_scores(probs)
        row_thresholds = _row_thresholds(thresholds, scores.device)
        sorted_sets = scores <= row_thresholds
        empty = _rows_without_member(scores, row_thresholds, sorted_sets) if need_empty else None
        return torch.empty_like(sorted_sets).scatter_(1, order, sorted_sets), empty

    def _uniform(self, n: int, probs: Tensor) -> Tensor:
        device = self.generator.device if self.generator is not None else probs.device
        u = torch.rand((n, 1), generator=self.generator, device=device, dtype=probs.dtype)
        return u.to(probs.device)


class RAPS(APS):
    """Regularised APS (Angelopoulos, Bates, Malik & Jordan 2021).

    Adds ``penalty * max(0, rank(y) - k_reg)`` (1-based rank) to the APS score, which
    discourages sets larger than ``k_reg`` when many tail classes have small probabilities.
    """

    name = "raps"

    def __init__(
        self,
        penalty: float = 0.01,
        k_reg: int = 5,
        randomized: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(randomized=randomized, generator=generator)
        if not float(penalty) >= 0.0:
            raise ValueError(f"penalty must be >= 0 (the RAPS lambda), got {penalty!r}")
        if isinstance(k_reg, bool) or not isinstance(k_reg, int) or k_reg < 0:
            raise ValueError(f"k_reg must be a non-negative int (set size left unpenalised), got {k_reg!r}")
        self.penalty = float(penalty)
        self.k_reg = k_reg

    @property
    def params(self) -> dict[str, object]:
        return {"randomized": self.randomized, "penalty": self.penalty, "k_reg": self.k_reg}

    def _add_penalty_(self, scores: Tensor, rank: Tensor) -> Tensor:
        return scores.add_(self.penalty * (rank - self.k_reg).clamp(min=0).to(scores.dtype))


SCORES: dict[str, type[Score]] = {"lac": LAC, "aps": APS, "raps": RAPS}


def make_score(name: str, **kwargs: object) -> Score:
    """Build a score by name; ``kwargs`` go to its constructor (e.g. ``randomized=True``)."""
    if name not in SCORES:
        raise ValueError(
            f"unknown score name {name!r}; valid names for score are: {', '.join(sorted(SCORES))}"
        )
    return SCORES[name](**kwargs)
