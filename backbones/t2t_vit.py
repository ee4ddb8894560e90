"""T2T-ViT-7 and T2T-ViT-14, the backbones of the JEI-DNN paper's image experiments.

Architecture from L. Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers from
Scratch on ImageNet", ICCV 2021: a Tokens-to-Token (T2T) module (three soft splits, i.e.
overlapping unfolds, with two Performer token mixers between them), a class token, a fixed
sinusoidal position table, plain pre-norm transformer blocks, a final LayerNorm and a linear
head on the class token. Written for this project; parameter names and shapes follow the
checkpoints the authors published (``71.7_T2T_ViT_7.pth.tar``, ``81.5_T2T_ViT_14.pth.tar``),
so those load strictly.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jei.types import ExitSpec

from .base import ExitChoice, SequentialBackbone, class_token_norm_form, resolve_exits
from .weights import load_keeping_head, load_torch_weights, read_state_dict


@dataclass(frozen=True)
class T2TVariant:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float


# The published lite and base configurations (both with Performer token mixers, token_dim 64).
VARIANTS: dict[str, T2TVariant] = {
    "t2t_vit_7": T2TVariant(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_14": T2TVariant(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
}
TOKEN_DIM = 64
# (kernel, stride, padding) of the three soft splits: the token grid is img_size / 16.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


class T2TViT(SequentialBackbone):
    """T2T-ViT with exits after its transformer blocks.

    Args:
        variant: ``"t2t_vit_7"`` or ``"t2t_vit_14"``.
        num_classes: classes of the head.
        img_size: input side the position table is made for (224 for the published weights).
        exits: ``"all"`` (after every block but the last, as in the paper), ``{"every": k}`` or
            positions k in 1..depth-1 (k: after transformer block k, counted from 1, i.e. module
            ``blocks.{k-1}``); see ``resolve_exits``.
        weights: a local checkpoint in the authors' layout (their ``.pth.tar`` files, whose EMA
            weights are used when present, as the authors do), or a plain or safetensors state
            dict with the same keys; loaded strictly.
        reset_head: keep a new head for ``num_classes`` instead of the checkpoint's (needed for
            the 1000-class ImageNet weights on other data); the backbone then has to be
            fine-tuned (``trainer.train_backbone=true``), as the paper does.
        input_size: resize every batch to this side first (bilinear), e.g. 224 for 32x32 CIFAR
            images, as the paper's fine-tuning does; must then equal ``img_size``.
    """

    def __init__(
        self,
        variant: Literal["t2t_vit_7", "t2t_vit_14"] = "t2t_vit_7",
        num_classes: int = 1000,
        img_size: int = 224,
        exits: ExitChoice = "all",
        weights: str | None = None,
        reset_head: bool = False,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"backbone.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if img_size < 16 or img_size % 16:
            raise ValueError(f"backbone.img_size must be a positive multiple of 16 (the token stride), got {img_size}")
        if reset_head and weights is None:
            raise ValueError("backbone.reset_head=true needs backbone.weights (a checkpoint whose head it replaces)")
        if input_size is not None and input_size != img_size:
            raise ValueError(f"backbone.input_size ({input_size}) must equal backbone.img_size ({img_size}) or be null")
        spec = VARIANTS[variant]
        positions = resolve_exits(exits, spec.depth, unit="transformer block")
        self.num_classes = num_classes
        self.img_size = img_size
        self.input_size = input_size
        self.tokens_to_token = TokensToToken(spec.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        num_tokens = (img_size // 16) ** 2 + 1
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, spec.embed_dim).unsqueeze(0))
        self.blocks = nn.ModuleList(
            TransformerBlock(spec.embed_dim, spec.num_heads, spec.mlp_ratio) for _ in range(spec.depth)
        )
        self.norm = nn.LayerNorm(spec.embed_dim)
        self.head = nn.Linear(spec.embed_dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.exit_specs = tuple(
            ExitSpec(index, f"blocks.{position - 1}", "vector", spec.embed_dim)
            for index, position in enumerate(positions)
        )
        self.set_segments(self.blocks, positions)
        if weights is not None:
            state = read_published_checkpoint(weights)
            load_keeping_head(self, state, str(weights), ("head",), num_classes, reset_head)

    def begin(self, inputs: Tensor) -> Tensor:
        """Image [B, 3, H, W] -> tokens [B, 1 + N, C] (class token first, positions added)."""
        size = tuple(inputs.shape[-2:])
        if self.input_size is not None and size != (self.input_size,) * 2:
            inputs = F.interpolate(inputs, size=(self.input_size,) * 2, mode="bilinear", antialias=True)
        elif size != (self.img_size,) * 2:
            raise ValueError(
                f"T2T-ViT got {size[0]}x{size[1]} images but backbone.img_size is {self.img_size}; "
                f"set backbone.input_size={self.img_size} to resize them on the fly"
            )
        tokens = self.tokens_to_token(inputs)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return tokens + self.pos_embed

    def finish(self, state: Tensor) -> Tensor:
        return self.head(self.norm(state[:, 0]))

    def represent(self, index: int, state: Tensor) -> Tensor:
        # The paper's ViT IMs read the final LayerNorm of the class token.
        return self.norm(state[:, 0])

    def native_represent(self, index: int) -> tuple[str, Tensor, Tensor, float] | None:
        """The class token's final LayerNorm, for native exits (``jei.types.NativeRepresentation``)."""
        return class_token_norm_form(self._modules["norm"])  # (the dict: read for every exit at every call)


class TokensToToken(nn.Module):
    """Soft split (unfold) -> Performer -> re-structure to a grid, twice; a last split; project."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = SOFT_SPLITS
        self.soft_split0 = nn.Unfold(kernel_size=k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(kernel_size=k2, stride=s2, padding=p2)
        self.attention1 = TokenPerformer(in_chans * k0 * k0, TOKEN_DIM)
        self.attention2 = TokenPerformer(TOKEN_DIM * k1 * k1, TOKEN_DIM)
        self.project = nn.Linear(TOKEN_DIM * k2 * k2, embed_dim)

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        tokens = self.soft_split0(images).transpose(1, 2)  # [B, L, C*k*k]
        for (kernel, stride, padding), mixer, split in (
            (SOFT_SPLITS[0], self.attention1, self.soft_split1),
            (SOFT_SPLITS[1], self.attention2, self.soft_split2),
        ):
            height, width = ((size + 2 * padding - kernel) // stride + 1 for size in (height, width))
            grid = mixer(tokens).transpose(1, 2).reshape(len(tokens), -1, height, width)
            tokens = split(grid).transpose(1, 2)
        return self.project(tokens)


class TokenPerformer(nn.Module):
    """A single-head Performer layer that also changes the token width (``dim`` -> ``out_dim``).

    Softmax attention is replaced by linear attention with positive random features (Choromanski
    et al. 2021, "Rethinking Attention with Performers"): phi(x) = exp(w x - |x|^2 / 2) / sqrt(m)
    with m = out_dim / 2 fixed orthogonal projections ``w``. As in T2T-ViT, the value ``v`` is the
    residual path of the attention (the input width differs from the output width).
    """

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, dropout: float = 0.1) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.norm1 = nn.LayerNorm(dim)
        self.kqv = nn.Linear(dim, 3 * out_dim)  # k, q, v in that order, as in the published weights
        self.proj = nn.Linear(out_dim, out_dim)
        self.dp = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(
            nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(dropout)
        )
        features = int(out_dim * kernel_ratio)
        # Fixed random projections (part of the checkpoint, never trained): orthogonal rows of norm sqrt(m).
        self.register_buffer("w", nn.init.orthogonal_(torch.empty(features, out_dim)) * math.sqrt(features))

    def random_features(self, x: Tensor) -> Tensor:
        """phi(x) [B, T, m], in float32 (the exponent overflows in half precision)."""
        x = x.float()
        return torch.exp(x @ self.w.t() - x.pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(self.w.shape[0])

    def attention(self, x: Tensor) -> Tensor:
        k, q, v = self.kqv(x).split(self.out_dim, dim=-1)
        qp, kp = self.random_features(q), self.random_features(k)
        context = kp.transpose(1, 2) @ v.float()  # [B, m, out_dim]
        normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # [B, T, 1]
        mixed = (qp @ context) / (normaliser + 1e-8)
        return v + self.dp(self.proj(mixed.to(v.dtype)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerBlock(nn.Module):
    """Pre-norm multi-head self-attention and MLP, residual around each (no qkv bias)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # Scale 1/sqrt(head_dim): the authors' models are built (and their weights used) with qk_scale unset.
        mixed = F.scaled_dot_product_attention(q, k, v)
        return self.proj(mixed.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def sinusoid_table(positions: int, dim: int) -> Tensor:
    """Vaswani et al. 2017 position table: sin(p / 10000^(2i/d)) on even, cos on odd channels."""
    position = torch.arange(positions, dtype=torch.float64).unsqueeze(1)
    rate = torch.pow(10000.0, -2.0 * (torch.arange(dim) // 2).double() / dim)
    angles = position * rate
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.float()


def read_published_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a T2T-ViT checkpoint file.

    The authors' files are timm training checkpoints: weights under ``state_dict_ema`` (their
    documented usage loads these) and ``state_dict``, with the training arguments stored as an
    ``argparse.Namespace``, which is allowed here and nothing else. Other files are read with
    ``read_state_dict`` (safetensors, plain or ``{'state_dict': ...}`` torch files).
    """
    path = Path(path).expanduser()
    if path.suffix == ".safetensors" or not path.is_file():
        return read_state_dict(path)  # also gives the standard missing-file error
    checkpoint = load_torch_weights(path, allowed_globals=[argparse.Namespace])
    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        raise ValueError(f"backbone.weights: {path} does not hold a state dict")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}
