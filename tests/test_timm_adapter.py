"""The timm adapter: exits from timm's metadata, a segment path equal to timm's own forward."""

from __future__ import annotations

import copy
import socket
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from jei.backbones.timm_adapter import TimmBackbone, candidate_exits

# timm's tiny test models (and one small real one), at 32x32.
CNNS = ["test_resnet", "test_convnext", "test_efficientnet", "mobilenetv3_small_050"]
TINY_DEIT = {"img_size": 32, "depth": 3, "embed_dim": 32, "num_heads": 2}


def frozen(name: str, **kwargs) -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone(name, **{"num_classes": 7, **kwargs}).freeze()


def images(batch: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["test_vit", *CNNS])
def test_segments_reproduce_the_timm_model(name: str) -> None:
    backbone, x = frozen(name), images()
    with torch.no_grad():
        reference = backbone.model(x)
        torch.testing.assert_close(backbone(x), reference, atol=1e-5, rtol=1e-5)
        # The step loop before the head is exactly forward_features.
        state = backbone.begin(x)
        for index in range(backbone.num_gates):
            state = backbone.run_segment(index, state)
        for _, step in backbone._steps[backbone.segments.bounds[-2] :]:
            state = step(state)
        torch.testing.assert_close(state, backbone.model.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CNNS)
def test_cnn_exits_are_feature_info_taps_matching_forward_intermediates(name: str) -> None:
    backbone, x = frozen(name), images()
    info = backbone.model.feature_info
    assert [spec.name for spec in backbone.exit_specs] == [tap["module"] for tap in info[:-1]]
    assert [(s.kind, s.channels, s.reduction) for s in backbone.exit_specs] == [
        ("map", tap["num_chs"], tap["reduction"]) for tap in info[:-1]
    ]
    with torch.no_grad():
        out = backbone.forward_exits(x)
        expected = backbone.model.forward_intermediates(x, indices=list(range(len(info) - 1)), intermediates_only=True)
    assert len(out.features) == len(expected) == len(info) - 1
    for feature, reference in zip(out.features, expected):
        torch.testing.assert_close(feature, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("token", ["cls", "mean"])
def test_vit_exits_read_the_final_norm_of_every_block_but_the_last(token: str) -> None:
    backbone, x = frozen("test_vit", token=token), images()
    depth = len(backbone.model.blocks)
    assert [spec.name for spec in backbone.exit_specs] == [f"blocks.{i}" for i in range(depth - 1)]
    assert all(s.kind == "vector" and s.channels == backbone.model.embed_dim for s in backbone.exit_specs)
    with torch.no_grad():
        out = backbone.forward_exits(x)
        # timm's own path: normed tokens of each block, prefix (class) tokens returned apart.
        timm_out = backbone.model.forward_intermediates(
            x,
            indices=list(range(depth - 1)),
            norm=True,
            output_fmt="NLC",
            return_prefix_tokens=True,
            intermediates_only=True,
        )
    for feature, (patches, prefix) in zip(out.features, timm_out):
        expected = prefix[:, 0] if token == "cls" else patches.mean(1)
        torch.testing.assert_close(feature, expected, atol=1e-5, rtol=1e-5)
        if token == "cls":  # the norm runs on the class token alone: per token, so bit for bit the same
            assert torch.equal(feature, expected)


def test_distilled_deit_mean_token_skips_both_prefix_tokens() -> None:
    backbone, x = frozen("deit_tiny_distilled_patch16_224", token="mean", model_kwargs=TINY_DEIT), images()
    model = backbone.model
    assert model.num_prefix_tokens == 2 and backbone.num_gates == TINY_DEIT["depth"] - 1
    with torch.no_grad():
        out = backbone.forward_exits(x)
        tokens = model.norm(model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x)))))
        torch.testing.assert_close(out.features[0], tokens[:, 2:].mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.logits, model(x), atol=1e-5, rtol=1e-5)  # both heads averaged


def test_early_exit_drops_samples_between_segments() -> None:
    backbone, x = frozen("test_vit"), images(batch=4)
    full = backbone.forward_exits(x)
    with torch.no_grad():
        state = backbone.run_segment(0, backbone.begin(x))
        state = backbone.select(state, torch.tensor([3, 1]))
        for index in range(1, backbone.num_gates + 1):
            state = backbone.run_segment(index, state)
    torch.testing.assert_close(state, full.logits[[3, 1]], atol=1e-5, rtol=1e-5)


def test_exits_select_among_candidates_and_bad_choices_name_the_field() -> None:
    assert candidate_exits("test_resnet") == ["act1", "layer1", "layer2", "layer3"]
    backbone = frozen("test_resnet", exits=[2, 4])  # after taps 2 and 4, counted from 1
    assert [spec.name for spec in backbone.exit_specs] == ["layer1", "layer3"]
    assert [spec.index for spec in backbone.exit_specs] == [0, 1]
    with torch.no_grad():
        out = backbone.forward_exits(images())
    assert [f.shape[1] for f in out.features] == [32, 192]
    for bad in ([5], [3, 2], [], [0], [-1], "some", {"every": 0}, 2):
        with pytest.raises(ValueError, match=r"backbone\.exits"):
            TimmBackbone("test_resnet", num_classes=3, exits=bad)
    with pytest.raises(ValueError, match=r"exit position 5 is outside 1\.\.4 .*5 feature_info taps"):
        TimmBackbone("test_resnet", num_classes=3, exits=[5])
    every_other = frozen("test_resnet", exits={"every": 2})
    assert [spec.name for spec in every_other.exit_specs] == ["layer1", "layer3"]


def test_vit_exit_positions_name_the_same_blocks_as_t2t_vit() -> None:
    """One numbering: ``exits=[k]`` is after the k-th transformer block on every ViT."""
    from jei.backbones.t2t_vit import T2TViT

    vit = frozen("test_vit", exits=[2])
    t2t = T2TViT("t2t_vit_7", num_classes=3, img_size=32, exits=[2])
    assert [s.name for s in vit.exit_specs] == [s.name for s in t2t.exit_specs] == ["blocks.1"]


def test_input_size_resizes_batches() -> None:
    backbone = frozen("test_resnet", input_size=64)
    with torch.no_grad():
        out = backbone.forward_exits(images(size=32))
        upsampled = torch.nn.functional.interpolate(images(size=32), size=(64, 64), mode="bilinear", antialias=True)
        expected = backbone.model(upsampled)
    assert out.features[1].shape[-1] == 16  # layer1 at stride 4 of 64
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


def test_weights_file_loads_strictly_and_head_mismatch_needs_reset_head(tmp_path) -> None:
    source = TimmBackbone("test_convnext", num_classes=7)
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = TimmBackbone("test_convnext", num_classes=7, weights=str(path)).freeze()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), source.freeze()(images()))

    with pytest.raises(ValueError, match=r"reset_head=true"):
        TimmBackbone("test_convnext", num_classes=5, weights=str(path))
    fresh = TimmBackbone("test_convnext", num_classes=5, weights=str(path), reset_head=True)
    assert fresh.model.head.fc.weight.shape == (5, 64)
    body = {k: v for k, v in fresh.model.state_dict().items() if not k.startswith("head.fc.")}
    for key, value in body.items():
        torch.testing.assert_close(value, source.model.state_dict()[key])

    with pytest.raises(FileNotFoundError, match="local weights file"):
        TimmBackbone("test_convnext", num_classes=7, weights=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="does not match"):
        TimmBackbone("test_resnet", num_classes=7, weights=str(path))


def test_pretrained_without_network_fails_fast_with_the_offline_fix(monkeypatch) -> None:
    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"backbone\.weights=<file>"):
        TimmBackbone("test_vit", num_classes=1000, pretrained=True)
    assert time.perf_counter() - start < 10
    with pytest.raises(ValueError, match="reset_head"):
        TimmBackbone("test_vit", num_classes=10, pretrained=True)


def test_unsupported_or_unknown_models_and_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="supports VisionTransformer"):
        TimmBackbone("test_byobnet", num_classes=3)
    with pytest.raises(ValueError, match="timm has no model"):
        TimmBackbone("no_such_net", num_classes=3)
    with pytest.raises(ValueError, match=r"backbone\.token"):
        TimmBackbone("test_vit", num_classes=3, token="max")
    with pytest.raises(ValueError, match="has no class token"):
        TimmBackbone("test_vit", num_classes=3, model_kwargs={"class_token": False, "global_pool": "avg"})
    with pytest.raises(ValueError, match="choose one"):
        TimmBackbone("test_vit", num_classes=3, weights="x.safetensors", pretrained=True)


def test_deepcopy_keeps_segments_on_the_copy() -> None:
    backbone = frozen("test_resnet")
    twin = copy.deepcopy(backbone)
    with torch.no_grad():
        before = backbone(images())
        for parameter in twin.parameters():
            parameter.zero_()
        torch.testing.assert_close(backbone(images()), before)
        assert not torch.allclose(twin(images()), before)


def test_test_models_exist_in_this_timm() -> None:
    assert {"test_vit", "test_resnet", "test_convnext", "test_efficientnet"} <= set(timm.list_models("test_*"))


def test_weights_saved_by_jei_train_load_back(tmp_path):
    """`jei-train` saves the adapter's own state dict (keys under `model.`); it must reload."""
    kwargs = {"model_name": "test_vit", "num_classes": 3, "model_kwargs": {"img_size": 32}}
    trained = TimmBackbone(**kwargs)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    reloaded = TimmBackbone(**kwargs, weights=str(path)).freeze()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded(x), trained.freeze()(x))
