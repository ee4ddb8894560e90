"""Feature cache: the frozen backbone's pooled exit representations, computed once per split.

The backbone is frozen and (without augmentation) deterministic, so each exit's pooled
representation is a fixed function of the input; IMs and gates then train from the cache at a
fraction of the cost of re-running the backbone (METHOD §5). The cache key hashes the backbone's
weights, the IMs' pooling and the split's labels, so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from jei.data.base import DataSplits
from jei.io import atomic_write
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


def cache_key(network: EarlyExitNetwork, data: DataSplits, split: str, fingerprint: str) -> str:
    """Hash of what the features depend on; ``fingerprint`` identifies the data settings."""
    digest = hashlib.sha256(fingerprint.encode())
    for name, tensor in sorted(network.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for im in network.ims:  # an IM without a pool_signature is keyed by its class
        signature = im.pool_signature() if hasattr(im, "pool_signature") else type(im).__qualname__
        digest.update(signature.encode())
    digest.update(split.encode())
    digest.update(data.labels(split).numpy().tobytes())
    digest.update(str(data.size(split)).encode())
    return digest.hexdigest()[:20]


def cached_split(
    network: EarlyExitNetwork,
    data: DataSplits,
    split: str,
    batch_size: int,
    device: torch.device,
    cache_dir: Path | None,
    fingerprint: str = "",
) -> CachedSplit:
    """Load the split's features from ``cache_dir`` if present, else compute (and store) them."""
    if cache_dir is None:
        return compute_split(network, data, split, batch_size, device)
    path = Path(cache_dir) / f"{cache_key(network, data, split, fingerprint)}-{split}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        log.info("feature cache hit: %s", path)
        return CachedSplit(stored["pooled"], stored["final_logits"], stored["labels"])
    result = compute_split(network, data, split, batch_size, device)
    atomic_write(path, lambda tmp: torch.save(
        {"pooled": result.pooled, "final_logits": result.final_logits, "labels": result.labels}, tmp
    ))
    log.info("feature cache written: %s", path)
    return result
