"""``jei-report RUN_OR_SWEEP_DIR ...``: a Markdown table of finished runs, and their
accuracy-vs-cost plot.

One row per run directory (a directory holding ``metrics.json``, searched recursively): the
run (its folder, relative to the directory given), its data, backbone and method (objective /
exit policy), the settings that differ between the runs read (``cost_weight=0.5``,
``threshold=0.9``, ...), accuracy and expected cost, and per-exit conformal coverage and set
size at ``--alpha``. Rows are sorted by data, backbone, method and expected cost. Works for
every objective: nothing assumes a particular knob.

The plot (``--plot``; default ``summary.png`` in the directory given, or in the current
directory when several are given) draws test accuracy against expected cost, one line per
data / backbone / method; its path is printed after the table.

A sweep (``jei-train -m ...``) writes both into its sweep folder when it ends
(``summary.md``, ``summary.png``) and prints where they are: ``SweepReport``, a Hydra callback
set in ``configs/train.yaml`` (``hydra.callbacks.report``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

# Settings that have a column of their own, or are paths: never listed as "settings".
_SUMMARISED = {"data.name", "data.dataset", "backbone.name", "backbone.model_name", "backbone.variant",
               "backbone.depth", "objective.name", "policy.name"}
_SKIPPED_PREFIXES = ("paths.", "hydra.")
_PATH_KEYS = {"root", "cache_dir", "weights", "shared_data", "data_dir", "checkpoint"}


@dataclass
class Run:
    path: Path  # the run folder
    label: str  # relative to the directory it was found under
    metrics: dict[str, Any]
    record: dict[str, Any] | None  # run.json, when the run wrote one

    @property
    def config(self) -> dict[str, Any]:
        return self.metrics.get("config") or {}


def find_runs(dirs: Iterable[Path]) -> list[Run]:
    runs = []
    for root in dirs:
        root = Path(root)
        for path in sorted(root.rglob("metrics.json")):
            folder = path.parent
            record_file = folder / "run.json"
            try:
                metrics = json.loads(path.read_text())
                record = json.loads(record_file.read_text()) if record_file.is_file() else None
            except (OSError, ValueError) as err:
                print(f"jei-report: skipping {folder}: {err}", file=sys.stderr)
                continue
            label = str(folder.relative_to(root)) if folder != root else folder.name
            runs.append(Run(folder, label, metrics, record))
    return runs


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def data_label(config: dict[str, Any]) -> str:
    data = config.get("data") or {}
    name = str(data.get("name", "?"))
    return f"{name}:{data['dataset']}" if data.get("dataset") else name


def backbone_label(config: dict[str, Any]) -> str:
    backbone = config.get("backbone") or {}
    name = str(backbone.get("name", "?"))
    detail = backbone.get("model_name") or backbone.get("variant")
    if detail is None and backbone.get("depth") is not None:
        return f"{name}{backbone['depth']}"
    if detail is None:
        return name
    return str(detail) if str(detail).startswith(name) else f"{name}:{detail}"


def policy_label(run: Run) -> str:
    if run.record and run.record.get("policy"):
        return str(run.record["policy"])
    name = (run.config.get("policy") or {}).get("name") or "auto"
    if name != "auto":
        return str(name)
    try:  # the objective's own policy, from its class (nothing is built)
        from jei.registry import OBJECTIVES

        return str(OBJECTIVES.get(run.config["objective"]["name"]).default_policy)
    except Exception:  # noqa: BLE001 (an unknown or uninstalled objective: say auto)
        return "auto"


def method_label(run: Run) -> str:
    objective = (run.config.get("objective") or {}).get("name", "?")
    return f"{objective} / {policy_label(run)}"


def varied_settings(runs: list[Run]) -> list[str]:
    """Settings (dotted keys) whose values differ between ``runs`` (absent counts as a value).

    A setting of a named component (``objective.cost_weight``) counts only when it differs
    between runs of the same component (``objective.name``): that the ``jei`` objective has
    settings ``sdn`` lacks is already said by the method column."""
    flat = [_flatten(run.config) for run in runs]
    keys = sorted({key for values in flat for key in values})
    varied = []
    for key in keys:
        if key in _SUMMARISED or key.startswith(_SKIPPED_PREFIXES) or key.rsplit(".", 1)[-1] in _PATH_KEYS:
            continue
        component = key.split(".", 1)[0] + ".name" if "." in key else None
        groups: dict[str, set[str]] = {}
        for values in flat:
            owner = str(values.get(component)) if component is not None else ""
            groups.setdefault(owner, set()).add(json.dumps(values.get(key, "<absent>"), sort_keys=True, default=str))
        if any(len(seen) > 1 for seen in groups.values()):
            varied.append(key)
    return varied


def _short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key shares."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(other == suffix or other.endswith("." + suffix) for other in keys) == 1:
                names[key] = suffix
                break
        else:
            names[key] = key
    return names


def settings_label(run: Run, varied: list[str], names: dict[str, str]) -> str:
    flat = _flatten(run.config)
    cells = [f"{names[key]}={_value(flat[key])}" for key in varied if key in flat]
    return ", ".join(cells) if cells else "-"


def _value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _conformal_row(metrics: dict[str, Any], alpha: float, min_samples: int) -> list[str]:
    conformal = metrics.get("conformal") or {}
    matches = [r for r in conformal.get("results", []) if abs(r["alpha"] - alpha) < 1e-12]
    if not matches:
        return ["n/a"] * 4
    result, counts = matches[0], conformal.get("n_test_per_exit", [])
    per_exit = result["per_exit"]
    # Coverage of the worst exit among those with enough test samples to say something.
    covered = [c for c, n in zip(per_exit["per_exit_coverage"], counts) if c is not None and n >= min_samples]
    return [
        _percent(per_exit["coverage"]),
        _percent(min(covered)) if covered else "n/a",
        f"{per_exit['mean_set_size']:.2f}",
        _percent(result["global"]["coverage"]),
    ]


def _sort_key(run: Run) -> tuple:
    return (data_label(run.config), backbone_label(run.config), method_label(run),
            float(run.metrics.get("expected_cost", 0.0)), run.label)


def markdown(runs: list[Run], alpha: float = 0.1, min_samples: int = 200) -> str:
    header = (
        "| run | data | backbone | method | settings | accuracy (%) | expected cost | backbone accuracy (%) | "
        f"per-exit coverage (%) α={alpha} | worst exit coverage (%) (exits with ≥{min_samples} test samples) | "
        "mean set size | global coverage (%) | ECE gated (%) |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    varied = varied_settings(runs)
    names = _short_names(varied)
    for run in sorted(runs, key=_sort_key):
        m = run.metrics
        cells = [
            run.label,
            data_label(run.config),
            backbone_label(run.config),
            method_label(run),
            settings_label(run, varied, names),
            _percent(m.get("accuracy")),
            f"{m['expected_cost']:.3f}" if m.get("expected_cost") is not None else "n/a",
            _percent(m.get("backbone_accuracy")),
            *_conformal_row(m, alpha, min_samples),
            _percent((m.get("calibration") or {}).get("ece_gated_equal_width")),
        ]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def table(run_dirs: list[Path], alpha: float = 0.1, min_samples: int = 200) -> str:
    """The Markdown table of every finished run under ``run_dirs``."""
    return markdown(find_runs(run_dirs), alpha, min_samples)


def plot(runs: list[Run], path: Path) -> Path:
    """Test accuracy against expected cost, one line per data / backbone / method, each point
    labelled with its varied settings; the backbone's accuracy as a dashed line per backbone."""
    from jei.plots import plt, save_figure

    varied = varied_settings(runs)
    names = _short_names(varied)
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=_sort_key):
        key = " · ".join([data_label(run.config), backbone_label(run.config), method_label(run)])
        groups.setdefault(key, []).append(run)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    baselines: dict[str, float] = {}
    for label, members in groups.items():
        points = [(r.metrics["expected_cost"], 100 * r.metrics["accuracy"], r) for r in members
                  if r.metrics.get("expected_cost") is not None and r.metrics.get("accuracy") is not None]
        if not points:
            continue
        costs, accuracies, owners = zip(*points)
        axis.plot(costs, accuracies, "o-", label=label)
        for cost, accuracy, run in points:
            text = settings_label(run, varied, names)
            if text != "-":
                axis.annotate(text, (cost, accuracy), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for run in owners:
            if run.metrics.get("backbone_accuracy") is not None:
                key = f"{data_label(run.config)} · {backbone_label(run.config)}"
                baselines.setdefault(key, 100 * run.metrics["backbone_accuracy"])
    for key, accuracy in baselines.items():
        axis.axhline(accuracy, linestyle="--", linewidth=0.8, color="gray")
        axis.annotate(f"backbone ({key})", (0.0, accuracy), textcoords="offset points", xytext=(2, -10),
                      fontsize=7, color="gray")
    axis.set_xlim(0, 1.05)
    axis.set_xlabel("expected cost (fraction of the full network)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"Accuracy vs cost ({len(runs)} run{'s' if len(runs) != 1 else ''})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    save_figure(figure, Path(path))
    return Path(path)


def write_summary(folder: Path, alpha: float = 0.1, min_samples: int = 200) -> tuple[Path, Path] | None:
    """``summary.md`` and ``summary.png`` of the runs under ``folder`` (None when it has none)."""
    from jei.io import atomic_write

    runs = find_runs([folder])
    if not runs:
        return None
    text = markdown(runs, alpha, min_samples) + "\n"
    table_path = atomic_write(folder / "summary.md", lambda tmp: tmp.write_text(text))
    return table_path, plot(runs, folder / "summary.png")


class SweepReport(Callback):
    """Hydra callback: when a multirun ends, write ``summary.md`` and ``summary.png`` into its
    sweep folder and print their paths."""

    def __init__(self, alpha: float = 0.1, min_samples: int = 200) -> None:
        self.alpha, self.min_samples = float(alpha), int(min_samples)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        written = write_summary(folder, self.alpha, self.min_samples)
        if written is None:
            print(f"jei-train: no finished runs under {folder}, so no summary")
            return
        print(f"sweep summary: {written[0]} (table), {written[1]} (accuracy vs cost)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jei-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--min-samples", type=int, default=200)
    parser.add_argument("--plot", type=Path, default=None,
                        help="the accuracy-vs-cost PNG (default: <dir>/summary.png for one dir, else ./summary.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(map(str, missing))}")
    runs = find_runs(args.dirs)
    if not runs:
        parser.error(f"no finished runs (metrics.json) under {', '.join(map(str, args.dirs))}")
    print(markdown(runs, args.alpha, args.min_samples))
    if not args.no_plot:
        target = args.plot or ((args.dirs[0] if len(args.dirs) == 1 else Path.cwd()) / "summary.png")
        print(f"accuracy-vs-cost plot: {plot(runs, target).resolve()}")


if __name__ == "__main__":
    main()
