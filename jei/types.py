"""Plain data types shared by every component. Imports only torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

ExitKind = Literal["map", "tokens", "vector"]


@dataclass(frozen=True)
class ExitSpec:
    """Where an intermediate exit taps a backbone and what its representation looks like.

    Published by an adapter right after construction (no forward pass needed), so heads can
    be built from it, like timm's ``feature_info``.

    Attributes:
        index: exit number, 0..G-1 (exit G is the backbone's own head).
        name: the module the exit sits after, e.g. ``"layer2.3"``.
        kind: ``"map"`` for [B, C, H, W], ``"tokens"`` for [B, N, C], ``"vector"`` for [B, C].
        channels: C.
        reduction: spatial stride w.r.t. the input, when it has one.
    """

    index: int
    name: str
    kind: ExitKind
    channels: int
    reduction: int | None = None


@dataclass
class BackboneOutput:
    """One all-exits pass: each intermediate exit's representation, plus the final logits."""

    features: list[Tensor]
    logits: Tensor
