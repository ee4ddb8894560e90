"""Conformal prediction sets and calibration metrics on probability tensors.

Standalone: imports only the standard library, torch and (if installed, for faster CPU sorts)
numpy; works on tensors (never on models), so it can be used without the rest of jei-dnn.
Typical per-exit use::

    cp = MondrianConformal("aps", alpha=0.1).calibrate(cal_probs, cal_labels, cal_exits, num_groups=L)
    sets = cp.predict(test_probs, test_exits)
    coverage_by_group(sets, test_labels, test_exits, L)
"""

from .metrics import (
    BINNINGS,
    coverage,
    coverage_by_group,
    empty_set_rate,
    expected_calibration_error,
    mean_set_size,
    reliability_diagram,
    set_size_by_group,
    size_stratified_coverage,
)
from .predictors import SMALL_GROUP_POLICIES, MondrianConformal, SplitConformal
from .quantile import conformal_rank, split_conformal_threshold
from .scores import APS, LAC, RAPS, SCORES, Score, make_score

__all__ = [
    "APS",
    "BINNINGS",
    "LAC",
    "RAPS",
    "SCORES",
    "SMALL_GROUP_POLICIES",
    "MondrianConformal",
    "Score",
    "SplitConformal",
    "conformal_rank",
    "coverage",
    "coverage_by_group",
    "empty_set_rate",
    "expected_calibration_error",
    "make_score",
    "mean_set_size",
    "reliability_diagram",
    "set_size_by_group",
    "size_stratified_coverage",
    "split_conformal_threshold",
]
