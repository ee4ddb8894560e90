"""A GPS graph transformer (Rampasek et al., NeurIPS 2022) on PyTorch Geometric, with exits.

Only this module (reached lazily through the registry) imports torch_geometric, so the core
package works without the ``graph`` extra.

Inputs are PyG ``Batch`` objects whose graphs carry random-walk positional encodings in the
node attribute ``random_walk_pe`` ([num_nodes, pe_dim]), precomputed by the dataset's
``pre_transform=AddRandomWalkPE(walk_length=pe_dim)`` (``jei.data.graphs`` does this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch
from torch_geometric.nn import GINConv, GINEConv, GPSConv, global_mean_pool

from jei.types import ExitSpec

from .base import ExitChoice, SequentialBackbone, resolve_exits
from .weights import load_weights

PE_ATTR = "random_walk_pe"  # AddRandomWalkPE's default attribute name


@dataclass
class GraphState:
    """Node states of a batch of graphs between segments.

    Invariants (kept by ``GraphGPS.begin`` and ``GraphGPS.select``): ``batch`` is sorted, and
    edges are grouped by graph in graph order, as in a collated PyG ``Batch``.
    """

    x: Tensor  # [num_nodes, in_channels + pe_dim] before segment 0, then [num_nodes, hidden]
    edge_index: Tensor  # [2, num_edges]
    edge_attr: Tensor | None  # [num_edges, edge_dim]
    batch: Tensor  # [num_nodes], graph of each node
    num_graphs: int


class GraphGPS(SequentialBackbone):
    """GPS layers (local GIN/GINE message passing + global multi-head attention) with exits.

    Node encoder: one Linear over [node features, random-walk PE], i.e. Linear(features) +
    Linear(PE) summed; it runs in segment 0 so cost counting sees it. Exit i sits after
    the i-th chosen layer and sees the global mean pool of the node states ([num_graphs, hidden],
    kind "vector"). The backbone's own head: global mean pool + MLP after the last layer.

    Every segment is per-graph independent in eval mode (attention runs within each graph,
    BatchNorm uses fixed statistics), so dropping graphs with ``select`` between segments
    gives the same rows as the full pass.

    Args:
        num_classes: classes of the head.
        in_channels: node feature size; ``backbone.in_channels: null`` in the config is filled
            by the pipeline from the dataset's ``num_node_features``.
        hidden: node state size (divisible by ``heads``).
        layers: number of GPS layers.
        heads: attention heads.
        pe_dim: random-walk PE length (must match the dataset's ``pe_dim``).
        edge_dim: edge feature size (the dataset's ``edge_dim``); None uses GIN without edge
            features, an int uses GINE.
        exits: ``"all"`` (default: after every layer but the last), ``{"every": k}`` or positions
            k in 1..layers-1 (k: after GPS layer k, counted from 1); see ``resolve_exits``.
        dropout: dropout inside the layers (training the backbone only; frozen means eval).
        weights: optional local weights file to load strictly.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int | None,
        hidden: int = 64,
        layers: int = 4,
        heads: int = 4,
        pe_dim: int = 8,
        edge_dim: int | None = None,
        exits: ExitChoice = "all",
        dropout: float = 0.0,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(in_channels, hidden, layers, heads, pe_dim, edge_dim, dropout)
        positions = resolve_exits(exits, layers, unit="GPS layer")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.pe_dim = pe_dim
        self.edge_dim = edge_dim
        self.encoder = nn.Linear(in_channels + pe_dim, hidden)
        attention = {"dropout": dropout}
        self.layers = nn.ModuleList(
            GPSConv(hidden, _local_conv(hidden, edge_dim), heads=heads, dropout=dropout, attn_kwargs=attention)
            for _ in range(layers)
        )
        self.head = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )
        self.exit_specs = tuple(
            ExitSpec(i, f"layers.{position - 1}", "vector", hidden) for i, position in enumerate(positions)
        )
        self.set_segments(self.layers, positions)
        if weights is not None:
            load_weights(self, weights)

    def begin(self, inputs: Batch) -> GraphState:
        _check_width(inputs.x, self.in_channels, "node features (backbone.in_channels)",
                     "set it to the dataset's num_node_features (null lets the pipeline fill it)")
        pe = getattr(inputs, PE_ATTR, None)
        _check_width(pe, self.pe_dim, f"random-walk PE '{PE_ATTR}' (backbone.pe_dim)",
                     "build the data with the same pe_dim (jei.data.graphs adds it)")
        edge_attr = None
        if self.edge_dim is not None:
            edge_attr = inputs.edge_attr
            _check_width(edge_attr, self.edge_dim, "edge features (backbone.edge_dim)",
                         "set it to the dataset's edge_dim (null when it has none)")
        x = torch.cat([inputs.x.float(), pe.float()], dim=-1)
        state = GraphState(
            x, inputs.edge_index, None if edge_attr is None else edge_attr.float(), inputs.batch, inputs.num_graphs
        )
        return _group_edges_by_graph(state)

    def stem(self, state: GraphState) -> GraphState:
        return GraphState(self.encoder(state.x), state.edge_index, state.edge_attr, state.batch, state.num_graphs)

    def run_block(self, layer: nn.Module, state: GraphState) -> GraphState:
        if state.x.shape[0] == 0:  # GPSConv cannot run on a batch without nodes
            return state
        extra = {} if state.edge_attr is None else {"edge_attr": state.edge_attr}
        x = layer(state.x, state.edge_index, state.batch, **extra)
        return GraphState(x, state.edge_index, state.edge_attr, state.batch, state.num_graphs)

    def finish(self, state: GraphState) -> Tensor:
        return self.head(self.represent(self.num_gates, state))

    def represent(self, index: int, state: GraphState) -> Tensor:
        return global_mean_pool(state.x, state.batch, size=state.num_graphs)

    def select(self, state: GraphState, keep: Tensor) -> GraphState:
        """Graph-level compaction: the graphs at positions ``keep``, in that order, with nodes,
        edges and the batch vector re-indexed so later segments compute only on them."""
        keep = keep.to(device=state.batch.device, dtype=torch.long)
        node_counts = torch.bincount(state.batch, minlength=state.num_graphs)
        edge_counts = torch.bincount(state.batch[state.edge_index[0]], minlength=state.num_graphs)
        node_start, edge_start = _starts(node_counts), _starts(edge_counts)
        kept_nodes, kept_edges = node_counts[keep], edge_counts[keep]
        nodes = _concat_ranges(node_start[keep], kept_nodes)
        edges = _concat_ranges(edge_start[keep], kept_edges)
        # Each kept graph's nodes move from node_start[g] to their new start.
        shift = torch.repeat_interleave(_starts(kept_nodes) - node_start[keep], kept_edges, output_size=len(edges))
        new_graph = torch.arange(len(keep), device=keep.device)
        return GraphState(
            x=state.x[nodes],
            edge_index=state.edge_index[:, edges] + shift,
            edge_attr=None if state.edge_attr is None else state.edge_attr[edges],
            batch=torch.repeat_interleave(new_graph, kept_nodes, output_size=len(nodes)),
            num_graphs=len(keep),
        )

    def batch_size(self, inputs: Batch | GraphState) -> int:
        return inputs.num_graphs


def _check_sizes(
    in_channels: int | None, hidden: int, layers: int, heads: int, pe_dim: int, edge_dim: int | None, dropout: float
) -> None:
    if in_channels is None:
        raise ValueError(
            "backbone.in_channels is null: the pipeline fills it from the dataset's num_node_features; "
            "pass it explicitly when building GraphGPS by hand"
        )
    for field, value in (("in_channels", in_channels), ("hidden", hidden), ("heads", heads), ("pe_dim", pe_dim)):
        if value < 1:
            raise ValueError(f"backbone.{field} must be >= 1, got {value}")
    if layers < 2:
        raise ValueError(f"backbone.layers must be >= 2 (exits sit between layers), got {layers}")
    if hidden % heads:
        raise ValueError(f"backbone.hidden ({hidden}) must be divisible by backbone.heads ({heads})")
    if edge_dim is not None and edge_dim < 1:
        raise ValueError(f"backbone.edge_dim must be >= 1 or null (no edge features), got {edge_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"backbone.dropout must be in [0, 1), got {dropout}")


def _check_width(value: Tensor | None, expected: int, what: str, fix: str) -> None:
    if value is None or value.shape[-1] != expected:
        found = "none" if value is None else f"width {value.shape[-1]}"
        raise ValueError(f"graph batch: {what} should have width {expected}, found {found}; {fix}")


def _local_conv(hidden: int, edge_dim: int | None) -> nn.Module:
    mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
    return GINConv(mlp) if edge_dim is None else GINEConv(mlp, edge_dim=edge_dim)


def _starts(counts: Tensor) -> Tensor:
    """Offset of each run in a concatenation of runs of the given lengths."""
    return torch.cumsum(counts, 0) - counts


def _concat_ranges(starts: Tensor, counts: Tensor) -> Tensor:
    """cat(arange(s, s + c) for s, c in zip(starts, counts)), without a Python loop."""
    total = int(counts.sum())
    offsets = torch.repeat_interleave(starts - _starts(counts), counts, output_size=total)
    return torch.arange(total, device=counts.device) + offsets


def _group_edges_by_graph(state: GraphState) -> GraphState:
    """Sort edges by graph (stable) unless they already are, as ``select`` expects."""
    edge_graph = state.batch[state.edge_index[0]]
    if edge_graph.numel() < 2 or bool((edge_graph[1:] >= edge_graph[:-1]).all()):
        return state
    order = torch.argsort(edge_graph, stable=True)
    edge_attr = None if state.edge_attr is None else state.edge_attr[order]
    return GraphState(state.x, state.edge_index[:, order], edge_attr, state.batch, state.num_graphs)
