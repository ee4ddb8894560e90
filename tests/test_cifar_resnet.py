"""CIFAR ResNet adapter (real checkpoints) and the CIFAR-10 pickle loader."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from jei.backbones.cifar_resnet import CifarResNet
from jei.data.cifar import RandomCropFlip, load_cifar10

# Where configs/paths/default.yaml looks: $JEI_SHARED_DATA, else ../shared/data next to the repository.
SHARED_DATA = Path(os.environ.get("JEI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
WEIGHTS = SHARED_DATA / "weights" / "resnet_cifar10_idelbayev"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"offline data folder {SHARED_DATA} is absent (CI has it)"
)


# --- the adapter -------------------------------------------------------------------------


@needs_shared_data
def test_resnet20_checkpoint_reproduces_reported_accuracy() -> None:
    model = CifarResNet(depth=20, weights=str(WEIGHTS / "resnet20-12fca82f.th"))
    assert model.frozen and not model.training
    data = load_cifar10(str(SHARED_DATA), max_per_split=500)
    images, labels = data.splits["test"].inputs, data.splits["test"].labels
    assert len(labels) == 500
    out = model.forward_exits(images)
    accuracy = (out.logits.argmax(dim=1) == labels).float().mean().item()
    assert accuracy > 0.85  # reported: 91.73 % on the full test set
    assert len(out.features) == 8


@needs_shared_data
def test_weights_of_another_depth_fail_clearly() -> None:
    with pytest.raises(ValueError, match=r"does not match the CifarResNet architecture: missing keys.*layer1\.3"):
        CifarResNet(depth=32, weights=str(WEIGHTS / "resnet20-12fca82f.th"))


def test_missing_weights_file_says_to_pass_a_local_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="backbone.weights: no file at .*local weights file"):
        CifarResNet(depth=8, weights=str(tmp_path / "nope.th"))


def test_state_dict_names_follow_the_checkpoints() -> None:
    keys = set(CifarResNet(depth=8, exit_every=1).state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer3.0.bn2.bias", "linear.weight"} <= keys
    assert not any(key.startswith("_blocks") for key in keys)


@pytest.mark.parametrize("depth", [0, 19, 21, 2, "56", True])
def test_bad_depth_names_the_field(depth: object) -> None:
    with pytest.raises(ValueError, match=r"backbone\.depth must be 6n \+ 2"):
        CifarResNet(depth=depth)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"exit_every": None, "exits": [3, 9]}, r"backbone\.exits: exit position 9 is outside 1\.\.8"),
        ({"exit_every": None, "exits": [4, 2]}, r"backbone\.exits: .*strictly increasing"),
        ({"exit_every": 9}, r"backbone\.exit_every must be an integer in 1\.\.8"),
        ({"exit_every": 0}, r"backbone\.exit_every"),
        ({"exit_every": 2, "exits": [1]}, r"exactly one of backbone\.exit_every and backbone\.exits"),
        ({"exit_every": None}, r"exactly one of backbone\.exit_every and backbone\.exits"),
    ],
)
def test_bad_exits_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CifarResNet(depth=20, **kwargs)


def test_exit_every_places_exits_after_blocks() -> None:
    specs = CifarResNet(depth=20, exit_every=2).exit_specs
    assert [s.name for s in specs] == ["layer1.1", "layer2.0", "layer2.2", "layer3.1"]
    assert [(s.index, s.kind, s.channels, s.reduction) for s in specs] == [
        (0, "map", 16, 1),
        (1, "map", 32, 2),
        (2, "map", 32, 2),
        (3, "map", 64, 4),
    ]

    specs = CifarResNet(depth=56, exit_every=1).exit_specs  # 27 blocks -> exits after 1..26
    assert len(specs) == 26
    assert specs[8].name == "layer1.8" and specs[9].name == "layer2.0" and specs[-1].name == "layer3.7"
    assert [s.channels for s in specs] == [16] * 9 + [32] * 9 + [64] * 8
    assert [s.reduction for s in specs] == [1] * 9 + [2] * 9 + [4] * 8

    specs = CifarResNet(depth=56, exit_every=None, exits=[9, 18]).exit_specs
    assert [(s.name, s.channels, s.reduction) for s in specs] == [("layer1.8", 16, 1), ("layer2.8", 32, 2)]


def test_option_a_shortcut_pads_channels_of_the_subsampled_input() -> None:
    model = CifarResNet(depth=8, exit_every=None, exits=[1, 2]).freeze()
    block = model.layer2[0]
    x = torch.randn(2, 16, 8, 8)
    shortcut = block._shortcut(x, 32)
    assert shortcut.shape == (2, 32, 4, 4)
    torch.testing.assert_close(shortcut[:, 8:24], x[:, :, ::2, ::2])
    assert shortcut[:, :8].abs().sum() == 0 and shortcut[:, 24:].abs().sum() == 0


# --- the CIFAR-10 loader -----------------------------------------------------------------


def _write_fake_cifar(folder: Path, per_file: int = 20) -> None:
    """Tiny batch files in the CIFAR-10 layout; pixel value k+1 in channel 0 marks image k."""
    folder.mkdir(parents=True)
    for offset, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = np.zeros((per_file, 3072), dtype=np.uint8)
        data[:, 0] = np.arange(per_file) + offset * per_file
        batch = {"batch_label": name, "labels": [k % 10 for k in range(per_file)], "data": data, "filenames": []}
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)


def test_fake_cifar_splits_fractions_of_train_and_keeps_the_test_set(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path / "cifar-10-batches-py")  # 100 train, 20 test images
    data = load_cifar10(str(tmp_path), fractions=(0.5, 0.2, 0.3), seed=3, normalize="none")
    assert {name: data.size(name) for name in data.splits} == {"train": 50, "val": 20, "cal": 30, "test": 20}
    ids = {name: (split.inputs[:, 0, 0, 0] * 255).round().long() for name, split in data.splits.items()}
    assert sorted(torch.cat([ids["train"], ids["val"], ids["cal"]]).tolist()) == list(range(100))
    assert ids["test"].tolist() == list(range(100, 120))  # official test images, in order
    assert data.splits["train"].inputs.dtype == torch.float32 and data.splits["train"].inputs.shape[1:] == (3, 32, 32)

    again = load_cifar10(str(tmp_path / "cifar-10-batches-py"), fractions=(0.5, 0.2, 0.3), seed=3, normalize="none")
    torch.testing.assert_close(again.splits["val"].inputs, data.splits["val"].inputs)  # the folder itself, seeded
    other = load_cifar10(str(tmp_path), fractions=(0.5, 0.2, 0.3), seed=4, normalize="none")
    assert not torch.equal(other.splits["val"].inputs, data.splits["val"].inputs)

    capped = load_cifar10(str(tmp_path), fractions=(0.5, 0.2, 0.3), max_per_split=7)
    assert [capped.size(name) for name in ("train", "val", "cal", "test")] == [7, 7, 7, 7]


def test_missing_cifar_files_say_where_they_go(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*python-pickle layout.*Nothing is downloaded"):
        load_cifar10(str(tmp_path))
    _write_fake_cifar(tmp_path / "cifar-10-repacked-py")
    (tmp_path / "cifar-10-repacked-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3 is missing"):
        load_cifar10(str(tmp_path))


def test_bad_loader_arguments_name_the_field(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ValueError, match=r"data\.fractions must hold 3"):
        load_cifar10(str(tmp_path), fractions=(0.5, 0.2, 0.2, 0.1))
    with pytest.raises(ValueError, match=r"data\.normalize"):
        load_cifar10(str(tmp_path), normalize="zscore")


def test_batch_files_cannot_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_fake_cifar(folder)
    with (folder / "test_batch").open("wb") as handle:
        pickle.dump({"data": Path("x")}, handle)
    with pytest.raises(ValueError, match=r"not a complete CIFAR-10 python-pickle batch .*unexpected object"):
        load_cifar10(str(tmp_path))


@needs_shared_data
def test_shared_cifar10_is_normalised_for_the_checkpoints() -> None:
    data = load_cifar10(str(SHARED_DATA), max_per_split=200)
    raw = load_cifar10(str(SHARED_DATA), max_per_split=200, normalize="none")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(data.splits["test"].inputs, (raw.splits["test"].inputs - mean) / std)
    assert raw.splits["test"].inputs.min() >= 0 and raw.splits["test"].inputs.max() <= 1
    assert data.splits["test"].labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # official order


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image() -> None:
    torch.manual_seed(0)
    images = torch.randn(16, 3, 6, 6)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = RandomCropFlip(padding=2, fill=fill)(images)
    assert out.shape == images.shape
    padded = fill.view(1, 3, 1, 1).expand(16, 3, 10, 10).clone()
    padded[:, :, 2:8, 2:8] = images
    windows = [padded[:, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
    candidates = torch.stack(windows + [w.flip(-1) for w in windows], dim=1)  # [B, 50, C, H, W]
    matches = (candidates == out.unsqueeze(1)).flatten(2).all(dim=2)
    assert matches.any(dim=1).all()
    assert not torch.equal(out, images)  # 16 samples: some shift or flip happened
