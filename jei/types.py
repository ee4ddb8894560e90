"""Plain data types shared by every component. Imports only torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

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


@dataclass
class ExitOutputs:
    """Every exit's prediction for a batch.

    Attributes:
        logits: ``[G+1, B, K]``: the G IMs' logits, then the backbone head's.
        gate_logits: ``[B, G]``: one gate logit per intermediate exit.
    """

    logits: Tensor
    gate_logits: Tensor

    @property
    def num_gates(self) -> int:
        return self.gate_logits.shape[-1]


@dataclass
class EarlyExitResult:
    """What real early-exit inference returns, in input order."""

    logits: Tensor  # [B, K], from the exit each sample took
    exit_index: Tensor  # [B], in 0..G


class Objective(Protocol):
    """What the exit trainer asks of an objective plugin (see ``jei.objectives.jei``)."""

    def warmup_loss(self, im_logits: Tensor, labels: Tensor, active: Tensor | None = None) -> Tensor: ...

    def gate_loss(self, exit_logits: Tensor, gate_logits: Tensor, labels: Tensor, costs: Tensor) -> Tensor: ...

    def im_loss(self, im_logits: Tensor, gate_logits: Tensor, labels: Tensor) -> Tensor: ...

    def update_from_validation(self, exit_logits: Tensor, labels: Tensor, costs: Tensor) -> None: ...
