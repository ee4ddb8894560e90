"""T2T-ViT-7/14: the published parameter layout, strict loading, exits and the token mixers."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from safetensors.torch import save_file

from jei.backbones.t2t_vit import VARIANTS, SelfAttention, T2TViT, TokenPerformer, sinusoid_table

# Names and shapes from the checkpoints the T2T-ViT authors published (224x224, 1000 classes).
PUBLISHED_T2T_VIT_7 = {
    "cls_token": (1, 1, 256),
    "pos_embed": (1, 197, 256),
    "tokens_to_token.attention1.w": (32, 64),
    "tokens_to_token.attention1.kqv.weight": (192, 147),
    "tokens_to_token.attention1.kqv.bias": (192,),
    "tokens_to_token.attention1.norm1.weight": (147,),
    "tokens_to_token.attention1.proj.weight": (64, 64),
    "tokens_to_token.attention1.norm2.bias": (64,),
    "tokens_to_token.attention1.mlp.0.weight": (64, 64),
    "tokens_to_token.attention1.mlp.2.bias": (64,),
    "tokens_to_token.attention2.w": (32, 64),
    "tokens_to_token.attention2.kqv.weight": (192, 576),
    "tokens_to_token.attention2.norm1.weight": (576,),
    "tokens_to_token.project.weight": (256, 576),
    "tokens_to_token.project.bias": (256,),
    "blocks.0.norm1.weight": (256,),
    "blocks.0.attn.qkv.weight": (768, 256),
    "blocks.0.attn.proj.weight": (256, 256),
    "blocks.0.attn.proj.bias": (256,),
    "blocks.0.norm2.bias": (256,),
    "blocks.6.mlp.fc1.weight": (512, 256),
    "blocks.6.mlp.fc1.bias": (512,),
    "blocks.6.mlp.fc2.weight": (256, 512),
    "norm.weight": (256,),
    "head.weight": (1000, 256),
    "head.bias": (1000,),
}
PUBLISHED_T2T_VIT_14 = {
    "cls_token": (1, 1, 384),
    "pos_embed": (1, 197, 384),
    "tokens_to_token.attention1.kqv.weight": (192, 147),
    "tokens_to_token.project.weight": (384, 576),
    "blocks.13.attn.qkv.weight": (1152, 384),
    "blocks.13.mlp.fc1.weight": (1152, 384),
    "blocks.13.mlp.fc2.weight": (384, 1152),
    "norm.bias": (384,),
    "head.weight": (1000, 384),
}


@pytest.mark.parametrize(
    ("variant", "published", "millions"),
    [("t2t_vit_7", PUBLISHED_T2T_VIT_7, 4.3), ("t2t_vit_14", PUBLISHED_T2T_VIT_14, 21.5)],
)
def test_parameter_layout_matches_the_published_checkpoints(variant: str, published: dict, millions: float) -> None:
    state = T2TViT(variant, num_classes=1000, img_size=224).state_dict()
    for key, shape in published.items():
        assert tuple(state[key].shape) == shape, key
    depth = VARIANTS[variant].depth
    # 13 tensors per Performer, 2 for the projection, cls/pos, 11 per block (no qkv bias), norm, head.
    assert len(state) == 2 * 13 + 2 + 2 + 11 * depth + 4
    assert "blocks.0.attn.qkv.bias" not in state
    assert f"blocks.{depth}.norm1.weight" not in state
    # The paper's parameter counts (the position table and Performer projections included).
    assert round(sum(v.numel() for v in state.values()) / 1e6, 1) == millions


def save_published_style(path, ema: dict, plain: dict) -> None:
    """A checkpoint like the authors' files: DataParallel keys, EMA copy, training args."""
    torch.save(
        {
            "epoch": 309,
            "arch": "t2t_vit_7",
            "state_dict": {f"module.{k}": v for k, v in plain.items()},
            "state_dict_ema": {f"module.{k}": v for k, v in ema.items()},
            "args": argparse.Namespace(model="t2t_vit_7", lr=1e-3),
        },
        path,
    )


def tiny(**kwargs) -> T2TViT:
    return T2TViT(**{"variant": "t2t_vit_7", "num_classes": 5, "img_size": 32, **kwargs})


def images(batch: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_published_checkpoint_round_trips_strictly_with_ema_weights(tmp_path) -> None:
    torch.manual_seed(0)
    ema, other = tiny().freeze(), tiny()
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    save_published_style(path, ema.state_dict(), other.state_dict())
    loaded = tiny(weights=str(path)).freeze()
    assert same_state(loaded, ema) and not same_state(loaded, other)
    with torch.no_grad():
        assert torch.equal(loaded(images()), ema(images()))
    flat = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(flat))
    assert same_state(tiny(weights=str(flat)), ema)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())


def test_missing_extra_or_misshapen_keys_fail_clearly(tmp_path) -> None:
    state = tiny().state_dict()
    cases = {
        "missing keys.*blocks.0.attn.qkv.weight": {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"},
        "unexpected keys.*blocks.0.attn.qkv.bias": {**state, "blocks.0.attn.qkv.bias": torch.zeros(768)},
        "shape mismatches.*pos_embed": T2TViT("t2t_vit_7", num_classes=5, img_size=64).state_dict(),
    }
    for pattern, bad in cases.items():
        path = tmp_path / "bad.pth"
        torch.save(bad, path)
        with pytest.raises(ValueError, match=pattern):
            tiny(weights=str(path))
    with pytest.raises(FileNotFoundError, match="local weights file"):
        tiny(weights=str(tmp_path / "absent.pth.tar"))


def test_imagenet_head_needs_reset_head_for_other_classes(tmp_path) -> None:
    source = tiny(num_classes=1000)
    path = tmp_path / "imagenet.pth.tar"
    save_published_style(path, source.state_dict(), source.state_dict())
    with pytest.raises(ValueError, match=r"reset_head=true"):
        tiny(weights=str(path))
    fresh = tiny(weights=str(path), reset_head=True)
    assert fresh.head.weight.shape == (5, 256)
    torch.testing.assert_close(fresh.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)


@pytest.mark.parametrize("variant", ["t2t_vit_7", "t2t_vit_14"])
def test_exits_after_every_block_but_the_last_read_the_normed_class_token(variant: str) -> None:
    torch.manual_seed(0)
    model, x = T2TViT(variant, num_classes=5, img_size=32).freeze(), images()
    depth = VARIANTS[variant].depth
    assert [s.name for s in model.exit_specs] == [f"blocks.{i}" for i in range(depth - 1)]
    assert all(s.kind == "vector" and s.channels == VARIANTS[variant].embed_dim for s in model.exit_specs)
    with torch.no_grad():
        out = model.forward_exits(x)
        tokens = model.begin(x)
        assert tokens.shape == (3, 1 + (32 // 16) ** 2, VARIANTS[variant].embed_dim)
        for index, block in enumerate(model.blocks[:-1]):
            tokens = block(tokens)
            torch.testing.assert_close(out.features[index], model.norm(tokens[:, 0]))
        logits = model.head(model.norm(model.blocks[-1](tokens))[:, 0])
    torch.testing.assert_close(out.logits, logits)


def test_chosen_exits_and_early_exit_rows() -> None:
    model, x = tiny(exits=[2, 5]).freeze(), images(batch=4)
    assert [s.name for s in model.exit_specs] == ["blocks.1", "blocks.4"]
    full = model.forward_exits(x)
    with torch.no_grad():
        state = model.select(model.run_segment(0, model.begin(x)), torch.tensor([2, 0]))
        logits = model.run_segment(2, model.run_segment(1, state))
    torch.testing.assert_close(logits, full.logits[[2, 0]], atol=1e-5, rtol=1e-5)
    for bad in ([7], [0], [3, 2]):
        with pytest.raises(ValueError, match=r"backbone\.exits"):
            tiny(exits=bad)
    with pytest.raises(ValueError, match=r"backbone\.variant"):
        T2TViT("t2t_vit_99", num_classes=3)
    with pytest.raises(ValueError, match=r"backbone\.img_size"):
        tiny(img_size=40)


def test_inputs_of_another_size_need_input_size() -> None:
    model, reference = tiny(input_size=32).freeze(), tiny().freeze()
    reference.load_state_dict(model.state_dict())
    small = images(size=16)
    with torch.no_grad():
        upsampled = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", antialias=True)
        torch.testing.assert_close(model(small), reference(upsampled))
    with pytest.raises(ValueError, match=r"backbone\.input_size=32"):
        tiny().begin(small)


def test_performer_is_linear_attention_with_positive_random_features() -> None:
    torch.manual_seed(0)
    layer = TokenPerformer(dim=12, out_dim=8).eval()
    x = torch.randn(2, 5, 12)
    k, q, v = layer.kqv(x).split(8, dim=-1)
    w = layer.w
    assert w.shape == (4, 8)
    torch.testing.assert_close(w @ w.t(), torch.eye(4) * 4, atol=1e-4, rtol=1e-4)  # orthogonal rows, norm sqrt(m)

    def phi(z: torch.Tensor) -> torch.Tensor:
        return torch.exp(z @ w.t() - (z * z).sum(-1, keepdim=True) / 2) / 2

    scores = phi(q) @ phi(k).transpose(1, 2)  # [B, T, T] kernel approximation of exp(q.k)
    mixed = (scores / scores.sum(-1, keepdim=True)) @ v
    with torch.no_grad():
        torch.testing.assert_close(layer.attention(x), v + layer.proj(mixed), atol=1e-5, rtol=1e-4)


def test_block_attention_is_softmax_attention_scaled_by_head_dim() -> None:
    torch.manual_seed(0)
    attention = SelfAttention(dim=8, num_heads=2)
    x = torch.randn(2, 3, 8)
    q, k, v = attention.qkv(x).view(2, 3, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(attention(x), expected, atol=1e-6, rtol=1e-5)


def test_position_table_is_the_sinusoid_table() -> None:
    table = sinusoid_table(197, 256)
    for position, channel in [(0, 0), (0, 1), (5, 10), (196, 255), (100, 77)]:
        angle = position / 10000 ** (2 * (channel // 2) / 256)
        expected = math.sin(angle) if channel % 2 == 0 else math.cos(angle)
        assert table[position, channel].item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(T2TViT("t2t_vit_7", num_classes=2).pos_embed[0], table)
