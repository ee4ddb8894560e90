"""``jei-predict RUN INPUTS... [--alpha 0.1] [--json out.json]``: a finished run's predictions on
image files (PNG/JPEG; folders are searched recursively), or graph ``.json`` files for graph runs.

Prints one row per input: the label, its probability, the exit taken, its cost (1 = the full
network) and the conformal prediction set at ``--alpha`` (per-exit thresholds unless
``--sets global``). ``--json`` also writes every row, with all class probabilities. Inputs
that do not match the run's preprocessing (size, channels, bit depth) fail with one line
naming the file and the expected format (exit status 2).

A plain argparse command, not Hydra: it takes a run and a list of files, composes no config,
and must not create a run folder or a log file in the current directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jei.errors import ConfigError, cli_main


def format_table(rows: list[dict], alpha: float, kind: str, base: Path | None = None) -> str:
    """A plain-text table of ``Predictions.rows()``."""

    def source(row: dict) -> str:
        text = row["source"] or ""
        if base is not None and text:
            try:
                return str(Path(text).resolve().relative_to(base))
            except ValueError:
                return text
        return text

    header = ["input", "label", "p(label)", "exit", "cost", f"set (alpha={alpha:g}, {kind.replace('_', '-')})"]
    body = [
        [source(row), row["class"], f"{row['probability']:.3f}", str(row["exit"]), f"{row['cost']:.3f}",
         "{" + ", ".join(row["set_names"]) + "}"]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="jei-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parse.add_argument("run", type=Path, help="the folder of a finished jei-train run (it holds run.json)")
    parse.add_argument("inputs", nargs="+", type=Path, help="image files or folders (graph .json files for graph runs)")
    parse.add_argument("--alpha", type=float, default=0.1, help="miscoverage of the conformal sets (default 0.1)")
    parse.add_argument("--sets", choices=("per_exit", "global"), default="per_exit",
                       help="per-exit (Mondrian) thresholds, as the run evaluates them, or one global threshold")
    parse.add_argument("--json", type=Path, default=None, help="also write the predictions to this JSON file")
    parse.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parse.add_argument("--batch-size", type=int, default=None, help="inputs per early-exit batch (default: the run's)")
    parse.add_argument("--native-exits", action="store_true",
                       help="run each exit's head as one C++ call (jei.native_exits; CPU, built on first use)")
    return parse


@cli_main("jei-predict")
def predict(args: argparse.Namespace) -> None:
    from jei.io import write_json
    from jei.predict import InputError, load

    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha must be in (0, 1), got {args.alpha:g}", "alpha")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}", "batch_size")
    try:
        predictor = load(args.run, device=args.device)
    except (FileNotFoundError, ValueError, LookupError, ImportError) as err:
        raise ConfigError(f"cannot load the run {args.run}: {err}") from err
    if args.native_exits:
        from jei.native_exits import NativeExitsUnavailable

        try:
            predictor.network.use_native_exits()
        except (ValueError, NativeExitsUnavailable) as err:
            raise ConfigError(f"--native-exits: {err}", "native_exits") from err
    try:
        result = predictor.predict_files(args.inputs, alpha=args.alpha, sets=args.sets, batch_size=args.batch_size)
    except InputError:
        raise
    except ValueError as err:  # e.g. an alpha the calibration set is too small for
        raise ConfigError(str(err)) from err
    rows = result.rows()
    print(format_table(rows, args.alpha, args.sets, Path.cwd().resolve()))
    counts = [sum(row["exit"] == exit_ for row in rows) for exit_ in range(predictor.num_exits)]
    mean_cost = sum(row["cost"] for row in rows) / len(rows)
    print(f"{len(rows)} inputs; per exit {counts}; mean cost {mean_cost:.3f}")
    if args.json is not None:
        write_json(args.json, {
            "run": str(predictor.run_dir),
            "alpha": args.alpha,
            "sets": args.sets,
            "class_names": None if predictor.class_names is None else list(predictor.class_names),
            "exit_costs": predictor.exit_costs.tolist(),
            "predictions": rows,
        })
        print(f"predictions written to {args.json.resolve()}")


def main(argv: list[str] | None = None) -> None:
    predict(parser().parse_args(argv))


if __name__ == "__main__":
    main()
