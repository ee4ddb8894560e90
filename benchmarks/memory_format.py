"""NCHW against channels-last maps (``trainer.channels_last``), side by side: the backbone alone
and real early exit, in one interleaved run.

    python benchmarks/memory_format.py [--setups resnet56 digits] [--policies budgeted jei]
        [--targets 0.44 0.72] [--rounds 5] [--batches 2] [--latency-images 100] [--threads N]
        [--clock wall|cpu] [--out layouts.json]

Setups and policies as in ``early_exit_limit.py``: the policy is set on the NCHW network, which
is then copied and converted (``jei.memory_format.to_channels_last``), so both layouts run the
same weights, heads and thresholds. Per round, in rotating order, each of the four paths runs
over the same batches (``--batch-size``) and, one image at a time, over the same single images.
Reported: images/s of every path, the NHWC/NCHW time ratio of the backbone and of early exit
(median over rounds of each round's ratio), and how many samples take another exit in NHWC
(rounding in other kernels can move a score across a threshold).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from early_exit_limit import build_setup, set_policy
from speed_common import CLOCKS, exit_costs, synchronizer, timed_call

from jei.memory_format import to_channels_last
from jei.model import EarlyExitNetwork

PATHS = ("backbone NCHW", "backbone NHWC", "early exit NCHW", "early exit NHWC")


def paths(network: EarlyExitNetwork) -> dict[str, Callable[[Any], Any]]:
    """The four timed paths; the NHWC ones run a channels-last copy of ``network``."""
    nhwc = copy.deepcopy(network)
    to_channels_last(nhwc.backbone)
    return dict(zip(PATHS, (network.backbone, nhwc.backbone, network.early_exit, nhwc.early_exit)))


@torch.inference_mode()
def measure(
    network: EarlyExitNetwork, groups: list[torch.Tensor], rounds: int, clock: Callable[[], float]
) -> dict[str, Any]:
    """Seconds per round of each path over ``groups`` (batches, or single images), interleaved."""
    timed = paths(network)
    sync = synchronizer(torch.device("cpu"))
    for fn in timed.values():  # warm-up: one-off allocations and kernel selection
        fn(groups[0])
    changed = sum(
        int((timed["early exit NCHW"](x).exit_index != timed["early exit NHWC"](x).exit_index).sum()) for x in groups
    )
    seconds: dict[str, list[float]] = {name: [] for name in PATHS}
    for round_index in range(rounds):
        names = PATHS[round_index % 4:] + PATHS[:round_index % 4]
        for name in names:
            seconds[name].append(sum(timed_call(timed[name], x, sync, clock) for x in groups))
    samples = sum(len(x) for x in groups)

    def ratio(fast: str, slow: str) -> float:
        return statistics.median(a / b for a, b in zip(seconds[fast], seconds[slow]))

    return {
        "samples": samples,
        "images_per_second": {name: samples / statistics.median(values) for name, values in seconds.items()},
        "backbone_nhwc_over_nchw": ratio("backbone NHWC", "backbone NCHW"),
        "early_exit_nhwc_over_nchw": ratio("early exit NHWC", "early exit NCHW"),
        "early_exit_nhwc_over_backbone_nchw": ratio("early exit NHWC", "backbone NCHW"),
        "exits_changed": changed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=["resnet56", "digits"])
    parser.add_argument("--policies", nargs="+", default=["budgeted", "jei"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.44, 0.72])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2, help="measured batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fit-images", type=int, default=512, help="images that set the policy (not timed)")
    parser.add_argument("--latency-images", type=int, default=100, help="single images per round (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    rows = []
    print("| setup | policy | batch | images/s backbone NCHW → NHWC | images/s early exit NCHW → NHWC "
          "| time NHWC/NCHW backbone | early exit | exits changed |")
    print("|---|---|---|---|---|---|---|---|")
    for setup in args.setups:
        measured = args.batches * args.batch_size
        network, images, _ = build_setup(setup, args.fit_images + max(measured, args.latency_images))
        fit, test = images[: args.fit_images], images[args.fit_images :]
        costs = exit_costs(network, test[:4])
        with torch.no_grad():
            outputs = network(fit)
        groups = {args.batch_size: [test[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.batches)]}
        if args.latency_images:
            groups[1] = [test[i : i + 1] for i in range(args.latency_images)]
        for kind in args.policies:
            for target in args.targets:
                label = set_policy(network, kind, target, outputs, costs)
                for batch_size, group in groups.items():
                    result = measure(network, group, args.rounds, clock)
                    rows.append({"setup": setup, "policy": f"{kind} @ {target:.2f}", "detail": label,
                                 "batch_size": batch_size, **result})
                    speed = result["images_per_second"]
                    print(f"| {setup} | {kind} @ {target:.2f} | {batch_size} "
                          f"| {speed['backbone NCHW']:.0f} → {speed['backbone NHWC']:.0f} "
                          f"| {speed['early exit NCHW']:.0f} → {speed['early exit NHWC']:.0f} "
                          f"| {result['backbone_nhwc_over_nchw']:.3f} | {result['early_exit_nhwc_over_nchw']:.3f} "
                          f"| {result['exits_changed']} of {result['samples']} |", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "clock": args.clock, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
