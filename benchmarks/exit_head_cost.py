"""Where real early exit's time goes at an exit: the cost of one exit's head, against a segment.

    python benchmarks/exit_head_cost.py [--setups resnet56 digits] [--batch-sizes 1 256]
        [--images 100] [--threads 1] [--clock cpu] [--compile] [--native] [--out heads.json]

An exit's head is what real early exit runs there besides the backbone: the IM on the
backbone's representation, then either max-prob's step (softmax, max, compare) or the JEI gate
(uncertainty features, Linear(4, 1)) and JEI's step; then one host read of how many leave.

Each head is timed **cold**, as real early exit runs it: right after the backbone segment before
it, image batch after image batch; and **hot**, called back to back on one input (what a
micro-benchmark sees). Both are reported per exit (median over exits and batches) and as a
share of the median segment's time. ``--compile`` also times the same heads under
``torch.compile`` (the compile itself is not timed), ``--native`` as native exits run them
(``jei.native_exits``: one kernel call that also counts who leaves), with, as a row of its own,
what native exits do once per call: read every exit's forms. Setups, data and weights as in
``early_exit_limit.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from early_exit_limit import build_setup
from speed_common import CLOCKS

from jei.model import EarlyExitNetwork
from jei.native_exits import native_plan, native_steps, representation_form
from jei.policies import JEIRule, max_prob


def heads(network: EarlyExitNetwork, batch_size: int, compiled: bool, native: bool) -> dict[str, Callable[[int, Any], int]]:
    """Named heads: ``head(index, state)``, ending in one host read (how many leave)."""
    backbone, ims, gates = network.backbone, network.ims, network.gates
    threshold, rule = max_prob(0.9), JEIRule()
    used = torch.zeros(batch_size)  # JEI's running gate sum (real early exit makes it once per batch)

    def im_only(index: int, state: Any) -> Any:
        return ims[index](backbone.represent(index, state))

    def with_max_prob(index: int, state: Any) -> Any:
        logits = ims[index](backbone.represent(index, state))
        return threshold.step(index, logits, logits, {})[0]

    def with_jei_gate(index: int, state: Any) -> Any:
        logits = ims[index](backbone.represent(index, state))
        return rule.step(index, logits, gates[index](logits), {"used": used})[0]

    named = {"IM": im_only, "IM + max-prob": with_max_prob, "IM + JEI gate": with_jei_gate}
    timed = {name: (lambda index, state, fn=fn: int(fn(index, state).sum())) for name, fn in named.items()}
    if native:  # the same heads as native exits run them: one kernel call, which also counts
        for name, policy, decision in (("IM + max-prob", threshold, {}), ("IM + JEI gate", rule, {"used": used})):
            network.policy = policy
            plan = native_plan(network)
            if isinstance(plan, str):
                raise SystemExit(f"--native: {plan}")
            prepare = native_steps(backbone.represent, plan, policy, network.temperature, compacts_rows=False,  # heads only
                                   native_represent=representation_form(backbone))
            timed[f"{name} (native)"] = lambda index, state, step=prepare(), decision=decision: step(index, state, decision)[3]
            # Once per call, not per exit: every exit's forms, read at the start of the call.
            timed[f"{name} (native, all exits' forms, once per call)"] = lambda index, state, prepare=prepare: (prepare(), 0)[1]
    if compiled:  # one compiled program per exit (its shapes and modules), for this batch size
        for name, fn in named.items():
            per_exit = [torch.compile(functools.partial(fn, index), dynamic=False) for index in range(len(ims))]
            timed[f"{name} (compiled)"] = lambda index, state, per_exit=per_exit: int(per_exit[index](state).sum())
    return timed


@torch.inference_mode()
def measure(network: EarlyExitNetwork, images: torch.Tensor, batch_size: int, clock: Callable[[], float],
            compiled: bool, native: bool) -> dict[str, Any]:
    backbone = network.backbone
    named = heads(network, batch_size, compiled, native)
    batches = [images[start:start + batch_size] for start in range(0, len(images) - batch_size + 1, batch_size)]
    states = []  # every segment's input state of the first batch, for the hot timings and compiling
    state = backbone.begin(batches[0])
    for index in range(network.num_gates):
        state = backbone.run_segment(index, state)
        states.append(state)
        for head in named.values():
            head(index, state)  # warm-up (and compile)
    cold: dict[str, list[float]] = {name: [] for name in named}
    segments: list[float] = []
    for position, batch in enumerate(batches):
        for offset in range(len(named)):  # every head after every segment, the order rotating
            name = list(named)[(position + offset) % len(named)]
            state = backbone.begin(batch)
            for index in range(network.num_gates):
                start = clock()
                state = backbone.run_segment(index, state)
                middle = clock()
                named[name](index, state)
                cold[name].append(clock() - middle)
                segments.append(middle - start)
    hot: dict[str, float] = {}
    for name, head in named.items():
        times = []
        for index, state in enumerate(states):
            start = clock()
            for _ in range(20):
                head(index, state)
            times.append((clock() - start) / 20)
        hot[name] = statistics.median(times)
    segment = statistics.median(segments)
    return {
        "batch_size": batch_size,
        "segment_us": 1e6 * segment,
        "heads": {
            name: {
                "cold_us": 1e6 * statistics.median(cold[name]),
                "cold_share": statistics.median(cold[name]) / segment,
                "hot_us": 1e6 * hot[name],
            }
            for name in named
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=["resnet56", "digits"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--images", type=int, default=100, help="images per batch size (at least one batch)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--compile", action="store_true", help="also time the heads under torch.compile")
    parser.add_argument("--native", action="store_true", help="also time the heads as native exits run them")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    print("| setup | batch | head | cold µs (share of a segment) | hot µs | segment µs |")
    print("|---|---|---|---|---|---|")
    for setup in args.setups:
        for batch_size in args.batch_sizes:
            network, images, _ = build_setup(setup, max(args.images, batch_size))
            result = measure(network, images, batch_size, CLOCKS[args.clock], args.compile, args.native) | {"setup": setup}
            results.append(result)
            for name, head in result["heads"].items():
                print(f"| {setup} | {batch_size} | {name} | {head['cold_us']:.1f} ({100 * head['cold_share']:.1f}%) "
                      f"| {head['hot_us']:.1f} | {result['segment_us']:.0f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "clock": args.clock, "results": results}, indent=2))


if __name__ == "__main__":
    main()
