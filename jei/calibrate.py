"""Conformal sets per exit and calibration error of a trained early-exit model.

Glue between the pipeline and the standalone ``jei.conformal``: thresholds are calibrated on
the calibration split (disjoint from training and model selection, never augmented, scored
with the final model) and evaluated on the test split's real early-exit predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from jei.conformal import (
    SCORES,
    SMALL_GROUP_POLICIES,
    MondrianConformal,
    SplitConformal,
    coverage,
    coverage_by_group,
    empty_set_rate,
    expected_calibration_error,
    mean_set_size,
    reliability_diagram,
    set_size_by_group,
    size_stratified_coverage,
)


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
        if not self.alphas:
            raise ValueError("conformal.alphas must list at least one alpha in (0, 1)")
        for alpha in self.alphas:
            if not 0 < alpha < 1:
                raise ValueError(f"conformal.alphas: {alpha} is outside (0, 1)")
        # Checked here, before training, rather than when the sets are built at the end.
        if self.score not in SCORES:
            raise ValueError(f"conformal.score must be one of {', '.join(sorted(SCORES))}, got {self.score!r}")
        if self.small_group_policy not in SMALL_GROUP_POLICIES:
            raise ValueError(
                f"conformal.small_group_policy must be one of {', '.join(SMALL_GROUP_POLICIES)}, "
                f"got {self.small_group_policy!r}"
            )
        if self.calibrate_on not in ("cal", "test_halves"):
            raise ValueError(f"conformal.calibrate_on must be 'cal' or 'test_halves', got {self.calibrate_on!r}")
        if self.n_bins < 1:
            raise ValueError(f"conformal.n_bins must be >= 1, got {self.n_bins}")


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
