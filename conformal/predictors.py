"""Split and Mondrian (group-conditional) conformal predictors on probability tensors.

A prediction set is ``{y : score_all(probs)[:, y] <= threshold}``. ``SplitConformal`` uses
one threshold for everyone (marginal coverage); ``MondrianConformal`` uses one threshold per
group, e.g. per exit of an early-exit network, which gives coverage within each group
(Vovk, Gammerman & Shafer 2005, "Mondrian conformal predictors"; Vovk 2012).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import (
    check_alpha,
    check_groups,
    check_labels,
    check_nonempty_calibration,
    check_num_groups,
    check_probs,
)
from .quantile import split_conformal_threshold
from .scores import Score, make_score

SMALL_GROUP_POLICIES = ("pool", "full_set")


def _resolve_score(score: str | Score, score_kwargs: dict[str, object]) -> Score:
    if isinstance(score, Score):
        if score_kwargs:
            raise ValueError(
                f"score keyword arguments {sorted(score_kwargs)} were given together with a Score instance; "
                f"set them on the instance instead"
            )
        return score
    return make_score(score, **score_kwargs)


def _json_threshold(threshold: float) -> float | None:
    """+inf (full label set) is not valid JSON, so summaries report it as None."""
    return None if math.isinf(threshold) else threshold


def _calibration_scores(score: Score, probs: Tensor, labels: Tensor) -> Tensor:
    """True-label scores of a calibration set, each input validated once; fails on an empty set."""
    probs = check_probs(probs)
    labels = check_labels(labels, probs)
    check_nonempty_calibration(probs)
    return score._score_at(probs, labels)


class SplitConformal:
    """Split conformal prediction with a single threshold (marginal coverage >= 1 - alpha).

    ``allow_empty=False`` (default) replaces an empty set with the arg-max class. Empty sets
    arise with randomised scores, or when a test row is less confident than every calibration
    row at a large alpha; filling them can only add the true label, so coverage stays valid
    and rises slightly. Extra keyword arguments go to the score (e.g.
    ``randomized=True``, ``penalty=0.01``); ``score`` may also be a ``Score`` instance.
    """

    def __init__(
        self,
        score: str | Score = "lac",
        alpha: float = 0.1,
        allow_empty: bool = False,
        **score_kwargs: object,
    ) -> None:
        self.score = _resolve_score(score, score_kwargs)
        self.alpha = check_alpha(alpha)
        self.allow_empty = bool(allow_empty)
        self.threshold: float | None = None
        self.n_calibration = 0

    def calibrate(self, probs: Tensor, labels: Tensor) -> SplitConformal:
        """Set the threshold from held-out ``probs [N, K]`` and true ``labels [N]``."""
        scores = _calibration_scores(self.score, probs, labels)
        self.threshold = split_conformal_threshold(scores, self.alpha)
        self.n_calibration = scores.shape[0]
        return self

    def predict(self, probs: Tensor) -> Tensor:
        """Prediction sets as a ``torch.bool [N, K]`` mask."""
        if self.threshold is None:
            raise ValueError(
                "SplitConformal.predict was called before calibrate(); call calibrate(probs, labels) first"
            )
        return self.score._prediction_sets(check_probs(probs), self.threshold, self.allow_empty)

    def summary(self) -> dict[str, object]:
        """JSON-serialisable description for results files; an infinite threshold is None."""
        return {
            "method": "split",
            "score": self.score.name,
            "score_params": self.score.params,
            "alpha": self.alpha,
            "allow_empty": self.allow_empty,
            "n_calibration": self.n_calibration,
            "threshold": None if self.threshold is None else _json_threshold(self.threshold),
        }


class MondrianConformal:
    """Group-conditional (Mondrian) split conformal: one threshold per group.

    Each group with more than ``min_group_size`` calibration samples gets its own threshold,
    hence coverage >= 1 - alpha within that group. A group with ``<= min_group_size``
    samples (including groups absent from calibration) follows ``small_group_policy``:

    - ``"pool"``: use the threshold computed on all calibration samples pooled (what the
      JEI-DNN paper does, with min_group_size=20). Its guarantee is only marginal: a small
      group that is harder than average may be under-covered.
    - ``"full_set"``: threshold +inf, i.e. the full label set. Conservative: coverage is
      guaranteed for that group, at the cost of uninformative sets.

    After ``calibrate``: ``thresholds`` (float64 ``[num_groups]``, +inf for full sets),
    ``group_counts`` (int64 ``[num_groups]``), ``fallback_groups`` (sorted ids that followed
    the policy), ``pooled_threshold`` and ``n_calibration``. ``summary()`` reports all of them.
    """

    def __init__(
        self,
        score: str | Score = "lac",
        alpha: float = 0.1,
        min_group_size: int = 20,
        small_group_policy: str = "pool",
        allow_empty: bool = False,
        **score_kwargs: object,
    ) -> None:
        if small_group_policy not in SMALL_GROUP_POLICIES:
            valid = ", ".join(SMALL_GROUP_POLICIES)
            raise ValueError(f"unknown small_group_policy {small_group_policy!r}; choose one of {valid}")
        if isinstance(min_group_size, bool) or not isinstance(min_group_size, int) or min_group_size < 0:
            raise ValueError(f"min_group_size must be a non-negative int, got {min_group_size!r}")
        self.score = _resolve_score(score, score_kwargs)
        self.alpha = check_alpha(alpha)
        self.min_group_size = min_group_size
        self.small_group_policy = small_group_policy
        self.allow_empty = bool(allow_empty)
        self.thresholds: Tensor | None = None
        self.group_counts: Tensor | None = None
        self.fallback_groups: list[int] = []
        self.pooled_threshold: float | None = None
        self.n_calibration = 0

    @property
    def num_groups(self) -> int | None:
        """Number of groups seen or declared at calibration; None before calibrate()."""
        return None if self.thresholds is None else self.thresholds.shape[0]

    def calibrate(
        self, probs: Tensor, labels: Tensor, groups: Tensor, num_groups: int | None = None
    ) -> MondrianConformal:
        """Set one threshold per group from held-out ``probs``, ``labels`` and ``groups [N]``.

        Pass ``num_groups`` when some groups may be absent from calibration (e.g. an exit no
        calibration sample took); otherwise it is ``max(groups) + 1``.
        """
        scores = _calibration_scores(self.score, probs, labels)
        if num_groups is not None:
            check_num_groups(num_groups)
        groups = check_groups(groups, probs.shape[0], "probs", tuple(probs.shape), num_groups).to(
            scores.device
        )
        num_groups = int(groups.max()) + 1 if num_groups is None else num_groups
        counts = torch.bincount(groups, minlength=num_groups).cpu()
        pooled = split_conformal_threshold(scores, self.alpha)
        small_group_threshold = pooled if self.small_group_policy == "pool" else math.inf
        thresholds = torch.empty(num_groups, dtype=torch.float64)
        fallback: list[int] = []
        for g in range(num_groups):
            if counts[g] <= self.min_group_size:
                thresholds[g] = small_group_threshold
                fallback.append(g)
            else:
                thresholds[g] = split_conformal_threshold(scores[groups == g], self.alpha)
        self.thresholds, self.group_counts = thresholds, counts
        self.fallback_groups, self.pooled_threshold = fallback, pooled
        self.n_calibration = scores.shape[0]
        return self

    def predict(self, probs: Tensor, groups: Tensor) -> Tensor:
        """Prediction sets ``torch.bool [N, K]``; row i uses the threshold of ``groups[i]``."""
        if self.thresholds is None:
            raise ValueError(
                "MondrianConformal.predict was called before calibrate(); "
                "call calibrate(probs, labels, groups) first"
            )
        probs = check_probs(probs)
        groups = check_groups(groups, probs.shape[0], "probs", tuple(probs.shape), self.num_groups)
        return self.score._prediction_sets(probs, (self.thresholds, groups), self.allow_empty)

    def summary(self) -> dict[str, object]:
        """JSON-serialisable description of the policy and every group; infinite thresholds are None."""
        groups: list[dict[str, object]] = []
        if self.thresholds is not None and self.group_counts is not None:
            groups = [
                {
                    "group": g,
                    "n": int(n),
                    "threshold": _json_threshold(float(t)),
                    "fell_back": g in self.fallback_groups,
                }
                for g, (n, t) in enumerate(zip(self.group_counts, self.thresholds, strict=True))
            ]
        return {
            "method": "mondrian",
            "score": self.score.name,
            "score_params": self.score.params,
            "alpha": self.alpha,
            "allow_empty": self.allow_empty,
            "small_group_policy": self.small_group_policy,
            "min_group_size": self.min_group_size,
            "num_groups": self.num_groups,
            "n_calibration": self.n_calibration,
            "pooled_threshold": None
            if self.pooled_threshold is None
            else _json_threshold(self.pooled_threshold),
            "groups": groups,
        }
