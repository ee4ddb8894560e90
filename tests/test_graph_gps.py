"""GraphGPS adapter: shapes, exits, freezing, graph-level compaction, weights, training."""

from __future__ import annotations

import pytest

pytest.importorskip("torch_geometric")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch_geometric.data import Batch, Data  # noqa: E402

from jei.backbones.graph_gps import GraphGPS, GraphState  # noqa: E402
from jei.registry import BACKBONES  # noqa: E402

TU_ROOT = "/work/shared/data/TUDataset"
SMALL = {"num_classes": 3, "in_channels": 5, "hidden": 16, "layers": 3, "heads": 2, "pe_dim": 4}


def random_graphs(
    sizes: list[int], seed: int, in_channels: int = 5, pe_dim: int = 4, edge_dim: int | None = None
) -> Batch:
    """A batch of random undirected graphs with the given node counts (0 allowed)."""
    gen = torch.Generator().manual_seed(seed)
    graphs = []
    for n in sizes:
        pairs = torch.randint(0, max(n, 1), (2, 2 * n), generator=gen) if n else torch.zeros(2, 0, dtype=torch.long)
        edge_index = torch.cat([pairs, pairs.flip(0)], dim=1)
        graph = Data(
            x=torch.randn(n, in_channels, generator=gen),
            edge_index=edge_index,
            random_walk_pe=torch.rand(n, pe_dim, generator=gen),
            num_nodes=n,
        )
        if edge_dim is not None:
            graph.edge_attr = torch.randn(edge_index.shape[1], edge_dim, generator=gen)
        graphs.append(graph)
    return Batch.from_data_list(graphs)


def build(seed: int = 0, **overrides: object) -> GraphGPS:
    torch.manual_seed(seed)
    return GraphGPS(**{**SMALL, **overrides}).freeze()


def test_exits_default_to_every_layer_but_the_last() -> None:
    model = build(layers=4)
    assert [(s.index, s.name, s.kind, s.channels) for s in model.exit_specs] == [
        (0, "layers.0", "vector", 16),
        (1, "layers.1", "vector", 16),
        (2, "layers.2", "vector", 16),
    ]
    assert [s.name for s in build(layers=4, exits=[2]).exit_specs] == ["layers.1"]


@pytest.mark.parametrize("edge_dim", [None, 3])
def test_shapes_and_head_agree_with_forward(edge_dim: int | None) -> None:
    model = build(edge_dim=edge_dim)
    batch = random_graphs([4, 1, 6, 3], seed=1, edge_dim=edge_dim)
    out = model.forward_exits(batch)
    assert model.batch_size(batch) == 4
    assert [tuple(f.shape) for f in out.features] == [(4, 16), (4, 16)]
    assert out.logits.shape == (4, 3) and torch.isfinite(out.logits).all()
    torch.testing.assert_close(model(batch), out.logits)
    # The exit representation is the mean of each graph's node states.
    state = model.run_segment(0, model.begin(batch))
    torch.testing.assert_close(out.features[0][1], state.x[state.batch == 1].mean(0))


def test_rows_do_not_depend_on_the_other_graphs_of_the_batch() -> None:
    model = build(edge_dim=2)
    batch = random_graphs([5, 2, 7], seed=3, edge_dim=2)
    together = model.forward_exits(batch).logits
    alone = torch.cat([model.forward_exits(Batch.from_data_list([g])).logits for g in batch.to_data_list()])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_frozen_stays_in_eval_mode_without_gradients() -> None:
    model = build()
    nn.ModuleDict({"backbone": model}).train()
    assert model.frozen and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    batch = random_graphs([3, 4], seed=0)
    torch.testing.assert_close(model(batch), model(batch))  # no dropout, fixed BatchNorm statistics


@settings(deadline=None, max_examples=25)
@given(data=st.data())
def test_compaction_gives_the_rows_of_the_full_pass(data: st.DataObject) -> None:
    """Drop graphs (any subset, any order) at any segment boundaries; kept rows never change."""
    edge_dim = data.draw(st.sampled_from([None, 2]), label="edge_dim")
    sizes = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=6), label="sizes")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    model = build(seed=seed % 1000, edge_dim=edge_dim)
    batch = random_graphs(sizes, seed, edge_dim=edge_dim)
    full = model.forward_exits(batch)

    alive = torch.arange(len(sizes))
    with torch.no_grad():
        state = model.begin(batch)
        for index in range(model.num_gates + 1):
            order = data.draw(st.permutations(range(len(alive))), label=f"order{index}")
            count = data.draw(st.integers(0, len(alive)), label=f"count{index}")
            keep = torch.tensor(order[:count], dtype=torch.long)
            state, alive = model.select(state, keep), alive[keep]
            assert model.batch_size(state) == len(alive)
            state = model.run_segment(index, state)
            expected = full.logits if index == model.num_gates else full.features[index]
            got = state if index == model.num_gates else model.represent(index, state)
            assert got.shape == (len(alive), expected.shape[1])
            torch.testing.assert_close(got, expected[alive], atol=1e-5, rtol=1e-5)


def test_select_reindexes_nodes_edges_and_batch() -> None:
    model = build(edge_dim=1)
    batch = random_graphs([2, 3, 1], seed=4, edge_dim=1)
    state = model.begin(batch)
    same = model.select(state, torch.arange(3))
    for name in ("x", "edge_index", "edge_attr", "batch"):
        assert torch.equal(getattr(same, name), getattr(state, name))

    picked = model.select(state, torch.tensor([2, 0]))
    assert picked.num_graphs == 2
    assert picked.batch.tolist() == [0, 1, 1]  # graph 2 (1 node), then graph 0 (2 nodes)
    assert torch.equal(picked.x, state.x[[5, 0, 1]])
    graph0_edges = state.edge_index[:, state.batch[state.edge_index[0]] == 0]
    graph2_edges = state.edge_index[:, state.batch[state.edge_index[0]] == 2]
    assert torch.equal(picked.edge_index, torch.cat([graph2_edges - 5, graph0_edges + 1], dim=1))


def test_unsorted_edges_are_grouped_by_graph() -> None:
    batch = random_graphs([3, 4], seed=5, edge_dim=2)
    order = torch.randperm(batch.num_edges, generator=torch.Generator().manual_seed(0))
    shuffled = batch.clone()
    shuffled.edge_index, shuffled.edge_attr = batch.edge_index[:, order], batch.edge_attr[order]
    model = build(edge_dim=2)
    state = model.begin(shuffled)
    edge_graph = state.batch[state.edge_index[0]]
    assert bool((edge_graph[1:] >= edge_graph[:-1]).all())
    keep = torch.tensor([1])
    torch.testing.assert_close(_finish(model, model.select(state, keep)), model(batch)[keep], atol=1e-5, rtol=1e-5)


def _finish(model: GraphGPS, state: GraphState) -> torch.Tensor:
    for index in range(model.num_gates + 1):
        state = model.run_segment(index, state)
    return state


def test_inputs_that_do_not_match_the_configuration_are_refused() -> None:
    model = build(edge_dim=2)
    with pytest.raises(ValueError, match=r"backbone.edge_dim\) should have width 2, found none"):
        model.begin(random_graphs([3], seed=0))
    with pytest.raises(ValueError, match=r"backbone.pe_dim\) should have width 4, found width 8"):
        model.begin(random_graphs([3], seed=0, pe_dim=8, edge_dim=2))
    with pytest.raises(ValueError, match=r"backbone.in_channels\) should have width 5, found width 7"):
        model.begin(random_graphs([3], seed=0, in_channels=7, edge_dim=2))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"in_channels": None}, "backbone.in_channels is null"),
        ({"hidden": 10, "heads": 4}, "backbone.hidden"),
        ({"layers": 1}, "backbone.layers"),
        ({"exits": [3]}, "backbone.exits"),
        ({"exits": [2, 1]}, "backbone.exits"),
        ({"edge_dim": 0}, "backbone.edge_dim"),
        ({"pe_dim": 0}, "backbone.pe_dim"),
    ],
)
def test_bad_configuration_names_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GraphGPS(**{**SMALL, **overrides})


def test_weights_load_strictly_from_a_local_file(tmp_path) -> None:
    trained = build(seed=1, edge_dim=2)
    path = tmp_path / "gps.pt"
    torch.save(trained.state_dict(), path)
    loaded = BACKBONES.build("graph_gps", **SMALL, edge_dim=2, weights=str(path)).freeze()
    batch = random_graphs([3, 5], seed=2, edge_dim=2)
    torch.testing.assert_close(loaded(batch), trained(batch))
    with pytest.raises(FileNotFoundError, match="local weights file"):
        GraphGPS(**SMALL, weights=str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match="does not match"):
        GraphGPS(**{**SMALL, "hidden": 8}, edge_dim=2, weights=str(path))


def test_backbone_stage_training_on_mutag_lowers_the_loss(tmp_path) -> None:
    """What the pipeline does before freezing: cross-entropy on batches('train') via forward."""
    from jei.data.graphs import load_tu

    data = load_tu("MUTAG", TU_ROOT, max_per_split=32, pe_dim=4, cache_dir=tmp_path)
    torch.manual_seed(0)
    model = BACKBONES.build(
        "graph_gps",
        num_classes=data.num_classes,
        in_channels=data.num_node_features,
        edge_dim=data.edge_dim,
        pe_dim=data.pe_dim,
        hidden=16,
        layers=2,
        heads=2,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for epoch in range(8):
        for inputs, labels in data.batches("train", 16, shuffle=True, seed=epoch):
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-4:]) < sum(losses[:4])

    model.freeze()
    inputs, _ = next(data.batches("test", 8))
    out = model.forward_exits(inputs)
    assert len(out.features) == 1 and out.features[0].shape == (8, 16)
    torch.testing.assert_close(out.logits, model(inputs))
