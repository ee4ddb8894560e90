"""EarlyExitNetwork: a frozen backbone with one IM and one gate per intermediate exit."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from jei.memory_format import plain_row_select
from jei.native_exits import (
    NativeExit,
    NativeExitsChanged,
    NativeExitsUnavailable,
    NativeStep,
    load_kernel,
    native_plan,
    native_steps,
    representation_form,
)
from jei.policies import JEIRule
from jei.types import EarlyExitResult, ExitOutputs, ExitPolicy


class EarlyExitNetwork(nn.Module):
    """Composes a backbone adapter with IMs and gates built from its ``exit_specs``.

    Two ways to run it, which give the same predictions (tested):
    - ``forward``: the all-exits pass (training, calibration): every exit's logits and gates;
    - ``early_exit``: real inference, segment by segment; a sample that exits leaves the batch
      and no later segment is computed for it.

    ``policy`` (an ``ExitPolicy``, JEI's rule by default) decides where samples leave, in both.
    ``ensemble_decay`` > 0 makes exit l predict out_l + decay * F_{l-1}, the previous exit's
    prediction detached (BoostedNet, Yu et al. 2023); the backbone head joins as the last stage.
    """

    def __init__(
        self,
        backbone: nn.Module,
        ims: Sequence[nn.Module],
        gates: Sequence[nn.Module],
        policy: ExitPolicy | None = None,
        ensemble_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= ensemble_decay:
            raise ValueError(f"ensemble_decay must be >= 0, got {ensemble_decay}")
        num_gates = len(backbone.exit_specs)
        if num_gates == 0:
            raise ValueError("the backbone declares no exit: an early-exit network needs at least one")
        if not len(ims) == len(gates) == num_gates:
            raise ValueError(f"need one IM and one gate per exit ({num_gates}); got {len(ims)} IMs, {len(gates)} gates")
        self.backbone = backbone
        self.ims = nn.ModuleList(ims)
        self.gates = nn.ModuleList(gates)
        self.policy: ExitPolicy = policy if policy is not None else JEIRule()
        check_exits = getattr(self.policy, "check_exits", None)  # (optional in the contract)
        if check_exits is not None:
            check_exits(num_gates)  # e.g. per-exit thresholds of another length: now, not at the first decision
        self.ensemble_decay = float(ensemble_decay)
        # Per-exit temperature (G IMs, then the head): every exit's logits are divided by it
        # before gates, policies and losses see them; 1 until fitted (``jei.temperature``).
        self.register_buffer("temperature", torch.ones(num_gates + 1))
        self.native_exits = False  # ``use_native_exits``: real early exit's heads in C++
        # (what the run was made for, the run or None: Python)
        self._native_cache: tuple[tuple[Any, ...], Callable[[Any], EarlyExitResult] | None] | None = None

    def use_native_exits(self, enabled: bool = True) -> EarlyExitNetwork:
        """Run real early exit's heads natively (``jei.native_exits``), or not (False). Builds or
        loads the kernel now, and raises a ``ValueError`` saying why when this network cannot
        run natively (or ``NativeExitsUnavailable`` when the kernel cannot be built here)."""
        if enabled:
            plan = native_plan(self)
            if isinstance(plan, str):
                raise ValueError(f"native exits cannot run this network: {plan}. Run without them.")
            load_kernel()
        self.native_exits, self._native_cache = bool(enabled), None
        return self

    @property
    def num_gates(self) -> int:
        return len(self.ims)

    @property
    def reads_history(self) -> bool:
        """Whether a gate reads the exits before its own (``jei.types.HistoryGate``)."""
        return any(getattr(gate, "reads_history", False) for gate in self.gates)

    def exit_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters: IMs (theta) and gates (phi). The backbone has none."""
        return {"ims": list(self.ims.parameters()), "gates": list(self.gates.parameters())}

    @torch.no_grad()
    def pooled_features(self, inputs: Any) -> tuple[list[Tensor], Tensor]:
        """Each IM's pooled input and the backbone's logits: what the feature cache stores."""
        out = self.backbone.forward_exits(inputs)
        return [im.pool(feature) for im, feature in zip(self.ims, out.features)], out.logits

    def _combine(self, logits: Tensor, previous: Tensor | None) -> Tensor:
        return combine(logits, previous, self.ensemble_decay)

    def _scaled(self, logits: Tensor, index: int) -> Tensor:
        return logits / self.temperature[index].to(logits.dtype)

    def from_pooled(self, pooled: Sequence[Tensor], final_logits: Tensor) -> ExitOutputs:
        """Exit outputs from pooled features (cached or fresh)."""
        raw: list[Tensor] = []  # before temperature: what ensembles accumulate
        for im, p in zip(self.ims, pooled):
            raw.append(self._combine(im.classifier(p), raw[-1] if raw else None))
        raw.append(self._combine(final_logits.to(raw[0].dtype), raw[-1]))
        logits = [self._scaled(z, index) for index, z in enumerate(raw)]
        if self.reads_history:
            gate_logits, history = [], None
            for gate, z in zip(self.gates, logits):
                gate_logit, history = gate_step(gate, z, history)
                gate_logits.append(gate_logit)
        else:
            gate_logits = [gate(z) for gate, z in zip(self.gates, logits)]
        return ExitOutputs(logits=torch.stack(logits), gate_logits=torch.stack(gate_logits, dim=-1))

    def forward(self, inputs: Any) -> ExitOutputs:
        return self.from_pooled(*self.pooled_features(inputs))

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles leave the cached native run behind: it holds this network's tensors.
        return {**super().__getstate__(), "_native_cache": None}

    def _native_run(self) -> Callable[[Any], EarlyExitResult] | None:
        """Real early exit with native exits, bound to the current backbone, policy and heads:
        made again only when one of these is replaced (making it costs more than a batch-1
        exit); None, with one warning, when they cannot run natively."""
        modules = self._modules
        key = (modules["backbone"], self.policy, self.ensemble_decay, id(self._buffers["temperature"]),
               *modules["ims"]._modules.values(), *modules["gates"]._modules.values())
        cache = self._native_cache
        if cache is None or cache[0] != key:
            plan, run = native_plan(self), None
            try:
                run = self._bind_native(plan, key) if not isinstance(plan, str) else None
            except NativeExitsUnavailable as error:  # e.g. a copy taken to a machine without a compiler
                plan = str(error)
            if run is None:
                warnings.warn(f"native exits are on but cannot run this network ({plan}): running in Python", stacklevel=3)
            self._native_cache = cache = (key, run)
        return cache[1]

    def _bind_native(self, plan: list[NativeExit], key: tuple[Any, ...]) -> Callable[[Any], EarlyExitResult]:
        backbone, policy, temperature, num_gates = self.backbone, self.policy, self.temperature, self.num_gates
        begin, batch_size, segment, select = backbone.begin, backbone.batch_size, backbone.run_segment, backbone.select
        prepare = native_steps(backbone.represent, plan, policy, temperature, plain_row_select(backbone),
                               representation_form(backbone))

        def run(inputs: Any) -> EarlyExitResult:  # (no ensemble or history gates: native_plan refuses them)
            try:
                step = prepare()  # every exit's forms, read before any work
                return stream_exits(inputs, batch_size(inputs), num_gates, begin=begin, segment=segment, head=_unused,
                                    gate=_unused, select=select, policy=policy, temperature=temperature, native=step)
            except NativeExitsChanged as change:  # edited since: this call again in Python, and the next ones
                self._native_cache = (key, None)
                warnings.warn(f"native exits stopped running this network ({change}): running in Python", stacklevel=3)
                return self._python_early_exit(inputs)

        return run

    def early_exit(self, inputs: Any) -> EarlyExitResult:
        """Real early-exit inference: stop computing each sample at the exit it takes.

        Gives exactly the all-exits pass's exits and predictions (``predict_from_outputs``);
        ``stream_exits`` says how the work per exit is kept small. ``exit_index`` is on the
        logits' device. With ``use_native_exits``, each exit's head runs in C++
        (``jei.native_exits``), which agrees with the all-exits pass to float rounding.
        """
        native = self._native_run() if self.native_exits else None
        return native(inputs) if native is not None else self._python_early_exit(inputs)

    def _python_early_exit(self, inputs: Any) -> EarlyExitResult:
        backbone, ims, gates, history = self.backbone, list(self.ims), list(self.gates), self.reads_history
        return stream_exits(
            inputs,
            backbone.batch_size(inputs),
            self.num_gates,
            begin=backbone.begin,
            segment=backbone.run_segment,
            head=lambda index, state: ims[index](backbone.represent(index, state)),
            gate=(lambda index, logits, past: gate_step(gates[index], logits, past)) if history
            else (lambda index, logits: gates[index](logits)),
            select=backbone.select,
            policy=self.policy,
            temperature=self.temperature,
            ensemble_decay=self.ensemble_decay,
            gate_history=history,
        )


def _unused(*args: Any) -> Any:
    raise AssertionError("native exits run the heads themselves")


def gate_step(gate: nn.Module, logits: Tensor, history: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A gate's logit and the history for the next gate: a history gate's ``step``; any other
    gate is called on the logits alone and passes the history on unchanged."""
    if getattr(gate, "reads_history", False):
        return gate.step(logits, history)
    return gate(logits), history


def combine(logits: Tensor, previous: Tensor | None, ensemble_decay: float) -> Tensor:
    """Exit l's prediction with an ensemble: out_l + decay * F_{l-1} (previous detached)."""
    if ensemble_decay == 0.0 or previous is None:
        return logits
    return logits + ensemble_decay * previous.detach().to(logits.dtype)


def stream_exits(
    state: Any,
    total: int,
    num_gates: int,
    *,
    begin: Callable[[Any], Any] | None = None,
    segment: Callable[[int, Any], Any],
    head: Callable[[int, Any], Tensor],
    gate: Callable[[int, Tensor], Tensor],
    select: Callable[[Any, Tensor], Any],
    policy: ExitPolicy,
    temperature: Tensor,
    ensemble_decay: float = 0.0,
    gate_history: bool = False,
    native: NativeStep | None = None,
) -> EarlyExitResult:
    """The real early-exit loop over a chain of parts, shared by ``EarlyExitNetwork.early_exit``
    and the exported chain (``jei.export``).

    ``state`` is the input state (``backbone.begin(inputs)``) of ``total`` samples, or the inputs
    with ``begin`` given (then run first, under inference mode with everything else);
    ``segment(i, state)`` advances it through segment i (segment ``num_gates``: the backbone's
    logits); ``head(i, state)`` is IM i's raw logits; ``gate(i, logits)`` gate i's logit;
    ``select(state, keep)`` the state of the samples at positions ``keep``. Exit i's logits are
    ``combine``d with the previous exit's (ensembles) and divided by ``temperature[i]``, exactly
    as in ``EarlyExitNetwork.from_pooled``; ``policy`` decides who leaves. With
    ``gate_history`` (history gates, ``jei.types.HistoryGate``) ``gate(i, logits, history)``
    returns ``(gate logit, history)``, and the history is compacted with the samples.
    ``native`` (a step of ``jei.native_exits.native_steps``) replaces ``head``, ``gate``, the temperature and
    ``policy.step`` with one call per exit that also counts who leaves and orders the samples,
    their logits and the policy state for compaction (no ``argsort`` or gathers of its own),
    and may copy out the staying samples' state itself (then ``select`` is not called).

    The work per exit is kept small:
    - one device-to-host read per exit (how many samples leave; plus one per call, which
      temperatures are 1) and nothing else: positions and exits stay on the logits' device,
      the split into staying and leaving samples is one stable ``argsort``, and the output is
      assembled once, at the end;
    - nothing is compacted at an exit no sample leaves, and once every sample has left no
      later segment runs;
    - compaction is one ``index_select`` each of the backbone state, the policy state,
      (with an ensemble) the previous prediction and (with history gates) the gates' history
      (``native`` orders the policy state itself, and may copy out the backbone state);
    - gates are not evaluated for a policy that does not read them (``uses_gates`` False), and
      an exit the policy says nobody can leave (``may_leave`` False, e.g. a +inf threshold) is
      skipped whole when no later exit reads it (no ensemble, no history gates);
    - a division by a temperature of exactly 1 is skipped (it would change nothing).
    """
    read_gates = native is None and getattr(policy, "uses_gates", True)
    may_leave = skippable_exits(policy, ensemble_decay, gate_history)
    # Asked for every exit here, together, rather than after each segment, where (cold) the
    # same call costs several times more at batch 1.
    skipped = [False] * num_gates if may_leave is None else [not may_leave(index) for index in range(num_gates)]
    unit = [value == 1.0 for value in temperature.tolist()]  # which temperatures are exactly 1
    running = total
    active: Tensor | None = None  # original positions of the running samples; None: all, in order
    decision: dict[str, Tensor] | None = None
    previous: Tensor | None = None  # the last exit's prediction, for ensembles
    history: Tensor | None = None  # history gates' per-sample history of the exits so far
    dtype = None  # the first exit's logits' dtype: the output's, as in the all-exits pass
    no_gates: Tensor | None = None  # the gate logits a gate-free policy is given
    left: list[tuple[Tensor | None, int, Tensor]] = []  # (positions or None: all, exit, logits)
    # Inference mode makes every small operation cheaper (no version counters, no autograd
    # dispatch); the result is assembled outside it, so callers get ordinary tensors.
    with torch.inference_mode():
        state = state if begin is None else begin(state)
        for index in range(num_gates):
            state = segment(index, state)
            if skipped[index]:
                continue
            if native is not None:  # head, temperature, gate, decision and count in one call
                if decision is None:
                    decision, dtype = policy.begin(total, torch.device("cpu")), torch.float32
                logits, order, decision, count, staying_state = native(index, state, decision)
                raw = logits  # (no ensemble runs natively)
            else:
                raw = combine(head(index, state), previous, ensemble_decay)
                logits = raw if unit[index] else raw / temperature[index].to(raw.dtype)
                if decision is None:
                    decision, dtype = policy.begin(total, logits.device), logits.dtype
                if not read_gates:  # zeros for the running samples, made again only when they change
                    if no_gates is None or len(no_gates) != running:
                        no_gates = logits.new_zeros(running)
                    gate_logit = no_gates
                elif gate_history:
                    gate_logit, history = gate(index, logits, history)
                else:
                    gate_logit = gate(index, logits)
                leaving, decision = policy.step(index, logits, gate_logit, decision)
                # The one device-to-host read of this exit.
                count = int(leaving.item()) if running == 1 else int(leaving.sum())
            if count == running:  # everyone left: no later segment runs
                left.append((active, index, logits))
                break
            if count == 0:  # nobody left: nothing to compact
                previous = raw
                continue
            staying = running - count
            if native is None:  # staying samples first, then leaving ones, each in batch order: no further sync
                order = torch.argsort(leaving.to(torch.uint8), stable=True)
            stay, leave = order[:staying], order[staying:]
            # Native exits give the logits and the policy state in that order already.
            leaving_logits = logits[staying:] if native is not None else logits.index_select(0, leave)
            left.append((leave if active is None else active.index_select(0, leave), index, leaving_logits))
            active = stay if active is None else active.index_select(0, stay)
            running = staying
            decision = {key: value[:staying] if native is not None else _take(value, stay) for key, value in decision.items()}
            previous = raw.index_select(0, stay) if ensemble_decay != 0.0 else None
            history = history.index_select(0, stay) if history is not None else None
            state = select(state, stay) if native is None or staying_state is None else staying_state
        else:  # some samples ran through every exit
            final = segment(num_gates, state)
            dtype = final.dtype if dtype is None else dtype  # every exit skipped
            final = combine(final.to(dtype), previous, ensemble_decay)
            scaled = final if unit[num_gates] else final / temperature[num_gates].to(final.dtype)
            left.append((active, num_gates, scaled))
    return _assemble(left, total, dtype)


def skippable_exits(policy: ExitPolicy, ensemble_decay: float, gate_history: bool) -> Callable[[int], bool] | None:
    """``policy.may_leave`` when real early exit may act on it: an exit nobody can leave is
    skipped whole, unless a later exit reads its output (an ensemble, history gates). None:
    every exit runs."""
    if ensemble_decay != 0.0 or gate_history:
        return None
    return getattr(policy, "may_leave", None)


def _take(value: Tensor, keep: Tensor) -> Tensor:
    """Rows ``keep`` of a policy-state tensor (what ``jei.policies.select_state`` does)."""
    return value.index_select(0, keep) if value.dim() > 0 else value[keep]


def _assemble(left: list[tuple[Tensor | None, int, Tensor]], total: int, dtype: torch.dtype) -> EarlyExitResult:
    """The result, in input order, from the groups of samples that left: (their positions, or
    None for all samples in order; the exit; their logits)."""
    positions, index, logits = left[0]
    if len(left) == 1 and positions is None:  # all left at one exit, before any compaction
        exit_index = torch.full((total,), index, dtype=torch.long, device=logits.device)
        if logits.dtype != dtype or logits.is_inference():  # an ordinary tensor of its own for the caller
            logits = logits.to(dtype, copy=True)
        return EarlyExitResult(logits=logits, exit_index=exit_index)
    out = logits.new_empty((total, logits.shape[-1]), dtype=dtype)
    exit_index = torch.empty(total, dtype=torch.long, device=logits.device)
    for positions, index, logits in left:
        out.index_copy_(0, positions, logits.to(dtype))
        exit_index.index_fill_(0, positions, index)
    return EarlyExitResult(logits=out, exit_index=exit_index)


def predict_from_outputs(outputs: ExitOutputs, policy: ExitPolicy | None = None) -> EarlyExitResult:
    """The prediction the all-exits pass implies under ``policy`` (JEI's rule by default):
    what ``early_exit`` computes for real."""
    exit_index = (policy or JEIRule()).decide(outputs)
    logits = outputs.logits.gather(0, exit_index.view(1, -1, 1).expand(1, -1, outputs.logits.shape[-1]))[0]
    return EarlyExitResult(logits=logits, exit_index=exit_index)
