"""Graph classification datasets as seeded splits of PyG graphs, from local files only.

- ``load_tu``: the TU collection (ENZYMES, PROTEINS, MUTAG, NCI1, IMDB-MULTI, ...), read from
  ``<root>/<dataset>/raw/``.
- ``load_superpixels``: the GNN-benchmark MNIST / CIFAR10 superpixel graphs, read from
  ``<root>/<dataset>/raw/<dataset>_v2.pt``.

Every graph gets random-walk positional encodings in the node attribute ``random_walk_pe``
([num_nodes, pe_dim]) from ``AddRandomWalkPE(walk_length=pe_dim)`` as a pre-transform, which is
what ``jei.backbones.graph_gps.GraphGPS`` reads. The source folder is never written to: its
raw files are copied into a cache folder and PyG processes them there, once per ``pe_dim``.

No file is ever fully unpickled: PyG's ``fs.torch_load`` retries a file that ``weights_only``
loading refuses with ``weights_only=False`` (running any code the file holds), and its
``Dataset`` reads ``processed/pre_transform.pt`` with ``weights_only=False``. So PyG runs here
with ``torch_load_strict`` in place of ``fs.torch_load``, and those two files are checked with it
first. A refused raw file is an error naming it; a refused or damaged file in the cache folder
is reported and the cached copy rebuilt from the raw files.

torch_geometric is imported at module top on purpose: without it, the registry turns the
failed import into its "pip install 'jei-dnn[graph]'" message.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch_geometric.transforms as T
from torch import Tensor
from torch_geometric.data import Batch, Data, Dataset
from torch_geometric.datasets import GNNBenchmarkDataset, TUDataset
from torch_geometric.io import fs as pyg_fs
from torch_geometric.loader import DataLoader
from torch_geometric.utils import degree

from jei.io import RefusedFileError, torch_load_strict

from .base import SPLITS, DataSplits, GraphPreprocessing, pick_split, split_indices

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/jei")
TU_REQUIRED = ("A", "graph_indicator", "graph_labels")  # files <name>_<part>.txt PyG needs
SUPERPIXEL_NAMES = ("MNIST", "CIFAR10")


class GraphDataSplits(DataSplits):
    """Four splits of PyG graphs, each graph with ``x``, ``edge_index``, ``y`` ([1]) and
    ``random_walk_pe``; ``edge_attr`` when the dataset has edge features.

    Attributes the pipeline passes to ``GraphGPS``: ``num_node_features`` (its
    ``in_channels``), ``edge_dim`` (None without edge features) and ``pe_dim``;
    ``preprocessing`` (``GraphPreprocessing``) says how a new graph is prepared.
    """

    def __init__(
        self,
        splits: dict[str, list[Data]],
        num_classes: int,
        num_node_features: int,
        edge_dim: int | None,
        pe_dim: int,
    ) -> None:
        self.splits = splits
        self.num_classes = num_classes
        self.num_node_features = num_node_features
        self.edge_dim = edge_dim
        self.pe_dim = pe_dim
        self.preprocessing = GraphPreprocessing(num_node_features, edge_dim, pe_dim)
        self._labels = {name: torch.cat([g.y.view(-1) for g in graphs]).long() for name, graphs in splits.items()}
        self.check()

    def size(self, split: str) -> int:
        return len(pick_split(self.splits, split))

    def labels(self, split: str) -> Tensor:
        return pick_split(self._labels, split)

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, augment: bool = False
    ) -> Iterator[tuple[Batch, Tensor]]:
        """``(Batch, labels)`` pairs; the order is seeded when shuffling. Graphs have no
        augmentation here, so ``augment`` is accepted and ignored."""
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        for batch in DataLoader(pick_split(self.splits, split), batch_size=batch_size, shuffle=shuffle, generator=generator):
            yield batch, batch.y.view(-1).long()


def load_tu(
    dataset: str,
    root: str | Path,
    fractions: Sequence[float] = (0.6, 0.1, 0.1, 0.2),
    seed: int = 0,
    max_per_split: int | None = None,
    pe_dim: int = 8,
    use_node_attr: bool = False,
    cache_dir: str | Path | None = None,
) -> GraphDataSplits:
    """A TU dataset from ``<root>/<dataset>/raw/``, split train/val/cal/test by ``fractions``.

    Node features are PyG's one-hot node labels (plus the continuous node attributes when
    ``use_node_attr``); edge features are the one-hot edge labels when the dataset has them.
    A dataset without node features (IMDB-MULTI) gets ``OneHotDegree(max_degree)`` features,
    with the maximum degree taken over the whole dataset (a feature width; no labels used).
    Processing happens in ``cache_dir`` (default ``~/.cache/jei/tu``).
    """
    source = Path(root).expanduser() / dataset / "raw"
    missing = [f"{dataset}_{part}.txt" for part in TU_REQUIRED if not (source / f"{dataset}_{part}.txt").is_file()]
    if missing:
        raise FileNotFoundError(
            f"data: TU dataset {dataset!r} needs its raw files in {source}/ (missing: {', '.join(missing)}). "
            f"Put the TU collection's {dataset} text files there (https://chrsmrrs.github.io/datasets/) "
            f"or point data.root at the folder that holds {dataset}/raw/"
        )
    _check_pe_dim(pe_dim)
    pre_transform = T.AddRandomWalkPE(walk_length=pe_dim)

    def open_at(cache_root: Path) -> TUDataset:
        return TUDataset(str(cache_root), dataset, pre_transform=pre_transform, use_node_attr=use_node_attr)

    (tu,) = _open_staged(source, _cache_root(cache_dir, "tu", pe_dim), dataset, open_at, lambda root: [open_at(root)])
    features = _degree_features(tu) if tu.num_node_features == 0 else None
    parts = split_indices(len(tu), fractions, seed, max_per_split)
    splits = _graph_splits(tu, parts, tu.num_classes, pe_dim, features)
    splits.preprocessing = GraphPreprocessing(
        splits.num_node_features, splits.edge_dim, pe_dim,
        degree_features=None if features is None else features.max_degree, name=dataset,
    )
    return splits


def load_superpixels(
    dataset: str = "MNIST",
    root: str | Path = "data/superpixels",
    fractions: Sequence[float] = (0.6, 0.1, 0.1, 0.2),
    seed: int = 0,
    max_per_split: int | None = None,
    pe_dim: int = 8,
    cache_dir: str | Path | None = None,
) -> GraphDataSplits:
    """GNN-benchmark superpixel graphs (Dwivedi et al., 2020) of MNIST or CIFAR10.

    Reads ``<root>/<dataset>/raw/<dataset>_v2.pt`` (the file inside PyG's ``<dataset>_v2.zip``) and
    never downloads. The benchmark's train, val and test graphs are pooled and re-split by
    ``fractions`` with the seeded rule every dataset uses, since a calibration split is needed
    too. Node features are the superpixel intensities followed by their 2-d positions.
    Processing happens in ``cache_dir`` (default ``~/.cache/jei/superpixels``).
    """
    if dataset not in SUPERPIXEL_NAMES:
        raise ValueError(
            f"data.dataset: superpixel dataset must be one of {', '.join(SUPERPIXEL_NAMES)}, got {dataset!r}"
        )
    source = Path(root).expanduser() / dataset / "raw"
    if not (source / f"{dataset}_v2.pt").is_file():
        raise FileNotFoundError(
            f"data: superpixel dataset {dataset!r} needs {source / f'{dataset}_v2.pt'}. Unzip "
            f"{dataset}_v2.zip from the benchmarking-gnns data (https://data.pyg.org/datasets/benchmarking-gnns/"
            f"{dataset}_v2.zip) into {source}/ on a machine with internet; nothing is downloaded at run time"
        )
    _check_pe_dim(pe_dim)
    pre_transform = T.AddRandomWalkPE(walk_length=pe_dim)

    def open_at(cache_root: Path, split: str = "train") -> GNNBenchmarkDataset:
        return GNNBenchmarkDataset(str(cache_root), dataset, split=split, pre_transform=pre_transform)

    benchmark = _open_staged(
        source, _cache_root(cache_dir, "superpixels", pe_dim), dataset, open_at,
        lambda root: [open_at(root, split) for split in ("train", "val", "test")],
    )
    num_classes = max(int(part.y.max()) for part in benchmark) + 1
    pooled = torch.utils.data.ConcatDataset(benchmark)
    parts = split_indices(len(pooled), fractions, seed, max_per_split)
    splits = _graph_splits(pooled, parts, num_classes, pe_dim, _superpixel_features)
    # Node features: intensities then 2-d positions (``_superpixel_features``), as a new graph must give them.
    splits.preprocessing = GraphPreprocessing(splits.num_node_features, splits.edge_dim, pe_dim, name=f"superpixels {dataset}")
    return splits


def _check_pe_dim(pe_dim: int) -> None:
    if pe_dim < 1:
        raise ValueError(f"data.pe_dim must be >= 1 (random-walk PE length), got {pe_dim}")


def _cache_root(cache_dir: str | Path | None, family: str, pe_dim: int) -> Path:
    # One folder per pe_dim: PyG does not reprocess when only the pre-transform changes.
    base = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE.expanduser() / family
    return base / f"rwpe{pe_dim}"


# PyG's Dataset reads these with torch.load(weights_only=False) whenever they exist.
PYG_UNPICKLED_FILES = ("pre_transform.pt", "pre_filter.pt")


@contextmanager
def strict_pyg_loading() -> Iterator[None]:
    """Within the block, PyG's ``fs.torch_load`` is ``torch_load_strict`` (no unpickling fallback)."""
    original = pyg_fs.torch_load
    pyg_fs.torch_load = torch_load_strict
    try:
        yield
    finally:
        pyg_fs.torch_load = original


def _open_staged(
    source_raw: Path,
    cache_root: Path,
    name: str,
    build: Callable[[Path], Dataset],
    open_all: Callable[[Path], list[Dataset]],
) -> list[Dataset]:
    """Stage ``source_raw`` in the cache (``_stage``) and open it with ``open_all``, strictly.

    A cached file that is refused (unsafe or damaged) is reported by path and the cached copy is
    rebuilt once from the raw files.
    """
    for rebuild in (False, True):
        root = _stage(source_raw, cache_root, name, build, rebuild=rebuild)
        try:
            with strict_pyg_loading():
                for file in PYG_UNPICKLED_FILES:
                    if (root / name / "processed" / file).is_file():
                        torch_load_strict(root / name / "processed" / file)
                return open_all(root)
        except RefusedFileError as err:
            if rebuild:
                raise ValueError(
                    f"data: the cached file {err.path} {err.reason}, even after rebuilding {root / name} from "
                    f"{source_raw}; delete {root / name} and check the raw files"
                ) from None
            log.warning("data: the cached file %s %s; rebuilding %s from %s", err.path, err.reason, root / name, source_raw)
    raise AssertionError("unreachable")


def _stage(
    source_raw: Path, cache_root: Path, name: str, build: Callable[[Path], Dataset], rebuild: bool = False
) -> Path:
    """Make ``cache_root/name`` hold a copy of ``source_raw`` as ``raw/`` plus PyG's
    ``processed/``, and return ``cache_root``.

    PyG processes in a temporary sibling that is renamed into place when done, so a run never
    sees half-written files; a copy whose raw files differ in names or sizes is rebuilt, and so
    is any copy when ``rebuild``. Raw files are loaded strictly (``strict_pyg_loading``): a
    refused one is a ``ValueError`` naming the file in ``source_raw``.
    """
    final = cache_root / name
    if not rebuild and _same_files(source_raw, final / "raw") and (final / "processed").is_dir():
        return cache_root
    cache_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root))
    try:
        raw = scratch / name / "raw"
        raw.mkdir(parents=True)
        for file in source_raw.iterdir():  # copyfile, not copytree: no read-only modes carried over
            if file.is_file():
                shutil.copyfile(file, raw / file.name)
        try:
            with _one_thread(), strict_pyg_loading():
                build(scratch)
        except RefusedFileError as err:
            culprit = source_raw / err.path.name if err.path.resolve().parent == raw.resolve() else err.path
            raise ValueError(
                f"data: {culprit} {err.reason}. Replace it with the dataset's original file "
                f"(see data.root and the dataset's documentation)"
            ) from None
        if final.exists() and (rebuild or not _same_files(source_raw, final / "raw")):
            shutil.rmtree(final)  # stale or refused copy
        try:
            os.replace(scratch / name, final)
        except OSError:
            if not final.is_dir():  # another run finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return cache_root


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded: PE pre-processing is thousands of tiny per-graph matmuls,
    where thread hand-off dominates (ENZYMES on 2 cores: 25 ms per graph with 2 threads,
    1.2 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _same_files(a: Path, b: Path) -> bool:
    def listing(folder: Path) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}

    return bool(listing(a)) and listing(a) == listing(b)


def _degree_features(dataset: Dataset) -> Callable[[Data], Data]:
    max_degree = max(
        (int(degree(g.edge_index[0], g.num_nodes).max()) for g in dataset if g.num_nodes and g.num_edges),
        default=0,
    )
    return T.OneHotDegree(max_degree)


def _superpixel_features(data: Data) -> Data:
    """Intensities and positions as node features; edge weights as [num_edges, 1] features."""
    data = data.clone()
    data.x = torch.cat([data.x.view(data.num_nodes, -1), data.pos], dim=-1)
    if data.edge_attr is not None:
        data.edge_attr = data.edge_attr.view(data.num_edges, -1)
    return data


def _graph_splits(
    dataset: Sequence[Data],
    parts: list[Tensor],
    num_classes: int,
    pe_dim: int,
    features: Callable[[Data], Data] | None = None,
) -> GraphDataSplits:
    """Materialise each split's graphs once (applying ``features``), and read feature widths."""

    def graph(i: int) -> Data:
        return dataset[i] if features is None else features(dataset[i])

    splits = {split: [graph(int(i)) for i in index] for split, index in zip(SPLITS, parts)}
    sample = graph(0)
    edge_dim = sample.edge_attr.shape[-1] if sample.edge_attr is not None else None
    return GraphDataSplits(splits, num_classes, sample.num_node_features, edge_dim, pe_dim)
