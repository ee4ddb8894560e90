"""Accuracy and cost of an early-exit model, overall and per exit."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _fraction(numerator: Tensor, denominator: Tensor) -> float | None:
    return None if denominator.item() == 0 else numerator.item() / denominator.item()


def exit_metrics(exit_index: Tensor, predictions: Tensor, labels: Tensor, costs: Tensor, all_exit_logits: Tensor) -> dict[str, Any]:
    """Metrics of one evaluation.

    Args:
        exit_index: ``[N]`` exit each sample took (0..G).
        predictions: ``[N]`` predicted class at that exit.
        labels: ``[N]``.
        costs: ``[G+1]`` normalised cumulative costs (c_G = 1).
        all_exit_logits: ``[G+1, N, K]`` every exit's logits, for per-exit accuracy on all samples.

    ``exit_accuracy[l]`` is the accuracy of the samples that took exit l (None if none did);
    ``im_accuracy[l]`` is exit l's accuracy on every sample; the last is the backbone's.
    """
    num_exits = len(costs)
    correct = predictions == labels
    counts = torch.bincount(exit_index, minlength=num_exits)
    correct_at = torch.bincount(exit_index, weights=correct.double(), minlength=num_exits)
    im_accuracy = (all_exit_logits.argmax(-1) == labels).double().mean(dim=1)
    return {
        "accuracy": correct.double().mean().item(),
        "expected_cost": costs.double()[exit_index].mean().item(),
        "backbone_accuracy": im_accuracy[-1].item(),
        "exit_fractions": (counts.double() / len(labels)).tolist(),
        "exit_counts": counts.tolist(),
        "exit_accuracy": [_fraction(correct_at[l], counts[l]) for l in range(num_exits)],
        "exit_costs": costs.double().tolist(),
        "im_accuracy": im_accuracy.tolist(),
        "num_samples": len(labels),
    }
