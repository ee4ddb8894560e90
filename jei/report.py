"""``jei-report RUN_OR_SWEEP_DIR ...``: a Markdown table of finished runs' metrics.

One row per run directory (a directory holding ``metrics.json``, searched recursively), with
accuracy and expected cost, and per-exit conformal coverage and set size at ``--alpha``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _conformal_row(metrics: dict[str, Any], alpha: float, min_samples: int) -> list[str]:
    matches = [r for r in metrics.get("conformal", {}).get("results", []) if abs(r["alpha"] - alpha) < 1e-12]
    if not matches:
        return ["n/a"] * 4
    result, counts = matches[0], metrics["conformal"]["n_test_per_exit"]
    per_exit = result["per_exit"]
    # Coverage of the worst exit among those with enough test samples to say something.
    covered = [c for c, n in zip(per_exit["per_exit_coverage"], counts) if c is not None and n >= min_samples]
    return [
        _percent(per_exit["coverage"]),
        _percent(min(covered)) if covered else "n/a",
        f"{per_exit['mean_set_size']:.2f}",
        _percent(result["global"]["coverage"]),
    ]


def table(run_dirs: list[Path], alpha: float = 0.1, min_samples: int = 200) -> str:
    header = (
        "| cost_weight | accuracy (%) | expected cost | backbone accuracy (%) | "
        f"per-exit coverage (%) α={alpha} | worst exit coverage (%) (exits with ≥{min_samples} test samples) | "
        "mean set size | global coverage (%) | ECE gated (%) |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    runs = []
    for run_dir in run_dirs:
        for path in sorted(run_dir.rglob("metrics.json")):
            runs.append(json.loads(path.read_text()))
    runs.sort(key=lambda m: m["config"]["objective"]["cost_weight"])
    for m in runs:
        cells = [
            str(m["config"]["objective"]["cost_weight"]),
            _percent(m["accuracy"]),
            f"{m['expected_cost']:.3f}",
            _percent(m["backbone_accuracy"]),
            *_conformal_row(m, alpha, min_samples),
            _percent(m.get("calibration", {}).get("ece_gated_equal_width")),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--min-samples", type=int, default=200)
    args = parser.parse_args()
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(map(str, missing))}")
    print(table(args.dirs, args.alpha, args.min_samples))


if __name__ == "__main__":
    main()
