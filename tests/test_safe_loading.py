"""No loader unpickles arbitrary objects: a crafted pickle is refused by every one of them, with
an error (or, for cache files, a warning) that names the file, and its code never runs."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch

from jei.io import RefusedFileError, torch_load_strict


class Payload:
    """Unpickling this creates ``marker``: proof that the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def craft(path: Path, marker: Path, kind: str = "torch", wrap=lambda payload: {"data": payload}) -> Path:
    """Write a file whose (full) unpickling creates ``marker``: a torch zip or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = wrap(Payload(marker))
    if kind == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


KINDS = ["torch", "pickle"]


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "CODE_RAN"


@pytest.mark.parametrize("kind", KINDS)
def test_the_crafted_file_really_runs_code_when_fully_unpickled(tmp_path, marker, kind):
    """The premise of every test below: without the safeguards this file would run its code."""
    path = craft(tmp_path / "evil.pt", marker, kind)
    if kind == "torch":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_torch_load_strict_refuses_it_naming_the_file(tmp_path, marker, kind):
    path = craft(tmp_path / "evil.pt", marker, kind)
    with pytest.raises(RefusedFileError, match=r"evil\.pt holds Python objects other than tensors.*refers to exec"):
        torch_load_strict(path)
    assert not marker.exists()


def test_torch_load_strict_loads_plain_tensor_files(tmp_path):
    torch.save({"w": torch.ones(2), "meta": [1, "a"]}, tmp_path / "ok.pt")
    assert torch_load_strict(tmp_path / "ok.pt")["meta"] == [1, "a"]


# --- backbone weights ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_backbone_weights_refuse_a_crafted_checkpoint(tmp_path, marker, kind):
    from jei.backbones.weights import read_state_dict

    path = craft(tmp_path / "resnet20.th", marker, kind, wrap=lambda p: {"state_dict": {"w": p}})
    with pytest.raises(ValueError, match=r"backbone\.weights: .*resnet20\.th holds Python objects.*safetensors"):
        read_state_dict(path)
    assert not marker.exists()


def test_backbone_weights_name_a_damaged_safetensors_file(tmp_path):
    from jei.backbones.weights import read_state_dict

    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match=r"backbone\.weights: .*w\.safetensors is damaged"):
        read_state_dict(tmp_path / "w.safetensors")


def test_t2t_vit_checkpoints_are_never_fully_unpickled(tmp_path, marker):
    from jei.backbones.t2t_vit import read_published_checkpoint

    path = craft(tmp_path / "t2t.pth.tar", marker, wrap=lambda p: {"state_dict_ema": {"w": p}})
    with pytest.raises(Exception):  # noqa: B017 (torch's own refusal today; see the next test)
        read_published_checkpoint(path)
    assert not marker.exists()


def test_t2t_vit_refusal_names_the_file(tmp_path, marker):
    from jei.backbones.t2t_vit import read_published_checkpoint

    path = craft(tmp_path / "t2t.pth.tar", marker, wrap=lambda p: {"state_dict_ema": {"w": p}})
    with pytest.raises(ValueError, match=r"backbone\.weights: .*t2t\.pth\.tar holds Python objects"):
        read_published_checkpoint(path)


# --- image datasets --------------------------------------------------------------------------


def test_cifar10_refuses_crafted_batches(tmp_path, marker):
    from jei.data.cifar import TEST_FILE, TRAIN_FILES, load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    for name in (*TRAIN_FILES, TEST_FILE):
        craft(folder / name, marker, "pickle")
    with pytest.raises(ValueError, match=r"data\.root: .*data_batch_1 is not a complete CIFAR-10.*unexpected object __builtin__\.exec"):
        load_cifar10(str(tmp_path))
    assert not marker.exists()


def test_cifar100_refuses_a_crafted_file(tmp_path, marker):
    from jei.data.images import load_cifar100

    folder = tmp_path / "cifar-100-python"
    for name in ("train", "test"):
        craft(folder / name, marker, "pickle")
    with pytest.raises(ValueError, match=r"data\.root: .*cifar-100-python/train is not a complete CIFAR-100.*exec.*Copy the original"):
        load_cifar100(str(tmp_path))
    assert not marker.exists()


def test_svhn_refuses_a_crafted_file(tmp_path, marker):
    pytest.importorskip("scipy")
    from jei.data.images import load_svhn

    for name in ("train_32x32.mat", "test_32x32.mat"):
        craft(tmp_path / name, marker, "pickle")
    with pytest.raises(ValueError, match=r"data\.root: .*train_32x32\.mat is not a readable MATLAB file"):
        load_svhn(str(tmp_path))
    assert not marker.exists()


def test_imagenet_refuses_a_crafted_image(tmp_path, marker):
    from jei.data.images import ImageFolderSplits

    image = craft(tmp_path / "n01" / "a.JPEG", marker, "pickle")
    splits = ImageFolderSplits({s: [image] for s in ("train", "val", "cal", "test")},
                               {s: torch.zeros(1, dtype=torch.long) for s in ("train", "val", "cal", "test")}, 1, 8, 8)
    with pytest.raises(Exception, match=r"n01/a\.JPEG"):
        next(splits.batches("test", 1))
    assert not marker.exists()


# --- graph datasets (PyG) --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_superpixels_refuse_a_crafted_raw_file(tmp_path, marker, kind):
    """The reported case: PyG's fs.torch_load retried it with weights_only=False and ran it."""
    pytest.importorskip("torch_geometric")
    from jei.data.graphs import load_superpixels

    raw = craft(tmp_path / "MNIST" / "raw" / "MNIST_v2.pt", marker, kind, wrap=lambda p: [[{"x": p}], [], []])
    with pytest.raises(ValueError, match=rf"data: {raw} holds Python objects other than tensors.*original file"):
        load_superpixels("MNIST", tmp_path, pe_dim=2, cache_dir=tmp_path / "cache")
    assert not marker.exists()
    assert not (tmp_path / "cache" / "rwpe2" / "MNIST").exists()  # nothing half-built was kept


def write_tu(root: Path, name: str = "TINY", graphs: int = 20) -> None:
    """A TU-format dataset of triangles (3 nodes each), with node labels and two classes."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    edges, indicator = [], []
    for g in range(graphs):
        a, b, c = 3 * g + 1, 3 * g + 2, 3 * g + 3
        edges += [(a, b), (b, a), (b, c), (c, b), (a, c), (c, a)]
        indicator += [g + 1] * 3
    (raw / f"{name}_A.txt").write_text("".join(f"{i}, {j}\n" for i, j in edges))
    (raw / f"{name}_graph_indicator.txt").write_text("".join(f"{g}\n" for g in indicator))
    (raw / f"{name}_graph_labels.txt").write_text("".join(f"{g % 2}\n" for g in range(graphs)))
    (raw / f"{name}_node_labels.txt").write_text("".join(f"{n % 3}\n" for n in range(3 * graphs)))


@pytest.mark.parametrize("file", ["data.pt", "pre_transform.pt", "pre_filter.pt"])
def test_tu_cache_files_are_never_unpickled_and_get_rebuilt(tmp_path, marker, caplog, file):
    """A crafted file in the processed cache is reported by path, not run, and the copy rebuilt.

    (PyG reads ``pre_transform.pt`` and ``pre_filter.pt`` with ``weights_only=False`` outright.)
    """
    pytest.importorskip("torch_geometric")
    from jei.data.graphs import load_tu

    write_tu(tmp_path)
    cache = tmp_path / "cache"
    clean = load_tu("TINY", tmp_path, pe_dim=2, cache_dir=cache)
    processed = cache / "rwpe2" / "TINY" / "processed"
    craft(processed / file, marker)
    caplog.set_level(logging.WARNING, logger="jei.data.graphs")
    data = load_tu("TINY", tmp_path, pe_dim=2, cache_dir=cache)
    assert not marker.exists()
    assert any(str(processed / file) in r.getMessage() and "holds Python objects" in r.getMessage()
               and "rebuilding" in r.getMessage() for r in caplog.records)
    for split in ("train", "test"):
        assert torch.equal(data.labels(split), clean.labels(split))
        assert all(torch.equal(a.x, b.x) for a, b in zip(data.splits[split], clean.splits[split]))
    caplog.clear()
    load_tu("TINY", tmp_path, pe_dim=2, cache_dir=cache)  # rebuilt: clean now
    assert not caplog.records


def test_pyg_loading_is_restored_after_a_load(tmp_path):
    pytest.importorskip("torch_geometric")
    from torch_geometric.io import fs

    from jei.data.graphs import load_tu

    original = fs.torch_load
    write_tu(tmp_path)
    load_tu("TINY", tmp_path, pe_dim=2, cache_dir=tmp_path / "cache")
    assert fs.torch_load is original


# --- the feature cache -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_feature_cache_entry_is_never_unpickled(tmp_path, marker, caplog, kind):
    from jei.data.base import TensorDataSplits, TensorSplit
    from jei.features import cache_key, cached_split, compute_split, entry_path

    from .helpers import tiny_network

    network = tiny_network(0)
    split = TensorSplit(torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 5)
    data = TensorDataSplits({name: split for name in ("train", "val", "cal", "test")}, 5)
    path = craft(entry_path(tmp_path, cache_key(network, data, "val", ""), "val"), marker, kind)
    caplog.set_level(logging.WARNING, logger="jei.features")
    result = cached_split(network, data, "val", 8, torch.device("cpu"), tmp_path)
    assert not marker.exists()
    assert torch.equal(result.final_logits, compute_split(network, data, "val", 8, torch.device("cpu")).final_logits)
    assert any(str(path) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
