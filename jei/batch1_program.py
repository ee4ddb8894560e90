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

On the CPU here it ran 1.25 (ResNet-56) to 2 times (ViT) faster than eager early exit with
native exits (``benchmarks/compiled_batch1.py``). It takes one sample of the example's
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

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jei.export import ExportError, _Head, _Segment, segment_states
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

    def _from(
        self, index: int, state: Tensor, decision: dict[str, Tensor], dtype: torch.dtype | None
    ) -> tuple[Tensor, Tensor]:
        state = self.segments[index](state)
        if index == self.num_gates:  # the output's dtype is the first exit's, as in stream_exits
            final = state if dtype is None else state.to(dtype)
            return self._scaled(final, index), torch.full((1,), index, dtype=torch.long, device=state.device)
        if not self.open[index]:  # nobody can leave: skipped, as stream_exits does
            return self._from(index + 1, state, decision, dtype)
        logits = self._scaled(self.heads[index](state), index)
        dtype = logits.dtype if dtype is None else dtype
        gate_logit = self.gates[index](logits) if self.reads_gates else logits.new_zeros(1)
        leaving, decision = self.policy.step(index, logits, gate_logit, decision)
        keys, shape = list(decision), state.shape

        def leave(logits: Tensor, state: Tensor, *values: Tensor) -> tuple[Tensor, Tensor]:
            return logits.clone(), torch.full((1,), index, dtype=torch.long, device=logits.device)

        def go_on(logits: Tensor, state: Tensor, *values: Tensor) -> tuple[Tensor, Tensor]:
            return self._from(index + 1, state.reshape(shape), dict(zip(keys, values)), dtype)

        crossing = state.reshape(-1) if self.flatten_state else state
        return torch.cond(leaving.reshape(()), leave, go_on, (logits, crossing, *decision.values()))

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        return self._from(0, inputs, self.policy.begin(1, inputs.device), None)


FORMAT = "1"  # the package metadata's "jei_batch1_program"


@dataclass
class Batch1Program:
    """A compiled batch-1 early-exit program (``compile_batch1``), the package it came from and
    the one input shape and dtype it takes (AOTInductor itself does not check them: a map of
    another size would run and give wrong logits)."""

    runner: Any
    path: Path
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    num_classes: int

    @classmethod
    def load(cls, path: str | Path) -> Batch1Program:
        """The program ``compile_batch1`` wrote to ``path``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no compiled early-exit program at {path} (write one with compile_batch1)")
        runner = torch._inductor.aoti_load_package(str(path))
        metadata = runner.get_metadata()
        if metadata.get("jei_batch1_program") != FORMAT:
            raise ValueError(f"{path} is not a package written by compile_batch1 (format {FORMAT})")
        return cls(
            runner, path, tuple(int(size) for size in metadata["input_shape"].split(",")),
            getattr(torch, metadata["input_dtype"]), int(metadata["num_classes"]),
        )

    def __call__(self, inputs: Tensor) -> EarlyExitResult:
        """Real early exit of one sample, ``inputs`` [1, ...] shaped as the example inputs."""
        if tuple(inputs.shape) != self.input_shape or inputs.dtype != self.input_dtype:
            batch = " (use early_exit for a batch)" if inputs.dim() > 0 and inputs.shape[0] != 1 else ""
            raise ValueError(
                f"this batch-1 program takes {self.input_dtype} inputs of shape {list(self.input_shape)}, "
                f"got {inputs.dtype} {list(inputs.shape)}{batch}"
            )
        logits, exit_index = self.runner(inputs)
        return EarlyExitResult(logits=logits, exit_index=exit_index)

    def early_exit(self, inputs: Tensor) -> EarlyExitResult:
        """``inputs`` one sample at a time, as ``network.early_exit`` would give them."""
        results = [self(inputs[position : position + 1]) for position in range(inputs.shape[0])]
        if not results:
            return EarlyExitResult(logits=inputs.new_zeros(0, self.num_classes, dtype=torch.float32),
                                   exit_index=torch.zeros(0, dtype=torch.long, device=inputs.device))
        return EarlyExitResult(logits=torch.cat([result.logits for result in results]),
                               exit_index=torch.cat([result.exit_index for result in results]))


def _refusal(network: EarlyExitNetwork, example_inputs: Any, path: Path) -> str | None:
    """Why ``compile_batch1`` cannot build this, found before any tracing; None: it can try."""
    if path.suffix != ".pt2":
        return f"path must end in .pt2 (AOTInductor's package), got {path.name!r}"
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
    and dtype are fixed into it, and checked at every call). Each is run through the built
    program and through ``network.early_exit``; the program is refused (``ExportError``, and
    nothing is written at ``path``) unless every exit agrees and the logits agree to 1e-4.
    ``flatten_state=False`` drops the workaround for AOTInductor's nested-cond miscompile (the
    module docstring); that check caught it on the digits CNN (``benchmarks/compiled_batch1.py
    --layout as-is``), but a miscompile that changes nothing on the examples would pass it.
    """
    path = Path(path)
    network = network.eval()  # (as export_network: the network stays in eval mode)
    reason = _refusal(network, example_inputs, path)
    if reason is not None:
        raise ExportError(f"compile_batch1: {reason}")
    segment_states(network, example_inputs[:1])  # the state between segments must be one tensor
    samples = [example_inputs[position : position + 1].contiguous() for position in range(example_inputs.shape[0])]
    expected = [network.early_exit(sample) for sample in samples]
    metadata = {
        "jei_batch1_program": FORMAT, "input_shape": ",".join(str(size) for size in samples[0].shape),
        "input_dtype": str(samples[0].dtype).removeprefix("torch."), "num_classes": str(expected[0].logits.shape[-1]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built and checked under a temporary name beside ``path``, then moved there: an interrupted or
    # refused build leaves nothing at ``path`` (nor replaces a program already there).
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-") as building:
        unchecked = Path(building) / path.name
        try:
            program = torch.export.export(_Batch1EarlyExit(network, flatten_state), (samples[0],), strict=False)
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(unchecked), inductor_configs={"aot_inductor.metadata": metadata}
            )
        except Exception as err:  # the exporter's and Inductor's errors are of many kinds
            raise ExportError(f"compile_batch1 could not build the program: {type(err).__name__}: {err}") from err
        compiled = Batch1Program.load(unchecked)
        results = [compiled(sample) for sample in samples]
        differing = sum(
            not torch.equal(result.exit_index, want.exit_index)
            or not torch.allclose(result.logits, want.logits, rtol=1e-4, atol=1e-4)
            for result, want in zip(results, expected)
        )
        if differing:
            raise ExportError(
                f"compile_batch1: the built program gives other exits or logits than network.early_exit on "
                f"{differing} of {len(samples)} example inputs, so it was not kept (a score within rounding of "
                f"its threshold on these examples, or a miscompile: try other examples; keep flatten_state=True)"
            )
        os.replace(unchecked, path)
    return Batch1Program.load(path)
