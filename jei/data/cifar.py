"""CIFAR-10 from local python-pickle batch files (no torchvision, never a download).

Reads either the official ``cifar-10-batches-py/`` folder or the pixel- and label-exact
``cifar-10-repacked-py/`` substitute in shared/data (same layout; see its README).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import TensorDataSplits, TensorSplit, split_indices

FOLDERS = ("cifar-10-batches-py", "cifar-10-repacked-py")
TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_FILE = "test_batch"
# Per-channel (mean, std) of [0, 1] pixels; "imagenet" is what the idelbayev ResNet checkpoints expect.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


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
    if len(fractions) != 3:
        raise ValueError(
            f"data.fractions must hold 3 fractions (train, val, cal) of the 50,000 training images; "
            f"the official test set is the test split. Got {list(fractions)}"
        )
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"data.normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    folder = _find_folder(Path(root).expanduser())
    train_pixels, train_labels = _read_batches(folder, TRAIN_FILES)
    test_pixels, test_labels = _read_batches(folder, (TEST_FILE,))

    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in NORMALIZATIONS[normalize])

    def to_split(pixels: np.ndarray, labels: np.ndarray, index: Tensor) -> TensorSplit:
        # Only the chosen rows become float: the whole train set would be 600 MB.
        images = torch.from_numpy(pixels[index.numpy()]).view(-1, 3, 32, 32).float().div_(255)
        return TensorSplit(images.sub_(mean).div_(std), torch.from_numpy(labels[index.numpy()]))

    parts = split_indices(len(train_labels), fractions, seed, max_per_split)
    splits = {name: to_split(train_pixels, train_labels, index) for name, index in zip(("train", "val", "cal"), parts)}
    splits["test"] = to_split(test_pixels, test_labels, torch.arange(len(test_labels))[:max_per_split])
    # Padding with black pixels (zero before normalisation), as torchvision's RandomCrop does.
    return TensorDataSplits(splits, num_classes=10, augment_fn=RandomCropFlip(padding=4, fill=(-mean / std).flatten()))


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


def _read_batches(folder: Path, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels [N, 3072] uint8 (R, G, B planes of 32x32) and labels [N] int64 of the named files."""
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
                batch = _BatchUnpickler(handle, encoding="latin1").load()  # Python 2 pickles
            except (pickle.UnpicklingError, EOFError) as err:
                raise ValueError(f"data.root: {path} is not a complete CIFAR-10 python-pickle batch ({err})") from err
        pixels.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3 * 32 * 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(pixels), np.concatenate(labels)


def _manifest_sizes(folder: Path) -> dict[str, int]:
    """File sizes listed by the repacked folder's MANIFEST.json (empty when there is none)."""
    manifest = folder / "MANIFEST.json"
    if not manifest.is_file():
        return {}
    files = json.loads(manifest.read_text()).get("files", {})
    return {name: entry["bytes"] for name, entry in files.items() if "bytes" in entry}


class _BatchUnpickler(pickle.Unpickler):
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
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch file")
        return super().find_class(module, name)
