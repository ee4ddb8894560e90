"""The feature cache past memory: peak memory of a split larger than a memory cap, and epoch
time from the memory-mapped entry against the in-memory one, side by side.

    python benchmarks/feature_cache.py [--samples 200000] [--exits 8] [--dim 256] [--cap-mb 400]
                                       [--rounds 3] [--dir DIR] [--out result.json]

A synthetic split (``--samples`` x ``--exits`` x ``--dim`` float32 features, 1.6 GB by default,
from a stand-in network whose features are a cheap function of the inputs) goes through
``jei.features.cached_split`` exactly as a run's would:

1. ``write``: a subprocess computes the split into the cache (streamed, ``in_memory_max_bytes=0``)
   under a cap on its data memory (``RLIMIT_DATA`` = what it uses after imports + ``--cap-mb``;
   it limits the process's heap and anonymous memory, not the page cache that file-backed pages
   live in). It reports the time, peak anonymous memory (``RssAnon``) and peak resident memory
   (``VmHWM``, which also counts the mapped file pages the kernel may drop at any time).
2. ``read``: another subprocess, under the same cap, loads the entry (a cache hit, memory-mapped)
   and runs one random-order epoch of batches of 256 through eight linear IMs (forward, backward,
   SGD step); then it tries to load the same entry whole into memory, which the cap refuses.
3. ``speed``: in this process (no cap), the same entry memory-mapped and loaded whole; random-order
   epochs at batch sizes 64 and 256, gathering only and gathering plus the IM training step,
   alternated round by round so machine load affects both alike; the memory-mapped gather without
   (the default) and with sorting each batch's rows first (``MappedSplit.sort_rows``); and the first
   ``--cold-batches`` of an epoch with the file's pages evicted first (``posix_fadvise(DONTNEED)``).

The entry stays in ``--dir`` (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from jei.data.base import TensorDataSplits, TensorSplit
from jei.features import (
    CachedSplit,
    MappedSplit,
    cache_key,
    cached_split,
    entry_path,
    read_entry,
)

CPU = torch.device("cpu")
SPLITS = ("train", "val", "cal", "test")


class SyntheticNetwork(torch.nn.Module):
    """Stands in for an ``EarlyExitNetwork``: ``exits`` pooled features of width ``dim``."""

    def __init__(self, exits: int, dim: int, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = torch.nn.Linear(1, 1)  # the cache key hashes its weights: fixed ones
        torch.nn.init.constant_(self.backbone.weight, 1.0)
        torch.nn.init.constant_(self.backbone.bias, 0.0)
        self.ims: list[torch.nn.Module] = []
        self.exits, self.dim, self.num_classes = exits, dim, num_classes
        self.frequencies = torch.linspace(0.001, 1.0, dim)
        self.on_batch = None

    @property
    def num_gates(self) -> int:
        return self.exits

    def pooled_features(self, inputs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = inputs.reshape(len(inputs), 1)
        features = [torch.sin(x * self.frequencies + i) for i in range(self.exits)]
        final = torch.cos(x * self.frequencies[: self.num_classes])
        if self.on_batch is not None:
            self.on_batch()
        return features, final


def synthetic_data(samples: int, num_classes: int = 10) -> TensorDataSplits:
    inputs = torch.arange(samples, dtype=torch.float32).view(samples, 1, 1, 1)
    labels = torch.arange(samples) % num_classes
    return TensorDataSplits({s: TensorSplit(inputs, labels) for s in SPLITS}, num_classes)


def status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


class Peak:
    """Peak ``RssAnon`` sampled by ``sample()`` (the kernel keeps no high-water mark of it)."""

    def __init__(self) -> None:
        self.start = status_mb("RssAnon")
        self.peak = self.start

    def sample(self) -> None:
        self.peak = max(self.peak, status_mb("RssAnon"))


def cap_data_memory(cap_mb: int) -> float:
    """Limit the process's data memory to what it holds now plus ``cap_mb``; returns the limit."""
    limit_mb = status_mb("VmData") + cap_mb
    limit = int(limit_mb * (1 << 20))
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    return limit_mb


def linear_ims(exits: int, dim: int, num_classes: int = 10) -> tuple[list[torch.nn.Linear], torch.optim.Optimizer]:
    torch.manual_seed(0)
    ims = [torch.nn.Linear(dim, num_classes) for _ in range(exits)]
    return ims, torch.optim.SGD([p for im in ims for p in im.parameters()], lr=0.01)


def epoch(split: CachedSplit, batch_size: int, seed: int, train: tuple | None = None,
          max_batches: int | None = None, on_batch=None) -> float:
    """Seconds for one random-order epoch (as ``jei.train`` draws it), gathering each batch and,
    with ``train=(ims, optimizer)``, one IM training step on it."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    batches = order.split(batch_size)[:max_batches]
    start = time.perf_counter()
    for index in batches:
        pooled, _, labels = split.batch(index, CPU)
        if train is not None:
            ims, optimizer = train
            loss = sum(torch.nn.functional.cross_entropy(im(p), labels) for im, p in zip(ims, pooled))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if on_batch is not None:
            on_batch()
    return time.perf_counter() - start


def role_write(args: argparse.Namespace) -> dict[str, Any]:
    network, data = SyntheticNetwork(args.exits, args.dim), synthetic_data(args.samples)
    limit = cap_data_memory(args.cap_mb)
    peak = Peak()
    network.on_batch = peak.sample
    start = time.perf_counter()
    split = cached_split(network, data, "train", args.batch_size, CPU, args.dir, in_memory_max_bytes=0)
    seconds = time.perf_counter() - start
    peak.sample()
    path = entry_path(args.dir, cache_key(network, data, "train", ""), "train")
    return {"role": "write", "type": type(split).__name__, "seconds": seconds, "entry_mb": path.stat().st_size / 2**20,
            "data_limit_mb": limit, "rss_anon_start_mb": peak.start, "rss_anon_peak_mb": peak.peak,
            "vm_hwm_mb": status_mb("VmHWM"), "path": str(path)}


def role_read(args: argparse.Namespace) -> dict[str, Any]:
    network, data = SyntheticNetwork(args.exits, args.dim), synthetic_data(args.samples)
    ims = linear_ims(args.exits, args.dim)
    limit = cap_data_memory(args.cap_mb)
    peak = Peak()
    split = cached_split(network, data, "train", args.batch_size, CPU, args.dir)  # a hit: memory-mapped
    peak.sample()
    seconds = epoch(split, 256, seed=0, train=ims, on_batch=peak.sample)
    result = {"role": "read", "type": type(split).__name__, "epoch_seconds_batch256_train": seconds,
              "data_limit_mb": limit, "rss_anon_start_mb": peak.start, "rss_anon_peak_mb": peak.peak,
              "vm_hwm_mb": status_mb("VmHWM")}
    del split
    gc.collect()
    path = entry_path(args.dir, cache_key(network, data, "train", ""), "train")
    try:
        whole = read_entry(path, cache_key(network, data, "train", ""), "train", data.labels("train"), args.exits,
                           in_memory_max_bytes=1 << 62, verify=False)
        result["in_memory_load_under_cap"] = f"succeeded ({type(whole).__name__})"
    except (MemoryError, RuntimeError) as err:
        result["in_memory_load_under_cap"] = f"refused: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
    return result


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (this file only; other processes' caches stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def speed(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    network, data = SyntheticNetwork(args.exits, args.dim), synthetic_data(args.samples)
    key, labels = cache_key(network, data, "train", ""), data.labels("train")
    mapped = read_entry(path, key, "train", labels, args.exits, in_memory_max_bytes=0)
    memory = read_entry(path, key, "train", labels, args.exits, in_memory_max_bytes=1 << 62, verify=False)
    assert isinstance(mapped, MappedSplit) and type(memory) is CachedSplit

    assert not mapped.sort_rows  # the default
    ordered = MappedSplit(mapped.pooled, mapped.final_logits, mapped.labels, path=path, sort_rows=True)
    variants = {"memory": memory, "mapped": mapped, "mapped_sorted": ordered}
    rows: dict[str, Any] = {}
    for batch_size in (64, 256):
        for train in (False, True):
            times: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for round_ in range(-1, args.rounds):  # round -1: warm-up (page cache, allocator), not counted
                for name in names if round_ % 2 else names[::-1]:
                    ims = linear_ims(args.exits, args.dim) if train else None
                    seconds = epoch(variants[name], batch_size, seed=round_ + 1, train=ims,
                                    max_batches=args.train_batches if train else None)
                    if round_ >= 0:
                        times[name].append(seconds)
            median = {name: statistics.median(t) for name, t in times.items()}
            label = f"batch{batch_size}_{'train' if train else 'gather'}"
            rows[label] = {
                "batches": len(torch.arange(len(memory)).split(batch_size)[: args.train_batches if train else None]),
                "seconds": {name: round(m, 3) for name, m in median.items()},
                "mapped_over_memory": round(median["mapped"] / median["memory"], 3),
                "sorted_over_unsorted": round(median["mapped_sorted"] / median["mapped"], 3),
            }
            print(label, rows[label], flush=True)
    del mapped, memory, ordered, variants
    gc.collect()
    cold: dict[str, float] = {}
    for name in ("mapped", "mapped_sorted", "mapped", "mapped_sorted"):
        split = read_entry(path, key, "train", labels, args.exits, in_memory_max_bytes=0)
        split.sort_rows = name == "mapped_sorted"
        evict(path)
        seconds = epoch(split, 256, seed=7, max_batches=args.cold_batches)
        cold[name] = min(cold.get(name, float("inf")), seconds)
        del split
        gc.collect()
    rows["cold_batch256_gather"] = {"batches": args.cold_batches, "seconds": {k: round(v, 3) for k, v in cold.items()},
                                    "sorted_over_unsorted": round(cold["mapped_sorted"] / cold["mapped"], 3)}
    print("cold", rows["cold_batch256_gather"], flush=True)
    return rows


def run_role(role: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--role", role, "--samples", str(args.samples), "--exits", str(args.exits),
               "--dim", str(args.dim), "--cap-mb", str(args.cap_mb), "--dir", str(args.dir),
               "--batch-size", str(args.batch_size)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{role} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(role, result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--exits", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--cap-mb", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=1024, help="batch size of the feature pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-batches", type=int, default=400, help="batches per timed training epoch")
    parser.add_argument("--cold-batches", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--role", choices=("write", "read"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.role is not None:
        result = role_write(args) if args.role == "write" else role_read(args)
        print(json.dumps(result))
        return

    temporary = args.dir is None
    args.dir = Path(tempfile.mkdtemp(prefix="jei-feature-bench-")) if temporary else args.dir
    try:
        result: dict[str, Any] = {
            "samples": args.samples, "exits": args.exits, "dim": args.dim, "threads": args.threads,
            "split_mb": args.samples * (args.exits * args.dim + 10) * 4 / 2**20, "cap_mb": args.cap_mb,
        }
        result["write"] = run_role("write", args)
        result["read"] = run_role("read", args)
        result["speed"] = speed(args, Path(result["write"]["path"]))
    finally:
        if temporary:
            shutil.rmtree(args.dir, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
