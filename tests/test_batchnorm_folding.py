"""trainer.fold_batchnorm (jei.batchnorm_folding): a frozen backbone's (Conv2d, BatchNorm2d) pairs
folded into one convolution compute the same function up to rounding, only where the fold is
exact, with the same exit costs, keyed apart in the feature cache."""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from jei.backbones.base import SequentialBackbone
from jei.batchnorm_folding import fold_batchnorm, fold_frozen_batchnorm
from jei.cost import measure_exit_costs
from jei.errors import ConfigError
from jei.features import cache_key
from jei.memory_format import to_channels_last, uses_channels_last
from jei.model import predict_from_outputs
from jei.policies import ConfidenceThreshold, confidence
from jei.registry import BACKBONES
from jei.types import ExitSpec

from .helpers import tiny_network, with_heads
from .test_cache_integrity import toy_data

CPU = torch.device("cpu")


def randomise_statistics(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None:
            width = norm.num_features
            norm.running_mean.copy_(torch.randn(width, generator=generator))
            norm.running_var.copy_(torch.rand(width, generator=generator) * 3 + 0.1)
            if norm.affine:
                norm.weight.data.copy_(torch.randn(width, generator=generator))
                norm.bias.data.copy_(torch.randn(width, generator=generator))
    return module.eval()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 3), st.sampled_from([1, 2]), st.booleans(),
       st.booleans(), st.integers(0, 2**16))
def test_a_folded_pair_computes_what_conv_then_batchnorm_computed(channels, width, kernel, stride, bias, affine, seed):
    torch.manual_seed(seed)
    block = nn.Sequential(
        nn.Conv2d(channels, width, kernel, stride=stride, padding=kernel // 2, bias=bias),
        nn.BatchNorm2d(width, affine=affine),
        nn.ReLU(),
    )
    randomise_statistics(block, seed)
    x = torch.randn(3, channels, 7, 7, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = block(x)
        assert fold_batchnorm(block) == 1
        actual = block(x)
    assert isinstance(block[1], nn.Identity) and type(block[0]) is nn.Conv2d and block[0].bias is not None
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


class ShiftedConv(nn.Conv2d):
    """A Conv2d subclass whose forward is not plain convolution: it must not be folded."""

    def forward(self, x):
        return super().forward(x) + 1


def test_only_exact_folds_happen():
    untouched = [
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False)),  # batch statistics
        nn.Sequential(ShiftedConv(2, 3, 3), nn.BatchNorm2d(3)),  # not plain convolution
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3)),  # something in between
        nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3)),  # norm before conv
    ]
    for module in untouched:
        before = copy.deepcopy(module.eval())
        assert fold_batchnorm(module) == 0
        assert [type(m) for m in module] == [type(m) for m in before]
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).train())
    hooked = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).eval()
    hooked[1].register_forward_hook(lambda *_: None)  # a fold would skip the hook
    weight_normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 3, 3)), nn.BatchNorm2d(3)).eval()
    assert fold_batchnorm(hooked) == 0 and fold_batchnorm(weight_normed) == 0


class Misdeclared(nn.Module):
    batchnorm_pairs = (("conv", "norm"),)

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)


def test_a_misnamed_pair_is_an_error_that_names_it():
    with pytest.raises(ValueError, match="Misdeclared.batchnorm_pairs names 'norm', which is not a module of it"):
        fold_batchnorm(Misdeclared().eval())


class FlatCNN(SequentialBackbone):
    """An adapter whose segments are the single layers of one Sequential (conv, BN, ReLU, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 3
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Linear(6, 3)
        self.exit_specs = (ExitSpec(0, "features.2", "map", 4, 1),)
        self.set_segments(list(self.features), [3])

    def finish(self, state):
        return self.head(state.mean(dim=(2, 3)))


def test_a_backbone_holding_its_layers_runs_the_folded_ones():
    backbone = randomise_statistics(FlatCNN(), 4).freeze()
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone(x)
        assert fold_frozen_batchnorm(backbone) == 2
        actual = backbone(x)
    registered = set(backbone.modules())
    blocks = [block for index in range(2) for block in backbone.segment_blocks(index)]
    assert all(block in registered for block in blocks)  # no stale layer left in the segments
    assert not any(isinstance(block, nn.BatchNorm2d) for block in blocks)
    assert not any(m.training for m in backbone.modules())  # the Identity replacements too
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_the_cifar_resnet_folds_its_declared_pairs_and_keeps_its_outputs_and_costs():
    torch.manual_seed(0)
    backbone = randomise_statistics(BACKBONES.build("cifar_resnet", depth=8, num_classes=10, exit_every=1), 1).freeze()
    network = with_heads(backbone, 10, gate_init=False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    costs = measure_exit_costs(network, x[:2]).normalized
    with torch.no_grad():
        expected = network(x)
        assert fold_frozen_batchnorm(network.backbone) == 1 + 3 * 2  # the stem and two per block
        actual = network(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    assert not any(p.requires_grad for p in network.backbone.parameters())
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(measure_exit_costs(network, x[:2]).normalized, costs)  # mul-adds unchanged


def test_a_folded_channels_last_network_exits_as_its_own_all_exits_pass_and_is_cached_apart():
    plain = tiny_network(3)
    randomise_statistics(plain.backbone, 2)
    network = copy.deepcopy(plain)
    to_channels_last(network.backbone)
    assert fold_frozen_batchnorm(network.backbone) == 4  # one per block of the small CNN
    assert uses_channels_last(network.backbone)  # the folded weights kept the backbone's layout
    data = toy_data()
    assert cache_key(network, data, "val", "") != cache_key(plain, data, "val", "")
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        medians = confidence(plain(x).logits[:-1], "max_prob").median(dim=-1).values
        network.policy = ConfidenceThreshold("max_prob", medians.tolist())
        expected = predict_from_outputs(network(x), network.policy)
        torch.testing.assert_close(network(x).logits, plain(x).logits, atol=1e-4, rtol=1e-4)
    result = network.early_exit(x)
    assert torch.equal(result.exit_index, expected.exit_index)
    torch.testing.assert_close(result.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_nothing_to_fold_is_said_once(caplog):
    with caplog.at_level(logging.WARNING, logger="jei.batchnorm_folding"):
        assert fold_frozen_batchnorm(nn.Sequential(nn.Linear(3, 2)).eval()) == 0
        assert "trainer.fold_batchnorm: Sequential has no (Conv2d, BatchNorm2d) pair to fold" in caplog.text
        caplog.clear()
        assert fold_frozen_batchnorm(nn.Sequential(nn.Linear(3, 2)).eval(), warn=False) == 0  # jei-predict
    assert not caplog.text


def test_backbone_options_enter_fingerprints_only_when_set():
    from jei.pipeline import RunSettings, backbone_options, resume_record
    from jei.train import BackboneTraining, ExitTraining

    plain = RunSettings(0, CPU, False, BackboneTraining(), ExitTraining(), None)
    assert backbone_options(plain) == []  # jei-compare's fingerprint of runs made before the options
    assert "channels_last" not in resume_record(plain, {})["settings"]  # jei-train runs still resume
    changed = dataclasses.replace(plain, channels_last=True, fold_batchnorm=True, precision="bf16")
    assert backbone_options(changed) == ["precision=bf16", "channels_last=True", "fold_batchnorm=True"]
    assert resume_record(changed, {}) != resume_record(plain, {})
    assert resume_record(dataclasses.replace(plain, fold_batchnorm=True), {}) != resume_record(plain, {})


@pytest.mark.parametrize("option", ["channels_last", "fold_batchnorm"])
def test_the_backbone_transform_options_are_checked_and_applied_by_the_run(tmp_path, option):
    from hydra import compose, initialize_config_module

    from jei.build import build_backbone, build_data, build_objective, build_settings, network_factory
    from jei.pipeline import prepare

    with initialize_config_module("jei.configs", version_base="1.3"):
        for trainer in ("default", "paper", "graph", "vit_cpu"):
            assert getattr(build_settings(compose("train", overrides=[f"trainer={trainer}"])), option) is False
        with pytest.raises(ConfigError, match=f"trainer.{option}"):
            build_settings(compose("train", overrides=[f"trainer.{option}=sometimes"]))
        cfg = compose("train", overrides=[f"trainer.{option}=true", "trainer.backbone.epochs=1",
                                          f"paths.cache_dir={tmp_path / 'cache'}", "data.max_per_split=40"])
    settings = dataclasses.replace(build_settings(cfg), device=CPU)
    data = build_data(cfg.data)
    make = network_factory(cfg.im, cfg.gate, data.num_classes, cfg.policy, build_objective(cfg.objective))
    network, _, splits, _, _ = prepare(data, build_backbone(cfg.backbone, data), make, settings, tmp_path / "run")
    norms = [m for m in network.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    if option == "channels_last":
        assert uses_channels_last(network.backbone) and norms
    else:  # trained, then folded; the run folder keeps the trained weights
        assert not norms and not uses_channels_last(network.backbone)
        saved = load_file(str(tmp_path / "run" / "backbone.safetensors"))
        assert any("running_mean" in name for name in saved)
    assert splits["test"].pooled[0].is_contiguous()  # pooled features are plain [N, C] rows either way


def test_the_transforms_benchmark_times_every_variant_of_one_network():
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        import backbone_transforms as benchmark
    finally:
        sys.path.remove(benchmarks)
    network = tiny_network(3, gate_bias=-0.5)
    batches = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(2)]
    result = benchmark.measure(benchmark.variants(network), batches, 2, time.perf_counter)
    assert not uses_channels_last(network.backbone)  # the variants transform copies of the backbone
    assert any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    assert result["samples"] == 32 and set(result["variants"]) == set(benchmark.VARIANTS)
    assert result["variants"]["NCHW"]["exits_changed"] == 0
    for variant in result["variants"].values():
        assert 0 <= variant["exits_changed"] <= 32 and variant["early_exit_over_plain_backbone"] > 0
        assert variant["warm_up_seconds"] > 0
        for path in ("backbone", "early exit"):
            assert variant[path]["images_per_second"] > 0 and variant[path]["time_over_plain"] > 0
