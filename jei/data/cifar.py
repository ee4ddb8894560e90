"""CIFAR-10 from local python-pickle batch files (no torchvision, never a download).

Reads either the official ``cifar-10-batches-py/`` folder or the pixel- and label-exact
``cifar-10-repacked-py/`` substitute in shared/data (same layout; see its README). Also holds
what the other 32x32 image sets (``images.py``) share with it: normalisation, the crop-and-flip
augmentation, the safe unpickler and the assembly of in-memory splits.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import SPLITS, ImagePreprocessing, TensorDataSplits, TensorSplit, split_indices

FOLDERS = ("cifar-10-batches-py", "cifar-10-repacked-py")
TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_FILE = "test_batch"
# Per-channel (mean, std) of [0, 1] pixels; "imagenet" is what the idelbayev ResNet checkpoints expect.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

Arrays = tuple[np.ndarray, np.ndarray]  # pixels [N, 3, 32, 32] uint8, labels [N] int64
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar10(
    root: str,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_per_split: int | None = None,
    normalize: str = "imagenet",
) -> TensorDataSplits:
    """CIFAR-10 as train / val / cal / test float32 tensors [N, 3, 32, 32].

    Args:
        root: the batch folder itself, or a folder holding ``cifar-10-batches-py/`` or
            ``cifar-10-repacked-py/``.
        fractions: train, val and cal fractions of the 50,000 training images (seeded split);
            the official 10,000 test images are always the test split.
        seed: seed of the split.
        max_per_split: caps every split, test included (its first images), for quick runs.
        normalize: ``"imagenet"``, ``"cifar10"`` (per-channel mean/std) or ``"none"`` ([0, 1]).
    """
    folder = _find_folder(Path(root).expanduser())
    train, test = _read_batches(folder, TRAIN_FILES), _read_batches(folder, (TEST_FILE,))
    test_index = torch.arange(len(test[1]))[:max_per_split]
    return in_memory_splits(
        train, test, test_index, fractions, seed, max_per_split, normalize, 10, augment=True,
        class_names=CLASS_NAMES, name="cifar10",
    )


def in_memory_splits(
    train: Arrays,
    test: Arrays,
    test_index: Tensor,
    fractions: Sequence[float],
    seed: int,
    max_per_split: int | None,
    normalize: str,
    num_classes: int,
    augment: bool,
    class_names: Sequence[str] | None = None,
    name: str = "",
) -> TensorDataSplits:
    """Seeded train / val / cal splits of ``train`` by ``fractions``; the ``test_index`` rows of
    ``test`` are the test split. Images become normalised float32 (``image_preprocessing``);
    ``augment`` adds ``RandomCropFlip`` for training batches."""
    check_fractions(fractions)
    mean, std = normalization(normalize)
    height, width = train[0].shape[-2:]
    preprocessing = image_preprocessing(normalize, height, width, class_names, name)

    def to_split(arrays: Arrays, index: Tensor) -> TensorSplit:
        # Only the chosen rows become float32: a whole training set would be 600 MB.
        pixels, labels = arrays[0][index.numpy()], arrays[1][index.numpy()]
        return TensorSplit(preprocessing.normalize(torch.from_numpy(pixels)), torch.from_numpy(labels))

    parts = split_indices(len(train[1]), fractions, seed, max_per_split)
    splits = {name: to_split(train, index) for name, index in zip(SPLITS, parts)}
    splits["test"] = to_split(test, test_index)
    # Padding with black pixels (zero before normalisation), as torchvision's RandomCrop does.
    augment_fn = RandomCropFlip(padding=4, fill=(-mean / std).flatten()) if augment else None
    return TensorDataSplits(splits, num_classes=num_classes, augment_fn=augment_fn, preprocessing=preprocessing)


def image_preprocessing(
    normalize: str, height: int, width: int, class_names: Sequence[str] | None = None, name: str = "",
    resize: int | None = None,
) -> ImagePreprocessing:
    """8-bit RGB images: pixel / 255, then ``NORMALIZATIONS[normalize]`` per channel."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"data.normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    mean, std = NORMALIZATIONS[normalize]
    return ImagePreprocessing(
        channels=3, height=int(height), width=int(width), mean=tuple(mean), std=tuple(std), max_value=255.0,
        integer_levels=True, resize=resize, class_names=None if class_names is None else tuple(class_names), name=name,
    )


def check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3:
        raise ValueError(
            f"data.fractions must hold 3 fractions (train, val, cal) of the training images; the "
            f"official test images are the test split. Got {list(fractions)}"
        )


def normalization(normalize: str) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of ``NORMALIZATIONS[normalize]``, shaped [3, 1, 1]."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"data.normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    mean, std = NORMALIZATIONS[normalize]
    return torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)


class RandomCropFlip:
    """Batched random crop after ``padding``-pixel padding, then a random horizontal flip.

    The standard CIFAR augmentation (He et al. 2016 §4.2), on normalised [B, C, H, W] tensors;
    ``fill`` is the per-channel value of the padding (a scalar or one value per channel).
    Uses torch's global random generator.
    """

    def __init__(self, padding: int = 4, fill: Tensor | float = 0.0) -> None:
        self.padding = padding
        self.fill = torch.as_tensor(fill, dtype=torch.float32)

    def __call__(self, images: Tensor) -> Tensor:
        batch, channels, height, width = images.shape
        pad = self.padding
        canvas = self.fill.to(images).reshape(1, -1, 1, 1).expand(batch, channels, height + 2 * pad, width + 2 * pad)
        canvas = canvas.clone()
        canvas[:, :, pad : pad + height, pad : pad + width] = images
        top = torch.randint(0, 2 * pad + 1, (batch, 1, 1), device=images.device)
        left = torch.randint(0, 2 * pad + 1, (batch, 1, 1), device=images.device)
        rows = top + torch.arange(height, device=images.device).view(1, -1, 1)
        cols = left + torch.arange(width, device=images.device).view(1, 1, -1)
        samples = torch.arange(batch, device=images.device).view(-1, 1, 1)
        crops = canvas.permute(0, 2, 3, 1)[samples, rows, cols].permute(0, 3, 1, 2)  # [B, C, H, W]
        flip = torch.rand(batch, device=images.device) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops).contiguous()


def _find_folder(root: Path) -> Path:
    """``root`` itself when it holds the batch files, else its CIFAR-10 subfolder."""
    for folder in (root, *(root / name for name in FOLDERS)):
        if (folder / TEST_FILE).is_file() or (folder / TRAIN_FILES[0]).is_file():
            return folder
    raise FileNotFoundError(
        f"data.root: no CIFAR-10 batch files under {root}. Expected {root / FOLDERS[0]}/"
        f"{{{','.join(TRAIN_FILES)},{TEST_FILE}}} (or the same in {root / FOLDERS[1]}/): place the "
        f"CIFAR-10 python-pickle layout there (the extracted cifar-10-python.tar.gz). "
        f"Nothing is downloaded."
    )


def _read_batches(folder: Path, names: Sequence[str]) -> Arrays:
    """Pixels [N, 3, 32, 32] uint8 and labels [N] int64 of the named files."""
    expected = _manifest_sizes(folder)
    pixels, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"data.root: {path} is missing; place the complete CIFAR-10 python-pickle layout "
                f"({', '.join(TRAIN_FILES)}, {TEST_FILE}) in {folder}. Nothing is downloaded."
            )
        if name in expected and path.stat().st_size != expected[name]:
            raise ValueError(
                f"data.root: {path} has {path.stat().st_size} bytes, MANIFEST.json says {expected[name]}; "
                f"the file is truncated or replaced, copy it again"
            )
        with path.open("rb") as handle:
            try:
                batch = BatchUnpickler(handle, encoding="latin1").load()  # Python 2 pickles
            except (pickle.UnpicklingError, EOFError) as err:
                raise ValueError(f"data.root: {path} is not a complete CIFAR-10 python-pickle batch ({err})") from err
        pixels.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # R, G, B planes
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(pixels), np.concatenate(labels)


def _manifest_sizes(folder: Path) -> dict[str, int]:
    """File sizes listed by the repacked folder's MANIFEST.json (empty when there is none)."""
    manifest = folder / "MANIFEST.json"
    if not manifest.is_file():
        return {}
    files = json.loads(manifest.read_text()).get("files", {})
    return {name: entry["bytes"] for name, entry in files.items() if "bytes" in entry}


class BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only, so a batch file cannot run code."""

    # What numpy arrays pickle to (numpy 1 and 2 module names; protocols 2 to 5).
    ALLOWED = {
        *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 bytes under protocol 2
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"unexpected object {module}.{name}: only numpy arrays and plain containers are unpickled"
            )
        return super().find_class(module, name)
