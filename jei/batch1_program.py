"""Batch-1 real early exit as one compiled program: no Python between segments, or at all.

The Python early-exit loop (``jei.model.stream_exits``) pays interpreter and dispatch work at
every exit, which at batch 1 is a large share of a small segment. ``compile_batch1`` writes the
whole batch-1 pass (every segment, every IM and gate, the temperatures and the exit policy's
``step``) as nested ``torch.cond`` in one ``torch.export`` program and builds it with
AOTInductor into one package file, which Python (``Batch1Program.load``) or C++
(``torch::inductor::AOTIModelPackageLoader``) runs::

    program = compile_batch1(network, example_inputs, "deploy/early_exit.pt2")  # builds and checks
    result = program(image[None])                   # EarlyExitResult of one sample
    program = Batch1Program.load("deploy/early_exit.pt2")

On the CPU here it ran 1.3 (ResNet-56) to 2 times (ViT, digits CNN) faster than eager early exit
with native exits (``benchmarks/compiled_batch1.py``). It takes one sample of the example's
shape at a time (``early_exit`` runs a batch sample by sample), and the network's backbone
state between segments must be one tensor (the CNNs and ViTs, as for ``jei.export``).
Ensembles and history gates are refused. Building takes seconds to a minute (ResNet-56) and a
C++ compiler.

AOTInductor (torch 2.14.1, CPU) miscompiles nested ``torch.cond`` when a convolution's map
crosses a ``cond`` with its layout optimization on: wrong logits, no error. The state therefore
crosses each ``cond`` flattened (``flatten_state``). Whatever the cause, a program whose exits
or logits differ from ``network.early_exit`` on the example inputs is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jei.export import ExportError, _Head, _Segment
from jei.model import EarlyExitNetwork
from jei.types import EarlyExitResult


class _Batch1EarlyExit(nn.Module):
    """Real early exit of one sample as nested ``torch.cond``: ``(logits [1, K], exit [1])``,
    the exit and (temperature-scaled) logits ``network.early_exit`` gives."""

    def __init__(self, network: EarlyExitNetwork, flatten_state: bool) -> None:
        super().__init__()
        backbone, self.num_gates, self.flatten_state = network.backbone, network.num_gates, flatten_state
        self.policy, self.reads_gates = network.policy, getattr(network.policy, "uses_gates", True)
        self.segments = nn.ModuleList(_Segment(backbone, index) for index in range(self.num_gates + 1))
        self.heads = nn.ModuleList(_Head(backbone, network.ims[index], index) for index in range(self.num_gates))
        self.gates = nn.ModuleList(network.gates)
        self.temperature = [float(value) for value in network.temperature]  # constants of the program
        may_leave = getattr(self.policy, "may_leave", None)  # read here, not while tracing
        self.open = [may_leave is None or may_leave(index) for index in range(self.num_gates)]

    def _scaled(self, logits: Tensor, index: int) -> Tensor:
        return logits if self.temperature[index] == 1.0 else logits / self.temperature[index]

    def _from(self, index: int, state: Tensor, decision: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        state = self.segments[index](state)
        if index == self.num_gates:
            return self._scaled(state, index), torch.full((1,), index, dtype=torch.long, device=state.device)
        if not self.open[index]:  # nobody can leave: skipped, as stream_exits does
            return self._from(index + 1, state, decision)
        logits = self._scaled(self.heads[index](state), index)
        gate_logit = self.gates[index](logits) if self.reads_gates else logits.new_zeros(1)
        leaving, decision = self.policy.step(index, logits, gate_logit, decision)
        keys, shape = list(decision), state.shape

        def leave(logits: Tensor, state: Tensor, *values: Tensor) -> tuple[Tensor, Tensor]:
            return logits.clone(), torch.full((1,), index, dtype=torch.long, device=logits.device)

        def go_on(logits: Tensor, state: Tensor, *values: Tensor) -> tuple[Tensor, Tensor]:
            return self._from(index + 1, state.reshape(shape), dict(zip(keys, values)))

        crossing = state.reshape(-1) if self.flatten_state else state
        return torch.cond(leaving.reshape(()), leave, go_on, (logits, crossing, *decision.values()))

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        return self._from(0, inputs, self.policy.begin(1, inputs.device))


@dataclass
class Batch1Program:
    """A compiled batch-1 early-exit program (``compile_batch1``) and the package it came from."""

    runner: Any
    path: Path

    @classmethod
    def load(cls, path: str | Path) -> Batch1Program:
        """The program ``compile_batch1`` wrote to ``path``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no compiled early-exit program at {path} (write one with compile_batch1)")
        return cls(torch._inductor.aoti_load_package(str(path)), path)

    def __call__(self, inputs: Tensor) -> EarlyExitResult:
        """Real early exit of one sample, ``inputs`` [1, ...] shaped as the example inputs."""
        if inputs.shape[0] != 1:
            raise ValueError(f"a batch-1 program takes one sample, got a batch of {inputs.shape[0]} (use early_exit)")
        logits, exit_index = self.runner(inputs)
        return EarlyExitResult(logits=logits, exit_index=exit_index)

    def early_exit(self, inputs: Tensor) -> EarlyExitResult:
        """``inputs`` one sample at a time, as ``network.early_exit`` would give them."""
        results = [self(inputs[position : position + 1]) for position in range(inputs.shape[0])]
        return EarlyExitResult(logits=torch.cat([result.logits for result in results]),
                               exit_index=torch.cat([result.exit_index for result in results]))


def _refusal(network: EarlyExitNetwork, example_inputs: Any) -> str | None:
    if network.ensemble_decay != 0.0:
        return "an ensemble (ensemble_decay > 0) is not supported: export the network without it"
    if network.reads_history:
        return "gates that read earlier exits (history) are not supported: use the default gate (history: null)"
    if not isinstance(example_inputs, Tensor) or example_inputs.dim() < 2 or example_inputs.shape[0] < 1:
        return "example_inputs must be a tensor batch with the batch first, of at least one sample"
    return None


@torch.no_grad()
def compile_batch1(
    network: EarlyExitNetwork, example_inputs: Tensor, path: str | Path, flatten_state: bool = True
) -> Batch1Program:
    """Build ``network``'s batch-1 real early exit into one AOTInductor package at ``path``.

    ``example_inputs``: a few samples shaped as the inputs the program will take (their shape
    is fixed into it). Each is run through the built program and through
    ``network.early_exit``; the program is refused (``ExportError``) unless every exit agrees
    and the logits agree to 1e-4. ``flatten_state=False`` drops the workaround for
    AOTInductor's nested-cond miscompile (the module docstring), which that check then catches.
    """
    reason = _refusal(network, example_inputs)
    if reason is not None:
        raise ExportError(f"compile_batch1: {reason}")
    network = network.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = [example_inputs[position : position + 1].contiguous() for position in range(example_inputs.shape[0])]
    try:
        program = torch.export.export(_Batch1EarlyExit(network, flatten_state), (samples[0],), strict=False)
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as err:  # the exporter's and Inductor's errors are of many kinds
        raise ExportError(f"compile_batch1 could not build the program: {type(err).__name__}: {err}") from err
    compiled = Batch1Program(torch._inductor.aoti_load_package(package), path)
    expected = [network.early_exit(sample) for sample in samples]
    results = [compiled(sample) for sample in samples]
    differing = sum(
        not torch.equal(result.exit_index, want.exit_index)
        or not torch.allclose(result.logits, want.logits, rtol=1e-4, atol=1e-4)
        for result, want in zip(results, expected)
    )
    if differing:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"compile_batch1: the built program gives other exits or logits than network.early_exit on "
            f"{differing} of {len(samples)} example inputs, so it was not kept (a score within rounding of its "
            f"threshold on these examples, or a miscompile: try other examples; keep flatten_state=True)"
        )
    return compiled
