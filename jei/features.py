"""Feature cache: the frozen backbone's pooled exit representations, computed once per split.

The backbone is frozen and (without augmentation) deterministic, so each exit's pooled
representation is a fixed function of the input; IMs and gates then train from the cache at a
fraction of the cost of re-running the backbone (METHOD §5). The cache key hashes the backbone's
weights, the IMs' pooling, the split's inputs and labels, the data settings and the stored dtype,
so a stale cache is never reused; each entry records its key, split, shapes and checksums and is
verified on load, and a bad entry is recomputed (``cached_split``).

An entry is one safetensors file per split. Small entries (data up to ``IN_MEMORY_MAX_BYTES``)
are computed in memory, loaded whole and checksummed at every load, as before. Larger ones
(ImageNet-sized splits) never sit in memory: they are streamed to disk batch by batch as they are
computed (``_EntryWriter``: memory O(batch)), checksummed once after writing, and memory-mapped
on load (``MappedSplit``), where each training batch gathers its rows from the mapping. Features
can be stored as float16 (``dtype``), half the disk and page cache; batches come back float32.

Under torchrun (``jei.distributed``) each process computes a contiguous range of the split's
batches and streams it to a shard file of the cache; rank 0 then joins the shards, in order,
into the one entry every process reads (``_shared_split``). Without a cache the shards are
exchanged in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from jei import distributed
from jei.data.base import DataSplits, TensorDataSplits, pick_split
from jei.io import atomic_path, atomic_write, remove_stale_temp_files
from jei.memory_format import uses_channels_last
from jei.model import EarlyExitNetwork
from jei.precision import autocast

log = logging.getLogger(__name__)

FEATURE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
# Entries whose data (all tensors) is at most this size are held in memory; larger ones are
# streamed to disk while computed and memory-mapped when read. 1 GiB: below it, holding a copy
# costs little on any machine that trains on such data, and reading is a plain tensor gather.
IN_MEMORY_MAX_BYTES = 1 << 30


def feature_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float16"`` (or the torch dtype) -> the torch dtype; ``ValueError`` otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in FEATURE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in FEATURE_DTYPES:
        return FEATURE_DTYPES[dtype]
    raise ValueError(f"the feature dtype must be one of {', '.join(FEATURE_DTYPES)}, got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _widen(tensor: Tensor) -> Tensor:
    """Half-precision features as float32 (what IMs compute in); anything else as it is."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


@dataclass
class CachedSplit:
    """Pooled features per exit (``[N, D_l]`` each), backbone logits ``[N, K]``, labels ``[N]``.

    The tensors may be float16 (``feature_dtype``); ``batch`` returns them as float32.
    """

    pooled: list[Tensor]
    final_logits: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def for_epoch(self, epoch: int) -> CachedSplit:
        """The same features every epoch (see ``AugmentedFeatures`` for the other case)."""
        return self

    def batch(self, index: Tensor, device: torch.device) -> tuple[list[Tensor], Tensor, Tensor]:
        index = torch.as_tensor(index, dtype=torch.long, device=self.labels.device)
        return (  # index_select: the same rows as p[index], copied faster
            [_widen(p.index_select(0, index).to(device)) for p in self.pooled],
            _widen(self.final_logits.index_select(0, index).to(device)),
            self.labels.index_select(0, index).to(device),
        )


@dataclass
class MappedSplit(CachedSplit):
    """A ``CachedSplit`` whose ``pooled`` and ``final_logits`` are read-only memory-mapped views
    of the cache entry at ``path`` (``labels`` are in memory). Reading them reads from the page
    cache (or the disk), so the split never needs to fit in memory. ``batch`` gathers rows with
    numpy (about twice as fast as torch's indexing on one thread). ``sort_rows`` reads each
    batch's rows in file order, then puts them back in the requested order: measured
    (``benchmarks/feature_cache.py``), it costs 9-20% per gather with the file in the page cache
    and changes nothing beyond noise (+-6%) reading from an SSD-backed disk, so it is off by
    default; it may pay on spinning or network disks. Never write into these tensors."""

    path: Path | None = None
    sort_rows: bool = False

    def batch(self, index: Tensor, device: torch.device) -> tuple[list[Tensor], Tensor, Tensor]:
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        rows = index.numpy()
        restore = None
        if self.sort_rows and len(rows) > 1:
            order = np.argsort(rows, kind="stable")
            rows, restore = rows[order], np.empty_like(order)
            restore[order] = np.arange(len(order))

        def gather(tensor: Tensor) -> Tensor:
            picked = np.take(tensor.numpy(), rows, axis=0)
            return _widen(torch.from_numpy(picked if restore is None else picked[restore]).to(device))

        return [gather(p) for p in self.pooled], gather(self.final_logits), self.labels[index].to(device)


def to_device(inputs: object, device: torch.device) -> object:
    """Move a tensor or anything with ``.to`` (e.g. a PyG batch) to ``device``."""
    return inputs.to(device) if hasattr(inputs, "to") else inputs


@torch.no_grad()
def _feature_batches(
    network: EarlyExitNetwork,
    data: DataSplits,
    split: str,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    augment: bool = False,
    seed: int = 0,
    precision: str = "fp32",
    only: range | None = None,
) -> Iterator[tuple[list[Tensor], Tensor, Tensor]]:
    """The split's pooled features, backbone logits (in ``dtype``, on the CPU) and labels, batch
    by batch; ``only``: the numbers of the batches to compute (the others' inputs are read and
    skipped, so augmentations draw the same random numbers as a full pass)."""
    total = _batch_count(data, split, batch_size)
    if augment:
        torch.manual_seed(seed)  # augmentations draw from the global generator
    batches = data.batches(split, batch_size, augment=augment)
    shown = len(only) if only is not None else total
    progress = tqdm(total=shown, desc=f"features[{split}]", leave=False, disable=None)
    for number, (inputs, y) in enumerate(batches):
        if only is not None and number not in only:
            continue
        with autocast(device, precision):
            features, final = network.pooled_features(to_device(inputs, device))
        progress.update()
        yield [f.to(dtype).cpu() for f in features], final.to(dtype).cpu(), y.cpu()
    progress.close()


def _batch_count(data: DataSplits, split: str, batch_size: int) -> int:
    return (data.size(split) + batch_size - 1) // batch_size


def _collect(batches: Iterable[tuple[list[Tensor], Tensor, Tensor]], num_exits: int) -> CachedSplit:
    pooled: list[list[Tensor]] = [[] for _ in range(num_exits)]
    logits, labels = [], []
    for features, final, y in batches:
        for store, feature in zip(pooled, features):
            store.append(feature)
        logits.append(final)
        labels.append(y)
    if not labels:  # a process whose share of a tiny split is empty
        return CachedSplit([torch.empty(0) for _ in range(num_exits)], torch.empty(0), torch.empty(0, dtype=torch.long))
    return CachedSplit([torch.cat(p) for p in pooled], torch.cat(logits), torch.cat(labels))


def compute_split(
    network: EarlyExitNetwork,
    data: DataSplits,
    split: str,
    batch_size: int,
    device: torch.device,
    augment: bool = False,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    precision: str = "fp32",
) -> CachedSplit:
    """Pooled features of a whole split, in memory; with ``augment``, of one augmented pass over
    it. Under torchrun each process computes its share of the batches and all exchange them."""
    world = distributed.current()
    only = distributed.shard_range(_batch_count(data, split, batch_size), world) if world.distributed else None
    batches = _feature_batches(network, data, split, batch_size, device, feature_dtype(dtype), augment, seed, precision, only)
    part = _collect(batches, network.num_gates)
    if not world.distributed:
        return part
    return _join(distributed.gather_objects(part))


def _join(parts: list[CachedSplit]) -> CachedSplit:
    """Consecutive row ranges of one split as one split."""
    parts = [p for p in parts if len(p)] or parts[:1]
    return CachedSplit(
        [torch.cat([p.pooled[i] for p in parts]) for i in range(len(parts[0].pooled))],
        torch.cat([p.final_logits for p in parts]),
        torch.cat([p.labels for p in parts]),
    )


@contextmanager
def cpu_threads(device: torch.device, threads: int) -> Iterator[None]:
    """Set torch's intra-op CPU threads for a block (no effect on other devices)."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class AugmentedFeatures:
    """Training features drawn anew each epoch from an augmented pass (no cache possible)."""

    def __init__(
        self,
        network: EarlyExitNetwork,
        data: DataSplits,
        batch_size: int,
        device: torch.device,
        seed: int,
        dtype: str | torch.dtype = "float32",
        precision: str = "fp32",
    ) -> None:
        self.network, self.data, self.batch_size, self.device, self.seed = network, data, batch_size, device, seed
        self.dtype, self.precision = feature_dtype(dtype), precision
        self.threads = torch.get_num_threads()  # the backbone pass gets all of them back

    def __len__(self) -> int:
        return self.data.size("train")

    def for_epoch(self, epoch: int) -> CachedSplit:
        with cpu_threads(self.device, self.threads):
            return compute_split(
                self.network, self.data, "train", self.batch_size, self.device, augment=True, seed=self.seed + epoch,
                dtype=self.dtype, precision=self.precision,
            )


def input_digest(data: DataSplits, split: str) -> str:
    """sha256 of a split's inputs: what the backbone sees, so changed inputs never hit the cache.

    Read directly where the data is at hand: the tensors of ``TensorDataSplits`` (all in-memory
    image sets), every graph's tensors for graph splits (a ``splits`` mapping of PyG ``Data``),
    the paths, sizes and modification times of the files of a lazily read image folder (its
    decoding settings come from the data config, which ``fingerprint`` covers). Any other
    ``DataSplits`` has its batches streamed (no backbone pass) and their inputs hashed.
    Raises ``TypeError`` for inputs of a type it cannot hash.
    """
    digest = hashlib.sha256(b"inputs\0")
    if isinstance(data, TensorDataSplits):
        _hash_value(digest, pick_split(data.splits, split).inputs)
    elif isinstance(getattr(data, "splits", None), Mapping):
        _hash_value(digest, pick_split(data.splits, split))
    elif isinstance(getattr(data, "files", None), Mapping):
        _hash_value(digest, [_file_identity(Path(f)) for f in pick_split(data.files, split)])
        for name in ("img_size", "resize_size", "mean", "std"):
            _hash_value(digest, getattr(data, name, None))
    else:
        for inputs, _ in data.batches(split, _DIGEST_BATCH):
            _hash_value(digest, inputs)
    return digest.hexdigest()


_DIGEST_BATCH = 256


def _file_identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _hash_value(digest: Any, value: Any) -> None:
    """Feed ``value`` (tensors, PyG data, containers, scalars) into ``digest``, types and shapes included."""
    if isinstance(value, Tensor):
        tensor = value.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        tensor = tensor.cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"M{len(value)}".encode())
        for key in sorted(value, key=str):
            digest.update(f"K{key!s}".encode())
            _hash_value(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _hash_value(digest, item)
    elif value is None or isinstance(value, (str, int, float, bool)):
        digest.update(f"V{value!r}".encode())
    elif hasattr(value, "to_dict"):  # a PyG Data or Batch
        digest.update(f"D{type(value).__qualname__}".encode())
        _hash_value(digest, value.to_dict())
    else:
        raise TypeError(f"cannot hash inputs of type {type(value).__qualname__} for the feature cache key")


def cache_key(
    network: EarlyExitNetwork, data: DataSplits, split: str, fingerprint: str, dtype: str | torch.dtype = "float32",
    precision: str = "fp32",
) -> str:
    """Hash of what the features depend on: the backbone's weights, the IMs' pooling, the
    split's inputs (``input_digest``), labels and size, ``fingerprint`` (the data settings),
    the ``dtype`` they are stored in, the ``precision`` the backbone ran in and its memory format."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{fingerprint}\0{_dtype_name(feature_dtype(dtype))}".encode())
    if precision != "fp32":  # (fp32 adds nothing: the keys of every entry made before precision existed hold)
        digest.update(f"precision={precision}".encode())
    if uses_channels_last(network.backbone):  # (likewise: NCHW adds nothing)
        digest.update(b"memory_format=channels_last")
    for name, tensor in sorted(network.backbone.state_dict().items()):
        digest.update(name.encode())
        _hash_value(digest, tensor)
    for im in network.ims:  # an IM without a pool_signature is keyed by its class
        signature = im.pool_signature() if hasattr(im, "pool_signature") else type(im).__qualname__
        digest.update(signature.encode())
    digest.update(split.encode())
    digest.update(input_digest(data, split).encode())
    _hash_value(digest, data.labels(split))
    digest.update(str(data.size(split)).encode())
    return digest.hexdigest()[:32]


# --- cache entries ---------------------------------------------------------------------------
#
# One safetensors file per split, ``<key>-<split>.safetensors``: tensors ``pooled.<l>``,
# ``final_logits`` and ``labels``, and a JSON header recording the format, key, split, number of
# samples, shapes, feature dtype, a sha256 of each tensor's bytes (``tensor_sha256``) and one over
# them all (``sha256``). safetensors rather than torch.save: loading it parses a JSON header and
# copies bytes, with no unpickler at all (``weights_only=True`` is a restricted unpickler, still a
# pickle parser), and a truncated file fails at open with a precise reason. Its layout (8-byte
# header length, header, then each tensor's raw little-endian bytes at recorded offsets) is also
# what lets a large entry be written row block by row block and memory-mapped tensor by tensor.
#
# Integrity. Always, at every load: the header parses and covers the file exactly (a truncated
# or extended file is refused), the format, key, split, tensor names, shapes, dtypes and sample
# count match, and the labels equal the split's (and their checksum). Entries loaded whole
# (small) also have every tensor's checksum verified: reading them costs as much anyway. For a
# memory-mapped entry, hashing every byte at each load would cost a full read of the file
# (tens of GB for ImageNet) before the first batch, so its checksums are verified once, by reading
# the written file back before it is renamed into place, and again on request
# (``read_entry(..., verify=True)``, ``cached_split(..., verify=True)``, or
# ``python -m jei.features verify <folder or file>...``). Entries are only ever replaced by
# rename, never rewritten in place, so a file a run has mapped does not change under it.

CACHE_FORMAT = "jei-features/3"
STALE_TEMP_AFTER_S = 15 * 60  # a temporary file not written to for this long is an orphan
# (a streamed write touches its file with every batch, so a live one is always recent)

_ST_DTYPES = {
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.float64: ("F64", np.float64),
    torch.int64: ("I64", np.int64),
    torch.int32: ("I32", np.int32),
    torch.uint8: ("U8", np.uint8),
}
_NUMPY_BY_CODE = {code: np_dtype for code, np_dtype in _ST_DTYPES.values()}
_TORCH_BY_CODE = {code: dtype for dtype, (code, _) in _ST_DTYPES.items()}
_CHUNK = 16 << 20  # bytes read at a time when checksumming a file


class CacheEntryError(Exception):
    """A cache entry that cannot be used (damaged, or not the entry for this key and split)."""


class CacheWriteError(Exception):
    """The cache folder could not take an entry (unwritable, full, or the written file failed
    verification). The computation itself went fine."""


def entry_path(cache_dir: Path, key: str, split: str) -> Path:
    return Path(cache_dir) / f"{key}-{split}.safetensors"


def _entry_names(num_exits: int) -> list[str]:
    """Tensor names in file order: int64 labels first, so every float tensor stays aligned."""
    return ["labels", "final_logits", *(f"pooled.{i}" for i in range(num_exits))]


def _entry_tensors(result: CachedSplit) -> dict[str, Tensor]:
    tensors = {f"pooled.{i}": p.contiguous() for i, p in enumerate(result.pooled)}
    tensors["final_logits"] = result.final_logits.contiguous()
    tensors["labels"] = result.labels.contiguous()
    return tensors


def _tensor_sha256(tensor: Tensor) -> str:
    tensor = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256()
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _combined_sha256(digests: Mapping[str, str]) -> str:
    """One checksum over the per-tensor ones (64 hex digits, as the header records it)."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(f"{name}\0{digests[name]}\n".encode())
    return digest.hexdigest()


def _metadata(key: str, split: str, shapes: Mapping[str, list[int]], dtype: torch.dtype, digests: Mapping[str, str]) -> dict[str, str]:
    return {
        "format": CACHE_FORMAT,
        "key": key,
        "split": split,
        "num_samples": str(shapes["labels"][0]),
        "dtype": _dtype_name(dtype),
        "shapes": json.dumps({name: list(shapes[name]) for name in sorted(shapes)}),
        "tensor_sha256": json.dumps({name: digests[name] for name in sorted(digests)}),
        "sha256": _combined_sha256(digests),
    }


def write_entry(path: Path, result: CachedSplit, key: str, split: str) -> None:
    """Store an in-memory ``result`` atomically at ``path`` with its key, split, shapes and checksums."""
    from safetensors.torch import save_file

    tensors = _entry_tensors(result)
    metadata = _metadata(
        key, split, {n: list(t.shape) for n, t in tensors.items()}, result.final_logits.dtype,
        {n: _tensor_sha256(t) for n, t in tensors.items()},
    )

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        _read_header(tmp)  # a short write (full disk) fails here, before the entry is replaced

    atomic_write(path, write)


def _read_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _st_header(specs: Mapping[str, tuple[str, list[int], int, int]], metadata: Mapping[str, str]) -> bytes:
    """A safetensors header (8-byte length + JSON padded with spaces to 8 bytes)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    for name, (code, shape, begin, end) in specs.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class _EntryWriter:
    """Streams a split's features into the safetensors file ``tmp`` while they are computed.

    The split's size is known, and the first batch gives every row's shape and dtype, so the
    layout is fixed then: the header (with placeholder checksums of the final length) is written
    and the file extended to its full size. Each batch's rows of each tensor are one contiguous
    block, written in place (``os.pwrite``: no memory map, so nothing accumulates in the process)
    while a sha256 per tensor is updated; only the current batch is ever held. ``finish`` writes
    the real checksums into the header and verifies them by reading the file back. Filesystem
    failures raise ``CacheWriteError``; a source that gives the wrong rows raises ``ValueError``.
    """

    def __init__(self, tmp: Path, num_samples: int, key: str, split: str) -> None:
        self.tmp, self.num_samples, self.key, self.split = Path(tmp), num_samples, key, split
        self.fd: int | None = None
        self.rows = 0
        self.specs: dict[str, tuple[str, list[int], int, int]] = {}
        self.row_bytes: dict[str, int] = {}
        self.digests: dict[str, Any] = {}
        self.dtype: torch.dtype | None = None
        self.data_start = 0

    def _header(self, digests: Mapping[str, str]) -> bytes:
        shapes = {name: spec[1] for name, spec in self.specs.items()}
        return _st_header(self.specs, _metadata(self.key, self.split, shapes, self.dtype, digests))

    def _open(self, tensors: Mapping[str, Tensor]) -> None:
        self.dtype = tensors["final_logits"].dtype
        offset = 0
        for name, tensor in tensors.items():
            if tensor.dtype not in _ST_DTYPES:
                raise ValueError(f"feature cache: cannot store {name} of dtype {tensor.dtype}")
            row_shape = list(tensor.shape[1:])
            row_bytes = int(np.prod(row_shape, dtype=np.int64)) * tensor.element_size()
            size = row_bytes * self.num_samples
            self.specs[name] = (_ST_DTYPES[tensor.dtype][0], [self.num_samples, *row_shape], offset, offset + size)
            self.row_bytes[name] = row_bytes
            self.digests[name] = hashlib.sha256()
            offset += size
        header = self._header({name: "0" * 64 for name in tensors})
        self.data_start = len(header)
        try:
            self.fd = os.open(self.tmp, os.O_RDWR)
            os.ftruncate(self.fd, self.data_start + offset)
            _pwrite_all(self.fd, header, 0)
        except OSError as err:
            raise CacheWriteError(f"{type(err).__name__}: {err}") from err

    def write(self, pooled: list[Tensor], final: Tensor, labels: Tensor) -> None:
        tensors = dict(zip(_entry_names(len(pooled)), [labels, final, *pooled]))
        if self.fd is None:
            self._open(tensors)
        count = len(labels)
        if self.rows + count > self.num_samples:
            raise ValueError(f"feature cache: the {self.split!r} split gave more than its {self.num_samples} samples")
        for name, tensor in tensors.items():
            code, shape, begin, _ = self.specs[name]
            if _ST_DTYPES.get(tensor.dtype, ("?",))[0] != code or list(tensor.shape) != [count, *shape[1:]]:
                raise ValueError(
                    f"feature cache: batch tensor {name} is {tensor.dtype} {list(tensor.shape)}, "
                    f"the first batch's was {code} {[count, *shape[1:]]}"
                )
            data = tensor.detach().cpu().contiguous().numpy()
            try:
                _pwrite_all(self.fd, data, self.data_start + begin + self.rows * self.row_bytes[name])
            except OSError as err:
                raise CacheWriteError(f"{type(err).__name__}: {err}") from err
            self.digests[name].update(data)
        self.rows += count

    def finish(self) -> None:
        if self.rows != self.num_samples:
            raise ValueError(f"feature cache: the {self.split!r} split gave {self.rows} samples, its size is {self.num_samples}")
        digests = {name: d.hexdigest() for name, d in self.digests.items()}
        header = self._header(digests)
        if len(header) != self.data_start:  # cannot happen: same names, same-length digests
            raise AssertionError("feature cache: the final header changed length")
        try:
            _pwrite_all(self.fd, header, 0)
            os.fsync(self.fd)
        except OSError as err:
            raise CacheWriteError(f"{type(err).__name__}: {err}") from err
        self.close()
        try:  # the checksum, once: what is on disk is what was computed
            problems = verify_file(self.tmp)
        except (OSError, CacheEntryError) as err:
            raise CacheWriteError(f"the written file does not read back ({err})") from err
        if problems:
            raise CacheWriteError(f"the written file does not read back ({'; '.join(problems)})")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class _Layout:
    """Where each tensor of a safetensors file lies: name -> (dtype code, shape, begin, end)."""

    tensors: dict[str, tuple[str, list[int], int, int]]
    metadata: dict[str, str]
    data_start: int
    file_size: int

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def _read_layout(path: Path) -> _Layout:
    """Parse a safetensors header; ``CacheEntryError`` unless it describes the file exactly."""
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CacheEntryError(f"is unreadable ({file_size} bytes: no safetensors header)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(file_size - 8, 100 << 20):
                raise CacheEntryError(f"is unreadable (its header length {length} exceeds the file's {file_size} bytes)")
            header = json.loads(handle.read(length))
    except CacheEntryError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CacheEntryError(f"is unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(header, dict):
        raise CacheEntryError("is unreadable (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, list[int], int, int]] = {}
    try:
        for name, info in header.items():
            begin, end = (int(v) for v in info["data_offsets"])
            tensors[name] = (str(info["dtype"]), [int(v) for v in info["shape"]], begin, end)
    except (KeyError, TypeError, ValueError) as err:
        raise CacheEntryError(f"is unreadable (a malformed tensor record: {err!r})") from err
    data_start = 8 + length
    expected = 0
    for name, (code, shape, begin, end) in sorted(tensors.items(), key=lambda item: item[1][2]):
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(_NUMPY_BY_CODE.get(code, np.uint8)).itemsize
        if code not in _NUMPY_BY_CODE or begin != expected or end - begin != size:
            raise CacheEntryError(f"is unreadable (tensor {name}: {code} {shape} at bytes {begin}-{end} is not a valid record)")
        expected = end
    if data_start + expected != file_size:
        raise CacheEntryError(
            f"is unreadable (truncated or extended: {file_size} bytes, its header records {data_start + expected})"
        )
    return _Layout(tensors, metadata, data_start, file_size)


def _region_sha256(path: Path, begin: int, end: int) -> str:
    """sha256 of the bytes ``[begin, end)`` of ``path``, read in chunks (bounded memory)."""
    digest = hashlib.sha256()
    buffer = bytearray(min(_CHUNK, max(end - begin, 1)))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(begin)
        left = end - begin
        while left > 0:
            read = handle.readinto(view[: min(left, len(buffer))])
            if not read:
                raise CacheEntryError(f"is unreadable (ends {left} bytes early)")
            digest.update(view[:read])
            left -= read
    return digest.hexdigest()


def _recorded_digests(metadata: Mapping[str, str]) -> dict[str, str]:
    try:
        digests = json.loads(metadata.get("tensor_sha256", ""))
    except ValueError as err:
        raise CacheEntryError("has no readable 'tensor_sha256' record") from err
    if not isinstance(digests, dict) or metadata.get("sha256") != _combined_sha256(digests):
        raise CacheEntryError("fails its checksum (its per-tensor checksums do not match 'sha256')")
    return digests


def verify_file(path: str | Path) -> list[str]:
    """Check a cache entry on its own (no key or split to compare with): its layout, header and
    every tensor's checksum, reading the file once in chunks. Returns the problems found;
    ``CacheEntryError`` if it is not an entry at all."""
    path = Path(path)
    layout = _read_layout(path)
    if layout.metadata.get("format") != CACHE_FORMAT:
        raise CacheEntryError(f"is not a {CACHE_FORMAT} entry (format {layout.metadata.get('format')!r})")
    digests = _recorded_digests(layout.metadata)
    if set(digests) != set(layout.tensors):
        return [f"records checksums of {sorted(digests)}, holds {sorted(layout.tensors)}"]
    problems = []
    for name, (_, _, begin, end) in sorted(layout.tensors.items()):
        if _region_sha256(path, layout.data_start + begin, layout.data_start + end) != digests[name]:
            problems.append(f"{name} fails its checksum")
    return problems


def _map_tensor(path: Path, layout: _Layout, name: str) -> Tensor:
    code, shape, begin, _ = layout.tensors[name]
    array = np.memmap(path, dtype=_NUMPY_BY_CODE[code], mode="r", offset=layout.data_start + begin, shape=tuple(shape))
    with warnings.catch_warnings():  # read-only on purpose: the entry must not change
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _read_tensor(path: Path, layout: _Layout, name: str) -> Tensor:
    """A tensor of the entry, read into memory (one copy, no intermediate buffer)."""
    code, shape, begin, end = layout.tensors[name]
    array = np.empty(shape, dtype=_NUMPY_BY_CODE[code])
    view = memoryview(array).cast("B") if array.size else memoryview(bytearray())
    with open(path, "rb", buffering=0) as handle:
        handle.seek(layout.data_start + begin)
        done = 0
        while done < end - begin:
            read = handle.readinto(view[done:])
            if not read:
                raise CacheEntryError(f"is unreadable ({name} ends early)")
            done += read
    return torch.from_numpy(array)


def read_entry(
    path: Path,
    key: str,
    split: str,
    labels: Tensor,
    num_exits: int,
    *,
    in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES,
    verify: bool | None = None,
) -> CachedSplit:
    """Load and verify the entry at ``path``; ``CacheEntryError`` says what is wrong with it.

    An entry of at most ``in_memory_max_bytes`` is loaded whole (a ``CachedSplit``), a larger one
    memory-mapped (a ``MappedSplit``). ``verify``: check every tensor's checksum (None: only when
    loading whole, where it costs no extra read; see the note above on integrity).
    """
    from safetensors import safe_open

    path = Path(path)
    layout = _read_layout(path)
    try:  # the library's own validation of the header, too ("numpy": maps nothing into torch)
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
    except Exception as err:  # any unreadable entry is recomputed
        raise CacheEntryError(f"is unreadable ({type(err).__name__}: {err})") from err
    if metadata.get("format") != CACHE_FORMAT:
        raise CacheEntryError(f"is not a {CACHE_FORMAT} entry (format {metadata.get('format')!r})")
    if metadata.get("split") != split:
        raise CacheEntryError(f"holds the {metadata.get('split')!r} split, not {split!r}")
    if metadata.get("key") != key:
        raise CacheEntryError(f"was computed for other inputs or weights (key {metadata.get('key')!r}, expected {key!r})")
    expected = set(_entry_names(num_exits))
    if names != expected or set(layout.tensors) != expected:
        raise CacheEntryError(f"holds tensors {sorted(names)}, expected {sorted(expected)}")
    try:
        shapes = json.loads(metadata.get("shapes", ""))
    except ValueError as err:
        raise CacheEntryError("has no readable 'shapes' record") from err
    actual = {name: list(spec[1]) for name, spec in sorted(layout.tensors.items())}
    if shapes != actual:
        raise CacheEntryError(f"holds shapes {actual}, its header records {shapes}")
    stored = metadata.get("dtype")
    codes = {name: layout.tensors[name][0] for name in expected - {"labels"}}
    if stored not in FEATURE_DTYPES or set(codes.values()) != {_ST_DTYPES[FEATURE_DTYPES[stored]][0]}:
        raise CacheEntryError(f"holds features of dtypes {sorted(set(codes.values()))}, its header records {stored!r}")
    n = len(labels)
    wrong = [name for name, shape in actual.items() if not shape or shape[0] != n]
    if wrong or metadata.get("num_samples") != str(n):
        raise CacheEntryError(f"has {metadata.get('num_samples')} samples ({', '.join(wrong) or 'header'}), the split has {n}")
    digests = _recorded_digests(metadata)
    if set(digests) != expected:
        raise CacheEntryError(f"records checksums of {sorted(digests)}, expected {sorted(expected)}")

    whole = layout.data_bytes <= in_memory_max_bytes
    if verify is None:
        verify = whole
    if whole:
        tensors = {name: _read_tensor(path, layout, name) for name in expected}
        bad = [name for name in sorted(tensors) if verify and _tensor_sha256(tensors[name]) != digests[name]]
    else:
        tensors = {name: _map_tensor(path, layout, name) for name in expected - {"labels"}}
        tensors["labels"] = _read_tensor(path, layout, "labels")
        check = sorted(expected) if verify else ["labels"]  # the labels are read anyway: always checked
        bad = []
        for name in check:
            _, _, begin, end = layout.tensors[name]
            if _region_sha256(path, layout.data_start + begin, layout.data_start + end) != digests[name]:
                bad.append(name)
    if bad:
        raise CacheEntryError(f"fails its checksum ({', '.join(bad)}: the file was changed after writing)")
    if not torch.equal(tensors["labels"], labels.cpu()):
        raise CacheEntryError("holds labels that differ from the split's")
    pooled = [tensors[f"pooled.{i}"] for i in range(num_exits)]
    if whole:
        return CachedSplit(pooled, tensors["final_logits"], tensors["labels"])
    return MappedSplit(pooled, tensors["final_logits"], tensors["labels"], path=path)


def _entry_bytes(first: tuple[list[Tensor], Tensor, Tensor], num_samples: int) -> int:
    """The size an entry of ``num_samples`` rows like the batch ``first`` will have."""
    pooled, final, labels = first
    row = sum(t[0].numel() * t.element_size() for t in [*pooled, final, labels] if len(t))
    return row * num_samples


def _stream_entry(path: Path, batches: Iterable[tuple[list[Tensor], Tensor, Tensor]], num_samples: int, key: str, split: str) -> None:
    """Write the entry at ``path`` while ``batches`` are computed; atomic (a temporary file
    renamed when complete). ``CacheWriteError`` for the filesystem's failures; an error of the
    backbone or data propagates as it is. Either way no entry and no temporary file remain."""
    started = done = False
    try:
        with atomic_path(path) as tmp:
            started = True
            writer = _EntryWriter(tmp, num_samples, key, split)
            try:
                for pooled, final, labels in batches:
                    writer.write(pooled, final, labels)
                writer.finish()
            finally:
                writer.close()
            done = True
    except OSError as err:
        if started and not done:
            raise  # from computing the features, not from the cache
        raise CacheWriteError(f"{type(err).__name__}: {err}") from err


def _warn_unwritable(path: Path, cache_dir: Path, split: str, reason: str) -> None:
    log.warning(
        "feature cache: cannot write %s (%s); this run goes on without caching the %r features. "
        "Free space in or allow writing to %s, or set paths.cache_dir=<a writable folder> or "
        "trainer.feature_cache=false",
        path, reason, split, cache_dir,
    )


def cached_split(
    network: EarlyExitNetwork,
    data: DataSplits,
    split: str,
    batch_size: int,
    device: torch.device,
    cache_dir: Path | None,
    fingerprint: str = "",
    *,
    dtype: str | torch.dtype = "float32",
    in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES,
    verify: bool | None = None,
    precision: str = "fp32",
) -> CachedSplit:
    """Load the split's features from ``cache_dir`` if present, else compute (and store) them.

    Features are stored and served in ``dtype`` (float32 or float16; ``batch`` widens to
    float32), with or without a cache, so the cache never changes a result. A split whose entry
    exceeds ``in_memory_max_bytes`` is streamed to the cache while computed and served
    memory-mapped (``MappedSplit``); a smaller one is computed, stored and served in memory.
    ``verify=True`` checks every checksum of a memory-mapped entry on load (see ``read_entry``).

    The cache is optional and can never change a result: an entry that is damaged or does not
    match (key, split, shapes, checksum, labels) is reported by path, recomputed and replaced;
    a cache folder that cannot be read or written gives a warning and the run goes on without
    it (in memory). Temporary files orphaned by killed writers are removed after
    ``STALE_TEMP_AFTER_S``.
    """
    dtype = feature_dtype(dtype)
    if cache_dir is None:
        return compute_split(network, data, split, batch_size, device, dtype=dtype, precision=precision)
    cache_dir = Path(cache_dir).expanduser()
    world = distributed.current()
    if world.main:
        remove_stale_temp_files(cache_dir, STALE_TEMP_AFTER_S)
    try:
        key = cache_key(network, data, split, fingerprint, dtype, precision)
    except TypeError as err:
        log.warning("feature cache: not used for the %r split: %s", split, err)
        return compute_split(network, data, split, batch_size, device, dtype=dtype, precision=precision)
    path = entry_path(cache_dir, key, split)
    if world.distributed:
        return _shared_split(network, data, split, batch_size, device, path, key, dtype, precision, in_memory_max_bytes, verify)
    try:
        present = path.exists()
    except OSError as err:
        log.warning("feature cache: cannot look up %s (%s); computing the %r features", path, err, split)
        present = False
    labels = data.labels(split)
    if present:
        try:
            result = read_entry(
                path, key, split, labels, network.num_gates, in_memory_max_bytes=in_memory_max_bytes, verify=verify
            )
        except CacheEntryError as err:
            log.warning("feature cache: entry %s %s; recomputing it and replacing the entry", path, err)
        else:
            log.info("feature cache hit: %s", path)
            return result

    num_samples = data.size(split)
    batches = _feature_batches(network, data, split, batch_size, device, dtype, precision=precision)
    first = next(batches, None)
    if first is None or _entry_bytes(first, num_samples) <= in_memory_max_bytes:
        result = _collect([first, *batches] if first is not None else [], network.num_gates)
        try:
            write_entry(path, result, key, split)
        except Exception as err:  # noqa: BLE001 (OSError, SafetensorError: the cache is optional)
            _warn_unwritable(path, cache_dir, split, f"{type(err).__name__}: {err}")
        else:
            log.info("feature cache written: %s", path)
        return result

    head = [first]  # handed over, not kept: the stream holds one batch at a time
    del first

    def rest() -> Iterator[tuple[list[Tensor], Tensor, Tensor]]:
        yield head.pop()
        yield from batches

    try:
        _stream_entry(path, rest(), num_samples, key, split)
    except CacheWriteError as err:
        _warn_unwritable(path, cache_dir, split, str(err))
        batches.close()
        return compute_split(network, data, split, batch_size, device, dtype=dtype, precision=precision)
    log.info("feature cache written (streamed): %s", path)
    try:
        return read_entry(path, key, split, labels, network.num_gates, in_memory_max_bytes=in_memory_max_bytes, verify=False)
    except CacheEntryError as err:  # replaced meanwhile by something else: compute in memory
        log.warning("feature cache: entry %s %s just after writing it; computing the %r features in memory", path, err, split)
        return compute_split(network, data, split, batch_size, device, dtype=dtype, precision=precision)


def _shared_split(
    network: EarlyExitNetwork,
    data: DataSplits,
    split: str,
    batch_size: int,
    device: torch.device,
    path: Path,
    key: str,
    dtype: torch.dtype,
    precision: str,
    in_memory_max_bytes: int,
    verify: bool | None,
) -> CachedSplit:
    """``cached_split`` under torchrun. Rank 0 decides whether the entry is usable; if not, each
    rank streams its range of batches to ``<entry>.shard<r>of<W>`` (memory O(batch)), rank 0
    joins the shards into the entry (streamed again) and removes them, and every rank reads
    the entry. A cache that cannot be written on any rank falls back to exchanging the
    features in memory (``compute_split``). Every rank takes the same branches."""
    world = distributed.current()
    labels = data.labels(split)

    def read() -> CachedSplit:
        return read_entry(path, key, split, labels, network.num_gates, in_memory_max_bytes=in_memory_max_bytes, verify=verify)

    usable = False
    if world.main and path.exists():
        try:
            read()
            usable = True
        except CacheEntryError as err:
            log.warning("feature cache: entry %s %s; recomputing it and replacing the entry", path, err)
    if distributed.gather_objects(usable)[0]:
        log.info("feature cache hit: %s", path)
        return read()

    mine = distributed.shard_range(_batch_count(data, split, batch_size), world)
    rows = range(min(mine.start * batch_size, len(labels)), min(mine.stop * batch_size, len(labels)))
    shard = path.with_name(f"{path.name}.shard{world.rank}of{world.size}")
    failure = ""
    if len(rows):
        try:
            _stream_entry(shard, _feature_batches(network, data, split, batch_size, device, dtype, precision=precision,
                                                  only=mine), len(rows), key, f"{split}[{rows.start}:{rows.stop}]")
        except CacheWriteError as err:
            failure = str(err)
    failures = [f for f in distributed.gather_objects(failure) if f]
    ranges = distributed.gather_objects((rows.start, rows.stop))
    shards = [path.with_name(f"{path.name}.shard{r}of{world.size}") for r in range(world.size)]
    if not failures and world.main:
        try:
            _stream_entry(path, _shard_rows(shards, ranges, key, split, labels, network.num_gates, batch_size),
                          len(labels), key, split)
        except CacheWriteError as err:
            failure = str(err)
        for file in shards:
            file.unlink(missing_ok=True)
    failures += [f for f in distributed.gather_objects(failure) if f]
    if failures:
        shard.unlink(missing_ok=True)
        _warn_unwritable(path, path.parent, split, failures[0])
        return compute_split(network, data, split, batch_size, device, dtype=dtype, precision=precision)
    log.info("feature cache written (from %d processes): %s", world.size, path)
    return read()


def _shard_rows(
    shards: list[Path], ranges: list[tuple[int, int]], key: str, split: str, labels: Tensor, num_exits: int, batch_size: int
) -> Iterator[tuple[list[Tensor], Tensor, Tensor]]:
    """The rows of the shard files, in order, ``batch_size`` at a time (each shard memory-mapped)."""
    for shard, (start, stop) in zip(shards, ranges):
        if start == stop:
            continue
        part = read_entry(shard, key, f"{split}[{start}:{stop}]", labels[start:stop], num_exits, in_memory_max_bytes=0)
        for begin in range(0, stop - start, batch_size):
            end = min(begin + batch_size, stop - start)
            yield [p[begin:end] for p in part.pooled], part.final_logits[begin:end], part.labels[begin:end]
        del part


def _verify_main(argv: list[str]) -> int:
    """``python -m jei.features verify PATH...``: check entries (files, or folders of them)."""
    if len(argv) < 2 or argv[0] != "verify":
        print("usage: python -m jei.features verify <entry file or cache folder>...", file=sys.stderr)
        return 2
    files: list[Path] = []
    for item in map(Path, argv[1:]):
        files += sorted(item.glob("*.safetensors")) if item.is_dir() else [item]
    bad = 0
    for file in files:
        try:
            problems = verify_file(file)
        except (OSError, CacheEntryError) as err:
            problems = [str(err)]
        bad += bool(problems)
        print(f"{'ok ' if not problems else 'BAD'} {file}" + (f": {'; '.join(problems)}" if problems else ""))
    print(f"{len(files) - bad} of {len(files)} entries ok")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(_verify_main(sys.argv[1:]))
