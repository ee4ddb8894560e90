"""A feature cache that cannot lie: keyed by the inputs, verified on load, optional when broken."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from jei.data.base import DataSplits, TensorDataSplits, TensorSplit
from jei.features import (
    CACHE_FORMAT,
    STALE_TEMP_AFTER_S,
    CachedSplit,
    cache_key,
    cached_split,
    compute_split,
    entry_path,
    input_digest,
    write_entry,
)
from jei.io import remove_stale_temp_files

from .helpers import tiny_network

CPU = torch.device("cpu")
SPLITS = ("train", "val", "cal", "test")


def toy_data(inputs: dict[str, torch.Tensor] | None = None) -> TensorDataSplits:
    """Four different 24-image splits (so that one split's features are not another's)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 5
    inputs = inputs or {name: torch.randn(24, 1, 8, 8, generator=generator) for name in SPLITS}
    return TensorDataSplits({name: TensorSplit(inputs[name], labels) for name in SPLITS}, 5)


def with_inputs(data: TensorDataSplits, split: str, inputs: torch.Tensor) -> TensorDataSplits:
    return toy_data({name: inputs if name == split else data.splits[name].inputs for name in SPLITS})


def assert_same(a: CachedSplit, b: CachedSplit) -> None:
    assert len(a.pooled) == len(b.pooled)
    for x, y in zip([*a.pooled, a.final_logits, a.labels], [*b.pooled, b.final_logits, b.labels]):
        torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0)


@pytest.fixture
def setting(tmp_path):
    return tiny_network(0), toy_data(), tmp_path / "features"


def load(network, data, split, cache, fingerprint=""):
    return cached_split(network, data, split, 16, CPU, cache, fingerprint)


def entry(network, data, split, cache, fingerprint="") -> Path:
    return entry_path(cache, cache_key(network, data, split, fingerprint), split)


def hits(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "feature cache hit" in r.getMessage()]


def warnings_about(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]


def test_an_entry_is_reused_and_records_its_key_split_shapes_and_checksum(setting, caplog):
    network, data, cache = setting
    caplog.set_level(logging.INFO, logger="jei.features")
    first = load(network, data, "val", cache)
    again = load(network, data, "val", cache)
    assert_same(first, again)
    assert_same(first, compute_split(network, data, "val", 16, CPU))
    assert len(hits(caplog)) == 1
    path = entry(network, data, "val", cache)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == CACHE_FORMAT and meta["split"] == "val" and meta["num_samples"] == "24"
    assert meta["key"] == cache_key(network, data, "val", "")
    assert json.loads(meta["shapes"])["labels"] == [24] and len(meta["sha256"]) == 64


def test_changed_inputs_are_not_served_from_the_cache(setting):
    """The case that went wrong: five training images set to NaN gave the clean features."""
    network, data, cache = setting
    clean = load(network, data, "train", cache)
    broken_inputs = data.splits["train"].inputs.clone()
    broken_inputs[:5] = float("nan")
    broken = with_inputs(data, "train", broken_inputs)
    assert cache_key(network, broken, "train", "") != cache_key(network, data, "train", "")
    result = load(network, broken, "train", cache)
    assert torch.isnan(result.final_logits[:5]).all() and not torch.isnan(clean.final_logits).any()
    assert_same(result, compute_split(network, broken, "train", 16, CPU))
    # Identical inputs in another tensor are the same key: the cache still works across runs.
    copy = with_inputs(data, "train", data.splits["train"].inputs.clone())
    assert cache_key(network, copy, "train", "") == cache_key(network, data, "train", "")


def test_an_entry_of_another_split_is_reported_recomputed_and_replaced(setting, caplog):
    network, data, cache = setting
    load(network, data, "val", cache)
    load(network, data, "cal", cache)
    cal_path = entry(network, data, "cal", cache)
    shutil.copyfile(entry(network, data, "val", cache), cal_path)  # the val entry under the cal name
    caplog.set_level(logging.INFO, logger="jei.features")
    result = load(network, data, "cal", cache)
    assert_same(result, compute_split(network, data, "cal", 16, CPU))
    assert any("holds the 'val' split, not 'cal'" in m for m in warnings_about(caplog, cal_path))
    caplog.clear()
    assert_same(load(network, data, "cal", cache), result)  # replaced: a clean hit now
    assert hits(caplog) and not warnings_about(caplog, cal_path)


def test_an_entry_for_other_weights_is_refused(setting, caplog):
    network, data, cache = setting
    other = tiny_network(1)
    load(other, data, "val", cache)
    path = entry(network, data, "val", cache)
    shutil.copyfile(entry(other, data, "val", cache), path)
    caplog.set_level(logging.WARNING, logger="jei.features")
    assert_same(load(network, data, "val", cache), compute_split(network, data, "val", 16, CPU))
    assert any("computed for other inputs or weights" in m for m in warnings_about(caplog, path))


def test_a_wrong_sized_entry_is_refused_before_it_is_used(setting, caplog):
    network, data, cache = setting
    full = compute_split(network, data, "test", 16, CPU)
    short = CachedSplit([p[:10] for p in full.pooled], full.final_logits[:10], full.labels[:10])
    path = entry(network, data, "test", cache)
    write_entry(path, short, cache_key(network, data, "test", ""), "test")  # right key, consistent header
    caplog.set_level(logging.WARNING, logger="jei.features")
    assert_same(load(network, data, "test", cache), full)
    assert any("has 10 samples" in m and "the split has 24" in m for m in warnings_about(caplog, path))


def damage(kind: str, data: bytes) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "random":
        return os.urandom(len(data))
    if kind == "flipped":  # one bit of the last tensor byte: the header still parses
        return data[:-1] + bytes([data[-1] ^ 1])
    if kind == "pickle":  # what earlier versions wrote (torch.save); never unpickled now
        return b"\x80\x04\x95" + data[:50]
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("empty", "unreadable"), ("truncated", "unreadable"), ("random", "unreadable"),
     ("flipped", "fails its checksum"), ("pickle", "unreadable")],
)
def test_a_damaged_entry_is_reported_by_path_recomputed_and_replaced(setting, caplog, kind, reason):
    network, data, cache = setting
    expected = load(network, data, "val", cache)
    path = entry(network, data, "val", cache)
    path.write_bytes(damage(kind, path.read_bytes()))
    caplog.set_level(logging.INFO, logger="jei.features")
    assert_same(load(network, data, "val", cache), expected)
    messages = warnings_about(caplog, path)
    assert len(messages) == 1 and reason in messages[0] and "recomputing it and replacing the entry" in messages[0]
    caplog.clear()
    assert_same(load(network, data, "val", cache), expected)
    assert hits(caplog) and not warnings_about(caplog, path)


def test_an_unwritable_cache_folder_warns_and_the_run_goes_on(setting, caplog, tmp_path):
    network, data, _ = setting
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    caplog.set_level(logging.WARNING, logger="jei.features")
    result = load(network, data, "val", blocker / "features")
    assert_same(result, compute_split(network, data, "val", 16, CPU))
    [message] = [r.getMessage() for r in caplog.records]
    assert "cannot write" in message and str(blocker / "features") in message
    assert "trainer.feature_cache=false" in message and "paths.cache_dir" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_cache_folder_warns_and_the_run_goes_on(setting, caplog):
    network, data, cache = setting
    cache.mkdir()
    cache.chmod(0o500)
    try:
        caplog.set_level(logging.WARNING, logger="jei.features")
        assert_same(load(network, data, "val", cache), compute_split(network, data, "val", 16, CPU))
        assert any("cannot write" in r.getMessage() for r in caplog.records)
    finally:
        cache.chmod(0o700)


def test_a_full_disk_warns_leaves_no_partial_entry_and_the_run_goes_on(setting, caplog, monkeypatch):
    network, data, cache = setting

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    caplog.set_level(logging.WARNING, logger="jei.features")
    assert_same(load(network, data, "val", cache), compute_split(network, data, "val", 16, CPU))
    assert any("No space left on device" in r.getMessage() for r in caplog.records)
    assert list(cache.iterdir()) == []  # neither an entry nor a temporary file


def test_orphaned_temporary_files_are_removed_and_live_ones_kept(setting):
    network, data, cache = setting
    cache.mkdir()
    old = time.time() - STALE_TEMP_AFTER_S - 60
    orphans = [cache / ".abc-val.safetensors.0123456789abcdef.tmp.safetensors", cache / ".tmpAbC123",
               cache / ".abc-val.pt.k3j4h5g6.pt"]
    live = cache / ".abc-cal.safetensors.fedcba9876543210.tmp.safetensors"
    unrelated = cache / "notes.txt"
    for path in [*orphans, live, unrelated]:
        path.write_bytes(b"x")
    for path in [*orphans, unrelated]:
        os.utime(path, (old, old))
    load(network, data, "val", cache)
    left = {p.name for p in cache.iterdir()}
    assert not any(p.name in left for p in orphans)
    assert {live.name, unrelated.name, entry(network, data, "val", cache).name} <= left


@pytest.mark.slow
def test_a_write_killed_midway_leaves_no_entry_and_its_temporary_file_is_cleaned_up(tmp_path):
    """kill -9 during a write: the target never appears; the orphan goes once it is old."""
    target = tmp_path / "entry.safetensors"
    code = (
        "import sys, time\n"
        "from jei.io import atomic_write\n"
        "def write(tmp):\n"
        "    tmp.write_bytes(b'half an entry')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        f"atomic_write({str(target)!r}, write)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not target.exists()
    [orphan] = list(tmp_path.iterdir())
    assert orphan.name.startswith(".entry.safetensors.")
    assert remove_stale_temp_files(tmp_path, STALE_TEMP_AFTER_S) == []  # too recent: might be live
    old = time.time() - STALE_TEMP_AFTER_S - 1
    os.utime(orphan, (old, old))
    assert remove_stale_temp_files(tmp_path, STALE_TEMP_AFTER_S) == [orphan]
    assert list(tmp_path.iterdir()) == []


def test_graph_inputs_are_part_of_the_key():
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data

    from jei.data.graphs import GraphDataSplits

    def graphs(seed: int) -> list[Data]:
        generator = torch.Generator().manual_seed(seed)
        return [Data(x=torch.randn(4, 3, generator=generator), edge_index=torch.tensor([[0, 1, 2], [1, 2, 3]]),
                     y=torch.tensor([i % 2]), random_walk_pe=torch.randn(4, 2, generator=generator))
                for i in range(4)]

    splits = {name: graphs(k) for k, name in enumerate(SPLITS)}
    data = GraphDataSplits(splits, 2, 3, None, 2)
    same = GraphDataSplits({name: [g.clone() for g in gs] for name, gs in splits.items()}, 2, 3, None, 2)
    assert input_digest(data, "train") == input_digest(same, "train")
    same.splits["train"][2].x[1, 0] += 1e-3
    assert input_digest(data, "train") != input_digest(same, "train")
    same.splits["val"][0].random_walk_pe[0, 0] = float("nan")
    assert input_digest(data, "val") != input_digest(same, "val")
    assert input_digest(data, "cal") == input_digest(same, "cal")


class Streamed(DataSplits):
    """A DataSplits whose inputs are reachable only through ``batches``."""

    def __init__(self, inner: DataSplits) -> None:
        self.inner, self.num_classes = inner, inner.num_classes

    def size(self, split):
        return self.inner.size(split)

    def labels(self, split):
        return self.inner.labels(split)

    def batches(self, split, batch_size, **kwargs):
        return self.inner.batches(split, batch_size, **kwargs)


def test_streamed_inputs_are_hashed_for_other_data_types(setting):
    network, data, cache = setting
    changed_inputs = data.splits["val"].inputs.clone()
    changed_inputs[3, 0, 0, 0] += 1
    streamed, other = Streamed(data), Streamed(with_inputs(data, "val", changed_inputs))
    assert input_digest(streamed, "val") != input_digest(other, "val")
    assert input_digest(streamed, "test") == input_digest(other, "test")
    assert_same(load(network, streamed, "val", cache), compute_split(network, streamed, "val", 16, CPU))
    assert_same(load(network, other, "val", cache), compute_split(network, other, "val", 16, CPU))
