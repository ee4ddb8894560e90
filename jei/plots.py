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


def plot_training_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Training curves from ``jei.tracking`` rows: the backbone's loss and validation accuracy
    per epoch; the exits' losses, and their validation accuracy (gated, and each IM's) with the
    expected cost, over the exit stage's epochs, phases marked."""
    backbone = [r for r in rows if r.get("stage") == "backbone"]
    exits = [r for r in rows if r.get("stage") == "exits"]
    panels = (1 if backbone else 0) + (2 if exits else 0)
    if panels == 0:
        return
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    axes = list(axes[0])
    if backbone:
        axis = axes.pop(0)
        epochs = [r["epoch"] + 1 for r in backbone]
        axis.plot(epochs, [r["loss"] for r in backbone], "o-", markersize=3, color="tab:red", label="train loss")
        axis.set_xlabel("backbone epoch")
        axis.set_ylabel("cross-entropy")
        twin = axis.twinx()
        twin.plot(epochs, [100 * r["val_accuracy"] for r in backbone], "s-", markersize=3, color="tab:blue",
                  label="val accuracy")
        twin.set_ylabel("val accuracy (%)")
        axis.set_title("backbone")
        handles = axis.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        axis.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="center right")
    if exits:
        losses_axis, val_axis = axes
        x = list(range(1, len(exits) + 1))
        loss_keys = list(dict.fromkeys(k for r in exits for k in r if k.startswith("loss_")))
        for key in loss_keys:
            points = [(i, r[key]) for i, r in zip(x, exits) if r.get(key) is not None]
            if points:
                losses_axis.plot(*zip(*points), ".-", markersize=3, label=key.removeprefix("loss_"))
        losses_axis.set_xlabel("exit-stage epoch")
        losses_axis.set_ylabel("training loss")
        losses_axis.set_title("exits: losses")
        losses_axis.legend(fontsize=7)
        val_axis.plot(x, [100 * r["val_accuracy"] for r in exits], "-", color="black", linewidth=2, label="gated")
        count = max((len(r.get("val_im_accuracy") or []) for r in exits), default=0)
        for index in range(count):
            points = [(i, 100 * r["val_im_accuracy"][index]) for i, r in zip(x, exits)
                      if len(r.get("val_im_accuracy") or []) > index]
            val_axis.plot(*zip(*points), "--", linewidth=1, label=f"IM {index}")
        val_axis.set_xlabel("exit-stage epoch")
        val_axis.set_ylabel("val accuracy (%)")
        cost_axis = val_axis.twinx()
        cost_axis.plot(x, [r["val_expected_cost"] for r in exits], ":", color="tab:orange", linewidth=2,
                       label="expected cost")
        cost_axis.set_ylabel("val expected cost")
        cost_axis.set_ylim(0, 1.05)
        val_axis.set_title("exits: validation")
        handles = val_axis.get_legend_handles_labels()[0] + cost_axis.get_legend_handles_labels()[0]
        val_axis.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
        starts = [(i, r["phase"]) for i, r in zip(x, exits) if i == 1 or exits[i - 2]["phase"] != r["phase"]]
        for axis in (losses_axis, val_axis):
            for start, phase in starts:
                axis.axvline(start - 0.5, color="gray", linewidth=0.6, alpha=0.6)
                axis.text(start - 0.3, 1.0, phase, transform=axis.get_xaxis_transform(), fontsize=7,
                          va="top", color="gray")
    from matplotlib.ticker import MaxNLocator

    for axis in figure.axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    save_figure(figure, path)
