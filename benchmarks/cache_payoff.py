"""What the feature cache buys: one exit-training epoch from the cache against the same epoch
re-running the frozen backbone on every batch (how the JEI-DNN authors' code trains), side by side.

    python benchmarks/cache_payoff.py [--setup resnet56|digits|both] [--samples 2048] [--rounds 2]
                                      [--threads 1] [--device cpu] [--out result.json]

Setups: ``resnet56`` is ``experiment=cifar10_resnet56`` (the frozen CIFAR-10 ResNet-56, 8 exits)
on the first ``--samples`` training images; ``digits`` is the default job's small CNN (random
frozen weights: the cost is the same as trained ones) on the digits training split. The shared
data is found from this file's repository (``<repo>/../shared/data``) or ``$JEI_SHARED_DATA``,
whatever the launch directory.

Each epoch is the same work on the same batches: random order (``trainer.exits.batch_size``,
seeded alike), the IMs' forward and backward on every exit and an AdamW step (an IM warm-up
epoch); the arms differ only in where the pooled features come from:

- ``backbone``: ``network.pooled_features`` on the batch's images (no gradient), every epoch;
- ``cache``: rows gathered from the in-memory cached split (``compute_split``);
- ``cache_mapped``: rows gathered from a streamed, memory-mapped entry (``cached_split`` with
  ``in_memory_max_bytes=0``), the path ImageNet-sized splits take.

The arms alternate round by round so machine load affects them alike; each figure is the median
over ``--rounds``. Also reported: the one-time cost of building the cache (one backbone pass at
``trainer.eval_batch_size``) and the epoch after which the cache has paid for itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module

from jei.build import build_backbone, build_data, build_objective, network_factory
from jei.features import (
    CachedSplit,
    MappedSplit,
    cached_split,
    compute_split,
    to_device,
)

REPO = Path(__file__).resolve().parents[1]
SETUPS = {
    "resnet56": ["experiment=cifar10_resnet56"],
    "digits": [],
}


def shared_data() -> Path:
    return Path(os.environ.get("JEI_SHARED_DATA") or REPO.parent / "shared" / "data").resolve()


def build(setup: str, samples: int | None, device: torch.device):
    overrides = [*SETUPS[setup], f"paths.shared_data={shared_data()}", "trainer.feature_cache=false"]
    if samples is not None and setup == "resnet56":
        overrides.append(f"data.max_per_split={samples}")
    with initialize_config_module("jei.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    data = build_data(cfg.data)
    backbone = build_backbone(cfg.backbone, data)
    objective = build_objective(cfg.objective)
    backbone.freeze()
    network = network_factory(cfg.im, cfg.gate, data.num_classes, cfg.policy, objective)(backbone).to(device)
    return cfg, data, network


def epoch(network, data, features: CachedSplit | None, batch_size: int, seed: int, device: torch.device) -> tuple[float, float]:
    """Seconds and summed loss of one IM training epoch; ``features=None``: from the backbone."""
    torch.manual_seed(seed)
    for im in network.ims:
        for layer in im.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()  # every arm starts from the same IMs
    parameters = network.exit_parameters()["ims"]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=1e-4)
    network.ims.train()
    n = data.size("train")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # what data.batches(shuffle) draws
    total = 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if features is None:
        batches = ((to_device(x, device), *network.pooled_features(to_device(x, device)), y.to(device))
                   for x, y in data.batches("train", batch_size, shuffle=True, seed=seed))
        batches = ((pooled, final, y) for _, pooled, final, y in batches)
    else:
        batches = (features.batch(order[i : i + batch_size], device) for i in range(0, n, batch_size))
    for pooled, final, labels in batches:
        out = network.from_pooled(pooled, final)
        loss = sum(torch.nn.functional.cross_entropy(logits, labels) for logits in out.logits[:-1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    sync()
    return time.perf_counter() - start, total


def run(setup: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg, data, network = build(setup, args.samples, device)
    batch_size, eval_batch = int(cfg.trainer.exits.batch_size), int(cfg.trainer.eval_batch_size)
    start = time.perf_counter()
    cache = compute_split(network, data, "train", eval_batch, device)
    build_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="jei-payoff-") as folder:
        start = time.perf_counter()
        mapped = cached_split(network, data, "train", eval_batch, device, Path(folder), in_memory_max_bytes=0)
        mapped_build_seconds = time.perf_counter() - start
        assert isinstance(mapped, MappedSplit)
        arms = {"backbone": None, "cache": cache, "cache_mapped": mapped}
        times: dict[str, list[float]] = {name: [] for name in arms}
        losses: dict[str, float] = {}
        names = list(arms)
        for round_ in range(-1, args.rounds):  # round -1 warms up (allocator, caches); not counted
            for name in names if round_ % 2 else names[::-1]:
                seconds, loss = epoch(network, data, arms[name], batch_size, seed=1, device=device)
                if round_ >= 0:
                    times[name].append(seconds)
                losses[name] = loss
            print(setup, round_, {k: [round(t, 3) for t in v] for k, v in times.items()}, flush=True)
        del mapped, arms
    median = {name: statistics.median(t) for name, t in times.items()}
    saved = median["backbone"] - median["cache"]
    return {
        "setup": setup,
        "train_samples": data.size("train"),
        "exits": network.num_gates,
        "batch_size": batch_size,
        "feature_mb": sum(p.numel() * p.element_size() for p in [*cache.pooled, cache.final_logits]) / 2**20,
        "epoch_seconds": {name: round(m, 3) for name, m in median.items()},
        "backbone_over_cache": round(median["backbone"] / median["cache"], 1),
        "backbone_over_cache_mapped": round(median["backbone"] / median["cache_mapped"], 1),
        "cache_build_seconds": round(build_seconds, 3),
        "cache_build_seconds_streamed": round(mapped_build_seconds, 3),
        "break_even_epochs": round(build_seconds / saved, 2) if saved > 0 else None,
        # Same batches, same start: the summed epoch losses agree up to the backbone's float noise.
        "epoch_loss": {name: round(v, 4) for name, v in losses.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=(*SETUPS, "both"), default="both")
    parser.add_argument("--samples", type=int, default=2048, help="training images of the ResNet-56 setup")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setups = list(SETUPS) if args.setup == "both" else [args.setup]
    result = {"device": str(device), "threads": torch.get_num_threads(), "rounds": args.rounds,
              "results": [run(setup, args, device) for setup in setups]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
