"""CIFAR-100, CIFAR-100-LT, SVHN and ImageNet from local files in their usual on-disk layouts.

Nothing is ever downloaded: a missing file is a ``FileNotFoundError`` that says which path is
expected. CIFAR-100(-LT) and SVHN are small enough to hold in memory as tensors; ImageNet is
read lazily, batch by batch, from its ImageFolder tree.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import SPLITS, DataSplits, TensorDataSplits, pick_split, split_indices
from .cifar import Arrays, BatchUnpickler, check_fractions, image_preprocessing, in_memory_splits, normalization

CIFAR100_FOLDER = "cifar-100-python"
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def load_cifar100(
    root: str,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_per_split: int | None = None,
    normalize: str = "imagenet",
) -> TensorDataSplits:
    """CIFAR-100 (fine labels, 100 classes) as train / val / cal / test tensors [N, 3, 32, 32].

    Args:
        root: the ``cifar-100-python`` folder (with ``train`` and ``test``) or its parent.
        fractions: train, val and cal fractions of the 50,000 training images (seeded split);
            the official 10,000 test images are the test split.
        seed: seed of the splits (and of the test subset when capped).
        max_per_split: caps every split, test included, for quick runs.
        normalize: ``"imagenet"``, ``"cifar10"`` (per-channel mean/std) or ``"none"`` ([0, 1]).
    """
    train, test = _read_cifar100(Path(root).expanduser())
    test_index = _test_subset(len(test[1]), seed, max_per_split)
    return in_memory_splits(
        train, test, test_index, fractions, seed, max_per_split, normalize, 100, augment=True,
        class_names=cifar100_class_names(Path(root).expanduser()), name="cifar100",
    )


def load_cifar100_lt(
    root: str,
    imbalance_factor: float = 100.0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_per_split: int | None = None,
    normalize: str = "imagenet",
) -> TensorDataSplits:
    """CIFAR-100-LT: a long-tailed subset of the CIFAR-100 training images; balanced test set.

    Class c keeps ``long_tail_counts`` images (n_max * (1/imbalance_factor)^(c/(C-1)), the
    profile of Cao et al. 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
    Loss"; 10,847 images for a factor of 100), chosen with ``seed``. That long-tailed pool is then
    split into train / val / cal by ``fractions``, so all three follow the training
    distribution; the official balanced test set is the test split. Other arguments as in
    ``load_cifar100``.
    """
    if imbalance_factor < 1:
        raise ValueError(f"data.imbalance_factor must be >= 1 (1 keeps CIFAR-100 balanced), got {imbalance_factor}")
    (pixels, labels), test = _read_cifar100(Path(root).expanduser())
    keep = long_tail_indices(labels, 100, imbalance_factor, seed)
    train = (pixels[keep], labels[keep])
    test_index = _test_subset(len(test[1]), seed, max_per_split)
    return in_memory_splits(
        train, test, test_index, fractions, seed, max_per_split, normalize, 100, augment=True,
        class_names=cifar100_class_names(Path(root).expanduser()), name="cifar100_lt",
    )


def load_svhn(
    root: str,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_per_split: int | None = None,
    normalize: str = "imagenet",
) -> TensorDataSplits:
    """SVHN cropped digits (``train_32x32.mat``, ``test_32x32.mat`` in ``root``), labels 0..9.

    The files store digit 0 as label 10; it becomes 0. The 73,257 training images are split
    train / val / cal by ``fractions``; the 26,032 test images are the test split. No
    augmentation (a horizontal flip changes some digits). Other arguments as in ``load_cifar100``.
    """
    folder = Path(root).expanduser()
    train, test = _read_svhn(folder, "train"), _read_svhn(folder, "test")
    test_index = _test_subset(len(test[1]), seed, max_per_split)
    return in_memory_splits(
        train, test, test_index, fractions, seed, max_per_split, normalize, 10, augment=False,
        class_names=tuple(str(digit) for digit in range(10)), name="svhn",
    )


def load_imagenet(
    root: str,
    img_size: int = 224,
    crop_pct: float = 0.875,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_per_split: int | None = None,
    normalize: str = "imagenet",
    num_workers: int = 4,
) -> ImageFolderSplits:
    """ImageNet (ILSVRC-2012) in ImageFolder layout, read lazily.

    Expects ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (the validation images
    sorted into class folders). Classes are the sorted ``train`` folder names. The training images
    are split train / val / cal by ``fractions``; the official validation images are the test
    split. Each image is resized (bicubic) so its shorter side is ``img_size / crop_pct``, then
    center-cropped to ``img_size``: the usual evaluation transform.

    Args:
        num_workers: threads decoding the images of a batch.
        Others as in ``load_cifar100``.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"data.crop_pct must be in (0, 1], got {crop_pct}")
    check_fractions(fractions)
    folder = Path(root).expanduser()
    classes = _class_folders(folder / "train")
    train_files, train_labels = _list_images(folder / "train", classes)
    test_files, test_labels = _list_images(folder / "val", classes)
    parts = split_indices(len(train_files), fractions, seed, max_per_split)
    files, labels = {}, {}
    for name, index in zip(SPLITS, parts):
        files[name], labels[name] = [train_files[i] for i in index.tolist()], train_labels[index]
    test_index = _test_subset(len(test_files), seed, max_per_split)
    files["test"], labels["test"] = [test_files[i] for i in test_index.tolist()], test_labels[test_index]
    splits = ImageFolderSplits(files, labels, len(classes), img_size, round(img_size / crop_pct), normalize, num_workers)
    splits.preprocessing = image_preprocessing(
        normalize, img_size, img_size, classes, "imagenet", resize=round(img_size / crop_pct)
    )
    return splits


class ImageFolderSplits(DataSplits):
    """Splits of image files, decoded, resized, cropped and normalised batch by batch.

    ``augment`` flips images horizontally at random (torch's global generator).
    """

    in_channels = 3

    def __init__(
        self,
        files: dict[str, list[Path]],
        labels: dict[str, Tensor],
        num_classes: int,
        img_size: int,
        resize_size: int,
        normalize: str = "imagenet",
        num_workers: int = 4,
    ) -> None:
        mean, std = normalization(normalize)
        self.files, self._labels = files, labels
        self.num_classes = num_classes
        self.img_size, self.resize_size = img_size, resize_size
        self.mean, self.std = mean, std
        self.num_workers = max(1, num_workers)
        self.check()

    def size(self, split: str) -> int:
        return len(pick_split(self._labels, split))

    def labels(self, split: str) -> Tensor:
        return pick_split(self._labels, split)

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, augment: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        labels, files = pick_split(self._labels, split), self.files[split]
        n = len(labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        with ThreadPoolExecutor(self.num_workers) as pool:
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                images = torch.stack(list(pool.map(self.load_image, (files[i] for i in index.tolist()))))
                if augment:
                    flip = torch.rand(len(images)) < 0.5
                    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
                yield images.sub_(self.mean).div_(self.std), labels[index]

    def load_image(self, path: Path) -> Tensor:
        """One image as float [3, img_size, img_size] in [0, 1]: shorter side resized, center crop."""
        from PIL import Image

        with Image.open(path) as image:
            pixels = resize_center_crop(image.convert("RGB"), self.resize_size, self.img_size)
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)


def resize_center_crop(image, resize_size: int, crop_size: int) -> np.ndarray:
    """A PIL image's shorter side resized (bicubic) to ``resize_size``, then its centre
    ``crop_size`` square: uint8 [crop_size, crop_size, bands] (the ImageNet evaluation transform)."""
    from PIL import Image

    scale = resize_size / min(image.size)
    width, height = (max(crop_size, round(side * scale)) for side in image.size)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - crop_size) // 2, (height - crop_size) // 2
    image = image.crop((left, top, left + crop_size, top + crop_size))
    return np.asarray(image, dtype=np.uint8).copy()


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Images kept per class: int(n_max * (1/imbalance_factor)^(c/(C-1))) for c = 0..C-1."""
    return [int(n_max * (1.0 / imbalance_factor) ** (c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_indices(labels: np.ndarray, num_classes: int, imbalance_factor: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded long-tailed subset of ``labels`` (``long_tail_counts`` per class)."""
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    counts = long_tail_counts(max(len(index) for index in per_class), num_classes, imbalance_factor)
    rng = np.random.default_rng(seed)
    chosen = []
    for c, (index, count) in enumerate(zip(per_class, counts)):
        if count > len(index):
            raise ValueError(f"data: class {c} has {len(index)} training images, the long-tail profile needs {count}")
        chosen.append(rng.choice(index, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


# --- readers of the in-memory datasets -------------------------------------------------------


def cifar100_class_names(root: Path) -> tuple[str, ...] | None:
    """The fine label names from ``cifar-100-python/meta`` (None when the file is absent or unreadable)."""
    for folder in (root, root / CIFAR100_FOLDER):
        meta = folder / "meta"
        if meta.is_file():
            try:
                with meta.open("rb") as handle:
                    names = BatchUnpickler(handle, encoding="latin1").load()["fine_label_names"]
            except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError):
                return None
            return tuple(str(name) for name in names)
    return None


def _read_cifar100(root: Path) -> tuple[Arrays, Arrays]:
    candidates = (root, root / CIFAR100_FOLDER)
    folder = next((f for f in candidates if (f / "train").is_file() or (f / "test").is_file()), None)
    if folder is None:
        raise FileNotFoundError(
            f"data.root: no CIFAR-100 files under {root}. Expected {root / CIFAR100_FOLDER}/train and "
            f"{root / CIFAR100_FOLDER}/test (the python-pickle layout of the extracted "
            f"cifar-100-python.tar.gz). Nothing is downloaded."
        )
    return _read_cifar100_file(folder / "train"), _read_cifar100_file(folder / "test")


def _read_cifar100_file(path: Path) -> Arrays:
    if not path.is_file():
        raise FileNotFoundError(
            f"data.root: {path} is missing; place both CIFAR-100 python-pickle files (train, test) in "
            f"{path.parent}. Nothing is downloaded."
        )
    with path.open("rb") as handle:
        try:
            batch = BatchUnpickler(handle, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(
                f"data.root: {path} is not a complete CIFAR-100 python-pickle file ({err}); it was not loaded. "
                f"Copy the original {path.name} from cifar-100-python.tar.gz again"
            ) from None
    pixels = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return pixels, np.asarray(batch["fine_labels"], dtype=np.int64)


def _read_svhn(folder: Path, split: str) -> Arrays:
    path = folder / SVHN_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"data.root: {path} is missing; place the SVHN cropped-digit files "
            f"{', '.join(SVHN_FILES.values())} (format 2 of http://ufldl.stanford.edu/housenumbers/) "
            f"in {folder}. Nothing is downloaded."
        )
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise ImportError("data: reading SVHN's .mat files needs scipy (pip install scipy)") from err
    try:
        mat = loadmat(str(path))
    except Exception as err:  # noqa: BLE001 (scipy raises several types for a file that is no .mat)
        raise ValueError(
            f"data.root: {path} is not a readable MATLAB file ({type(err).__name__}: {err}); copy the "
            f"original {path.name} (format 2 of http://ufldl.stanford.edu/housenumbers/) again"
        ) from None
    pixels = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1), dtype=np.uint8)  # [32, 32, 3, N] -> [N, 3, 32, 32]
    labels = mat["y"].reshape(-1).astype(np.int64) % 10  # the files label digit 0 as 10
    return pixels, labels


# --- helpers -----------------------------------------------------------------------------------


def _test_subset(n: int, seed: int, max_per_split: int | None) -> Tensor:
    """All test indices, or a seeded random ``max_per_split`` of them (in file order)."""
    return split_indices(n, (1.0,), seed, max_per_split)[0].sort().values


def _class_folders(train: Path) -> list[str]:
    if not train.is_dir():
        raise FileNotFoundError(
            f"data.root: {train} is missing; ImageNet is expected in ImageFolder layout: "
            f"{train}/<wnid>/*.JPEG and {train.parent / 'val'}/<wnid>/*.JPEG (validation images sorted "
            f"into class folders). Nothing is downloaded."
        )
    classes = sorted(entry.name for entry in os.scandir(train) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"data.root: {train} holds no class folders (<wnid>/*.JPEG)")
    return classes


def _list_images(folder: Path, classes: list[str]) -> tuple[list[Path], Tensor]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data.root: {folder} is missing; put the images there as {folder}/<wnid>/*.JPEG, with the "
            f"same class folders as {folder.parent / 'train'}. Nothing is downloaded."
        )
    unknown = sorted({entry.name for entry in os.scandir(folder) if entry.is_dir()} - set(classes))
    if unknown:
        raise ValueError(f"data.root: {folder} has class folders missing from train/: {', '.join(unknown[:5])}")
    files, labels = [], []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        names = sorted(e.name for e in os.scandir(folder / name) if e.name.lower().endswith(IMAGE_SUFFIXES))
        files += [folder / name / file for file in names]
        labels += [label] * len(names)
    if not files:
        raise FileNotFoundError(f"data.root: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}/<wnid>/")
    return files, torch.tensor(labels, dtype=torch.long)
