"""Split containers and the seeded split rule shared by every dataset."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

SPLITS = ("train", "val", "cal", "test")

T = TypeVar("T")


class DataSplits(ABC):
    """Four disjoint splits of one dataset: train (fit), val (model selection), cal
    (conformal calibration, never trained on or augmented) and test.

    ``batches`` yields ``(inputs, labels)`` where ``inputs`` is what the backbone's ``begin``
    accepts (a tensor for images, a PyG ``Batch`` for graphs).
    """

    num_classes: int

    @abstractmethod
    def size(self, split: str) -> int: ...

    @abstractmethod
    def labels(self, split: str) -> Tensor: ...

    @abstractmethod
    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, augment: bool = False
    ) -> Iterator[tuple[Any, Tensor]]: ...

    def check(self) -> None:
        for split in SPLITS:
            if self.size(split) == 0:
                raise ValueError(
                    f"data: the {split!r} split is empty; increase the dataset size, the split "
                    f"fractions or data.max_per_split"
                )


@dataclass
class TensorSplit:
    inputs: Tensor
    labels: Tensor


class TensorDataSplits(DataSplits):
    """Splits held in memory as tensors (images already normalised)."""

    def __init__(self, splits: dict[str, TensorSplit], num_classes: int, augment_fn: Any = None) -> None:
        self.splits = splits
        self.num_classes = num_classes
        self.augment_fn = augment_fn
        self.check()
        # Channels of an image (axis 1), so backbones can be sized from the data.
        self.in_channels = int(splits["train"].inputs.shape[1]) if splits["train"].inputs.dim() > 1 else None

    def size(self, split: str) -> int:
        return len(pick_split(self.splits, split).labels)

    def labels(self, split: str) -> Tensor:
        return pick_split(self.splits, split).labels

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, augment: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        data = pick_split(self.splits, split)
        n = len(data.labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            inputs = data.inputs[index]
            if augment and self.augment_fn is not None:
                inputs = self.augment_fn(inputs)
            yield inputs, data.labels[index]


def pick_split(per_split: Mapping[str, T], split: str) -> T:
    """``per_split[split]``, or an error naming the splits when ``split`` is not one of them."""
    if split not in per_split:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return per_split[split]


def split_indices(
    n: int, fractions: Sequence[float], seed: int, max_per_split: int | None = None
) -> list[Tensor]:
    """Seeded random disjoint index sets with the given fractions (which must sum to <= 1).

    ``max_per_split`` caps each split for quick runs.
    """
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"data.fractions must be non-negative and sum to at most 1, got {list(fractions)}")
    if max_per_split is not None and max_per_split < 1:
        raise ValueError(f"data.max_per_split must be >= 1 or null, got {max_per_split}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for fraction in fractions:
        count = int(round(fraction * n))
        part = order[start : start + count]
        start += count
        out.append(part[:max_per_split] if max_per_split is not None else part)
    return out
