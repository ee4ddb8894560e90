"""scikit-learn's 8x8 handwritten digits: the embedded default, no download needed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import SPLITS, ImagePreprocessing, TensorDataSplits, TensorSplit, split_indices

MAX_VALUE = 16  # each pixel counts the set pixels of a 4x4 block of a 32x32 bitmap: 0..16
CLASS_NAMES = tuple(str(digit) for digit in range(10))


def raw_digits(
    fractions: Sequence[float] = (0.5, 0.15, 0.15, 0.2),
    seed: int = 0,
    max_per_split: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each split's raw images (float32 [N, 1, 8, 8], the integers 0..16) and labels, before
    normalisation: the images ``load_digits`` splits, in the same order."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    parts = split_indices(len(labels), fractions, seed, max_per_split)
    return {name: (images[index], labels[index]) for name, index in zip(SPLITS, parts)}


def load_digits(
    fractions: tuple[float, float, float, float] = (0.5, 0.15, 0.15, 0.2),
    seed: int = 0,
    max_per_split: int | None = None,
) -> TensorDataSplits:
    """1,797 grey 8x8 digit images, 10 classes, split train/val/cal/test by ``fractions``.

    Pixels are scikit-learn's integer counts 0..16, scaled to [0, 1] (divided by 16) and
    standardised by the mean and standard deviation of the training split's pixels (one value
    for all pixels). ``preprocessing`` records that (``max_value`` 16, 17 integer levels): an
    8-bit PNG pixel p stands for round(p * 16 / 255), so a digits image written as
    round(v * 255 / 16) (``ImagePreprocessing.to_8bit``) reads back exactly.
    """
    raw = raw_digits(fractions, seed, max_per_split)
    train = raw["train"][0] / MAX_VALUE
    mean, std = train.mean(), train.std()  # statistics of train only
    preprocessing = ImagePreprocessing(
        channels=1, height=8, width=8, mean=(mean.item(),), std=(std.item(),), max_value=float(MAX_VALUE),
        integer_levels=True, class_names=CLASS_NAMES, name="digits",
    )
    splits = {name: TensorSplit(preprocessing.normalize(images), labels) for name, (images, labels) in raw.items()}
    return TensorDataSplits(splits, num_classes=10, preprocessing=preprocessing)
