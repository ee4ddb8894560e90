"""Speed of jei.conformal against TorchCP and a bare torch threshold-and-compare.

One interleaved run: every repeat times, in turn, calibrate + predict of each implementation on
the same tensors (split conformal, float32 probabilities ``[N, K]``, labels drawn from them), so
machine noise hits all of them alike. Prints medians and ratios as a Markdown table::

    .venv/bin/python benchmarks/conformal_speed.py            # N=100,000, K=100, 7 repeats
    .venv/bin/python benchmarks/conformal_speed.py --n 20000 --repeats 3 --threads 1

TorchCP (``pip install torchcp``) is optional: without it the TorchCP columns say "missing".
Its classification package imports ``torchsort`` and ``transformers`` at import time for its
losses and LLM tools, which the split predictor never calls; when those are not installed, the
benchmark puts empty placeholder modules in their place, so that only the timed code must be
real. TorchCP is given the same probabilities (``score_type="identity"``) and its deterministic
scores (``randomized=False``), to match jei's defaults; its APS definition breaks ties by sort
order while jei's treats tied classes alike, so APS/RAPS sets may differ, not the work done.
The bare baseline is the plain LAC rule: ``1 - p_label`` on calibration, its
``ceil((n+1)(1-alpha))``-th smallest value as threshold, and ``1 - probs <= threshold``.

Unless ``OMP_WAIT_POLICY`` is already set, the benchmark sets it to PASSIVE before torch loads:
with OpenMP's default spinning, on a machine shared with other jobs every parallel op waits for a
scheduler tick, which times the number of ops rather than the work. ``--threads 1`` avoids
intra-op threads altogether.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see the docstring

import torch  # noqa: E402

import jei.conformal  # noqa: E402
from jei.conformal import SplitConformal  # noqa: E402

SCORES = ("lac", "aps", "raps")
RAPS_PARAMS = {"penalty": 0.01, "k_reg": 5}
_IMPORT_ONLY = ("torchsort", "transformers")  # imported by TorchCP modules the split predictor never uses


class _Placeholder(types.ModuleType):
    """Stands in for a module that TorchCP imports but the benchmarked code never calls."""

    def __getattr__(self, attr: str) -> object:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {})


def import_torchcp() -> tuple[types.ModuleType | None, str]:
    """TorchCP's classification package, or None and why not."""
    if importlib.util.find_spec("torchcp") is None:
        return None, "not installed (pip install torchcp)"
    placeholders: list[str] = []
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return importlib.import_module("torchcp.classification"), _note(placeholders)
        except ImportError as err:
            if err.name not in _IMPORT_ONLY or err.name in sys.modules:
                return None, f"import failed: {err}"
            sys.modules[err.name] = _Placeholder(err.name)
            placeholders.append(err.name)
            for name in [m for m in sys.modules if m == "torchcp" or m.startswith("torchcp.")]:
                del sys.modules[name]


def _note(placeholders: list[str]) -> str:
    version = getattr(sys.modules.get("torchcp"), "__version__", "?")
    if not placeholders:
        return f"torchcp {version}"
    return f"torchcp {version} (import-only placeholders for {', '.join(placeholders)})"


def make_data(n: int, k: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax probabilities of Gaussian logits (a mildly confident model) and labels drawn from them."""
    generator = torch.Generator().manual_seed(seed)
    cal = torch.softmax(2.0 * torch.randn(n, k, generator=generator), dim=1)
    test = torch.softmax(2.0 * torch.randn(n, k, generator=generator), dim=1)
    labels = torch.multinomial(cal, 1, generator=generator).squeeze(1)
    return cal.to(device), labels.to(device), test.to(device)


Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (cal, labels, test) -> sets


def jei_runner(score: str, alpha: float) -> Runner:
    kwargs = RAPS_PARAMS if score == "raps" else {}
    predictor = SplitConformal(score, alpha, **kwargs)
    return lambda cal, labels, test: predictor.calibrate(cal, labels).predict(test)


def torchcp_runner(cp: types.ModuleType, score: str, alpha: float, device: str) -> Runner:
    if score == "lac":
        function = cp.score.LAC(score_type="identity")
    elif score == "aps":
        function = cp.score.APS(score_type="identity", randomized=False)
    else:
        function = cp.score.RAPS(
            score_type="identity", randomized=False, penalty=RAPS_PARAMS["penalty"], kreg=RAPS_PARAMS["k_reg"]
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its constructor warns about a deprecated argument
        predictor = cp.predictor.SplitPredictor(function, alpha=alpha, device=torch.device(device))

    def run(cal: torch.Tensor, labels: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        predictor.calculate_threshold(cal, labels, alpha)
        return predictor.predict_with_logits(test)

    return run


def bare_lac(alpha: float) -> Runner:
    def run(cal: torch.Tensor, labels: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        scores = 1 - cal.gather(1, labels.unsqueeze(1)).squeeze(1)
        rank = math.ceil((scores.shape[0] + 1) * (1 - alpha))
        threshold = scores.kthvalue(rank).values if rank <= scores.shape[0] else math.inf
        return (1 - test) <= threshold

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="calibration and test samples (each)")
    parser.add_argument("--k", type=int, default=100, help="classes")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    cp, cp_note = import_torchcp()
    cal, labels, test = make_data(args.n, args.k, args.seed, args.device)
    runners: dict[tuple[str, str], Runner] = {}
    for score in SCORES:
        runners[score, "jei"] = jei_runner(score, args.alpha)
        if cp is not None:
            runners[score, "torchcp"] = torchcp_runner(cp, score, args.alpha, args.device)
    runners["lac", "bare"] = bare_lac(args.alpha)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    outputs = {key: run(cal, labels, test) for key, run in runners.items()}  # warm-up, and a check below
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    for _ in range(args.repeats):
        for key, run in runners.items():
            sync()
            start = time.perf_counter()
            run(cal, labels, test)
            sync()
            times[key].append(time.perf_counter() - start)
    median = {key: 1e3 * statistics.median(values) for key, values in times.items()}

    print(
        f"N={args.n:,} calibration + {args.n:,} test samples, K={args.k}, alpha={args.alpha}, float32, "
        f"device={args.device}, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
        f"median of {args.repeats} interleaved repeats of calibrate + predict"
    )
    print(f"jei.conformal from {jei.conformal.__file__}; TorchCP: {cp_note if cp else 'missing, ' + cp_note}")
    same = torch.equal(outputs["lac", "jei"], outputs["lac", "bare"])
    print(f"LAC sets of jei.conformal and of the bare baseline identical: {'yes' if same else 'NO'}")
    print()
    print("| score | jei.conformal (ms) | TorchCP (ms) | jei / TorchCP | bare torch (ms) | jei / bare |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for score in SCORES:
        ours = median[score, "jei"]
        theirs = median.get((score, "torchcp"))
        bare = median.get((score, "bare"))
        cells = [
            score.upper(),
            f"{ours:.1f}",
            "missing" if theirs is None else f"{theirs:.1f}",
            "n/a" if theirs is None else f"{ours / theirs:.2f}x",
            "" if bare is None else f"{bare:.1f}",
            "" if bare is None else f"{ours / bare:.2f}x",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
