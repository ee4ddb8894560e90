"""Batch-1 real early exit as one compiled program (``jei.batch1_program``) against its ideal.

    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/compiled_batch1.py [--setups digits vit resnet56]
        [--images 200] [--rounds 5] [--q 1.0] [--clock cpu|wall] [--layout flat|no-layout-optimization|as-is]
        [--out results.json]

At batch 1 the eager early-exit loop (``jei.model.stream_exits``) pays Python and dispatch at
every exit, which keeps it above 1.05 times its latency-weighted ideal (README, Speed). This
script measures what is left without any Python between segments: ``compile_batch1`` builds the
whole batch-1 pass (every segment, every IM and the max-prob rule of a ``BudgetedThreshold``
policy fitted on separate images) into one AOTInductor program. One image at a time,
interleaved in a rotating order, it times the eager backbone, eager real early exit (Python
heads, and native exits), the backbone built the same way as one program, the early-exit
program, every compiled segment alone (their shares give the compiled ideal) and a no-op
compiled program (what one call of a compiled program costs by itself). ``compile_batch1``
checks the program's exits and logits against eager early exit on the timed images.

AOTInductor (torch 2.14.1, CPU) miscompiles nested ``torch.cond`` when a convolution's map
crosses a ``cond`` with layout optimization on. ``--layout as-is`` builds the program without
``compile_batch1``'s workaround (the state crosses each ``cond`` flattened, ``flat``, the
default), and its check refuses the result; ``no-layout-optimization`` builds it without the
workaround too, with Inductor's layout optimization off instead. Building takes seconds
(digits) to a few minutes (ResNet-56).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from early_exit_limit import build_setup
from speed_common import CLOCKS, cumulative_shares, exit_costs, exit_fractions, ideal_ratio, rotated

from jei.batch1_program import compile_batch1
from jei.export import ExportError, _Segment
from jei.policies import BudgetedThreshold

FIT_IMAGES = 512


class Noop(nn.Module):
    def forward(self, inputs: Tensor) -> Tensor:
        return inputs.flatten()[:1] + 1


def compiled(module: nn.Module, example: Tensor, path: Path) -> tuple[Any, float]:
    """``module`` exported at batch 1 and built with AOTInductor: (runner, build seconds)."""
    start = time.perf_counter()
    program = torch.export.export(module.eval(), (example,), strict=False)
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return torch._inductor.aoti_load_package(package), time.perf_counter() - start


def run_setup(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    network, images, _ = build_setup(name, FIT_IMAGES + args.images)
    fit, singles = images[:FIT_IMAGES], [image[None].contiguous() for image in images[FIT_IMAGES:]]
    costs = exit_costs(network, singles[0])
    with torch.no_grad():
        outputs = network(fit)
    policy = BudgetedThreshold(args.q)
    policy.fit(outputs, torch.zeros(outputs.logits.shape[1], dtype=torch.long), costs)
    network.policy = policy
    gates = network.num_gates
    print(f"[{name}] building the AOTI programs ...", flush=True)
    start = time.perf_counter()
    try:  # checked against eager early exit on every timed image
        program = compile_batch1(network, torch.cat(singles), workdir / f"{name}_early_exit.pt2",
                                 flatten_state=args.layout == "flat")
    except ExportError as refusal:
        print(f"[{name}] refused: {refusal}", flush=True)
        return {"setup": name, "layout": args.layout, "refused": str(refusal)}
    build = time.perf_counter() - start
    with torch.no_grad():
        chain, _ = compiled(network.backbone, singles[0], workdir / f"{name}_backbone.pt2")  # forward: every segment
        noop, _ = compiled(Noop(), singles[0], workdir / f"{name}_noop.pt2")
        segments, eager_segments, state = [], [], singles[0]
        for index in range(gates + 1):
            segment = _Segment(network.backbone, index).eval()
            segments.append(compiled(segment, state, workdir / f"{name}_segment_{index}.pt2")[0])
            eager_segments.append(segment)
            state = segment(state)
        eager = [network.early_exit(x) for x in singles]
        results = [program(x) for x in singles]
    eager_exits = torch.cat([result.exit_index for result in eager])
    exits = torch.cat([result.exit_index for result in results])
    logit_error = max(float((result.logits - expected.logits).abs().max()) for result, expected in zip(results, eager))

    with torch.inference_mode():  # each segment's input, per image
        inputs = []
        for x in singles:
            state, states = x, []
            for segment in eager_segments:
                states.append(state)
                state = segment(state)
            inputs.append(states)
        backbone = network.backbone
        native = copy.deepcopy(network).use_native_exits()
        paths = {"eager backbone": backbone, "eager early exit": network.early_exit,
                 "eager native early exit": native.early_exit, "AOTI backbone": chain, "AOTI early exit": program,
                 "no-op": noop}
        clock = CLOCKS[args.clock]
        times: dict[str, list[float]] = {key: [] for key in paths}
        segment_times = {"AOTI": [[] for _ in segments], "eager": [[] for _ in segments]}
        for _ in range(2):  # warm-up
            for x in singles[:10]:
                for fn in paths.values():
                    fn(x)
        for round_ in range(args.rounds):
            for position, (x, states) in enumerate(zip(singles, inputs)):
                for key in rotated([*paths, "segments"], position + round_):
                    if key != "segments":
                        start = clock()
                        paths[key](x)
                        times[key].append(clock() - start)
                        continue
                    for kind, runs in (("AOTI", segments), ("eager", eager_segments)):
                        for index, (run, state) in enumerate(zip(runs, states)):
                            start = clock()
                            run(state)
                            segment_times[kind][index].append(clock() - start)
    mean = {key: statistics.fmean(values) for key, values in times.items()}
    shares = {kind: cumulative_shares([statistics.median(t) for t in per]) for kind, per in segment_times.items()}
    ideal = ideal_ratio(exit_fractions(exits, gates + 1), shares["AOTI"])
    eager_ideal = ideal_ratio(exit_fractions(eager_exits, gates + 1), shares["eager"])
    row = {
        "setup": name, "layout": args.layout, "build_s": build, "expected_cost": float(costs[exits].mean()),
        "exits_agree": int((exits == eager_exits).sum()), "images": len(singles), "max_logit_difference": logit_error,
        "mean_ms": {key: value * 1e3 for key, value in mean.items()},
        "eager_ratio": mean["eager early exit"] / mean["eager backbone"], "eager_ideal": eager_ideal,
        "native_ratio": mean["eager native early exit"] / mean["eager backbone"],
        "ratio": mean["AOTI early exit"] / mean["AOTI backbone"], "ideal": ideal,
    }
    print(json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=["digits", "vit", "resnet56"])
    parser.add_argument("--images", type=int, default=200, help="batch-1 images timed (after 512 that fit the policy)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--q", type=float, default=1.0, help="BudgetedThreshold's q (1: the same share at every exit)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--layout", choices=["flat", "no-layout-optimization", "as-is"], default="flat")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.layout == "no-layout-optimization":
        torch._inductor.config.layout_optimization = False
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run_setup(name, args, Path(workdir)) for name in args.setups]
    print(f"\ntorch {torch.__version__}, 1 thread, {args.clock} clock, {args.images} images x {args.rounds} rounds, "
          f"layout {args.layout}; ratios are of mean latencies, each path against its own backbone")
    print("| setup | exits agree | build s | eager backbone → early exit (native) ms | eager ratio / ideal (native) | "
          "AOTI backbone → early exit ms | AOTI ratio | AOTI ideal | AOTI ratio / ideal | no-op AOTI call µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "refused" in row:
            print(f"| {row['setup']} | refused: {row['refused']} |")
            continue
        ms, ideal = row["mean_ms"], row["eager_ideal"]
        print(f"| {row['setup']} | {row['exits_agree']}/{row['images']} | {row['build_s']:.0f} | "
              f"{ms['eager backbone']:.3f} → {ms['eager early exit']:.3f} ({ms['eager native early exit']:.3f}) | "
              f"{row['eager_ratio'] / ideal:.3f} ({row['native_ratio'] / ideal:.3f}) | "
              f"{ms['AOTI backbone']:.3f} → {ms['AOTI early exit']:.3f} | {row['ratio']:.3f} | {row['ideal']:.3f} | "
              f"{row['ratio'] / row['ideal']:.3f} | {ms['no-op'] * 1e3:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
