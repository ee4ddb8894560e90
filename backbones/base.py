"""The backbone adapter contract: a frozen network cut into segments, one per exit.

Segment i (i < G) runs the backbone from the previous exit up to exit i and returns its
state; segment G finishes the network and returns the backbone's own logits. The same
segments serve both the all-exits pass (training, calibration) and real early-exit
inference, where samples that have exited are dropped from the state between segments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from jei.types import BackboneOutput, ExitSpec


class FrozenBackbone(nn.Module, ABC):
    """Base class of every backbone adapter.

    Subclasses build their layers, set ``exit_specs`` and ``num_classes`` in ``__init__``,
    implement ``run_segment`` and call ``freeze()`` once weights are in place (the trainer
    also calls it before fitting exits). Override ``begin``, ``represent``, ``select`` and
    ``batch_size`` when the input is not one tensor (graphs, token sequences).
    """

    exit_specs: tuple[ExitSpec, ...]
    num_classes: int

    @property
    def num_gates(self) -> int:
        """G: the number of intermediate exits (exit G is the backbone's head)."""
        return len(self.exit_specs)

    def begin(self, inputs: Any) -> Any:
        """The state before segment 0 (e.g. the input tensor itself)."""
        return inputs

    @abstractmethod
    def run_segment(self, index: int, state: Any) -> Any:
        """Advance ``state`` through segment ``index``; segment G returns logits [B, K]."""

    def represent(self, index: int, state: Any) -> Tensor:
        """The representation exit ``index`` sees, shaped as its ``ExitSpec`` says."""
        return state

    def select(self, state: Any, keep: Tensor) -> Any:
        """The state of the samples at positions ``keep`` (a LongTensor), in that order."""
        return state[keep]

    def batch_size(self, inputs: Any) -> int:
        return len(inputs)

    @torch.no_grad()
    def forward_exits(self, inputs: Any) -> BackboneOutput:
        """Every exit's representation and the final logits, in one pass.

        Uses ``no_grad`` rather than ``inference_mode`` so the outputs can feed trainable heads.
        """
        state = self.begin(inputs)
        features = []
        for index in range(self.num_gates):
            state = self.run_segment(index, state)
            features.append(self.represent(index, state))
        return BackboneOutput(features=features, logits=self.run_segment(self.num_gates, state))

    def forward(self, inputs: Any) -> Tensor:
        """The backbone's own prediction (all segments); used to train it before freezing."""
        state = self.begin(inputs)
        for index in range(self.num_gates + 1):
            state = self.run_segment(index, state)
        return state

    def freeze(self) -> FrozenBackbone:
        """No gradients and eval mode for good: BatchNorm statistics and dropout stay fixed."""
        self.requires_grad_(False)
        self._frozen = True
        return super().train(False)

    @property
    def frozen(self) -> bool:
        return getattr(self, "_frozen", False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        # A wrapper's .train() must not switch a frozen backbone back to training mode.
        return super().train(False if self.frozen else mode)


def check_exit_positions(positions: list[int], depth: int, field: str) -> list[int]:
    """Validate exit positions (1-based layer counts) against a backbone's depth.

    An exit after the last layer would duplicate the backbone's own head, so positions must
    lie in 1..depth-1, strictly increasing.
    """
    if not positions:
        raise ValueError(f"{field}: at least one exit position is needed (layers 1..{depth - 1})")
    for position in positions:
        if not 1 <= position <= depth - 1:
            raise ValueError(
                f"{field}: exit position {position} is outside 1..{depth - 1} "
                f"(the backbone has {depth} layers and its own head is the last exit)"
            )
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise ValueError(f"{field}: exit positions must be strictly increasing, got {positions}")
    return list(positions)


def load_state_dict_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load weights strictly, with an error that says what does not match and where from."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(state))
        if state[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            details.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
        if mismatched:
            details.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:5])}")
        raise ValueError(
            f"weights file {source} does not match the {type(module).__name__} architecture: "
            + " | ".join(details)
            + ". Check backbone.weights and the depth/width settings."
        )
    module.load_state_dict(state, strict=True)
