"""Split containers, the seeded split rule shared by every dataset, and the description of a
dataset's preprocessing (``ImagePreprocessing``, ``GraphPreprocessing``) that a run saves so
new inputs can be prepared exactly as its training data was (``jei.predict``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

SPLITS = ("train", "val", "cal", "test")

T = TypeVar("T")


class DataSplits(ABC):
    """Four disjoint splits of one dataset: train (fit), val (model selection), cal
    (conformal calibration, never trained on or augmented) and test.

    ``batches`` yields ``(inputs, labels)`` where ``inputs`` is what the backbone's ``begin``
    accepts (a tensor for images, a PyG ``Batch`` for graphs).
    """

    num_classes: int
    # How a raw input becomes what ``batches`` yields (``ImagePreprocessing`` or
    # ``GraphPreprocessing``); None when the dataset does not say, and then a trained run can
    # only predict on inputs prepared by the caller (``jei.predict.Predictor.predict_prepared``).
    preprocessing: ImagePreprocessing | GraphPreprocessing | None = None

    @abstractmethod
    def size(self, split: str) -> int: ...

    @abstractmethod
    def labels(self, split: str) -> Tensor: ...

    @abstractmethod
    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, augment: bool = False
    ) -> Iterator[tuple[Any, Tensor]]: ...

    def check(self) -> None:
        for split in SPLITS:
            if self.size(split) == 0:
                raise ValueError(
                    f"data: the {split!r} split is empty; increase the dataset size, the split "
                    f"fractions or data.max_per_split"
                )


@dataclass
class TensorSplit:
    inputs: Tensor
    labels: Tensor


class TensorDataSplits(DataSplits):
    """Splits held in memory as tensors (images already normalised, by ``preprocessing`` when given)."""

    def __init__(
        self,
        splits: dict[str, TensorSplit],
        num_classes: int,
        augment_fn: Any = None,
        preprocessing: ImagePreprocessing | None = None,
    ) -> None:
        self.splits = splits
        self.num_classes = num_classes
        self.augment_fn = augment_fn
        self.preprocessing = preprocessing
        self.check()
        # Channels of an image (axis 1), so backbones can be sized from the data.
        self.in_channels = int(splits["train"].inputs.shape[1]) if splits["train"].inputs.dim() > 1 else None

    def size(self, split: str) -> int:
        return len(pick_split(self.splits, split).labels)

    def labels(self, split: str) -> Tensor:
        return pick_split(self.splits, split).labels

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, augment: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        data = pick_split(self.splits, split)
        n = len(data.labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            inputs = data.inputs[index]
            if augment and self.augment_fn is not None:
                inputs = self.augment_fn(inputs)
            yield inputs, data.labels[index]


def pick_split(per_split: Mapping[str, T], split: str) -> T:
    """``per_split[split]``, or an error naming the splits when ``split`` is not one of them."""
    if split not in per_split:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return per_split[split]


def split_indices(
    n: int, fractions: Sequence[float], seed: int, max_per_split: int | None = None
) -> list[Tensor]:
    """Seeded random disjoint index sets with the given fractions (which must sum to <= 1).

    ``max_per_split`` caps each split for quick runs.
    """
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"data.fractions must be non-negative and sum to at most 1, got {list(fractions)}")
    if max_per_split is not None and max_per_split < 1:
        raise ValueError(f"data.max_per_split must be >= 1 or null, got {max_per_split}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for fraction in fractions:
        count = int(round(fraction * n))
        part = order[start : start + count]
        start += count
        out.append(part[:max_per_split] if max_per_split is not None else part)
    return out


# --- preprocessing, as saved with a run --------------------------------------------------------


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a raw image becomes the network's input: what a run saves (``run.json``) so that
    ``jei.predict`` prepares new images exactly as the training data was prepared.

    A *raw* image holds values in ``[0, max_value]`` in the dataset's own units: 8-bit pixels
    (``max_value`` 255) for CIFAR, SVHN and ImageNet; scikit-learn's digits store counts 0..16
    (``max_value`` 16). The network's input is float32 ``(raw / max_value - mean[c]) / std[c]``
    per channel c (``normalize``; the dataset loaders call the same function, so both give the
    same bits). ``integer_levels``: the raw values are the integers 0..max_value.

    Image files (``from_8bit``): an 8-bit pixel p in 0..255 stands for the fraction p / 255 of
    the full range, i.e. the raw value p * max_value / 255, rounded to the nearest integer level
    when ``integer_levels``. For 8-bit data that is p itself. For digits it is round(p * 16 / 255):
    ``to_8bit`` writes a digits value v as round(v * 255 / 16), and reading it back gives v
    exactly (a lossless round trip for PNG), while any other grey level maps to the nearest of
    the 17 levels the network was trained on.

    ``resize``: None means an image must already be ``height`` x ``width``; an int means the
    shorter side is resized (bicubic) to it, then the centre ``height`` x ``width`` is cropped,
    as the ImageNet loader does. ``channels`` is 1 (grey) or 3 (RGB); ``class_names`` name the
    labels 0..K-1 when the dataset knows them.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_value: float = 255.0
    integer_levels: bool = True
    resize: int | None = None
    class_names: tuple[str, ...] | None = None
    name: str = ""  # the dataset, for messages
    kind: str = "image"

    def __post_init__(self) -> None:
        if self.channels < 1 or self.height < 1 or self.width < 1:
            raise ValueError(f"image preprocessing: bad shape {self.channels}x{self.height}x{self.width}")
        if len(self.mean) not in (1, self.channels) or len(self.std) != len(self.mean):
            raise ValueError(f"image preprocessing: need 1 or {self.channels} mean/std values, got {self.mean}, {self.std}")
        if not self.max_value > 0:
            raise ValueError(f"image preprocessing: max_value must be > 0, got {self.max_value}")

    def normalize(self, raw: Tensor) -> Tensor:
        """Raw values ``[..., C, H, W]`` in ``[0, max_value]`` -> the network's float32 input."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        out = raw.to(torch.float32, copy=True)  # one copy, then in place (large image sets)
        return out.div_(self.max_value).sub_(mean.to(out.device)).div_(std.to(out.device))

    def from_8bit(self, pixels: Tensor) -> Tensor:
        """8-bit pixels (0..255, any shape) -> raw values in ``[0, max_value]`` (float32)."""
        if self.max_value == 255:
            return pixels.float()
        values = pixels.double() * (self.max_value / 255.0)
        return (values.round() if self.integer_levels else values).float()

    def to_8bit(self, raw: Tensor) -> Tensor:
        """Raw values -> 8-bit pixels (uint8) that ``from_8bit`` reads back (exactly, for integer levels)."""
        return (raw.double() * (255.0 / self.max_value)).round().clamp(0, 255).to(torch.uint8)

    def format(self) -> str:
        """What an input image must look like, in words (for error messages and ``jei-predict``)."""
        colours = {1: "grayscale (1-channel)", 3: "RGB (3-channel)"}
        colour = colours.get(self.channels, f"{self.channels}-channel")
        size = (
            f"any size (shorter side resized to {self.resize}, centre {self.width}x{self.height} crop)"
            if self.resize is not None else f"{self.width}x{self.height} pixels"
        )
        text = f"8-bit {colour} PNG/JPEG images of {size}"
        if self.max_value != 255:
            levels = f"round(p * {self.max_value:g} / 255)" if self.integer_levels else f"p * {self.max_value:g} / 255"
            text += f"; pixel p in 0..255 stands for the {self.name or 'data'} value {levels} in 0..{self.max_value:g}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ImagePreprocessing:
        values = dict(values)
        for key in ("mean", "std"):
            values[key] = tuple(float(v) for v in values[key])
        if values.get("class_names") is not None:
            values["class_names"] = tuple(str(v) for v in values["class_names"])
        return cls(**values)


@dataclass(frozen=True)
class GraphPreprocessing:
    """How a raw graph becomes the network's input (a PyG ``Data`` as in the dataset).

    Node features ``x`` are ``num_node_features`` wide, in the dataset's encoding (TU datasets:
    PyG's one-hot node labels, then the continuous attributes when used; superpixels: intensity
    then position), unless ``degree_features`` is set: then the dataset has none, and ``x`` is
    the one-hot node degree up to that maximum (``OneHotDegree``), computed from the edges.
    ``edge_dim`` is the edge-feature width (None: no edge features). Every graph gets the
    random-walk positional encoding ``random_walk_pe`` of length ``pe_dim`` (``AddRandomWalkPE``).
    """

    num_node_features: int
    edge_dim: int | None
    pe_dim: int
    degree_features: int | None = None
    class_names: tuple[str, ...] | None = None
    name: str = ""
    kind: str = "graph"

    def apply(self, graph: Any) -> Any:
        """A raw ``Data`` (``edge_index``; ``x`` unless ``degree_features``; ``edge_attr`` when
        ``edge_dim``) -> the network's input, with the same transforms as the dataset."""
        import torch_geometric.transforms as T

        graph = graph.clone()
        if self.degree_features is not None:
            if getattr(graph, "x", None) is not None:
                raise ValueError(
                    f"{self.name or 'this dataset'} has no node features (x is the one-hot degree, computed from "
                    f"the edges): give graphs without x"
                )
            degree = int(torch.bincount(graph.edge_index[0], minlength=graph.num_nodes).max()) if graph.num_edges else 0
            if degree > self.degree_features:
                raise ValueError(
                    f"a node has degree {degree}, above the training data's maximum {self.degree_features} "
                    f"(the width of the one-hot degree features)"
                )
            graph = T.OneHotDegree(self.degree_features)(graph)
        x = getattr(graph, "x", None)
        if x is None or x.dim() != 2 or x.shape[1] != self.num_node_features:
            got = "none" if x is None else "x" + "x".join(map(str, x.shape))
            raise ValueError(f"node features: expected x of shape [num_nodes, {self.num_node_features}], got {got}")
        edge_attr = getattr(graph, "edge_attr", None)
        if self.edge_dim is None and edge_attr is not None:
            graph.edge_attr = None
        elif self.edge_dim is not None:
            if edge_attr is None or edge_attr.view(graph.num_edges, -1).shape[1] != self.edge_dim:
                got = "none" if edge_attr is None else str(list(edge_attr.shape))
                raise ValueError(f"edge features: expected edge_attr of shape [num_edges, {self.edge_dim}], got {got}")
            graph.edge_attr = edge_attr.view(graph.num_edges, -1).float()
        graph.x = graph.x.float()
        return T.AddRandomWalkPE(walk_length=self.pe_dim)(graph)

    def format(self) -> str:
        features = (
            f"no node features (one-hot degree up to {self.degree_features} is computed)"
            if self.degree_features is not None else f"x: [num_nodes, {self.num_node_features}] node features"
        )
        edges = f"edge_attr: [num_edges, {self.edge_dim}]" if self.edge_dim is not None else "no edge features"
        return f"graphs with edge_index [2, num_edges], {features}, {edges}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GraphPreprocessing:
        values = dict(values)
        if values.get("class_names") is not None:
            values["class_names"] = tuple(str(v) for v in values["class_names"])
        return cls(**values)


def preprocessing_from_dict(values: Mapping[str, Any] | None) -> ImagePreprocessing | GraphPreprocessing | None:
    """The preprocessing a run saved (``to_dict``), or None."""
    if values is None:
        return None
    kinds = {"image": ImagePreprocessing, "graph": GraphPreprocessing}
    kind = values.get("kind")
    if kind not in kinds:
        raise ValueError(f"unknown preprocessing kind {kind!r}; expected one of {', '.join(kinds)}")
    return kinds[kind].from_dict(values)

