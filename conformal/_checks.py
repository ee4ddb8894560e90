"""Input validation for the conformal package.

Conformal guarantees silently break on malformed input (logits instead of probabilities,
labels off by one, a group id that was never calibrated), so every public entry point
validates here and fails with a ValueError that names the argument and says how to fix it.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float, or fail unless it lies strictly inside (0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(
            f"alpha must be a number strictly between 0 and 1 (the target miscoverage rate), "
            f"got {alpha!r}; e.g. alpha=0.1 asks for 90% coverage"
        )
    return float(alpha)


def _require_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor(...)"
        )
    return x


def check_probs(probs: Tensor, name: str = "probs") -> Tensor:
    """Validate a [N, K] probability tensor and return it in a dtype safe for scoring.

    float16/bfloat16 inputs are upcast to float32 so that cumulative sums (APS/RAPS) do not
    lose the precision the quantile depends on. The row-sum tolerance follows the input
    dtype: max(1e-3, 4 * eps), since each rounded entry contributes at most eps/2 relative error.
    """
    _require_tensor(probs, name)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(
            f"{name} must have shape [N, K] with K >= 1 (one row of class probabilities per sample), "
            f"got shape {tuple(probs.shape)}"
        )
    if not probs.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {probs.dtype}; pass softmax(logits, dim=1)"
        )
    tol = max(1e-3, 4 * torch.finfo(probs.dtype).eps)
    if probs.dtype in (torch.float16, torch.bfloat16):
        probs = probs.float()
    if probs.shape[0] == 0:
        return probs
    # One pass for finiteness and sign: min/max propagate NaN, and +-inf shows up in one of them.
    lowest, highest = (float(v) for v in torch.aminmax(probs.detach()))
    if not (math.isfinite(lowest) and math.isfinite(highest)):
        raise ValueError(
            f"{name} contains NaN or inf; pass softmax(logits, dim=1) computed from finite logits"
        )
    if lowest < 0:
        raise ValueError(
            f"{name} contains negative values (min {lowest:.3g}); "
            f"it must hold probabilities: pass softmax(logits, dim=1)"
        )
    if not _row_sums_surely_within(probs, tol):
        _check_row_sums_exactly(probs, name, tol)
    return probs


def _row_sums_surely_within(probs: Tensor, tol: float) -> bool:
    """True when every row sum is provably within ``tol`` of 1, from a sum in the input dtype.

    The reference check sums in float64; summing float32 directly avoids a float64 copy of the
    whole tensor. Entries are finite and non-negative here, so a sum in any order in a dtype with
    unit roundoff u is within (K-1) u / (1 - (K-1) u) * sum of the exact sum, and so is the
    float64 sum. Only rows whose float32 sum is clear of the tolerance by 4 K u * sum (more than
    twice that bound) pass here; any closer row sends the tensor to the float64 check, so the
    decision (and the error message) is always that of the float64 check.
    """
    if probs.dtype == torch.float64:
        return False  # the float64 sum is the reference computation itself
    k = probs.shape[1]
    unit_roundoff = torch.finfo(probs.dtype).eps / 2
    if k * unit_roundoff > 0.01:  # keeps the bound below within 2% of (K-1) u
        return False
    low, high = (float(v) for v in torch.aminmax(probs.detach().sum(dim=1)))
    if not (math.isfinite(low) and math.isfinite(high)):
        return False
    margin = 4 * k * unit_roundoff * max(high, 1.0)
    return 1.0 - tol + margin <= low and high <= 1.0 + tol - margin


def _check_row_sums_exactly(probs: Tensor, name: str, tol: float) -> None:
    row_sums = probs.sum(dim=1, dtype=torch.float64)
    worst = int((row_sums - 1.0).abs().argmax())
    if abs(float(row_sums[worst]) - 1.0) > tol:
        raise ValueError(
            f"rows of {name} must sum to 1 (tolerance {tol:.1e}), but row {worst} sums to "
            f"{float(row_sums[worst]):.6g}; pass softmax(logits, dim=1), not logits or unnormalised scores"
        )


def check_nonempty_calibration(scores: Tensor) -> None:
    """Fail on an empty calibration set, for which no quantile exists."""
    if scores.shape[0] == 0:
        raise ValueError(
            "the calibration set is empty (probs and labels have 0 rows); calibrate on held-out samples, "
            "ideally several hundred, that were not used for training or model selection"
        )


def _check_index_vector(x: Tensor, name: str, n: int, ref_name: str, ref_shape: tuple[int, ...]) -> Tensor:
    _require_tensor(x, name)
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}; use {name}.long()")
    if x.ndim != 1 or x.shape[0] != n:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {ref_shape}; "
            f"{name} must be 1-D with one entry per row of {ref_name} (shape ({n},))"
        )
    return x.long()


def check_labels(labels: Tensor, probs_or_sets: Tensor, ref_name: str = "probs") -> Tensor:
    """Validate class indices against a [N, K] tensor; return them as int64 on its device."""
    n, k = probs_or_sets.shape
    labels = _check_index_vector(labels, "labels", n, ref_name, tuple(probs_or_sets.shape))
    if n:
        lowest, highest = (int(v) for v in torch.aminmax(labels))
        if lowest < 0 or highest >= k:
            raise ValueError(
                f"labels must be class indices in [0, {k - 1}] ({ref_name} has K={k} columns), "
                f"got values in [{lowest}, {highest}]"
            )
    return labels.to(probs_or_sets.device)


def check_groups(
    groups: Tensor, n: int, ref_name: str, ref_shape: tuple[int, ...], num_groups: int | None
) -> Tensor:
    """Validate group ids (e.g. exit indices); ids must lie in [0, num_groups) when it is given."""
    groups = _check_index_vector(groups, "groups", n, ref_name, ref_shape)
    if n and groups.min() < 0:
        raise ValueError(
            f"groups must be non-negative integer ids 0..num_groups-1, got min {int(groups.min())}"
        )
    if n and num_groups is not None and groups.max() >= num_groups:
        raise ValueError(
            f"groups contains id {int(groups.max())} but num_groups={num_groups}; ids must lie in "
            f"[0, {num_groups - 1}]. If that group is real, pass a larger num_groups (to calibrate() "
            f"when predicting)"
        )
    return groups


def check_num_groups(num_groups: int) -> int:
    """Fail unless ``num_groups`` is a positive int."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(
            f"num_groups must be a positive int (groups are ids 0..num_groups-1), got {num_groups!r}"
        )
    return num_groups


def check_sets(sets: Tensor) -> Tensor:
    """Validate a [N, K] boolean prediction-set mask as returned by ``predict``."""
    _require_tensor(sets, "sets")
    if sets.dtype != torch.bool or sets.ndim != 2:
        raise ValueError(
            f"sets must be a boolean [N, K] mask (the output of predict()), "
            f"got dtype {sets.dtype} and shape {tuple(sets.shape)}"
        )
    return sets


def check_nonempty(x: Tensor, name: str) -> None:
    """Fail when a metric would average over zero samples."""
    if x.shape[0] == 0:
        raise ValueError(f"{name} has 0 rows; a metric needs at least one sample")
