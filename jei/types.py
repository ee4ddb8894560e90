"""Plain data types shared by every component. Imports only torch."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

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
    def num_exits(self) -> int:
        return self.logits.shape[0]

    @property
    def num_gates(self) -> int:
        return self.gate_logits.shape[-1]


@dataclass
class EarlyExitResult:
    """What real early-exit inference returns, in input order."""

    logits: Tensor  # [B, K], from the exit each sample took
    exit_index: Tensor  # [B], in 0..G


class HistoryGate(Protocol):
    """A gate that reads the exits before its own (``reads_history`` True; e.g. the
    ``uncertainty`` gate with ``history`` set, ``jei.heads.gates``).

    The model threads one per-sample tensor from gate to gate: gate l gets the history its
    predecessor returned (``None`` at exit 0) and returns its gate logit and the history
    extended by exit l. Rows are samples: in real early exit the model keeps the rows of the
    samples still running (``index_select`` on dim 0), exactly as it compacts the batch, so the
    all-exits pass and early exit give the same gate logits. A gate without ``reads_history``
    is called as ``gate(logits)`` and never sees a history.
    """

    reads_history: bool

    def step(self, logits: Tensor, history: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(gate logit [B], history [B, H])`` at this gate's exit."""
        ...


class NativeIM(Protocol):
    """An IM native exits can run (``jei.native_exits``): ``native_form()`` returns
    ``(kind, pool_size, weight [K, C'], bias [K])`` when the IM is exactly
    ``linear(global_pool(representation, kind, pool_size), weight, bias)``
    (``jei.heads.ims.global_pool``: a map's mean over a pool_size x pool_size grid, the tokens'
    mean, the vector), and None otherwise. Native exits read it at every call. A subclass that
    changes ``forward`` or ``pool`` must describe itself again: an IM whose ``forward`` or
    ``pool`` is overridden below the class that defines ``native_form`` is refused."""

    def native_form(self) -> tuple[ExitKind, int, Tensor, Tensor] | None: ...


class NativeRepresentation(Protocol):
    """A backbone whose representation native exits can compute (``jei.native_exits``):
    ``native_represent(index)`` returns ``("class_token_layer_norm", weight [C], bias [C], eps)``
    when ``represent(index, state)`` is exactly ``layer_norm(state[:, 0], (C,), weight, bias,
    eps)`` of tokens ``[B, N, C]`` (a ViT's class token under its final norm), and None
    otherwise (then ``represent`` runs in Python). Read for every exit at every call; a
    subclass that overrides ``represent`` below the class that defines ``native_represent`` is
    run in Python."""

    def native_represent(self, index: int) -> tuple[str, Tensor, Tensor, float] | None: ...


class NativeGate(Protocol):
    """A gate native exits can run: ``native_form()`` returns ``(weight [1, 4], bias [1])`` when the
    gate logit is ``linear(uncertainty_features(logits), weight, bias)`` (the paper's gate,
    ``jei.heads.uncertainty``), None otherwise; the same rule on overriding ``forward`` and ``step``."""

    def native_form(self) -> tuple[Tensor, Tensor] | None: ...


class ExitPolicy(Protocol):
    """The exit rule: turns each exit's outputs into "leave here or go on" (see ``jei.policies``).

    The same object drives the all-exits evaluation (``decide``) and real early exit
    (``begin``/``step``/``select``, one exit at a time, on the samples still running); the two
    give the same exits (property-tested for every built-in policy).
    """

    uses_gates: bool  # whether decisions read the gates (False: the gates may stay untrained)

    def may_leave(self, index: int) -> bool:
        """Whether any sample can leave at intermediate exit ``index``. False promises that
        ``step`` there would leave nobody and change no state, so real early exit may skip the
        exit's IM, gate and step (optional: a policy without it is asked at every exit)."""
        ...

    def check_exits(self, num_gates: int) -> None:
        """Raise ``ValueError``, naming the setting and the fix, when this policy cannot run a
        network with ``num_gates`` intermediate exits (e.g. per-exit thresholds of another
        length); ``EarlyExitNetwork`` asks when it is built, before any work (optional)."""
        ...

    def decide(self, outputs: ExitOutputs) -> Tensor:
        """``[B]`` exit index in 0..G for every sample of an all-exits pass."""
        ...

    def begin(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        """Streaming state for a new batch: tensors whose first dimension is the batch."""
        ...

    def step(self, index: int, logits: Tensor, gate_logit: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """At intermediate exit ``index``: ``(leaving [B] bool, next state)``."""
        ...

    def fit(self, outputs: ExitOutputs, labels: Tensor, costs: Tensor) -> None:
        """Choose data-dependent settings (thresholds) on the validation split; may do nothing."""
        ...

    def native_rule(self, index: int) -> tuple[str, float] | None:
        """What ``step`` computes at exit ``index`` as ``(rule, threshold)`` for native exits
        (``jei.native_exits.RULES``), or None (optional: a policy without it runs in Python).
        The same rule on overriding ``step``, ``begin`` and ``_score`` as for ``NativeIM``."""
        ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


@dataclass
class TrainBatch:
    """One training batch as a loss sees it: cached inputs, labels and the exits' outputs."""

    pooled: list[Tensor]
    final_logits: Tensor
    labels: Tensor
    outputs: ExitOutputs


class FeatureSource(Protocol):
    """Cached exit features of one split (``jei.features.CachedSplit`` is one)."""

    labels: Tensor

    def __len__(self) -> int: ...

    def batch(self, index: Tensor, device: torch.device) -> tuple[list[Tensor], Tensor, Tensor]:
        """``(pooled exit features, final logits, labels)`` of the samples ``index``."""
        ...


class OptimizerFactory(Protocol):
    def build(self, params: Iterable[nn.Parameter], total_steps: int) -> tuple[torch.optim.Optimizer, Any]: ...


@dataclass
class Step:
    """One kind of optimisation step of a phase: which parameters, which loss."""

    name: str
    parameters: list[nn.Parameter]
    loss: Callable[[TrainBatch], Tensor]


@dataclass
class Phase:
    """A stretch of training that an objective asks the trainer to run.

    The trainer runs ``epochs`` epochs over the training features; batch t uses
    ``steps[(t // block_batches) % len(steps)]`` (one step: every batch), each step with its own
    optimiser. After every epoch the validation outputs go to ``on_epoch_end``, which may stop
    the phase by returning True. A phase with no steps trains nothing (only its hooks run).
    ``fit`` is for fits that need the whole training split at once rather than batches (a
    full-batch L-BFGS fit): it gets ``(train features, val features, device)`` after
    ``on_start`` and before any step. ``ims_only`` marks a phase that trains the IMs alone on
    their classification loss (no gate, no exit decision): a protocol may give such phases a
    separate IM training split (``fit_exits(ims_train=...)``; ``jei-compare crossfit_ims=train``).
    """

    name: str
    epochs: int
    steps: list[Step]
    optimizer: OptimizerFactory | None = None
    block_batches: int = 1
    on_start: Callable[[ExitOutputs, Tensor], None] | None = None  # (val outputs, val labels)
    on_epoch_end: Callable[[int, ExitOutputs, Tensor], bool] | None = None
    on_end: Callable[[], None] | None = None
    fit: Callable[[FeatureSource, FeatureSource, torch.device], None] | None = None
    ims_only: bool = False


class Objective(Protocol):
    """What the exit trainer asks of a method's plugin (see ``jei.objectives``).

    An objective owns its schedule (``phases``) and losses; its state (class weights,
    meta-network weights) is saved with the run and reloaded with it.
    """

    default_policy: str  # the exit policy this method is meant to run with (``jei.registry.POLICIES``)
    ensemble_decay: float  # > 0: exit l predicts out_l + decay * F_{l-1} (BoostedNet); 0: plain IMs

    def phases(self, network: nn.Module, schedule: Any, costs: Tensor) -> list[Phase]: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...
