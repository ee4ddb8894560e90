"""Evaluation metrics for prediction sets and for probability calibration.

Set metrics take the boolean ``[N, K]`` masks returned by ``predict``. Per-group metrics
return float64 tensors of length ``num_groups`` holding NaN for groups with no samples, so
that an empty group is visible rather than silently reported as 0. Calibration metrics are
computed over the whole evaluation set at once (never averaged over batches, which inflates
ECE) and take the binning explicitly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_groups, check_labels, check_nonempty, check_num_groups, check_probs, check_sets

BINNINGS = ("equal_width", "equal_mass")


def _covered(sets: Tensor, labels: Tensor) -> Tensor:
    sets = check_sets(sets)
    labels = check_labels(labels, sets, ref_name="sets")
    return sets.gather(1, labels.unsqueeze(1)).squeeze(1)


def coverage(sets: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose true label is in their set (target: >= 1 - alpha)."""
    covered = _covered(sets, labels)
    check_nonempty(sets, "sets")
    return covered.double().mean().item()


def mean_set_size(sets: Tensor) -> float:
    """Average number of labels per set; smaller is more informative at equal coverage."""
    check_nonempty(check_sets(sets), "sets")
    return sets.sum(dim=1).double().mean().item()


def empty_set_rate(sets: Tensor) -> float:
    """Fraction of empty sets; non-zero only for predictors built with ``allow_empty=True``."""
    check_nonempty(check_sets(sets), "sets")
    return (~sets.any(dim=1)).double().mean().item()


def _group_mean(values: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Per-group mean of ``values [N]`` as float64 ``[num_groups]``, NaN where a group is empty."""
    groups = groups.to(values.device)
    totals = torch.zeros(num_groups, dtype=torch.float64, device=values.device).index_add_(
        0, groups, values.double()
    )
    counts = torch.bincount(groups, minlength=num_groups).double()
    return (totals / counts).cpu()


def coverage_by_group(sets: Tensor, labels: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Coverage within each group (e.g. each exit), float64 ``[num_groups]``; NaN for empty groups."""
    covered = _covered(sets, labels)
    groups = check_groups(groups, sets.shape[0], "sets", tuple(sets.shape), check_num_groups(num_groups))
    return _group_mean(covered, groups, num_groups)


def set_size_by_group(sets: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Mean set size within each group, float64 ``[num_groups]``; NaN for empty groups."""
    sets = check_sets(sets)
    groups = check_groups(groups, sets.shape[0], "sets", tuple(sets.shape), check_num_groups(num_groups))
    return _group_mean(sets.sum(dim=1), groups, num_groups)


def size_stratified_coverage(sets: Tensor, labels: Tensor) -> dict[int, dict[str, float | int]]:
    """Coverage for each set size that occurs: ``{size: {"coverage": c, "count": n}}``.

    Marginal coverage can hide under-coverage of the small (confident) sets behind
    over-coverage of large ones (Angelopoulos et al. 2021, size-stratified coverage).
    """
    covered = _covered(sets, labels).double()
    sizes = sets.sum(dim=1)
    return {
        int(size): {"coverage": covered[sizes == size].mean().item(), "count": int((sizes == size).sum())}
        for size in torch.unique(sizes).tolist()
    }


def _bin_indices(confidence: Tensor, n_bins: int, binning: str) -> tuple[Tensor, Tensor]:
    """Bin index of every sample and the ``n_bins + 1`` bin edges.

    ``equal_width``: bins ``(e_b, e_{b+1}]`` on [0, 1] (the first bin also holds 0).
    ``equal_mass``: samples sorted by confidence (stable) and cut into ``n_bins`` runs whose
    sizes differ by at most one; edge b+1 is the largest confidence in bin b, the outer edges
    are 0 and 1. Ties across a cut are split by rank so that counts stay equal.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    if binning not in BINNINGS:
        raise ValueError(f"unknown binning {binning!r}; choose one of {', '.join(BINNINGS)}")
    if binning == "equal_width":
        edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=confidence.device)
        return torch.bucketize(confidence, edges[1:-1]), edges.cpu()
    order = confidence.argsort(stable=True)
    idx = torch.empty_like(order)
    upper: list[float] = []
    for b, chunk in enumerate(torch.tensor_split(order, n_bins)):  # the first chunk is never empty
        idx[chunk] = b
        upper.append(confidence[chunk[-1]].item() if len(chunk) else upper[-1])
    return idx, torch.tensor([0.0, *upper[:-1], 1.0], dtype=torch.float64)


def _calibration_bins(
    probs: Tensor, labels: Tensor, n_bins: int, binning: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bin edges and per-bin mean confidence, accuracy and count (float64/int64 on the CPU)."""
    probs = check_probs(probs).double()
    check_nonempty(probs, "probs")
    labels = check_labels(labels, probs)
    confidence, predicted = probs.max(dim=1)
    idx, edges = _bin_indices(confidence, n_bins, binning)
    accuracy = _group_mean((predicted == labels).double(), idx, n_bins)
    return edges, _group_mean(confidence, idx, n_bins), accuracy, torch.bincount(idx, minlength=n_bins).cpu()


def reliability_diagram(
    probs: Tensor, labels: Tensor, n_bins: int = 15, binning: str = "equal_width"
) -> dict[str, object]:
    """Per-bin confidence, accuracy and count as plain lists, for plotting elsewhere.

    Confidence is the max probability, accuracy is ``argmax == label``. Empty bins have
    count 0 and NaN confidence/accuracy (matplotlib skips NaN).
    """
    edges, confidence, accuracy, count = _calibration_bins(probs, labels, n_bins, binning)
    return {
        "binning": binning,
        "bin_edges": edges.tolist(),
        "confidence": confidence.tolist(),
        "accuracy": accuracy.tolist(),
        "count": count.tolist(),
    }


def expected_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 15, binning: str = "equal_width"
) -> float:
    """ECE = sum_b |B_b| / N * |acc_b - conf_b| over the whole set (Guo et al. 2017)."""
    _, confidence, accuracy, count = _calibration_bins(probs, labels, n_bins, binning)
    nonempty = count > 0
    weights = count[nonempty].double() / count.sum()
    return float((weights * (accuracy[nonempty] - confidence[nonempty]).abs()).sum())
