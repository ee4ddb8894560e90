"""torchrun: ``jei-train`` on 2 processes (gloo, CPU) gives one process's results.

The exit stage and feature extraction run on frozen (untrained, seeded) backbone weights, where
the only difference from one process is the order of floating-point sums; the backbone stage
differs more (each process's BatchNorm sees half of every batch), hence its looser tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from jei.distributed import World, local_rows, shard_range

QUICK = ["trainer.exits.warmup_epochs=3", "trainer.exits.epochs=2", "trainer.backbone.epochs=2"]


def _run(tmp_path: Path, name: str, processes: int, *overrides: str) -> dict:
    run_dir, cache = tmp_path / name, tmp_path / f"cache_{name}"
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "jei.cli", *QUICK, *overrides,
               f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one_on_a_frozen_backbone(tmp_path: Path) -> None:
    one = _run(tmp_path, "one", 1, "trainer.train_backbone=false")
    two = _run(tmp_path, "two", 2, "trainer.train_backbone=false")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # Features computed in two halves and joined are the one-process features, exactly.
    entries = sorted((tmp_path / "cache_one" / "features").iterdir())
    joined = sorted((tmp_path / "cache_two" / "features").iterdir())
    assert [p.name for p in entries] == [p.name for p in joined]  # and no shard file is left
    for a, b in zip(entries, joined):
        left, right = load_file(str(a)), load_file(str(b))
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    # Averaged half-batch gradients: the same training up to rounding.
    assert abs(one["accuracy"] - two["accuracy"]) <= 0.01
    assert abs(one["expected_cost"] - two["expected_cost"]) <= 0.01
    assert one["backbone_accuracy"] == two["backbone_accuracy"]


@pytest.mark.slow
def test_two_processes_train_the_backbone_too(tmp_path: Path) -> None:
    one = _run(tmp_path, "one", 1)
    two = _run(tmp_path, "two", 2)
    assert two["world_size"] == 2
    assert abs(one["backbone_accuracy"] - two["backbone_accuracy"]) <= 0.05
    assert abs(one["accuracy"] - two["accuracy"]) <= 0.05
    assert len(two["history"]["backbone"]["val_accuracy"]) == 2


@given(count=st.integers(0, 500), size=st.integers(1, 8))
def test_shards_cover_every_item_once_in_order(count: int, size: int) -> None:
    shards = [shard_range(count, World(rank, size)) for rank in range(size)]
    assert [i for shard in shards for i in shard] == list(range(count))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@given(batch=st.integers(1, 300), size=st.integers(1, 8))
def test_loss_shares_give_the_whole_batch_mean(batch: int, size: int) -> None:
    # Averaging the ranks' (share x local mean) over the ranks equals the whole batch's mean.
    values = torch.arange(batch, dtype=torch.float64) ** 1.5
    parts = [local_rows(batch, World(rank, size)) for rank in range(size)]
    averaged = sum(share * values[rows].mean() for rows, share in parts) / size
    assert torch.isclose(averaged, values.mean())
