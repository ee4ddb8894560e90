"""CIFAR-100(-LT), SVHN and ImageNet loaders on tiny fake datasets in the real on-disk formats."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jei.data.base import SPLITS
from jei.data.images import (
    ImageFolderSplits,
    load_cifar100,
    load_cifar100_lt,
    load_imagenet,
    load_svhn,
    long_tail_counts,
)
from jei.registry import DATASETS


def identified_pixels(n: int, layout: str = "NCHW") -> np.ndarray:
    """Random uint8 images whose first two values encode the image's index (to check disjointness)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    pixels[:, 0, 0, 0], pixels[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return pixels if layout == "NCHW" else np.ascontiguousarray(pixels.transpose(2, 3, 1, 0))  # SVHN: HWCN


def ids(images: torch.Tensor) -> set[int]:
    """Image identities from unnormalised [0, 1] images (normalize='none')."""
    codes = (images[:, 0, 0, :2] * 255).round().long()
    return set((codes[:, 0] + 256 * codes[:, 1]).tolist())


def write_cifar100(root: Path, per_class_train: int = 10, per_class_test: int = 2, offset: int = 0) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per_class)
        np.random.default_rng(1).shuffle(labels)
        pixels = identified_pixels(len(labels))
        if name == "test":
            pixels[:, 0, 0, 2] = 255  # marks test images
        batch = {
            "batch_label": f"{name} batch",
            "data": pixels.reshape(len(labels), -1),
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "filenames": [f"img_{i}.png" for i in range(len(labels))],
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)  # the official files are Python 2 pickles
    return folder


def all_ids(data, split: str) -> set[int]:
    return set().union(*(ids(x) for x, _ in data.batches(split, 64)))


def test_cifar100_splits_are_seeded_disjoint_and_capped(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    data = load_cifar100(str(tmp_path), seed=3, normalize="none")
    assert data.num_classes == 100 and data.in_channels == 3
    assert [data.size(s) for s in SPLITS] == [800, 100, 100, 200]
    train_ids = [all_ids(data, s) for s in ("train", "val", "cal")]
    assert sum(len(i) for i in train_ids) == len(set().union(*train_ids)) == 1000  # disjoint, nothing lost
    x, y = next(data.batches("test", 500))
    assert (x[:, 0, 0, 2] == 1).all() and Counter(y.tolist()) == {c: 2 for c in range(100)}  # the official test set
    again = load_cifar100(str(tmp_path / "cifar-100-python"), seed=3, normalize="none")  # the folder itself
    assert torch.equal(again.labels("val"), data.labels("val"))
    assert not torch.equal(load_cifar100(str(tmp_path), seed=4).labels("val"), data.labels("val"))
    capped = load_cifar100(str(tmp_path), max_per_split=7)
    assert [capped.size(s) for s in SPLITS] == [7] * 4
    assert DATASETS.get("cifar100") is load_cifar100


def test_cifar100_normalisation_and_augmentation(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    raw = load_cifar100(str(tmp_path), normalize="none", max_per_split=20)
    standardised = load_cifar100(str(tmp_path), normalize="imagenet", max_per_split=20)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    (a, _), (b, _) = next(raw.batches("train", 20)), next(standardised.batches("train", 20))
    torch.testing.assert_close(b, (a - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    torch.manual_seed(0)
    augmented, _ = next(raw.batches("train", 20, augment=True))
    assert augmented.shape == a.shape and not torch.equal(augmented, a)
    with pytest.raises(ValueError, match=r"data\.fractions"):
        load_cifar100(str(tmp_path), fractions=(0.5, 0.2, 0.1, 0.2))
    with pytest.raises(ValueError, match=r"data\.normalize"):
        load_cifar100(str(tmp_path), normalize="zca")


def test_long_tail_profile() -> None:
    # The standard CIFAR-100-LT training-set sizes (Cao et al. 2019) for 500 images per class.
    assert sum(long_tail_counts(500, 100, 100)) == 10847
    assert sum(long_tail_counts(500, 100, 50)) == 12608
    assert sum(long_tail_counts(500, 100, 10)) == 19573
    counts = long_tail_counts(500, 100, 100)
    assert counts[0] == 500 and counts[-1] == 5 and counts == sorted(counts, reverse=True)
    assert long_tail_counts(500, 100, 1) == [500] * 100


def test_cifar100_lt_keeps_the_profile_and_a_balanced_test_set(tmp_path: Path) -> None:
    write_cifar100(tmp_path, per_class_train=20)
    data = load_cifar100_lt(str(tmp_path), imbalance_factor=10, seed=1, normalize="none")
    pooled = torch.cat([data.labels(s) for s in ("train", "val", "cal")])
    expected = long_tail_counts(20, 100, 10)
    assert [Counter(pooled.tolist())[c] for c in range(100)] == expected
    assert Counter(data.labels("test").tolist()) == {c: 2 for c in range(100)}
    ids_by_split = [all_ids(data, s) for s in ("train", "val", "cal")]
    assert sum(len(i) for i in ids_by_split) == len(set().union(*ids_by_split)) == sum(expected)
    other = load_cifar100_lt(str(tmp_path), imbalance_factor=10, seed=2, normalize="none")
    assert set().union(*(all_ids(other, s) for s in ("train", "val", "cal"))) != set().union(*ids_by_split)
    with pytest.raises(ValueError, match=r"data\.imbalance_factor"):
        load_cifar100_lt(str(tmp_path), imbalance_factor=0.5)


def test_cifar100_missing_files_say_where_they_go(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/train.*Nothing is downloaded"):
        load_cifar100(str(tmp_path))
    folder = write_cifar100(tmp_path)
    (folder / "test").unlink()
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/test is missing"):
        load_cifar100_lt(str(tmp_path))


def write_svhn(folder: Path, n_train: int = 60, n_test: int = 20) -> None:
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        labels = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # 1..10, 10 = digit 0
        savemat(str(folder / name), {"X": identified_pixels(n, layout="HWCN"), "y": labels})


def test_svhn_maps_label_10_to_0_and_keeps_pixels(tmp_path: Path) -> None:
    write_svhn(tmp_path)
    data = load_svhn(str(tmp_path), normalize="none", seed=0)
    assert data.num_classes == 10 and [data.size(s) for s in SPLITS] == [48, 6, 6, 20]
    test_images, test_labels = next(data.batches("test", 100))
    assert sorted(set(test_labels.tolist())) == list(range(10))
    # Image i was stored with file label (i % 10) + 1, so its label is (i + 1) % 10.
    identities = (test_images[:, 0, 0, 0] * 255).round().long()
    assert torch.equal(test_labels, (identities + 1) % 10)
    expected = torch.from_numpy(identified_pixels(20)).float() / 255
    torch.testing.assert_close(test_images, expected[identities])
    splits = [all_ids(data, s) for s in ("train", "val", "cal")]
    assert sum(len(i) for i in splits) == len(set().union(*splits)) == 60
    augmented, _ = next(data.batches("train", 48, augment=True))
    assert torch.equal(augmented, next(data.batches("train", 48))[0])  # no flips on digits


def test_svhn_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train_32x32\.mat is missing.*Nothing is downloaded"):
        load_svhn(str(tmp_path))
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_32x32\.mat is missing"):
        load_svhn(str(tmp_path))


WNIDS = ("n01440764", "n01443537", "n01484850")


def write_imagenet(root: Path, per_class_train: int = 10, per_class_val: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        for label, wnid in enumerate(WNIDS):
            (root / split / wnid).mkdir(parents=True)
            for k in range(per_class):
                size = (int(rng.integers(20, 48)), int(rng.integers(20, 48)))
                colour = (80 * label, 255 if split == "val" else 0, k)
                Image.new("RGB", size, colour).save(root / split / wnid / f"{wnid}_{k}.JPEG", quality=100)
    (root / "train" / WNIDS[0] / "notes.txt").write_text("not an image")


def test_imagenet_reads_lazily_with_resize_and_center_crop(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    data = load_imagenet(str(tmp_path), img_size=16, normalize="none", seed=0, num_workers=2)
    assert isinstance(data, ImageFolderSplits) and data.num_classes == 3
    assert [data.size(s) for s in SPLITS] == [24, 3, 3, 6]
    names = [{p.name for p in data.files[s]} for s in ("train", "val", "cal")]
    assert sum(len(n) for n in names) == len(set().union(*names)) == 30  # disjoint, the .txt skipped
    images, labels = next(data.batches("test", 4))
    assert images.shape == (4, 3, 16, 16) and torch.equal(labels, data.labels("test")[:4])
    # Solid colours survive resizing: the red channel encodes the class, green the folder.
    torch.testing.assert_close(images[:, 0, 8, 8], labels.float() * 80 / 255, atol=2 / 255, rtol=0)
    assert (images[:, 1] > 0.95).all()
    capped = load_imagenet(str(tmp_path), img_size=16, max_per_split=2)
    assert [capped.size(s) for s in SPLITS] == [2, 2, 2, 2]


def test_imagenet_center_crop_of_a_wide_image(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[:, 32:] = 255  # left half black, right half white
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    data = load_imagenet(str(tmp_path), img_size=16, crop_pct=1.0, normalize="none")
    crop = data.load_image(path)  # resized to 32x16, the middle 16 columns kept
    assert crop.shape == (3, 16, 16)
    assert crop[:, :, :7].max() < 0.05 and crop[:, :, 9:].min() > 0.95


def test_imagenet_missing_folders_say_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train/<wnid>/\*\.JPEG.*Nothing is downloaded"):
        load_imagenet(str(tmp_path))
    write_imagenet(tmp_path)
    for path in sorted((tmp_path / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(FileNotFoundError, match=r"val is missing"):
        load_imagenet(str(tmp_path))
