"""Native exits: real early exit with each exit's head run as one C++ call (CPU, float32).

At batch 1 the Python head of an exit (IM, temperature, score or JEI gate, decision, count) is
8 to 25 PyTorch operations that each cost several microseconds of dispatch, which is what keeps
real early exit above its latency-weighted ideal (``benchmarks/exit_head_cost.py``). Native
exits compute the same thing in one call to a small C++ kernel (``jei/csrc/native_exits.cpp``),
which also copies out the staying samples' state when some leave (for backbones whose
``select`` is plain row selection, ``jei.memory_format.plain_row_select``). The kernel is
compiled on first use with torch's ``cpp_extension`` (a C++ compiler and ninja; about 20 s
once, then cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``)::

    network.use_native_exits()          # builds or loads the kernel; raises if it cannot run
    result = network.early_exit(images)  # the backbone segments as before, the heads native

The kernel computes in float32 like the Python path, in another order, so it agrees with it to
float rounding, not bit for bit: a sample whose score is within rounding of its threshold may
take another exit (tested on random networks; counted by the speed benchmarks). A sample with a
NaN or +inf logit never leaves, as its NaN scores never pass in Python.

It runs networks whose every exit has a ``NativeIM`` (a mean pool and one linear layer), a
``NativeGate`` when the policy reads gates, and a policy with a ``native_rule`` (JEI's rule,
gate thresholds, max-prob, entropy), on CPU float32 parameters, without ensembles, history
gates or forward hooks. ``native_plan`` says why when a network does
not qualify. A network edited after ``use_native_exits`` so that it no longer qualifies warns
once and runs in Python until ``use_native_exits`` is called again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SOURCE = Path(__file__).resolve().parent / "csrc" / "native_exits.cpp"
# Codes shared with the kernel's ``Pool`` and ``Rule`` enums.
POOLS = {"map": 0, "tokens": 1, "vector": 2, "class_token_norm": 3}
RULES = {"max_prob": 0, "negative_entropy": 1, "gate_logit": 2, "gate_probability": 3, "jei": 4}
GATE_RULES = frozenset({"gate_logit", "gate_probability", "jei"})
EMPTY = torch.empty(0)  # the kernel's "not used" argument

NativeStep = Callable[[int, Any, dict[str, Tensor]], tuple[Tensor, Tensor | None, dict[str, Tensor], int, Any]]


class NativeExitsUnavailable(RuntimeError):
    """The kernel could not be built or loaded here (no C++ compiler or ninja)."""


@functools.cache
def load_kernel() -> Any:
    """The compiled kernel module, built on first use (then loaded from torch's cache)."""
    from torch.utils import cpp_extension  # imported here: it is slow to import and rarely needed

    try:
        return cpp_extension.load(
            name="jei_native_exits", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp-simd"], verbose=False
        )
    except (OSError, RuntimeError, ImportError) as error:  # no compiler, no ninja, a failed build
        raise NativeExitsUnavailable(
            f"native exits could not build {SOURCE.name}: they need a C++ compiler and ninja "
            f"(pip install ninja). Run without them (network.use_native_exits(False)). Cause: {error}"
        ) from error


class NativeExitsChanged(RuntimeError):
    """A head or the policy stopped being one native exits can run after the run was made (an
    edit inside a module, a dtype or device change): the call is redone in Python."""


@dataclass(frozen=True)
class NativeExit:
    """One exit's modules. Their ``native_form`` is read at the start of every call, so edits
    inside them (a new classifier, new parameters, another ``pool_size``) are seen."""

    im: nn.Module
    gate: nn.Module


def linear_parameters(linear: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(weight, bias)`` of a plain ``nn.Linear`` with a bias, or None (another module, a
    parametrized or hook-computed weight, no bias); for ``native_form``. Read from the module
    dicts: native exits call it for every exit at every call."""
    if type(linear) is not nn.Linear:  # (a parametrized Linear is a subclass)
        return None
    weight, bias = linear._parameters.get("weight"), linear._parameters.get("bias")
    return None if weight is None or bias is None else (weight, bias)


def _describes(obj: object, form: str, methods: tuple[str, ...]) -> bool:
    """Whether the class that defines ``form`` also defines, or inherits unchanged, each of
    ``methods``: a subclass that changes what a component computes without describing itself
    again is not run natively."""

    def author(name: str) -> type | None:
        return next((cls for cls in type(obj).__mro__ if name in vars(cls)), None)

    described = author(form)
    return described is not None and all(
        (defined := author(name)) is None or issubclass(described, defined) for name in methods
    )


def _global_hooks() -> bool:
    """Whether global forward hooks are registered (``nn.modules.module.register_module_forward_hook``)."""
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook on ``module`` or a submodule would see what native exits skip."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def native_plan(network: nn.Module) -> list[NativeExit] | str:
    """Each exit's ``NativeExit``, or why ``network`` (an ``EarlyExitNetwork``) cannot run natively."""
    policy = network.policy
    if network.ensemble_decay != 0.0:
        return "an ensemble (ensemble_decay > 0) reads the previous exit's logits"
    if network.reads_history:
        return "history gates read the exits before their own"
    rule_of = getattr(policy, "native_rule", None)
    if rule_of is None or not _describes(policy, "native_rule", ("step", "begin", "_score")):
        return f"the policy {type(policy).__name__} has no native_rule for its step"
    if network.temperature.device.type != "cpu" or network.temperature.dtype != torch.float32:
        return "the network's temperatures are not float32 on the CPU"
    if _global_hooks():
        return "global forward hooks are registered (native exits would skip them)"
    plan = []
    for index, (im, gate) in enumerate(zip(network.ims, network.gates)):
        form = im.native_form() if _describes(im, "native_form", ("forward", "pool")) else None
        if form is None:
            return f"IM {index} ({type(im).__name__}) is not a mean pool and one linear layer with a bias"
        rule = rule_of(index)
        if rule is None or rule[0] not in RULES:
            return f"the policy {type(policy).__name__} gives no native rule at exit {index}"
        tensors = list(form[2:])
        if rule[0] in GATE_RULES:
            gate_form = gate.native_form() if _describes(gate, "native_form", ("forward", "step")) else None
            if gate_form is None:
                return f"gate {index} ({type(gate).__name__}) is not the paper's Linear(4, 1) over uncertainty features"
            tensors += gate_form
        if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
            return f"exit {index}'s parameters are not float32 on the CPU"
        if _hooked(im) or _hooked(gate):
            return f"exit {index}'s IM or gate has forward hooks (native exits would skip them)"
        plan.append(NativeExit(im, gate))
    return plan


def representation_form(backbone: nn.Module) -> Callable[[int], tuple[str, Tensor, Tensor, float] | None] | None:
    """The backbone's ``native_represent`` (``jei.types.NativeRepresentation``), unless a subclass
    changed ``represent`` without describing itself again: None, and native exits call
    ``represent`` in Python."""
    if getattr(backbone, "native_represent", None) is None or not _describes(backbone, "native_represent", ("represent",)):
        return None
    if "represent" in vars(backbone):  # replaced on the instance: only Python knows what it computes
        return None
    return backbone.native_represent


def native_steps(
    represent: Callable[[int, Any], Tensor], plan: list[NativeExit], policy: Any, temperature: Tensor, compacts_rows: bool,
    native_represent: Callable[[int], tuple[str, Tensor, Tensor, float] | None] | None = None,
) -> Callable[[], NativeStep]:
    """``prepare() -> step`` for one early-exit call. ``step(index, state, decision) -> (logits,
    order, decision, count, staying state)`` is what ``jei.model.stream_exits`` calls at exit
    ``index``: its head, temperature, score or gate, decision and count in one kernel call.
    ``decision`` is the policy's streaming state (JEI's running gate sum). When some but not all
    samples leave, ``order`` lists the staying samples, then the leaving ones (each in batch
    order), and the logits and the state come in that order; with ``compacts_rows`` (the
    backbone's ``select`` is plain row selection, ``jei.memory_format.plain_row_select``) the
    kernel also copies out the staying samples' backbone state, when it is a plain, dense CPU
    tensor (otherwise ``select`` does). Otherwise ``order`` and that state are None. With
    ``native_represent`` (``representation_form``), a vector IM's representation, the class
    token's LayerNorm, is computed in the kernel too.

    ``prepare`` reads every exit's forms, the representation's and the policy's rule and
    threshold, so edits made between calls are seen; ``NativeExitsChanged`` (before any work)
    when they no longer run natively. It reads them all at once, at the start of the call:
    read right after a segment, whose data has pushed the Python objects out of the caches, the
    same reads cost several times more (ViT, batch 1: 12 µs an exit after its segment, ad hoc,
    against 19 µs for all five exits at the start of a call, ``benchmarks/exit_head_cost.py``)."""
    kernel = load_kernel().exit_step
    jei = RULES["jei"]
    no_norm = (EMPTY, EMPTY, 0.0)  # the kernel's arguments for a representation computed in Python

    def prepare() -> NativeStep:
        if _global_hooks():  # registered since the run was made: they would not see the heads
            raise NativeExitsChanged("global forward hooks are registered (native exits would skip them)")
        exits = []
        for index, exit_ in enumerate(plan):
            rule, threshold = policy.native_rule(index)
            form, code = exit_.im.native_form(), RULES.get(rule)
            gate_form = exit_.gate.native_form() if rule in GATE_RULES else (EMPTY, EMPTY)
            if form is None or gate_form is None or code is None:
                raise NativeExitsChanged(f"exit {index}'s IM, gate or rule is no longer one native exits run")
            kind, grid, weight, bias = form
            norm = native_represent(index) if native_represent is not None and kind == "vector" else None
            in_kernel = norm is not None and norm[0] == "class_token_layer_norm"  # the representation in the kernel too
            pool = POOLS["class_token_norm"] if in_kernel else POOLS[kind]
            exits.append((in_kernel, (pool, grid, weight, bias, temperature, index, code, threshold, *gate_form),
                          norm[1:] if in_kernel else no_norm, code == jei))

        def step(index: int, state: Any, decision: dict[str, Tensor]) -> tuple[Tensor, Tensor | None, dict[str, Tensor], int, Any]:
            in_kernel, head, norm_form, reads_used = exits[index]
            features = state if in_kernel else represent(index, state)
            rows = state if compacts_rows and type(state) is Tensor else EMPTY  # (not a subclass: it would come back plain)
            try:
                logits, order, used, count, staying = kernel(
                    features, *head, decision["used"] if reads_used else EMPTY, rows, *norm_form
                )
            except RuntimeError as error:  # the kernel refuses its inputs (dtype, device, shapes)
                raise NativeExitsChanged(str(error)) from error
            return logits, order, ({"used": used} if reads_used else decision), count, staying

        return step

    return prepare
