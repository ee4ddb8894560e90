"""Wall-clock speed of a trained run's real early exit against its full backbone, side by side.

    python benchmarks/early_exit_speed.py RUN_DIR [--rounds 3] [--batch-size 256] [--max-batches N]
        [--latency-images 200] [--threads N] [--clock wall|cpu] [--native-exits]

RUN_DIR is a finished `jei-train` run (loaded with ``jei.build.load_run``, so any working
directory works). On the same test batches, interleaved batch by batch (``speed_common``): the
backbone alone, real early exit and a pass timed segment by segment; the result is their time
ratio next to the mul-add cost of the exits taken and the latency-weighted ideal (each exit
weighted by the share of the backbone's time spent up to it), images/s, and p50/p99 latency at
batch 1. Writes RUN_DIR/benchmark_speed.json. ``--native-exits`` runs early exit with native
exits and times the Python path beside it (the reference column), as ``early_exit_limit.py`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import CLOCKS, Row, as_dict, exit_costs, markdown_tables, measure_batches, measure_latency

from jei.build import load_run, resolve_device
from jei.features import to_device
from jei.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--latency-images", type=int, default=200, help="batch-1 images (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (use with --threads 1)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--native-exits", action="store_true",
                        help="early exit with native exits, the Python path timed beside it as the reference")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    run_dir = args.run_dir.expanduser().resolve()
    _, data, network = load_run(run_dir)
    network.to(device).eval()
    batches = [to_device(x, device) for x, _ in data.batches("test", args.batch_size)][: args.max_batches]
    costs = exit_costs(network, batches[0][:4] if isinstance(batches[0], torch.Tensor) else batches[0]).to("cpu")
    clock = CLOCKS[args.clock]
    row = Row(run_dir.name, str(type(network.policy).__name__))
    reference = network.use_native_exits()._python_early_exit if args.native_exits else None
    row.batch = measure_batches(network, batches, args.rounds, costs, device, clock, reference)
    if args.latency_images and isinstance(batches[0], torch.Tensor):
        images = torch.cat(batches)[: args.latency_images]
        row.latency = measure_latency(network, [images[i : i + 1] for i in range(len(images))], costs, device, clock,
                                      reference=reference)
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    b = row.batch
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "samples": b.samples,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "backbone_seconds": b.backbone_seconds,
        "early_exit_seconds": b.early_exit_seconds,
        "time_ratio": b.time_ratio,
        "latency_weighted_ideal": b.ideal,
        "expected_cost": b.expected_cost,
        "run_expected_cost": metrics.get("expected_cost"),
        "backbone_images_per_second": b.backbone_images_per_second,
        "early_exit_images_per_second": b.early_exit_images_per_second,
        "batch": as_dict(b),
        "latency": as_dict(row.latency) if row.latency else None,
    }
    write_json(run_dir / "benchmark_speed.json", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("batch", "latency")}, indent=2))
    print(markdown_tables([row]))


if __name__ == "__main__":
    main()
