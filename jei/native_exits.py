"""Native exits: real early exit with each exit's head run as one C++ call (CPU, float32).

At batch 1 the Python head of an exit (IM, temperature, score or JEI gate, decision, count) is
8 to 25 PyTorch operations that each cost several microseconds of dispatch, which is what keeps
real early exit above its latency-weighted ideal (``benchmarks/exit_head_cost.py``). Native
exits compute the same thing in one call to a small C++ kernel (``jei/csrc/native_exits.cpp``),
compiled on first use with torch's ``cpp_extension`` (a C++ compiler and ninja; about 20 s
once, then cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``)::

    network.use_native_exits()          # builds or loads the kernel; raises if it cannot run
    result = network.early_exit(images)  # the backbone segments as before, the heads native

The kernel computes in double and rounds to float where the Python path holds a float, so it
agrees with the Python path to float rounding, not bit for bit: a sample whose score is within
rounding of its threshold may take another exit (tested on random networks; counted by the
speed benchmarks). It runs networks whose every exit has a ``NativeIM`` (a mean pool and one
linear layer), a ``NativeGate`` when the policy reads gates, and a policy with a
``native_rule`` (JEI's rule, gate thresholds, max-prob, entropy), on CPU float32 parameters,
without ensembles or history gates. ``native_plan`` says why when a network does not qualify.
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
POOLS = {"map": 0, "tokens": 1, "vector": 2}
RULES = {"max_prob": 0, "negative_entropy": 1, "gate_logit": 2, "gate_probability": 3, "jei": 4}
GATE_RULES = frozenset({"gate_logit", "gate_probability", "jei"})
EMPTY = torch.empty(0)  # the kernel's "not used" argument

NativeStep = Callable[[int, Any, dict[str, Tensor]], tuple[Tensor, Tensor | None, dict[str, Tensor], int]]


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


@dataclass(frozen=True)
class NativeExit:
    """One exit's parameters for the kernel: the IM's pool and linear layer, the gate's (empty
    when the policy does not read gates). The tensors are the modules' own parameters, so edits
    in place and ``module.to`` are seen without making the plan again."""

    pool: int
    grid: int  # the IM's pool_size (maps)
    weight: Tensor
    bias: Tensor
    gate_weight: Tensor
    gate_bias: Tensor


def _same_author(obj: object, form: str, methods: tuple[str, ...]) -> bool:
    """Whether ``form`` is defined by the same class as every one of ``methods``: a subclass that
    changes what the component computes without describing it again is not run natively."""

    def author(name: str) -> type | None:
        return next((cls for cls in type(obj).__mro__ if name in vars(cls)), None)

    return all(author(name) is author(form) for name in methods)


def native_plan(network: nn.Module) -> list[NativeExit] | str:
    """Each exit's ``NativeExit``, or why ``network`` (an ``EarlyExitNetwork``) cannot run natively."""
    policy = network.policy
    if network.ensemble_decay != 0.0:
        return "an ensemble (ensemble_decay > 0) reads the previous exit's logits"
    if network.reads_history:
        return "history gates read the exits before their own"
    rule_of = getattr(policy, "native_rule", None)
    if rule_of is None or not _same_author(policy, "native_rule", ("step",)):
        return f"the policy {type(policy).__name__} has no native_rule for its step"
    if network.temperature.device.type != "cpu":
        return "the network is not on the CPU"
    plan = []
    for index, (im, gate) in enumerate(zip(network.ims, network.gates)):
        form = im.native_form() if _same_author(im, "native_form", ("forward", "pool")) else None
        if form is None:
            return f"IM {index} ({type(im).__name__}) is not a mean pool and one linear layer with a bias"
        kind, grid, weight, bias = form
        rule = rule_of(index)
        if rule is None or rule[0] not in RULES:
            return f"the policy {type(policy).__name__} gives no native rule at exit {index}"
        gate_weight = gate_bias = EMPTY
        if rule[0] in GATE_RULES:
            gate_form = gate.native_form() if _same_author(gate, "native_form", ("forward",)) else None
            if gate_form is None:
                return f"gate {index} ({type(gate).__name__}) is not the paper's Linear(4, 1) over uncertainty features"
            gate_weight, gate_bias = gate_form
        tensors = (weight, bias, gate_weight, gate_bias)
        if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors if t is not EMPTY):
            return f"exit {index}'s parameters are not float32 on the CPU"
        plan.append(NativeExit(POOLS[kind], grid, weight, bias, gate_weight, gate_bias))
    return plan


def native_step(represent: Callable[[int, Any], Tensor], plan: list[NativeExit], policy: Any, temperature: Tensor) -> NativeStep:
    """``step(index, state, decision) -> (logits, order, decision, count)`` for
    ``jei.model.stream_exits``: exit ``index``'s head, temperature, score or gate, decision and
    count in one kernel call. ``decision`` is the policy's streaming state (JEI's running gate
    sum). When some but not all samples leave, ``order`` lists the staying samples, then the
    leaving ones (each in batch order), and the logits and the state come in that order; otherwise
    ``order`` is None. The policy's thresholds are read at every call (``native_rule``), so edits
    are seen."""
    kernel = load_kernel().exit_step
    jei = RULES["jei"]

    def step(index: int, state: Any, decision: dict[str, Tensor]) -> tuple[Tensor, Tensor | None, dict[str, Tensor], int]:
        exit_, (rule, threshold) = plan[index], policy.native_rule(index)
        code = RULES[rule]
        logits, order, used, count = kernel(
            represent(index, state), exit_.pool, exit_.grid, exit_.weight, exit_.bias, temperature, index, code, threshold,
            exit_.gate_weight, exit_.gate_bias, decision["used"] if code == jei else EMPTY,
        )
        return logits, order, ({"used": used} if code == jei else decision), count

    return step
