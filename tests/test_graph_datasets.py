"""TU and superpixel graph datasets: real TU files, cache handling, batches, missing files."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch_geometric")

import torch  # noqa: E402
from torch_geometric.data import Batch  # noqa: E402

from jei.data.base import SPLITS  # noqa: E402
from jei.data.graphs import GraphDataSplits, load_superpixels, load_tu  # noqa: E402
from jei.registry import DATASETS  # noqa: E402

TU_ROOT = Path("/work/shared/data/TUDataset")
needs_tu = pytest.mark.skipif(not TU_ROOT.is_dir(), reason="the offline TU files are not on this machine")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tu-cache")


def all_labels(data: GraphDataSplits) -> torch.Tensor:
    return torch.cat([data.labels(split) for split in SPLITS])


@needs_tu
@pytest.mark.parametrize(
    ("name", "sizes", "class_counts", "node_features", "edge_dim"),
    [
        ("MUTAG", [113, 19, 19, 37], [63, 125], 7, 4),
        ("ENZYMES", [360, 60, 60, 120], [100] * 6, 3, None),
    ],
)
def test_tu_splits_cover_the_dataset(name, sizes, class_counts, node_features, edge_dim, cache: Path) -> None:
    data = DATASETS.build("tu", dataset=name, root=str(TU_ROOT), seed=0, pe_dim=4, cache_dir=str(cache))
    assert [data.size(split) for split in SPLITS] == sizes
    assert torch.bincount(all_labels(data)).tolist() == class_counts
    assert data.num_classes == len(class_counts)
    assert (data.num_node_features, data.edge_dim, data.pe_dim) == (node_features, edge_dim, 4)
    graph = data.splits["train"][0]
    assert graph.random_walk_pe.shape == (graph.num_nodes, 4)
    assert graph.x.shape == (graph.num_nodes, node_features)
    assert not (TU_ROOT / name / "processed").exists()  # shared/ stays untouched
    assert (cache / "rwpe4" / name / "processed").is_dir()


@needs_tu
def test_tu_splits_are_seeded_and_capped(cache: Path) -> None:
    def load(seed: int, cap: int | None = None) -> GraphDataSplits:
        return load_tu("MUTAG", TU_ROOT, seed=seed, max_per_split=cap, pe_dim=4, cache_dir=cache)

    assert torch.equal(all_labels(load(0)), all_labels(load(0)))
    assert not torch.equal(all_labels(load(0)), all_labels(load(1)))
    assert [load(0, cap=10).size(split) for split in SPLITS] == [10, 10, 10, 10]


@needs_tu
def test_cached_processing_is_reused_and_pe_dim_gets_its_own_cache(cache: Path) -> None:
    load_tu("MUTAG", TU_ROOT, pe_dim=4, cache_dir=cache)
    processed = cache / "rwpe4" / "MUTAG" / "processed" / "data.pt"
    stamp = processed.stat().st_mtime_ns
    load_tu("MUTAG", TU_ROOT, pe_dim=4, cache_dir=cache)
    assert processed.stat().st_mtime_ns == stamp
    data = load_tu("MUTAG", TU_ROOT, pe_dim=3, max_per_split=2, cache_dir=cache)
    assert data.splits["val"][0].random_walk_pe.shape[1] == 3
    assert not list(cache.glob("rwpe*/.MUTAG-*"))  # no scratch folders left behind


@needs_tu
def test_batches_follow_labels_and_shuffle_by_seed(cache: Path) -> None:
    data = load_tu("MUTAG", TU_ROOT, pe_dim=4, cache_dir=cache)
    pairs = list(data.batches("train", 32))
    assert all(isinstance(batch, Batch) and batch.num_graphs == len(labels) for batch, labels in pairs)
    assert [batch.num_graphs for batch, _ in pairs] == [32, 32, 32, 17]
    assert torch.equal(torch.cat([labels for _, labels in pairs]), data.labels("train"))

    def order(seed: int) -> list[int]:
        return [int(batch.num_nodes) for batch, _ in data.batches("train", 8, shuffle=True, seed=seed)]

    assert order(3) == order(3) and order(3) != order(4)
    with pytest.raises(ValueError, match="unknown split"):
        data.size("training")


@needs_tu
def test_imdb_multi_gets_one_hot_degree_features(cache: Path) -> None:
    data = load_tu("IMDB-MULTI", TU_ROOT, pe_dim=4, cache_dir=cache)
    assert [data.size(split) for split in SPLITS] == [900, 150, 150, 300]
    assert torch.bincount(all_labels(data)).tolist() == [500, 500, 500]
    assert data.edge_dim is None
    for graph in data.splits["test"][:20]:
        assert graph.x.shape == (graph.num_nodes, data.num_node_features)
        assert torch.equal(graph.x.sum(1), torch.ones(graph.num_nodes))  # one-hot
        degrees = torch.bincount(graph.edge_index[0], minlength=graph.num_nodes)
        assert torch.equal(graph.x.argmax(1), degrees)
    widest = max(int(torch.bincount(g.edge_index[0]).max()) for split in SPLITS for g in data.splits[split])
    assert data.num_node_features == widest + 1


def test_missing_tu_files_say_where_they_go(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"NOPE/raw.*NOPE_A\.txt"):
        load_tu("NOPE", tmp_path, cache_dir=tmp_path / "cache")
    (tmp_path / "PART" / "raw").mkdir(parents=True)
    (tmp_path / "PART" / "raw" / "PART_A.txt").write_text("1, 2\n")
    with pytest.raises(FileNotFoundError, match="PART_graph_indicator.txt, PART_graph_labels.txt"):
        load_tu("PART", tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_superpixels_raise_before_any_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw/MNIST_v2\.pt.*nothing is downloaded"):
        load_superpixels("MNIST", tmp_path, cache_dir=tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []  # PyG never got to create its raw/ folder
    with pytest.raises(ValueError, match="MNIST, CIFAR10"):
        load_superpixels("SVHN", tmp_path)


def test_superpixels_load_from_a_local_raw_file(tmp_path: Path) -> None:
    """A tiny stand-in for MNIST_v2.pt in the benchmark's layout: [train, val, test] lists of graph dicts."""
    gen = torch.Generator().manual_seed(0)

    def graph(label: int) -> dict[str, torch.Tensor]:
        n = 6
        edge_index = torch.randint(0, n, (2, 12), generator=gen)
        return {
            "x": torch.rand(n, 1, generator=gen),
            "pos": torch.rand(n, 2, generator=gen),
            "edge_index": edge_index,
            "edge_attr": torch.rand(12, generator=gen),
            "y": torch.tensor([label]),
        }

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    benchmark = [[graph(i % 10) for i in range(30)], [graph(i) for i in range(10)], [graph(i) for i in range(10)]]
    torch.save(benchmark, raw / "MNIST_v2.pt")
    data = DATASETS.build("superpixels", dataset="MNIST", root=str(tmp_path), pe_dim=4, cache_dir=tmp_path / "cache")
    assert [data.size(split) for split in SPLITS] == [30, 5, 5, 10]
    assert (data.num_classes, data.num_node_features, data.edge_dim) == (10, 3, 1)
    sample = data.splits["train"][0]
    assert sample.random_walk_pe.shape == (6, 4) and sample.edge_attr.shape == (12, 1)
    assert not (tmp_path / "MNIST" / "processed").exists()
