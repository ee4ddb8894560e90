"""PNG plots of a run: where samples exit, and accuracy and cost per exit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from jei.io import atomic_path  # noqa: E402


def save_figure(figure: Any, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def plot_exit_histogram(metrics: dict[str, Any], path: Path) -> None:
    fractions = metrics["exit_fractions"]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(range(len(fractions)), [100 * f for f in fractions], color="tab:blue")
    axis.set_xticks(range(len(fractions)))
    axis.set_xlabel("exit (last = backbone head)")
    axis.set_ylabel("test samples (%)")
    axis.set_title(f"Where samples exit (accuracy {100 * metrics['accuracy']:.1f}%, cost {metrics['expected_cost']:.2f})")
    save_figure(figure, path)


def plot_accuracy_cost(metrics: dict[str, Any], path: Path) -> None:
    costs, im_accuracy = metrics["exit_costs"], metrics["im_accuracy"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    exits = range(len(costs))
    left.plot(exits, [100 * a for a in im_accuracy], "o-", label="exit on all test samples")
    taken = [(l, 100 * a) for l, a in enumerate(metrics["exit_accuracy"]) if a is not None]
    if taken:
        left.plot(*zip(*taken), "s", label="samples that took the exit")
    left.set_xticks(list(exits))
    left.set_xlabel("exit")
    left.set_ylabel("accuracy (%)")
    left.legend(fontsize=8)
    right.plot(exits, costs, "o-", color="tab:orange")
    right.axhline(metrics["expected_cost"], linestyle="--", color="gray", label="expected cost (JEI)")
    right.set_xticks(list(exits))
    right.set_xlabel("exit")
    right.set_ylabel("cumulative cost (fraction of full path)")
    right.legend(fontsize=8)
    save_figure(figure, path)


def plot_reliability(calibration: dict[str, Any], path: Path) -> None:
    """Reliability diagram of the gated predictions (equal-width bins)."""
    diagram = calibration["reliability_gated"]
    edges = diagram["bin_edges"]
    centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    width = edges[1] - edges[0]
    shown = [(c, a) for c, a in zip(centers, diagram["accuracy"]) if a is not None]
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    if shown:
        axis.bar(*zip(*shown), width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
    axis.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    axis.set_xlabel("confidence (max probability at the exit taken)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"ECE {100 * calibration['ece_gated_equal_width']:.2f}% ({len(centers)} equal-width bins)")
    axis.legend(fontsize=8, loc="upper left")
    save_figure(figure, path)
