"""scikit-learn's 8x8 handwritten digits: the embedded default, no download needed."""

from __future__ import annotations

import torch

from .base import SPLITS, TensorDataSplits, TensorSplit, split_indices


def load_digits(
    fractions: tuple[float, float, float, float] = (0.5, 0.15, 0.15, 0.2),
    seed: int = 0,
    max_per_split: int | None = None,
) -> TensorDataSplits:
    """1,797 grey 8x8 digit images, 10 classes, split train/val/cal/test by ``fractions``."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    parts = split_indices(len(labels), fractions, seed, max_per_split)
    mean, std = images[parts[0]].mean(), images[parts[0]].std()  # statistics of train only
    images = (images - mean) / std
    splits = {name: TensorSplit(images[idx], labels[idx]) for name, idx in zip(SPLITS, parts)}
    return TensorDataSplits(splits, num_classes=10)
