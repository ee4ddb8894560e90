"""The frozen backbone's inference transforms side by side: channels-last maps
(``trainer.channels_last``) and BatchNorm folded into the convolutions
(``trainer.fold_batchnorm``), for the backbone alone and for real early exit, in one
interleaved run.

    python benchmarks/backbone_transforms.py [--setups resnet56 digits] [--policies budgeted jei]
        [--targets 0.44 0.72] [--rounds 5] [--batches 2] [--latency-images 100] [--threads N]
        [--clock wall|cpu] [--compile] [--out transforms.json]

Setups and policies as in ``early_exit_limit.py``: each variant is the plain (NCHW) network
with a transformed copy of its backbone, sharing its heads, so all run the same weights, heads
and thresholds. ``--compile`` adds the plain backbone with every segment compiled by
``torch.compile`` (inductor, dynamic batch size, BatchNorm folded by inductor's freezing).
Every variant first runs once over every input (warm-up: allocations, kernel choice,
compilation; its wall time is reported); then, per round and in rotating order, each variant's
backbone and early exit run over the same batches (``--batch-size``) and, one image at a time,
over the same single images. Reported per variant: images/s of both paths, their time over the
plain network's (median over rounds of each round's ratio), and how many samples take another
exit than in the plain network (rounding in other kernels can move a score across a threshold).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from early_exit_limit import add_setup_arguments, build_setup, set_policy
from speed_common import CLOCKS, exit_costs, rotated, synchronizer, timed_call

from jei.batchnorm_folding import fold_frozen_batchnorm
from jei.memory_format import to_channels_last
from jei.model import EarlyExitNetwork

VARIANTS = ("NCHW", "NHWC", "NCHW + fold", "NHWC + fold")
COMPILED = "compiled segments"


def variants(network: EarlyExitNetwork, compile_segments: bool = False) -> dict[str, EarlyExitNetwork]:
    """The plain network and copies of it with a transformed backbone, sharing its heads (so a
    policy set on the plain network holds for all); with ``compile_segments``, also one whose
    segments ``torch.compile`` runs (``compiled``)."""
    made = {"NCHW": network}
    for name in VARIANTS[1:]:
        backbone = copy.deepcopy(network.backbone)
        if "NHWC" in name:
            to_channels_last(backbone)
        if "fold" in name:
            fold_frozen_batchnorm(backbone)
        made[name] = sharing_heads(network, backbone)
    if compile_segments:
        made[COMPILED] = sharing_heads(network, compiled(copy.deepcopy(network.backbone)))
    return made


def sharing_heads(network: EarlyExitNetwork, backbone: torch.nn.Module) -> EarlyExitNetwork:
    shared = EarlyExitNetwork(backbone, list(network.ims), list(network.gates), ensemble_decay=network.ensemble_decay)
    shared.temperature.copy_(network.temperature)
    return shared.eval()


def compiled(backbone: torch.nn.Module) -> torch.nn.Module:
    """``backbone`` with each segment one inductor program, for any batch size (``dynamic``);
    inductor's ``freezing`` folds BatchNorm into the convolutions by itself. Compiled at the
    first call of each segment (and again for a batch of one sample, which dynamo specialises)."""
    torch._dynamo.config.recompile_limit = 64  # one code object (run_segment) for every segment
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._inductor.config.freezing = True
    programs = [torch.compile(functools.partial(backbone.run_segment, index), dynamic=True)
                for index in range(backbone.num_gates + 1)]
    backbone.run_segment = lambda index, state: programs[index](state)
    return backbone


@torch.inference_mode()
def measure(
    networks: dict[str, EarlyExitNetwork], groups: list[torch.Tensor], rounds: int, clock: Callable[[], float]
) -> dict[str, Any]:
    """Per variant, seconds per round of the backbone and of early exit over ``groups`` (batches,
    or single images), all interleaved, with the plain network's policy."""
    plain = networks["NCHW"]
    for network in networks.values():
        network.policy = plain.policy
    timed = {(name, path): (net.backbone if path == "backbone" else net.early_exit)
             for name, net in networks.items() for path in ("backbone", "early exit")}
    sync = synchronizer(torch.device("cpu"))
    warm_up: dict[str, float] = {}
    for (name, _), fn in timed.items():  # every shape once: one-off allocations, kernel choice, compiling
        start = time.perf_counter()
        for x in groups:
            fn(x)
        warm_up[name] = warm_up.get(name, 0.0) + time.perf_counter() - start
    plain_exits = [plain.early_exit(x).exit_index for x in groups]
    changed = {
        name: sum(int((net.early_exit(x).exit_index != exits).sum()) for x, exits in zip(groups, plain_exits))
        for name, net in networks.items()
    }
    keys = list(timed)
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    for round_index in range(rounds):
        for key in rotated(keys, round_index):
            seconds[key].append(sum(timed_call(timed[key], x, sync, clock) for x in groups))
    samples = sum(len(x) for x in groups)
    results = {}
    for name in networks:
        results[name] = {"exits_changed": changed[name], "warm_up_seconds": warm_up[name]}
        for path in ("backbone", "early exit"):
            own, base = seconds[(name, path)], seconds[("NCHW", path)]
            results[name][path] = {
                "images_per_second": samples / statistics.median(own),
                "time_over_plain": statistics.median(a / b for a, b in zip(own, base)),
            }
        results[name]["early_exit_over_plain_backbone"] = statistics.median(
            a / b for a, b in zip(seconds[(name, "early exit")], seconds[("NCHW", "backbone")])
        )
    return {"samples": samples, "variants": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_arguments(parser, setups=["resnet56", "digits"], latency_images=100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--compile", action="store_true",
                        help="also time the plain backbone with every segment under torch.compile (inductor)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    rows = []
    print("| setup | policy | batch | variant | images/s backbone | images/s early exit | time over NCHW: backbone "
          "| early exit | early exit over NCHW backbone | exits changed | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setup in args.setups:
        measured = args.batches * args.batch_size
        network, images, _ = build_setup(setup, args.fit_images + max(measured, args.latency_images))
        networks = variants(network, args.compile)
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
                    result = measure(networks, group, args.rounds, clock)
                    rows.append({"setup": setup, "policy": f"{kind} @ {target:.2f}", "detail": label,
                                 "batch_size": batch_size, **result})
                    for name, variant in result["variants"].items():
                        backbone, early = variant["backbone"], variant["early exit"]
                        print(f"| {setup} | {kind} @ {target:.2f} | {batch_size} | {name} "
                              f"| {backbone['images_per_second']:.0f} | {early['images_per_second']:.0f} "
                              f"| {backbone['time_over_plain']:.3f} | {early['time_over_plain']:.3f} "
                              f"| {variant['early_exit_over_plain_backbone']:.3f} "
                              f"| {variant['exits_changed']} of {result['samples']} "
                              f"| {variant['warm_up_seconds']:.1f} |", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "clock": args.clock, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
