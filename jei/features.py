"""Feature cache: the frozen backbone's pooled exit representations, computed once per split.

The backbone is frozen and (without augmentation) deterministic, so each exit's pooled
representation is a fixed function of the input; IMs and gates then train from the cache at a
fraction of the cost of re-running the backbone (METHOD §5). The cache key hashes the backbone's
weights, the IMs' pooling, the split's inputs and labels and the data settings, so a stale cache
is never reused; each entry records its key, split, shapes and checksum and is verified on load,
and a bad entry is recomputed (``cached_split``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from jei.data.base import DataSplits, TensorDataSplits, pick_split
from jei.io import atomic_write, remove_stale_temp_files
from jei.model import EarlyExitNetwork

log = logging.getLogger(__name__)


@dataclass
class CachedSplit:
    """Pooled features per exit (``[N, D_l]`` each), backbone logits ``[N, K]``, labels ``[N]``."""

    pooled: list[Tensor]
    final_logits: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def for_epoch(self, epoch: int) -> CachedSplit:
        """The same features every epoch (see ``AugmentedFeatures`` for the other case)."""
        return self

    def batch(self, index: Tensor, device: torch.device) -> tuple[list[Tensor], Tensor, Tensor]:
        return (
            [p[index].to(device) for p in self.pooled],
            self.final_logits[index].to(device),
            self.labels[index].to(device),
        )


def to_device(inputs: object, device: torch.device) -> object:
    """Move a tensor or anything with ``.to`` (e.g. a PyG batch) to ``device``."""
    return inputs.to(device) if hasattr(inputs, "to") else inputs


@torch.no_grad()
def compute_split(
    network: EarlyExitNetwork,
    data: DataSplits,
    split: str,
    batch_size: int,
    device: torch.device,
    augment: bool = False,
    seed: int = 0,
) -> CachedSplit:
    """Pooled features of a whole split; with ``augment``, of one augmented pass over it."""
    pooled: list[list[Tensor]] = [[] for _ in range(network.num_gates)]
    logits, labels = [], []
    total = (data.size(split) + batch_size - 1) // batch_size
    if augment:
        torch.manual_seed(seed)  # augmentations draw from the global generator
    batches = data.batches(split, batch_size, augment=augment)
    for inputs, y in tqdm(batches, total=total, desc=f"features[{split}]", leave=False):
        features, final = network.pooled_features(to_device(inputs, device))
        for store, feature in zip(pooled, features):
            store.append(feature.float().cpu())
        logits.append(final.float().cpu())
        labels.append(y.cpu())
    return CachedSplit([torch.cat(p) for p in pooled], torch.cat(logits), torch.cat(labels))


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
        self, network: EarlyExitNetwork, data: DataSplits, batch_size: int, device: torch.device, seed: int
    ) -> None:
        self.network, self.data, self.batch_size, self.device, self.seed = network, data, batch_size, device, seed
        self.threads = torch.get_num_threads()  # the backbone pass gets all of them back

    def __len__(self) -> int:
        return self.data.size("train")

    def for_epoch(self, epoch: int) -> CachedSplit:
        with cpu_threads(self.device, self.threads):
            return compute_split(
                self.network, self.data, "train", self.batch_size, self.device, augment=True, seed=self.seed + epoch
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


def cache_key(network: EarlyExitNetwork, data: DataSplits, split: str, fingerprint: str) -> str:
    """Hash of what the features depend on: the backbone's weights, the IMs' pooling, the
    split's inputs (``input_digest``), labels and size, and ``fingerprint`` (the data settings)."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{fingerprint}".encode())
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
# ``final_logits`` and ``labels``, and a JSON header recording the format, key, split, shapes and
# a sha256 of the tensors. safetensors rather than torch.save: loading it parses a JSON header
# and copies bytes, with no unpickler at all (``weights_only=True`` is a restricted unpickler,
# still a pickle parser), and a truncated file fails at open with a precise reason.

CACHE_FORMAT = "jei-features/2"
STALE_TEMP_AFTER_S = 15 * 60  # a write takes seconds; older temporary files are orphans


class CacheEntryError(Exception):
    """A cache entry that cannot be used (damaged, or not the entry for this key and split)."""


def entry_path(cache_dir: Path, key: str, split: str) -> Path:
    return Path(cache_dir) / f"{key}-{split}.safetensors"


def _entry_tensors(result: CachedSplit) -> dict[str, Tensor]:
    tensors = {f"pooled.{i}": p.contiguous() for i, p in enumerate(result.pooled)}
    tensors["final_logits"] = result.final_logits.contiguous()
    tensors["labels"] = result.labels.contiguous()
    return tensors


def _checksum(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        _hash_value(digest, tensors[name])
    return digest.hexdigest()


def write_entry(path: Path, result: CachedSplit, key: str, split: str) -> None:
    """Store ``result`` atomically at ``path`` with its key, split, shapes and checksum."""
    from safetensors.torch import save_file

    tensors = _entry_tensors(result)
    metadata = {
        "format": CACHE_FORMAT,
        "key": key,
        "split": split,
        "num_samples": str(len(result.labels)),
        "shapes": json.dumps({name: list(t.shape) for name, t in sorted(tensors.items())}),
        "sha256": _checksum(tensors),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        _read_header(tmp)  # a short write (full disk) fails here, before the entry is replaced

    atomic_write(path, write)


def _read_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def read_entry(path: Path, key: str, split: str, labels: Tensor, num_exits: int) -> CachedSplit:
    """Load and verify the entry at ``path``; ``CacheEntryError`` says what is wrong with it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # noqa: BLE001 (any unreadable entry is recomputed)
        raise CacheEntryError(f"is unreadable ({type(err).__name__}: {err})") from err
    if metadata.get("format") != CACHE_FORMAT:
        raise CacheEntryError(f"is not a {CACHE_FORMAT} entry (format {metadata.get('format')!r})")
    if metadata.get("split") != split:
        raise CacheEntryError(f"holds the {metadata.get('split')!r} split, not {split!r}")
    if metadata.get("key") != key:
        raise CacheEntryError(f"was computed for other inputs or weights (key {metadata.get('key')!r}, expected {key!r})")
    expected = {f"pooled.{i}" for i in range(num_exits)} | {"final_logits", "labels"}
    if set(tensors) != expected:
        raise CacheEntryError(f"holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    try:
        shapes = json.loads(metadata.get("shapes", ""))
    except ValueError as err:
        raise CacheEntryError("has no readable 'shapes' record") from err
    actual = {name: list(t.shape) for name, t in sorted(tensors.items())}
    if shapes != actual:
        raise CacheEntryError(f"holds shapes {actual}, its header records {shapes}")
    if metadata.get("sha256") != _checksum(tensors):
        raise CacheEntryError("fails its checksum (the tensors were changed after writing)")
    n = len(labels)
    wrong = [name for name, t in sorted(tensors.items()) if t.dim() < 1 or len(t) != n]
    if wrong or metadata.get("num_samples") != str(n):
        raise CacheEntryError(f"has {metadata.get('num_samples')} samples ({', '.join(wrong) or 'header'}), the split has {n}")
    if not torch.equal(tensors["labels"], labels.cpu()):
        raise CacheEntryError("holds labels that differ from the split's")
    return CachedSplit([tensors[f"pooled.{i}"] for i in range(num_exits)], tensors["final_logits"], tensors["labels"])


def cached_split(
    network: EarlyExitNetwork,
    data: DataSplits,
    split: str,
    batch_size: int,
    device: torch.device,
    cache_dir: Path | None,
    fingerprint: str = "",
) -> CachedSplit:
    """Load the split's features from ``cache_dir`` if present, else compute (and store) them.

    The cache is optional and can never change a result: an entry that is damaged or does not
    match (key, split, shapes, checksum, labels) is reported by path, recomputed and replaced;
    a cache folder that cannot be read or written gives a warning and the run goes on without
    it. Temporary files orphaned by killed writers are removed after ``STALE_TEMP_AFTER_S``.
    """
    if cache_dir is None:
        return compute_split(network, data, split, batch_size, device)
    cache_dir = Path(cache_dir).expanduser()
    remove_stale_temp_files(cache_dir, STALE_TEMP_AFTER_S)
    try:
        key = cache_key(network, data, split, fingerprint)
    except TypeError as err:
        log.warning("feature cache: not used for the %r split: %s", split, err)
        return compute_split(network, data, split, batch_size, device)
    path = entry_path(cache_dir, key, split)
    try:
        present = path.exists()
    except OSError as err:
        log.warning("feature cache: cannot look up %s (%s); computing the %r features", path, err, split)
        present = False
    if present:
        try:
            result = read_entry(path, key, split, data.labels(split), network.num_gates)
        except CacheEntryError as err:
            log.warning("feature cache: entry %s %s; recomputing it and replacing the entry", path, err)
        else:
            log.info("feature cache hit: %s", path)
            return result
    result = compute_split(network, data, split, batch_size, device)
    try:
        write_entry(path, result, key, split)
    except Exception as err:  # noqa: BLE001 (OSError, SafetensorError: the cache is optional)
        log.warning(
            "feature cache: cannot write %s (%s: %s); this run goes on without caching the %r features. "
            "Free space in or allow writing to %s, or set paths.cache_dir=<a writable folder> or "
            "trainer.feature_cache=false",
            path, type(err).__name__, err, split, cache_dir,
        )
    else:
        log.info("feature cache written: %s", path)
    return result
