"""trainer.channels_last (jei.memory_format): the backbone's maps in NHWC, kept NHWC through real
early exit's compaction, keyed apart in both caches, and the same predictions as NCHW up to
rounding."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jei.backbone_cache import backbone_key
from jei.features import cache_key, compute_split
from jei.memory_format import is_channels_last, select_rows, to_channels_last, uses_channels_last
from jei.model import predict_from_outputs
from jei.policies import ConfidenceThreshold, confidence
from jei.train import BackboneTraining

from .helpers import tiny_network
from .test_cache_integrity import toy_data

CPU = torch.device("cpu")


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.data())
def test_select_rows_gathers_the_rows_and_keeps_the_layout(batch, channels, height, width, data):
    maps = torch.randn(batch, channels, height, width)
    keep = torch.tensor(data.draw(st.lists(st.integers(0, batch - 1), min_size=1, max_size=8)))
    for layout in (torch.contiguous_format, torch.channels_last):
        state = maps.contiguous(memory_format=layout)
        rows = select_rows(state, keep)
        assert torch.equal(rows, maps[keep])
        # Channels-last input stays channels-last (a 1x1 map or one channel is both layouts).
        assert rows.is_contiguous(memory_format=layout)


def test_one_by_one_kernels_and_one_channel_inputs_count_as_channels_last_once_converted():
    """``is_contiguous`` calls such weights contiguous in both layouts, yet the convolution's output
    layout (and its values, in the last bits) follows their strides."""
    for conv in (torch.nn.Conv2d(4, 8, 1), torch.nn.Conv2d(1, 8, 3)):
        module = torch.nn.Sequential(conv)
        assert not uses_channels_last(module)
        to_channels_last(module)
        assert uses_channels_last(module) and is_channels_last(module(torch.randn(2, conv.in_channels, 5, 5)))


def test_the_backbone_selects_rows_with_select_rows():
    network = tiny_network(0)
    maps = torch.randn(5, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    keep = torch.tensor([3, 1])
    rows = network.backbone.select(maps, keep)
    assert torch.equal(rows, maps[keep]) and is_channels_last(rows)
    vectors = torch.arange(12.0).view(6, 2)
    assert torch.equal(network.backbone.select(vectors, keep), vectors[keep])


def test_channels_last_early_exit_stays_channels_last_and_matches_its_own_all_exits_pass():
    plain = tiny_network(3)
    network = copy.deepcopy(plain)
    to_channels_last(network.backbone)
    assert uses_channels_last(network.backbone) and not uses_channels_last(plain.backbone)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # thresholds at each exit's median confidence: samples leave at every exit
        medians = confidence(plain(x).logits[:-1], "max_prob").median(dim=-1).values
    policy = network.policy = ConfidenceThreshold("max_prob", medians.tolist())
    layouts = []
    run_segment = network.backbone.run_segment

    def recorded(index, state):
        if index > 0:  # segment 0 sees the input as given
            layouts.append(is_channels_last(state))
        return run_segment(index, state)

    network.backbone.run_segment = recorded
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = network.early_exit(x)
    assert layouts and all(layouts)  # every segment after the first ran on NHWC maps, compacted or not
    assert len(set(result.exit_index.tolist())) == network.num_gates + 1  # samples left at every exit
    with torch.no_grad():
        expected = predict_from_outputs(network(x), policy)
        reference = predict_from_outputs(plain(x), policy)
    assert torch.equal(result.exit_index, expected.exit_index)
    torch.testing.assert_close(result.logits, expected.logits, atol=1e-5, rtol=1e-5)
    # NCHW computes the same function up to rounding.
    torch.testing.assert_close(expected.logits, reference.logits, atol=1e-4, rtol=1e-4)


def test_both_caches_key_channels_last_apart_and_nchw_keys_are_unchanged():
    data = toy_data()
    plain = tiny_network(0)
    before = cache_key(plain, data, "val", "")
    network = copy.deepcopy(plain)
    to_channels_last(network.backbone)
    assert cache_key(plain, data, "val", "") == before
    assert cache_key(network, data, "val", "") != before
    training = BackboneTraining(epochs=1, batch_size=8)

    def key(backbone):
        torch.manual_seed(0)
        return backbone_key(backbone, data, training, 0, CPU, "toy", {"name": "small_cnn"})

    assert key(network.backbone) != key(plain.backbone)
    features = compute_split(network, data, "val", 8, CPU)
    reference = compute_split(plain, data, "val", 8, CPU)
    for a, b in zip([*features.pooled, features.final_logits], [*reference.pooled, reference.final_logits]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
