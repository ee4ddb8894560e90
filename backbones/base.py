"""The backbone adapter contract: a frozen network cut into segments, one per exit.

Segment i (i < G) runs the backbone from the previous exit up to exit i and returns its
state; segment G finishes the network and returns the backbone's own logits. The same
segments serve both the all-exits pass (training, calibration) and real early-exit
inference, where samples that have exited are dropped from the state between segments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from jei.memory_format import select_rows, selects_rows
from jei.types import BackboneOutput, ExitSpec


class FrozenBackbone(nn.Module, ABC):
    """Base class of every backbone adapter.

    Subclasses build their layers, set ``exit_specs`` and ``num_classes`` in ``__init__``,
    implement ``run_segment`` and call ``freeze()`` once weights are in place (the trainer
    also calls it before fitting exits). Override ``begin``, ``represent``, ``select`` and
    ``batch_size`` when the input is not one tensor (graphs, token sequences). A network that
    is a chain of blocks subclasses ``SequentialBackbone`` instead, which writes
    ``run_segment``; either way, exit positions come from ``resolve_exits``, and
    ``jei.testing.check_backbone`` checks the contract.
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

    @selects_rows
    def select(self, state: Any, keep: Tensor) -> Any:
        """The state of the samples at positions ``keep`` (a LongTensor), in that order.

        Real early exit calls it only at an exit that some, but not all, samples leave. Native
        exits copy the rows of a plain, dense CPU tensor state themselves instead
        (``selects_rows``); an override of this method is always called.
        """
        if isinstance(state, Tensor):
            return select_rows(state, keep)  # one gather, channels-last maps kept channels-last
        return state[keep]

    def batch_size(self, inputs: Any) -> int:
        return len(inputs)

    def replace_references(self, replaced: Mapping[nn.Module, nn.Module]) -> None:
        """Modules of this backbone were swapped for others (``jei.batchnorm_folding``): update
        any reference to them held outside the module tree. The base class holds none."""

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


# What ``backbone.exits`` may say: "all", {"every": k}, or a list of positions.
ExitChoice = Union[str, Mapping[str, int], Sequence[int]]


def class_token_norm_form(
    norm: nn.Module, after: nn.Module | None = None, layer_norms: tuple[type, ...] = (nn.LayerNorm,)
) -> tuple[str, Tensor, Tensor, float] | None:
    """``native_represent``'s form (``jei.types.NativeRepresentation``) of a class token read
    through ``norm`` and then ``after``: when ``norm`` is exactly one of ``layer_norms`` (classes
    that compute ``F.layer_norm``; a subclass may compute something else) with weight and bias
    over the last dimension, without hooks, and ``after`` is absent or an identity; else None."""
    if type(norm) not in layer_norms or len(norm.normalized_shape) != 1 or norm._forward_hooks or norm._forward_pre_hooks:
        return None
    if after is not None and (type(after) is not nn.Identity or after._forward_hooks or after._forward_pre_hooks):
        return None
    weight, bias = norm._parameters.get("weight"), norm._parameters.get("bias")
    return None if weight is None or bias is None else ("class_token_layer_norm", weight, bias, float(norm.eps))


def resolve_exits(exits: ExitChoice, num_blocks: int, *, field: str = "backbone.exits", unit: str = "block") -> list[int]:
    """The exit positions ``exits`` asks for, in the one numbering every adapter uses.

    A backbone is a sequence of ``num_blocks`` blocks (what a block is depends on the adapter:
    a conv block, a residual block, a transformer block, a GPS layer, a timm ``feature_info``
    stage) followed by its head. **Position k means "after block k", counting blocks from 1**:
    the exit sees the state once k blocks have run. The last block feeds the backbone's own
    head, so positions lie in 1..num_blocks-1. ``exits`` may be:

    - ``"all"``: after every block but the last (1, 2, ..., num_blocks-1);
    - ``{"every": k}``: after blocks k, 2k, ... (< num_blocks);
    - a list of positions, strictly increasing, e.g. ``[3, 6]``.

    Returns the positions as a list of ints. Errors name ``field`` and the valid range.
    """
    last = num_blocks - 1
    if last < 1:
        raise ValueError(f"{field}: the backbone has {num_blocks} {unit}(s); an exit needs at least 2 (one before the head)")
    if isinstance(exits, str):
        if exits != "all":
            raise ValueError(f"{field} must be 'all', {{every: k}} or a list of {unit} positions in 1..{last}, got {exits!r}")
        return list(range(1, num_blocks))
    if isinstance(exits, Mapping):
        if set(exits) != {"every"}:
            raise ValueError(f"{field}: a mapping must be {{every: k}} (an exit after every k-th {unit}), got {dict(exits)!r}")
        return exits_every(exits["every"], num_blocks, field=f"{field}.every", unit=unit)
    if exits is None or isinstance(exits, (bool, int, float)) or not isinstance(exits, Sequence):
        raise ValueError(
            f"{field} must be 'all', {{every: k}} or a list of {unit} positions in 1..{last} "
            f"(position k: after {unit} k, counted from 1), got {exits!r}"
        )
    positions = list(exits)
    if not positions:
        raise ValueError(f"{field}: at least one exit position is needed ({unit}s 1..{last})")
    for position in positions:
        if isinstance(position, bool) or not isinstance(position, int):
            raise ValueError(f"{field}: exit positions are integers ({unit} counts 1..{last}), got {position!r}")
        if not 1 <= position <= last:
            raise ValueError(
                f"{field}: exit position {position} is outside 1..{last} (position k is after {unit} k; "
                f"the backbone has {num_blocks} {unit}s and the last one feeds its own head)"
            )
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise ValueError(f"{field}: exit positions must be strictly increasing, got {positions}")
    return positions


def exits_every(every: int, num_blocks: int, *, field: str, unit: str = "block") -> list[int]:
    """Positions k, 2k, ... below ``num_blocks`` (see ``resolve_exits``)."""
    last = num_blocks - 1
    if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= last:
        raise ValueError(
            f"{field} must be an integer in 1..{last} (the backbone has {num_blocks} {unit}s), got {every!r}"
        )
    return list(range(every, num_blocks, every))


class SequentialBackbone(FrozenBackbone):
    """A backbone that is a stem, a flat sequence of blocks and a head, cut at exit positions.

    In ``__init__``, build the layers, then call ``set_segments(blocks, positions)`` with the
    positions from ``resolve_exits`` and set ``exit_specs`` (one per position). Segment 0 runs
    ``stem`` and the blocks up to the first exit; segment i the blocks between exits i-1 and i;
    the last segment the remaining blocks and ``finish``. Override ``stem`` (default: identity),
    ``finish`` (the head: state -> logits) and, when a block takes more than the state,
    ``run_block``.
    """

    def set_segments(self, blocks: Sequence[Any], positions: Sequence[int]) -> None:
        """Cut ``blocks`` (modules or callables, registered elsewhere) after each position."""
        self.segments = Segments(positions, len(blocks))
        self._segment_blocks = [list(blocks[self.segments.blocks(i)]) for i in range(len(self.segments))]

    def replace_references(self, replaced: Mapping[nn.Module, nn.Module]) -> None:
        # The segments' block lists hold the blocks themselves (e.g. the layers of a Sequential).
        self._segment_blocks = [[replaced.get(block, block) for block in blocks] for blocks in self._segment_blocks]

    def segment_blocks(self, index: int) -> list[Any]:
        """The blocks segment ``index`` runs."""
        return self._segment_blocks[index]

    def stem(self, state: Any) -> Any:
        return state

    def run_block(self, block: Any, state: Any) -> Any:
        return block(state)

    def finish(self, state: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define finish(state) -> logits")

    def run_segment(self, index: int, state: Any) -> Any:
        if len(self._segment_blocks) != self.num_gates + 1:
            raise RuntimeError(
                f"{type(self).__name__}: exit_specs has {self.num_gates} exits but set_segments cut the blocks "
                f"into {len(self._segment_blocks)} segments; declare one ExitSpec per exit position"
            )
        if index == 0:
            state = self.stem(state)
        for block in self._segment_blocks[index]:
            state = self.run_block(block, state)
        return self.finish(state) if index == self.num_gates else state


class Segments:
    """Exit positions cutting a sequence of ``num_blocks`` blocks into ``len(positions) + 1`` segments.

    Segment i runs blocks ``bounds[i]`` to ``bounds[i + 1]`` (0-based, end excluded), where
    ``bounds = [0, *positions, num_blocks]``.
    """

    def __init__(self, positions: Sequence[int], num_blocks: int) -> None:
        bounds = [0, *positions, num_blocks]
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"segment cuts must lie strictly inside 0..{num_blocks} in increasing order, got {list(positions)}")
        self.positions = list(positions)
        self.bounds = bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def blocks(self, index: int) -> slice:
        """The slice of blocks segment ``index`` runs."""
        return slice(self.bounds[index], self.bounds[index + 1])


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
