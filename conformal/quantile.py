"""The finite-sample split-conformal quantile.

With n exchangeable calibration scores, thresholding at the k-th smallest score,
k = ceil((n + 1)(1 - alpha)), covers a new sample with probability at least 1 - alpha
(Vovk, Gammerman & Shafer 2005; Lei, G'Sell, Rinaldo, Tibshirani & Wasserman 2018).
When k > n no finite threshold is valid and the set must be the full label set.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from ._checks import check_alpha


def conformal_rank(n: int, alpha: float) -> int:
    """The 1-based rank ``ceil((n + 1)(1 - alpha))`` of the conformal quantile, computed exactly.

    ``alpha`` is read as the decimal it prints as (0.1 means 1/10), so that e.g. n=99,
    alpha=0.1 gives rank 90 and not 91, as naive float arithmetic would.
    """
    alpha = check_alpha(alpha)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int (the number of calibration scores), got {n!r}")
    return math.ceil((n + 1) * (1 - Fraction(repr(alpha))))


def split_conformal_threshold(scores: Tensor, alpha: float) -> float:
    """The ``conformal_rank(n, alpha)``-th smallest score, or ``math.inf`` when that rank exceeds n."""
    alpha = check_alpha(alpha)
    if not isinstance(scores, Tensor):
        raise TypeError(
            f"scores must be a torch.Tensor, got {type(scores).__name__}; wrap it with torch.as_tensor(...)"
        )
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise ValueError(
            f"scores must be a non-empty 1-D tensor of calibration scores, got shape {tuple(scores.shape)}; "
            f"an empty calibration set has no quantile"
        )
    if not scores.is_floating_point() or torch.isnan(scores.amax()):  # amax propagates NaN: one pass
        raise ValueError(f"scores must be floating point without NaN, got dtype {scores.dtype}")
    k = conformal_rank(scores.shape[0], alpha)
    if k > scores.shape[0]:
        return math.inf
    return float(scores.kthvalue(k).values)
