"""Conformal sets per exit and calibration error of a trained early-exit model.

Glue between the pipeline and the standalone ``jei.conformal``: thresholds are calibrated on
the calibration split (disjoint from training and model selection, never augmented, scored
with the final model) and evaluated on the test split's real early-exit predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from jei.conformal import (
    SCORES,
    SMALL_GROUP_POLICIES,
    MondrianConformal,
    SplitConformal,
    conformal_rank,
    coverage,
    coverage_by_group,
    empty_set_rate,
    expected_calibration_error,
    mean_set_size,
    reliability_diagram,
    set_size_by_group,
    size_stratified_coverage,
)
from jei.errors import ConfigError
from jei.validate import boolean, choice, integer, number, sequence


@dataclass
class ConformalSettings:
    alphas: list[float] = field(default_factory=lambda: [0.05, 0.1])
    score: str = "lac"
    min_group_size: int = 20
    small_group_policy: str = "pool"
    allow_empty: bool = True
    n_bins: int = 15
    calibrate_on: str = "cal"  # "cal" | "test_halves" (see calibration_folds)

    def __post_init__(self) -> None:
        # Checked here, before training, rather than when the sets are built at the end.
        alphas = sequence(self.alphas, "conformal.alphas", "[0.05, 0.1]", min_length=1)
        for alpha in alphas:
            number(alpha, "conformal.alphas", hint="list miscoverage levels in (0, 1), such as [0.05, 0.1]")
            if not 0 < alpha < 1:
                raise ConfigError(
                    f"conformal.alphas: {alpha} is outside (0, 1); use e.g. [0.05, 0.1]", "conformal.alphas"
                )
        self.alphas = [float(alpha) for alpha in alphas]
        choice(self.score, "conformal.score", sorted(SCORES))
        integer(self.min_group_size, "conformal.min_group_size", minimum=0,
                hint="an exit with at most this many calibration samples uses the fallback (e.g. 20)")
        choice(self.small_group_policy, "conformal.small_group_policy", SMALL_GROUP_POLICIES)
        boolean(self.allow_empty, "conformal.allow_empty")
        integer(self.n_bins, "conformal.n_bins", minimum=1, hint="ECE bins, e.g. 15")
        choice(self.calibrate_on, "conformal.calibrate_on", ("cal", "test_halves"))


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration samples for which split conformal at ``alpha`` has a finite
    threshold: the smallest n with ceil((n + 1)(1 - alpha)) <= n, i.e. n >= (1 - alpha) / alpha."""
    exact = Fraction(repr(float(alpha)))
    return math.ceil((1 - exact) / exact)


def calibration_warnings(n_cal: int, alphas: list[float], where: str = "the calibration split") -> list[str]:
    """One message per alpha for which ``n_cal`` calibration samples are too few: the conformal
    rank ceil((n+1)(1-alpha)) exceeds n, so every prediction set is the full label set (valid,
    but uninformative). Empty when every alpha is fine."""
    messages = []
    for alpha in alphas:
        if conformal_rank(n_cal, alpha) > n_cal:
            messages.append(
                f"conformal.alphas: alpha={alpha:g} needs at least {min_calibration_size(alpha)} calibration "
                f"samples, {where} has {n_cal}, so every prediction set at this alpha is the full label set; "
                f"use a larger alpha or more calibration data (data.fractions, data.max_per_split)"
            )
    return messages


def _nan_to_none(values: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def _set_metrics(sets: Tensor, labels: Tensor, exits: Tensor, num_exits: int) -> dict[str, Any]:
    return {
        "coverage": coverage(sets, labels),
        "mean_set_size": mean_set_size(sets),
        "empty_set_rate": empty_set_rate(sets),
        "per_exit_coverage": _nan_to_none(coverage_by_group(sets, labels, exits, num_exits)),
        "per_exit_set_size": _nan_to_none(set_size_by_group(sets, exits, num_exits)),
        "size_stratified_coverage": {str(k): v for k, v in size_stratified_coverage(sets, labels).items()},
    }


@dataclass
class Scored:
    """Probabilities at the exit each sample took, the labels, and those exits."""

    probs: Tensor
    labels: Tensor
    exits: Tensor

    def subset(self, index: Tensor) -> Scored:
        return Scored(self.probs[index], self.labels[index], self.exits[index])


def calibration_folds(cal: Scored, test: Scored, calibrate_on: str, seed: int) -> list[tuple[Scored, Tensor]]:
    """(calibration samples, test positions they give sets to) pairs.

    ``"cal"``: the calibration split for every test sample. ``"test_halves"``: two-fold
    cross-conformal on the test split (each half calibrated on the other), for backbones that
    were trained on every training image, where a calibration split cut from the training set
    is not exchangeable with the test set.
    """
    if calibrate_on == "cal":
        return [(cal, torch.arange(len(test.labels)))]
    order = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(seed))
    first, second = order[: len(order) // 2], order[len(order) // 2 :]
    return [(test.subset(first), second), (test.subset(second), first)]


def conformal_metrics(
    folds: list[tuple[Scored, Tensor]], test: Scored, num_exits: int, settings: ConformalSettings
) -> dict[str, Any]:
    """Per-exit (Mondrian) and global split conformal sets for every test sample, for every
    alpha in ``settings``, with their coverage and size overall and per exit."""
    results = []
    for alpha in settings.alphas:
        sets = {kind: torch.zeros_like(test.probs, dtype=torch.bool) for kind in ("per_exit", "global")}
        summaries: dict[str, list[dict[str, Any]]] = {"per_exit": [], "global": []}
        for cal, index in folds:
            per_exit = MondrianConformal(
                settings.score,
                alpha=alpha,
                min_group_size=settings.min_group_size,
                small_group_policy=settings.small_group_policy,
                allow_empty=settings.allow_empty,
            ).calibrate(cal.probs, cal.labels, cal.exits, num_groups=num_exits)
            overall = SplitConformal(settings.score, alpha=alpha, allow_empty=settings.allow_empty).calibrate(
                cal.probs, cal.labels
            )
            sets["per_exit"][index] = per_exit.predict(test.probs[index], test.exits[index])
            sets["global"][index] = overall.predict(test.probs[index])
            summaries["per_exit"].append(per_exit.summary())
            summaries["global"].append(overall.summary())
        results.append({
            "alpha": alpha,
            **{
                kind: {**_set_metrics(sets[kind], test.labels, test.exits, num_exits), "calibration": summaries[kind]}
                for kind in ("per_exit", "global")
            },
        })
    return {
        "score": settings.score,
        "calibrate_on": settings.calibrate_on,
        "small_group_policy": settings.small_group_policy,
        "min_group_size": settings.min_group_size,
        "n_test_per_exit": torch.bincount(test.exits, minlength=num_exits).tolist(),
        "n_calibration_per_exit": sum(
            torch.bincount(cal.exits, minlength=num_exits) for cal, _ in folds
        ).tolist(),
        "results": results,
    }


def calibration_metrics(
    gated_probs: Tensor, labels: Tensor, all_exit_probs: Tensor, n_bins: int
) -> dict[str, Any]:
    """ECE (equal-width and equal-mass bins, over the whole set) of the gated predictions and
    of every exit on all samples, plus reliability-diagram data of the gated predictions."""
    out: dict[str, Any] = {"n_bins": n_bins}
    for binning in ("equal_width", "equal_mass"):
        out[f"ece_gated_{binning}"] = expected_calibration_error(gated_probs, labels, n_bins, binning)
        out[f"ece_per_exit_{binning}"] = [
            expected_calibration_error(probs, labels, n_bins, binning) for probs in all_exit_probs
        ]
    diagram = reliability_diagram(gated_probs, labels, n_bins, "equal_width")
    out["reliability_gated"] = {
        key: _nan_to_none(torch.tensor(value, dtype=torch.float64)) if isinstance(value, list) else value
        for key, value in diagram.items()
    }
    return out
