"""Feature cache entries larger than memory: streamed to disk while computed, memory-mapped on load.

``in_memory_max_bytes=0`` sends even a tiny split down the streamed, memory-mapped path, so
every property is checked here on small data; the last tests check the memory bound on wide
features in a subprocess.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import jei.features
from jei.data.base import TensorDataSplits, TensorSplit
from jei.features import (
    CACHE_FORMAT,
    STALE_TEMP_AFTER_S,
    CachedSplit,
    MappedSplit,
    _verify_main,
    cache_key,
    cached_split,
    compute_split,
    entry_path,
    read_entry,
    verify_file,
)
from jei.io import remove_stale_temp_files
from jei.train import ExitTraining, OptimizerSettings, exit_outputs, fit_exits

from .helpers import tiny_network

CPU = torch.device("cpu")
SPLITS = ("train", "val", "cal", "test")
MAPPED = {"in_memory_max_bytes": 0}  # every entry memory-mapped


def toy_data(n: int = 40, seed: int = 0) -> TensorDataSplits:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 5
    return TensorDataSplits(
        {name: TensorSplit(torch.randn(n, 1, 8, 8, generator=generator), labels) for name in SPLITS}, 5
    )


def assert_same(a: CachedSplit, b: CachedSplit) -> None:
    assert len(a.pooled) == len(b.pooled)
    for x, y in zip([*a.pooled, a.final_logits, a.labels], [*b.pooled, b.final_logits, b.labels]):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def load(network, data, split, cache, **options):
    return cached_split(network, data, split, 8, CPU, cache, **options)


def path_of(network, data, split, cache, dtype="float32") -> Path:
    return entry_path(cache, cache_key(network, data, split, "", dtype), split)


def messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def hits(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "feature cache hit" in r.getMessage()]


@pytest.fixture
def setting(tmp_path):
    return tiny_network(0), toy_data(), tmp_path / "features"


def test_a_streamed_entry_round_trips_exactly_in_float32(setting, caplog):
    network, data, cache = setting
    caplog.set_level(logging.INFO, logger="jei.features")
    expected = compute_split(network, data, "val", 8, CPU)
    first = load(network, data, "val", cache, **MAPPED)
    again = load(network, data, "val", cache, **MAPPED)
    assert isinstance(first, MappedSplit) and isinstance(again, MappedSplit)
    assert_same(first, expected)
    assert_same(again, expected)
    assert len(hits(caplog)) == 1 and any("written (streamed)" in m for m in messages(caplog, logging.INFO))
    path = path_of(network, data, "val", cache)
    assert first.path == path and sorted(p.name for p in cache.iterdir()) == [path.name]  # no temporary file left
    with safe_open(str(path), framework="pt") as handle:  # a plain safetensors file
        meta = handle.metadata()
        torch.testing.assert_close(handle.get_tensor("pooled.1"), expected.pooled[1], rtol=0, atol=0)
    assert meta["format"] == CACHE_FORMAT and meta["key"] == cache_key(network, data, "val", "")
    assert meta["split"] == "val" and meta["num_samples"] == "40" and meta["dtype"] == "float32"
    assert json.loads(meta["shapes"])["labels"] == [40] and len(meta["sha256"]) == 64
    assert set(json.loads(meta["tensor_sha256"])) == {"labels", "final_logits", "pooled.0", "pooled.1", "pooled.2"}
    # The same file read with the default threshold is small, so it is loaded whole: one format.
    whole = load(network, data, "val", cache)
    assert type(whole) is CachedSplit
    assert_same(whole, expected)


def test_streamed_and_in_memory_entries_hold_the_same_tensors_and_checksums(setting, tmp_path):
    network, data, cache = setting
    load(network, data, "cal", cache, **MAPPED)
    load(network, data, "cal", tmp_path / "small")
    streamed = path_of(network, data, "cal", cache)
    small = path_of(network, data, "cal", tmp_path / "small")
    with safe_open(str(streamed), framework="pt") as a, safe_open(str(small), framework="pt") as b:
        assert a.metadata() == b.metadata()
        names = a.keys()
        for name in names:
            torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=0, atol=0)


def test_float16_entries_are_within_float16_tolerance_and_batches_are_float32(setting, caplog):
    network, data, cache = setting
    exact = compute_split(network, data, "train", 8, CPU)
    half = compute_split(network, data, "train", 8, CPU, dtype="float16")
    assert all(p.dtype == torch.float16 for p in half.pooled) and half.final_logits.dtype == torch.float16
    for options in ({}, MAPPED):  # held in memory, and memory-mapped
        caplog.clear()
        caplog.set_level(logging.INFO, logger="jei.features")
        result = load(network, data, "train", cache / str(len(options)), dtype="float16", **options)
        assert_same(result, half)  # what a run without the cache trains on, bit for bit
        assert_same(load(network, data, "train", cache / str(len(options)), dtype="float16", **options), half)
        assert len(hits(caplog)) == 1
        for x, y in zip([*result.pooled, result.final_logits], [*exact.pooled, exact.final_logits]):
            torch.testing.assert_close(x.float(), y, rtol=2**-10, atol=1e-4)
        pooled, final, labels = result.batch(torch.tensor([5, 1, 3]), CPU)
        assert all(p.dtype == torch.float32 for p in pooled) and final.dtype == torch.float32
        torch.testing.assert_close(pooled[0], exact.pooled[0][[5, 1, 3]], rtol=2**-10, atol=1e-4)
        assert torch.equal(labels, exact.labels[[5, 1, 3]])
    assert cache_key(network, data, "train", "", "float16") != cache_key(network, data, "train", "")
    assert_same(cached_split(network, data, "train", 8, CPU, None, dtype="float16"), half)  # no cache: the same
    with pytest.raises(ValueError, match="float32, float16"):
        compute_split(network, data, "train", 8, CPU, dtype="bfloat16")


def test_random_order_batches_equal_in_memory_batches(setting):
    network, data, cache = setting
    memory = compute_split(network, data, "test", 8, CPU)
    mapped = load(network, data, "test", cache, **MAPPED)
    assert isinstance(mapped, MappedSplit)
    generator = torch.Generator().manual_seed(3)
    indices = [torch.randperm(40, generator=generator)[:size] for size in (1, 7, 16, 40)]
    indices += [torch.randint(0, 40, (25,), generator=generator), torch.tensor([39, 0, 39, 0]), torch.arange(40)]
    for index in indices:
        for got, want in zip(mapped.batch(index, CPU), memory.batch(index, CPU)):
            got, want = (got, want) if isinstance(got, list) else ([got], [want])
            for x, y in zip(got, want):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert mapped.for_epoch(3) is mapped and len(mapped) == 40


def test_training_from_a_mapped_split_equals_training_in_memory(setting):
    network, data, cache = setting
    schedule = ExitTraining(batch_size=16, warmup_epochs=2, warmup_patience=2, epochs=2, phase_batches=2,
                            optimizer=OptimizerSettings("sgd", 0.05, 1e-3, 0.9, 5e-4))
    from jei.objectives.jei import JEIObjective

    outputs = []
    for splits in (
        {s: compute_split(network, data, s, 8, CPU) for s in ("train", "val")},
        {s: load(network, data, s, cache, **MAPPED) for s in ("train", "val")},
    ):
        net = tiny_network(0, gate_init=False)
        fit_exits(net, JEIObjective(0.3), splits["train"], splits["val"], torch.tensor([0.3, 0.6, 0.8, 1.0]),
                  schedule, CPU, 7)
        outputs.append(exit_outputs(net, splits["val"], CPU))
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=0, atol=0)
    torch.testing.assert_close(outputs[0].gate_logits, outputs[1].gate_logits, rtol=0, atol=0)


class Failing(TensorDataSplits):
    """Its ``train`` batches fail after ``after`` batches, like a run interrupted mid-split."""

    def __init__(self, inner: TensorDataSplits, after: int) -> None:
        super().__init__(inner.splits, inner.num_classes)
        self.after = after

    def batches(self, split, batch_size, **kwargs):
        for count, batch in enumerate(super().batches(split, batch_size, **kwargs)):
            if count == self.after:
                raise RuntimeError("interrupted")
            yield batch


def test_an_interrupted_write_leaves_no_entry_and_the_split_is_recomputed(setting, caplog):
    network, data, cache = setting
    with pytest.raises(RuntimeError, match="interrupted"):  # the error is the run's, not the cache's
        load(network, Failing(data, after=3), "train", cache, **MAPPED)
    assert cache.is_dir() and list(cache.iterdir()) == []  # neither an entry nor a temporary file
    caplog.set_level(logging.INFO, logger="jei.features")
    assert_same(load(network, data, "train", cache, **MAPPED), compute_split(network, data, "train", 8, CPU))
    assert not hits(caplog) and not messages(caplog)
    assert_same(load(network, data, "train", cache, **MAPPED), compute_split(network, data, "train", 8, CPU))
    assert len(hits(caplog)) == 1


WRITER = """
import os, sys, time, torch
sys.path.insert(0, {tests!r})
from jei.data.base import TensorDataSplits, TensorSplit
from jei.features import cached_split
from helpers import tiny_network

class Slow(TensorDataSplits):
    def batches(self, split, batch_size, **kwargs):
        for count, batch in enumerate(super().batches(split, batch_size, **kwargs)):
            if count == 2:
                print("writing", flush=True)
                time.sleep(60)
            yield batch

generator = torch.Generator().manual_seed(0)
labels = torch.arange(40) % 5
data = Slow({{s: TensorSplit(torch.randn(40, 1, 8, 8, generator=generator), labels)
             for s in ("train", "val", "cal", "test")}}, 5)
cached_split(tiny_network(0), data, "train", 8, torch.device("cpu"), {cache!r}, in_memory_max_bytes=0)
"""


@pytest.mark.slow
def test_a_write_killed_midway_leaves_no_usable_entry_and_is_recomputed(setting, caplog):
    network, data, cache = setting
    code = WRITER.format(tests=str(Path(__file__).parent), cache=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    path = path_of(network, data, "train", cache)
    [orphan] = list(cache.iterdir())  # the partial file, under a temporary name only
    assert orphan.name.startswith(f".{path.name}.") and not path.exists()
    caplog.set_level(logging.INFO, logger="jei.features")
    assert_same(load(network, data, "train", cache, **MAPPED), compute_split(network, data, "train", 8, CPU))
    assert not hits(caplog) and path.exists() and orphan.exists()  # a recent orphan might be a live write
    old = time.time() - STALE_TEMP_AFTER_S - 1
    os.utime(orphan, (old, old))
    assert remove_stale_temp_files(cache, STALE_TEMP_AFTER_S) == [orphan]


@pytest.mark.parametrize("cut", [1, 100, "half"])
def test_a_truncated_entry_is_reported_by_path_recomputed_and_replaced(setting, caplog, cut):
    network, data, cache = setting
    load(network, data, "val", cache, **MAPPED)
    expected = compute_split(network, data, "val", 8, CPU)  # (a mapped split would see the damage)
    path = path_of(network, data, "val", cache)
    size = path.stat().st_size
    os.truncate(path, size // 2 if cut == "half" else size - cut)
    caplog.set_level(logging.INFO, logger="jei.features")
    result = load(network, data, "val", cache, **MAPPED)
    assert isinstance(result, MappedSplit)
    assert_same(result, expected)
    [warning] = messages(caplog)
    assert str(path) in warning and "truncated" in warning and "recomputing it and replacing the entry" in warning
    assert path.stat().st_size == size
    caplog.clear()
    assert_same(load(network, data, "val", cache, **MAPPED), expected)
    assert hits(caplog) and not messages(caplog)


def flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 1
    path.write_bytes(bytes(data))


def test_checksums_of_a_mapped_entry_are_verified_after_writing_and_on_request(setting, caplog, capsys):
    """A changed feature byte is not looked for at every load of a memory-mapped entry (that
    would read the whole file), but is found on request; changed labels are always found."""
    network, data, cache = setting
    load(network, data, "val", cache, **MAPPED)
    expected = compute_split(network, data, "val", 8, CPU)
    path = path_of(network, data, "val", cache)
    assert verify_file(path) == [] and _verify_main(["verify", str(cache)]) == 0
    flip_byte(path, 1)  # the last byte of the last pooled tensor
    assert verify_file(path) == ["pooled.2 fails its checksum"]
    assert _verify_main(["verify", str(cache)]) == 1 and "BAD" in capsys.readouterr().out
    assert isinstance(load(network, data, "val", cache, **MAPPED), MappedSplit)  # default: not read
    caplog.set_level(logging.WARNING, logger="jei.features")
    assert_same(load(network, data, "val", cache, verify=True, **MAPPED), expected)
    [warning] = messages(caplog)
    assert str(path) in warning and "fails its checksum (pooled.2" in warning
    assert verify_file(path) == []  # replaced
    with pytest.raises(jei.features.CacheEntryError, match="fails its checksum"):  # whole loads: always checked
        flip_byte(path, 1)
        read_entry(path, cache_key(network, data, "val", ""), "val", data.labels("val"), 3)
    # Labels are read whole at every load, so their checksum is always checked.
    load(network, data, "cal", cache, **MAPPED)
    cal = path_of(network, data, "cal", cache)
    layout = jei.features._read_layout(cal)
    _, _, begin, _ = layout.tensors["labels"]
    raw = bytearray(cal.read_bytes())
    raw[layout.data_start + begin + 1] ^= 1  # a high byte of label 0: not a valid class any more
    cal.write_bytes(bytes(raw))
    with pytest.raises(jei.features.CacheEntryError, match=r"fails its checksum \(labels"):
        read_entry(cal, cache_key(network, data, "cal", ""), "cal", data.labels("cal"), 3, in_memory_max_bytes=0)


def test_an_unwritable_cache_folder_warns_and_the_run_goes_on_in_memory(setting, caplog, tmp_path):
    network, data, _ = setting
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    caplog.set_level(logging.WARNING, logger="jei.features")
    result = load(network, data, "val", blocker / "features", **MAPPED)
    assert type(result) is CachedSplit
    assert_same(result, compute_split(network, data, "val", 8, CPU))
    [message] = messages(caplog)
    assert "cannot write" in message and str(blocker / "features") in message and "trainer.feature_cache=false" in message


def test_a_disk_filling_up_midway_warns_leaves_nothing_and_the_run_goes_on(setting, caplog, monkeypatch):
    network, data, cache = setting
    real, calls = jei.features._pwrite_all, []

    def filling(fd, data, offset):
        calls.append(offset)
        if len(calls) > 12:  # the header and a few batches fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(jei.features, "_pwrite_all", filling)
    caplog.set_level(logging.WARNING, logger="jei.features")
    result = load(network, data, "val", cache, **MAPPED)
    assert_same(result, compute_split(network, data, "val", 8, CPU))
    [message] = messages(caplog)
    assert "No space left on device" in message and "cannot write" in message
    assert list(cache.iterdir()) == []


# A stand-in for an ``EarlyExitNetwork`` with wide exits (features follow from the inputs) and
# its data; source text, so that the memory test's subprocess runs the very same code.
WIDE_SOURCE = """
import torch
from jei.data.base import TensorDataSplits, TensorSplit


class WideNetwork(torch.nn.Module):
    def __init__(self, dims=(512, 512), num_classes=5):
        super().__init__()
        self.backbone = torch.nn.Linear(1, 1)
        self.ims = []
        self.dims, self.num_classes, self.probe = dims, num_classes, None  # probe: sees every batch returned

    @property
    def num_gates(self):
        return len(self.dims)

    def pooled_features(self, inputs):
        x = inputs.reshape(len(inputs), -1)[:, :1].float()
        features = [x * torch.arange(1, d + 1) + i for i, d in enumerate(self.dims)]
        final = x.expand(-1, self.num_classes) * 2.0
        if self.probe is not None:
            self.probe([*features, final])
        return features, final


def wide_data(n):
    inputs = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return TensorDataSplits({s: TensorSplit(inputs, torch.arange(n) % 5) for s in ("train", "val", "cal", "test")}, 5)
"""
_wide: dict = {}
exec(WIDE_SOURCE, _wide)  # noqa: S102 (our own source text, shared with a subprocess)
WideNetwork, wide_data = _wide["WideNetwork"], _wide["wide_data"]


def test_a_streamed_write_holds_one_batch_at_a_time(tmp_path):
    """Every batch the network returns is released before the batch after next is computed;
    computing in memory (the control) keeps them all."""
    network, data = WideNetwork((64, 32)), wide_data(400)

    def run(compute) -> list[int]:
        returned: list[weakref.ref] = []
        alive_at_call: list[int] = []

        def probe(tensors):
            gc.collect()
            alive_at_call.append(sum(ref() is not None for ref in returned) // len(tensors))
            returned.extend(weakref.ref(t) for t in tensors)

        network.probe = probe
        result = compute()
        network.probe = None
        gc.collect()
        assert len(alive_at_call) == 400 // 16
        return alive_at_call, sum(ref() is not None for ref in returned), result

    alive, left, result = run(lambda: cached_split(network, data, "train", 16, CPU, tmp_path, **MAPPED))
    assert isinstance(result, MappedSplit) and max(alive) <= 1 and left == 0
    assert_same(result, compute_split(network, data, "train", 16, CPU))
    alive, _, _ = run(lambda: compute_split(network, data, "train", 16, CPU))
    assert alive == list(range(400 // 16))  # the probe does see tensors that are kept


MEMORY = """
import json, torch
from jei.features import cached_split, compute_split
""" + WIDE_SOURCE.replace("{", "{{").replace("}", "}}") + """

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

network, data = WideNetwork((1024, 1024)), wide_data(12_000)   # 98 MB of float32 features
peak = [0.0]
network.probe = lambda tensors: peak.__setitem__(0, max(peak[0], anon_mb()))
torch.set_num_threads(1)
before = anon_mb()
if {streamed}:
    result = cached_split(network, data, "train", 256, torch.device("cpu"), {cache!r}, in_memory_max_bytes=0)
    for index in torch.randperm(12_000).split(256):     # an epoch of random batches, too
        result.batch(index, torch.device("cpu"))
        peak[0] = max(peak[0], anon_mb())
else:
    result = compute_split(network, data, "train", 256, torch.device("cpu"))
peak[0] = max(peak[0], anon_mb())
print(json.dumps({{"growth_mb": peak[0] - before, "type": type(result).__name__}}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_computing_and_reading_a_large_split_keeps_memory_bounded(tmp_path):
    """Anonymous memory (what the process holds, not the page cache) while a 98 MB split is
    computed into the cache and an epoch is read from it, against computing it in memory."""
    def growth(streamed: bool) -> dict:
        code = MEMORY.format(cache=str(tmp_path / "features"), streamed=streamed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    streamed, in_memory = growth(True), growth(False)
    assert streamed["type"] == "MappedSplit" and in_memory["type"] == "CachedSplit"
    assert in_memory["growth_mb"] > 90  # the control holds the split
    assert streamed["growth_mb"] < 40, (streamed, in_memory)  # a few 2 MB batches, not the split's 98 MB


def test_trainer_feature_dtype_reaches_the_features_a_run_trains_on(tmp_path):
    import dataclasses

    from hydra import compose, initialize_config_module

    from jei.build import (
        build_backbone,
        build_data,
        build_objective,
        build_settings,
        network_factory,
    )
    from jei.errors import ConfigError
    from jei.pipeline import prepare

    with initialize_config_module("jei.configs", version_base="1.3"):
        for trainer in ("default", "paper", "graph", "vit_cpu"):
            assert build_settings(compose("train", overrides=[f"trainer={trainer}"])).feature_dtype == "float32"
        with pytest.raises(ConfigError, match="trainer.feature_dtype must be one of float32, float16"):
            build_settings(compose("train", overrides=["trainer.feature_dtype=bf16"]))
        cfg = compose("train", overrides=["trainer.feature_dtype=float16", "trainer.train_backbone=false",
                                          f"paths.cache_dir={tmp_path / 'cache'}"])
    settings = dataclasses.replace(build_settings(cfg), device=CPU)
    assert settings.feature_dtype == "float16"
    data = build_data(cfg.data)
    make = network_factory(cfg.im, cfg.gate, data.num_classes, cfg.policy, build_objective(cfg.objective))
    _, _, splits, train, _ = prepare(data, build_backbone(cfg.backbone, data), make, settings, tmp_path / "run")
    for split in (*splits.values(), train):
        assert all(p.dtype == torch.float16 for p in split.pooled) and split.final_logits.dtype == torch.float16
