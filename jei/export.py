"""Export an early-exit network for deployment: its parts as standalone programs, and the host
loop that runs them as real early exit does.

Every backbone segment, every IM (with the backbone's representation at its exit) and every
gate becomes its own ``torch.export`` program with a dynamic batch dimension; with the
``onnx`` and ``onnxscript`` packages, also an ONNX file each. The exit policy, the ensemble
and the temperature stay on the host, in ``ExportedChain.early_exit``, which runs the same loop
as ``EarlyExitNetwork.early_exit`` (``jei.model.stream_exits``): a sample stops at its exit,
the samples still running are gathered between segments, and the policy decides from the
exported IMs' and gates' outputs. So the chain gives the model's exits and predictions.

    chain = export_network(network, example_inputs)     # torch.export programs
    chain.save("deploy/")                               # deploy/segment_0.pt2, ..., chain.json
    chain = ExportedChain.load("deploy/", network.policy)
    result = chain.early_exit(images)                   # EarlyExitResult, as network.early_exit

    files = export_onnx(network, example_inputs, "deploy/")   # segment_0.onnx, ...: OnnxUnavailable without onnx
    result = OnnxChain.load("deploy/", network.policy).early_exit(images)  # needs onnxruntime

Only backbones whose state between segments is one tensor with the batch first (the CNNs and
ViTs; not the graph backbone) can be exported this way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jei.memory_format import select_rows
from jei.model import EarlyExitNetwork, stream_exits
from jei.types import EarlyExitResult, ExitPolicy

MANIFEST = "chain.json"
FORMAT = 1


class ExportError(RuntimeError):
    """The network cannot be exported as a chain of tensor programs."""


class OnnxUnavailable(ExportError):
    """The ONNX exporter (the ``onnx`` and ``onnxscript`` packages) or runtime is not installed."""


class _Segment(nn.Module):
    """Backbone segment ``index`` as a module: state -> state (segment G: -> logits).
    Segment 0 starts from the inputs (``backbone.begin``: e.g. the adapter's resize)."""

    def __init__(self, backbone: nn.Module, index: int) -> None:
        super().__init__()
        self.backbone, self.index = backbone, index

    def forward(self, state: Tensor) -> Tensor:
        if self.index == 0:
            state = self.backbone.begin(state)
        return self.backbone.run_segment(self.index, state)


class _Head(nn.Module):
    """IM ``index`` on the backbone's representation at its exit: state -> raw logits."""

    def __init__(self, backbone: nn.Module, im: nn.Module, index: int) -> None:
        super().__init__()
        self.backbone, self.im, self.index = backbone, im, index

    def forward(self, state: Tensor) -> Tensor:
        return self.im(self.backbone.represent(self.index, state))


def chain_parts(network: EarlyExitNetwork) -> dict[str, nn.Module]:
    """The modules that are exported, by file stem: ``segment_i`` (G+1), ``im_i`` and ``gate_i`` (G)."""
    if any(getattr(gate, "reads_history", False) for gate in network.gates):
        # The host loop calls each gate on its own exit's logits; a history gate would read zeros
        # for the earlier exits and give other exits than the model.
        raise ExportError(
            "export does not support gates that read earlier exits (gate history/agreement); "
            "export a network with the default gate (history: null)"
        )
    backbone = network.backbone
    parts: dict[str, nn.Module] = {f"segment_{i}": _Segment(backbone, i) for i in range(network.num_gates + 1)}
    for index, (im, gate) in enumerate(zip(network.ims, network.gates)):
        parts[f"im_{index}"] = _Head(backbone, im, index)
        parts[f"gate_{index}"] = gate
    return parts


@torch.no_grad()
def example_chain_inputs(network: EarlyExitNetwork, example_inputs: Tensor) -> dict[str, Tensor]:
    """Each part's example input, from one all-exits pass over ``example_inputs``."""
    if not isinstance(example_inputs, Tensor):
        raise ExportError(
            f"export needs a tensor input with the batch first, got {type(example_inputs).__name__} "
            "(the graph backbone's batches cannot be exported as a chain of tensor programs)"
        )
    if example_inputs.shape[0] < 2:
        raise ExportError("export needs an example batch of at least 2 samples (a batch of 1 would fix the batch size)")
    backbone = network.backbone
    examples: dict[str, Tensor] = {"segment_0": example_inputs}
    for index, state in enumerate(segment_states(network, example_inputs)):
        examples[f"segment_{index + 1}"] = state
        examples[f"im_{index}"] = state
        raw = network.ims[index](backbone.represent(index, state))
        examples[f"gate_{index}"] = network._scaled(raw, index)
    return examples


@torch.no_grad()
def segment_states(network: EarlyExitNetwork, inputs: Tensor) -> list[Tensor]:
    """The backbone's state after each intermediate segment on ``inputs``; ``ExportError`` when
    one is not a single tensor (the graph backbone's), which no tensor program can carry."""
    backbone, state, states = network.backbone, inputs, []
    for index in range(network.num_gates):
        state = backbone.run_segment(index, backbone.begin(state) if index == 0 else state)
        if not isinstance(state, Tensor):
            raise ExportError(f"segment {index} returns {type(state).__name__}, not one tensor: it cannot be exported")
        states.append(state)
    return states


@dataclass
class ExportedChain:
    """The exported parts and what the host loop needs; ``early_exit`` runs them.

    ``parts`` maps the file stems of ``chain_parts`` to callables (an exported program's
    ``module()``, or an ONNX session wrapper); the host keeps the policy, the per-exit
    temperature and the ensemble decay.
    """

    parts: dict[str, Callable[[Tensor], Tensor]]
    policy: ExitPolicy
    num_gates: int
    num_classes: int
    temperature: Tensor
    ensemble_decay: float = 0.0
    programs: dict[str, Any] = field(default_factory=dict)  # the torch.export ExportedPrograms

    @torch.no_grad()
    def early_exit(self, inputs: Tensor) -> EarlyExitResult:
        """Real early exit over the exported parts: the same loop as ``EarlyExitNetwork.early_exit``."""
        total = int(inputs.shape[0])
        if total == 0:
            return EarlyExitResult(
                logits=torch.zeros(0, self.num_classes, device=inputs.device),
                exit_index=torch.zeros(0, dtype=torch.long, device=inputs.device),
            )
        parts = self.parts
        segments = [parts[f"segment_{i}"] for i in range(self.num_gates + 1)]
        heads = [parts[f"im_{i}"] for i in range(self.num_gates)]
        gates = [parts[f"gate_{i}"] for i in range(self.num_gates)]
        return stream_exits(
            inputs,
            total,
            self.num_gates,
            segment=lambda index, state: segments[index](state),
            head=lambda index, state: heads[index](state),
            gate=lambda index, logits: gates[index](logits),
            select=select_rows,
            policy=self.policy,
            temperature=self.temperature,
            ensemble_decay=self.ensemble_decay,
        )

    def manifest(self) -> dict[str, Any]:
        return _manifest(list(self.parts), self.num_gates, self.num_classes, self.temperature, self.ensemble_decay)

    def save(self, directory: str | Path) -> list[Path]:
        """Write each program as ``<part>.pt2`` (``torch.export.save``) and ``chain.json``."""
        if not self.programs:
            raise ExportError("this chain holds no torch.export programs to save (it was loaded from ONNX files?)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, program in self.programs.items():
            path = directory / f"{name}.pt2"
            torch.export.save(program, str(path))
            written.append(path)
        written.append(_write_manifest(directory, self.manifest()))
        return written

    @classmethod
    def load(cls, directory: str | Path, policy: ExitPolicy) -> ExportedChain:
        """The chain saved by ``save``, driven by ``policy`` (the network's, saved with its run)."""
        directory = Path(directory)
        manifest = _read_manifest(directory)
        programs = {name: torch.export.load(str(directory / f"{name}.pt2")) for name in manifest["parts"]}
        return cls(
            parts={name: program.module() for name, program in programs.items()},
            policy=policy,
            num_gates=manifest["num_gates"],
            num_classes=manifest["num_classes"],
            temperature=torch.tensor(manifest["temperature"], dtype=torch.float32),
            ensemble_decay=float(manifest["ensemble_decay"]),
            programs=programs,
        )


def _batch_dim(max_batch: int | None) -> Any:
    return torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)


@torch.no_grad()
def export_network(network: EarlyExitNetwork, example_inputs: Tensor, max_batch: int | None = None) -> ExportedChain:
    """Every segment, IM and gate of ``network`` as a ``torch.export`` program, batch size
    dynamic (1..``max_batch``, unbounded by default), in an ``ExportedChain`` ready to run.

    ``example_inputs``: a batch of at least 2 inputs shaped as the network's (any values).
    """
    network = network.eval()
    examples = example_chain_inputs(network, example_inputs)
    programs = {}
    for name, module in chain_parts(network).items():
        try:
            programs[name] = torch.export.export(
                module, (examples[name],), dynamic_shapes=({0: _batch_dim(max_batch)},), strict=False
            )
        except Exception as err:  # the exporter's errors are many kinds; say which part failed
            raise ExportError(f"torch.export failed on {name}: {type(err).__name__}: {err}") from err
    return ExportedChain(
        parts={name: program.module() for name, program in programs.items()},
        policy=network.policy,
        num_gates=network.num_gates,
        num_classes=int(network.backbone.num_classes),
        temperature=network.temperature.detach().cpu().clone(),
        ensemble_decay=network.ensemble_decay,
        programs=programs,
    )


def onnx_available() -> str | None:
    """None when ONNX export works here, else why not (the message ``OnnxUnavailable`` carries)."""
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        return (
            f"ONNX export needs the {' and '.join(missing)} package(s), not installed here "
            f"(pip install onnx onnxscript); the torch.export programs do not need them"
        )
    return None


def onnxruntime_available() -> str | None:
    if not _importable("onnxruntime"):
        return "running the ONNX chain needs onnxruntime (pip install onnxruntime)"
    return None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@torch.no_grad()
def export_onnx(
    network: EarlyExitNetwork, example_inputs: Tensor, directory: str | Path, opset: int | None = None
) -> list[Path]:
    """Write every segment, IM and gate as ``<part>.onnx`` (dynamic batch) and ``chain.json``.

    Uses torch's dynamo-based ONNX exporter, which works offline; raises ``OnnxUnavailable``
    (with the packages to install) when ``onnx``/``onnxscript`` are missing.
    """
    reason = onnx_available()
    if reason is not None:
        raise OnnxUnavailable(reason)
    network = network.eval()
    examples = example_chain_inputs(network, example_inputs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, module in chain_parts(network).items():
        path = directory / f"{name}.onnx"
        try:
            torch.onnx.export(
                module, (examples[name],), str(path), dynamo=True, input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: _batch_dim(None)},), opset_version=opset, external_data=False,
            )
        except Exception as err:
            raise ExportError(f"ONNX export failed on {name}: {type(err).__name__}: {err}") from err
        written.append(path)
    manifest = _manifest(
        list(chain_parts(network)), network.num_gates, int(network.backbone.num_classes),
        network.temperature, network.ensemble_decay,
    )
    written.append(_write_manifest(directory, manifest))
    return written


class _OrtPart:
    """An ONNX Runtime session as a tensor -> tensor callable (CPU)."""

    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        (out,) = self.session.run(None, {self.input: x.detach().cpu().contiguous().numpy()})
        return torch.from_numpy(out)


class OnnxChain(ExportedChain):
    """The ONNX files of ``export_onnx`` run by ONNX Runtime, with the same host loop."""

    @classmethod
    def load(cls, directory: str | Path, policy: ExitPolicy, threads: int | None = None) -> OnnxChain:
        reason = onnxruntime_available()
        if reason is not None:
            raise OnnxUnavailable(reason)
        directory = Path(directory)
        manifest = _read_manifest(directory)
        return cls(
            parts={name: _OrtPart(directory / f"{name}.onnx", threads) for name in manifest["parts"]},
            policy=policy,
            num_gates=manifest["num_gates"],
            num_classes=manifest["num_classes"],
            temperature=torch.tensor(manifest["temperature"], dtype=torch.float32),
            ensemble_decay=float(manifest["ensemble_decay"]),
        )


def _manifest(parts: list[str], num_gates: int, num_classes: int, temperature: Tensor, decay: float) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "num_gates": num_gates,
        "num_classes": num_classes,
        "temperature": temperature.detach().cpu().float().tolist(),  # float32 values: exact as floats
        "ensemble_decay": float(decay),
        "parts": parts,
    }


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {directory} a directory written by jei.export?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, this version reads format {FORMAT}")
    return manifest

