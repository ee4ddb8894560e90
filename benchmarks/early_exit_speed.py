"""Wall-clock speed of real early-exit inference against the full backbone, side by side.

    python benchmarks/early_exit_speed.py RUN_DIR [--rounds 3] [--batch-size 256] [--max-batches N]

RUN_DIR is a finished `jei-train` run. Both paths run on the same test batches, interleaved
round by round so machine load affects them alike; the result is their time ratio, next to the
run's expected cost (the mul-add ratio). Writes RUN_DIR/benchmark_speed.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from jei.build import load_run, resolve_device
from jei.features import to_device
from jei.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    _, data, network = load_run(args.run_dir)
    network.to(device)
    batches = [to_device(x, device) for x, _ in data.batches("test", args.batch_size)][: args.max_batches]
    samples = sum(network.backbone.batch_size(x) for x in batches)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            for inputs in batches:
                fn(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(network.early_exit)  # warm-up of both paths
    timed(network.backbone)
    full, early = [], []
    for _ in range(args.rounds):
        full.append(timed(network.backbone))
        early.append(timed(network.early_exit))
    metrics = json.loads((args.run_dir / "metrics.json").read_text())
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "samples": samples,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "backbone_seconds": min(full),
        "early_exit_seconds": min(early),
        "time_ratio": min(early) / min(full),
        "expected_cost": metrics["expected_cost"],
        "backbone_images_per_second": samples / min(full),
        "early_exit_images_per_second": samples / min(early),
    }
    write_json(args.run_dir / "benchmark_speed.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
