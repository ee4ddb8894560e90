"""Checkpoints that let an interrupted ``jei-train`` continue where it stopped, with the same result.

A run keeps its checkpoints in ``<run dir>/checkpoints/`` and deletes them once ``metrics.json``
is written. Re-running the same command in the same folder (``hydra.run.dir=<folder>``, or
``hydra.sweep.dir=<folder>`` for a sweep) continues from the last checkpoint; ``trainer.resume``
says what to do with them (``auto``: continue when the folder holds checkpoints of the same
configuration; ``true``: the same, and fail when there is nothing to continue; ``false``:
discard them and start afresh).

What is saved, and why the final result is identical to an uninterrupted run's:

- **Backbone stage, every epoch**: the weights, the optimiser's and the schedule's state, the
  best epoch so far (its weights and accuracy), the history and every random generator (torch,
  CUDA, numpy, Python). Batches are shuffled by seeded generators, and augmentations and
  dropout draw from the global generators restored here, so the remaining epochs run exactly as
  they would have.
- **Exit stage, at every phase boundary** (after a phase's ``on_end``): the network's
  non-backbone state (IMs, gates, temperature), the objective's ``state_dict()``, the history
  and the random generators. On resume the objective's ``phases`` are built again on the
  initial network and objective, exactly as in the uninterrupted run, then the saved state is
  loaded and the finished phases are skipped; an interrupted phase runs again from its start.
  A phase is not checkpointed in the middle because part of its state lives in the objective's
  closures, where the trainer cannot reach it: the per-IM early stopping of a warm-up
  (``PerExitBest``: best weights, patience counters), L2W's batch counter and meta-optimiser.
  What carries from one phase to the next lives in the network and the objective's state (the
  ``Objective`` contract), so re-running a phase from its start reproduces it bit for bit, on
  cached features in a fraction of the backbone stage's time.

Exact equality holds where the computation itself is deterministic (CPU; on CUDA only with
deterministic kernels). Files are safetensors (tensors, plus the structure as JSON in the
header): loading one never unpickles anything; each records its format, stage, the fingerprint
of the run it belongs to and a checksum, and a checkpoint that does not match is ignored with
a warning. Writes are atomic, so a kill mid-write leaves the previous checkpoint.

Test hook: with ``JEI_TEST_KILL_AFTER=<stage>:<n>`` (``backbone`` or ``exits``) the process
kills itself with SIGKILL right after its ``n``-th epoch of that stage is finished (and
checkpointed, where the stage checkpoints per epoch). Only the resume tests set it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import shutil
import signal
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jei.errors import ConfigError
from jei.io import atomic_write, with_non_finite, write_json

log = logging.getLogger(__name__)

FORMAT = "jei-checkpoint/1"
KILL_ENV = "JEI_TEST_KILL_AFTER"
RESUME_CHOICES = ("auto", True, False)


class CheckpointError(Exception):
    """A checkpoint file that cannot be used (damaged, or not this run's)."""


# --- nested state <-> tensors + JSON ----------------------------------------------------------


def pack(value: Any) -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (dicts with str/int keys, lists, tuples, tensors, numpy arrays,
    numbers, strings, None) into named tensors and a JSON-able skeleton that refers to them."""
    tensors: dict[str, Tensor] = {}

    def encode(item: Any) -> Any:
        if isinstance(item, np.generic):
            item = item.item()
        if isinstance(item, Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = item.detach().cpu().contiguous().clone()
            return {"tensor": name}
        if isinstance(item, np.ndarray):
            name = f"t{len(tensors)}"
            tensors[name] = torch.from_numpy(item.astype(np.int64) if item.dtype.kind in "ui" else item.copy())
            return {"ndarray": name, "dtype": item.dtype.str}
        if item is None or isinstance(item, (bool, int, str)):
            return item
        if isinstance(item, float):
            return {"float": repr(item)}  # exact, and inf/nan survive
        if isinstance(item, Mapping):
            return {"dict": [[encode(key), encode(v)] for key, v in item.items()]}
        if isinstance(item, tuple):
            return {"tuple": [encode(v) for v in item]}
        if isinstance(item, list):
            return {"list": [encode(v) for v in item]}
        raise TypeError(f"cannot checkpoint a value of type {type(item).__qualname__}")

    return tensors, encode(value)


def unpack(tensors: Mapping[str, Tensor], skeleton: Any) -> Any:
    """The inverse of ``pack``."""

    def decode(item: Any) -> Any:
        if not isinstance(item, dict):
            return item
        if "tensor" in item:
            return tensors[item["tensor"]]
        if "ndarray" in item:
            return tensors[item["ndarray"]].numpy().astype(np.dtype(item["dtype"]))
        if "float" in item:
            return float(item["float"])
        if "dict" in item:
            return {decode(key): decode(v) for key, v in item["dict"]}
        if "tuple" in item:
            return tuple(decode(v) for v in item["tuple"])
        if "list" in item:
            return [decode(v) for v in item["list"]]
        raise CheckpointError(f"has an unknown node {sorted(item)} in its structure")

    return decode(skeleton)


def to_json(value: Any) -> str:
    """A small nested state as one JSON string (tensors inline, base64): for file headers."""
    tensors, skeleton = pack(value)
    inline = {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
               "data": base64.b64encode(t.reshape(-1).view(torch.uint8).numpy().tobytes()).decode()}
        for name, t in tensors.items()
    }
    return json.dumps({"tensors": inline, "value": skeleton})


def from_json(text: str) -> Any:
    record = json.loads(text)
    tensors = {}
    for name, spec in record["tensors"].items():
        raw = torch.frombuffer(bytearray(base64.b64decode(spec["data"])), dtype=torch.uint8)
        tensors[name] = raw.view(getattr(torch, spec["dtype"])).reshape(spec["shape"]).clone()
    return unpack(tensors, record["value"])


def tensor_digest(digest: Any, tensor: Tensor) -> None:
    """Feed a tensor (dtype, shape, bytes) into a hashlib object."""
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_digest(state: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        tensor_digest(digest, state[name])
    return digest.hexdigest()


# --- random generators -----------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global random generator a run draws from (CUDA only where it is in use)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def rng_digest() -> str:
    """A hash of ``rng_state()``: equal hashes, equal draws to come."""
    digest = hashlib.sha256()
    tensors, skeleton = pack(rng_state())
    digest.update(json.dumps(skeleton).encode())
    for name in sorted(tensors):
        tensor_digest(digest, tensors[name])
    return digest.hexdigest()


# --- files -----------------------------------------------------------------------------------


def save(path: Path, state: Any, stage: str, fingerprint: str) -> None:
    """Write ``state`` atomically as a safetensors checkpoint of ``stage``."""
    from safetensors.torch import save_file

    tensors, skeleton = pack(state)
    metadata = {"format": FORMAT, "stage": stage, "fingerprint": fingerprint,
                "structure": json.dumps(skeleton), "sha256": state_digest(tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def open_signed(path: Path, fmt: str, error: type[Exception]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file whose header names its format ``fmt``; raises
    ``error`` when it cannot be read or is of another format (checkpoints, backbone cache)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # noqa: BLE001 (any unreadable file is ignored or recomputed)
        raise error(f"is unreadable ({type(err).__name__}: {err})") from err
    if metadata.get("format") != fmt:
        raise error(f"is not a {fmt} file (format {metadata.get('format')!r})")
    return tensors, metadata


def load(path: Path, stage: str, fingerprint: str) -> Any:
    """Read and verify a checkpoint; ``CheckpointError`` says what is wrong with it."""
    tensors, metadata = open_signed(path, FORMAT, CheckpointError)
    if metadata.get("stage") != stage:
        raise CheckpointError(f"is a checkpoint of the {metadata.get('stage')!r} stage, not {stage!r}")
    if metadata.get("fingerprint") != fingerprint:
        raise CheckpointError("belongs to another run (other settings, data or weights)")
    if metadata.get("sha256") != state_digest(tensors):
        raise CheckpointError("fails its checksum")
    try:
        return unpack(tensors, json.loads(metadata["structure"]))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"has an unreadable structure ({err})") from err


_epochs_done: Counter[str] = Counter()


def epoch_done(stage: str) -> None:
    """The test hook (module docstring): SIGKILL after the ``n``-th epoch of ``stage``."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    _epochs_done[stage] += 1
    if spec == f"{stage}:{_epochs_done[stage]}":
        log.warning("%s=%s: killing this process (test hook)", KILL_ENV, spec)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class StageCheckpoint:
    """The checkpoint file of one stage of one run; ``load`` gives None when there is none."""

    path: Path
    stage: str
    fingerprint: str
    _failed: bool = field(default=False, repr=False)

    def load(self) -> Any | None:
        if not self.path.exists():
            return None
        try:
            state = load(self.path, self.stage, self.fingerprint)
        except CheckpointError as err:
            log.warning("checkpoint %s %s; running the %s stage from its start", self.path, err, self.stage)
            return None
        log.info("resuming the %s stage from %s", self.stage, self.path)
        return state

    def save(self, state: Any) -> None:
        if self._failed:
            return
        try:
            save(self.path, state, self.stage, self.fingerprint)
        except Exception as err:  # noqa: BLE001 (OSError, SafetensorError, a state it cannot store: optional)
            self._failed = True
            log.warning("checkpoint: cannot write %s (%s: %s); this run goes on without checkpoints of its %s stage",
                        self.path, type(err).__name__, err, self.stage)

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass


# What marks a run folder as finished: ``metrics.json`` (written last) and the run record.
FINISHED_FILES = ("metrics.json", "run.json")
# Settings that change nothing in the results: a run resumed with other values of these is the same run.
NOT_RESULTS = ("trainer.resume", "trainer.tensorboard", "trainer.backbone_cache", "trainer.feature_cache", "paths")


def comparable(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config`` without the settings in ``NOT_RESULTS``."""
    plain = json.loads(json.dumps(dict(config or {}), default=str))
    for dotted in NOT_RESULTS:
        *parents, last = dotted.split(".")
        node = plain
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return plain


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [d for key in keys for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def resume_mode(value: Any) -> str | bool:
    """``trainer.resume``: auto, true or false (``ConfigError`` otherwise)."""
    if value in RESUME_CHOICES and not (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ConfigError(
        f"trainer.resume must be auto, true or false, got {value!r} (auto continues a run from its folder's "
        f"checkpoints when there are some)",
        "trainer.resume",
    )


class RunCheckpoints:
    """The checkpoints of one run folder (``<run dir>/checkpoints``), and whether this launch resumes.

    ``record`` is what identifies the run (its configuration, less ``NOT_RESULTS``); it is kept
    in ``checkpoints/resume.json`` and a launch resumes only a folder whose record is the same.
    """

    MARKER = "resume.json"

    def __init__(
        self, run_dir: str | Path, record: Mapping[str, Any], mode: str | bool = "auto", *, reader: bool = False
    ) -> None:
        """``reader``: only read the checkpoints another process (torchrun's rank 0) opened and
        writes: resume when its marker says so, never clear or mark the folder."""
        mode = resume_mode(mode)
        self.folder = Path(run_dir) / "checkpoints"
        self.record = json.loads(json.dumps(record, default=str))
        self.fingerprint = hashlib.sha256(json.dumps(self.record, sort_keys=True).encode()).hexdigest()[:32]
        self.resuming = self._read_marker() if reader else self._open(mode)

    def _read_marker(self) -> bool:
        try:
            previous = json.loads((self.folder / self.MARKER).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(previous, dict) and previous.get("fingerprint") == self.fingerprint

    def _open(self, mode: str | bool) -> bool:
        marker = self.folder / self.MARKER
        previous = None
        if marker.is_file():
            try:
                previous = json.loads(marker.read_text())
            except (OSError, ValueError) as err:
                log.warning("checkpoint: %s is unreadable (%s); ignoring this folder's checkpoints", marker, err)
        same = isinstance(previous, dict) and previous.get("fingerprint") == self.fingerprint
        if mode is not False and same:
            log.info("resuming the run in %s from its checkpoints", self.folder.parent)
            return True
        if previous is not None and mode is not False:
            # (the marker is JSON: an inf in the config is the string "inf" there)
            changed = _differences(with_non_finite(previous.get("record")), self.record) if isinstance(previous, dict) else []
            what = f"other settings ({', '.join(changed[:6])})" if changed else "another run"
            if mode is True:
                raise ConfigError(
                    f"trainer.resume=true, but the checkpoints in {self.folder} are from {what}; run the same "
                    f"command as the interrupted run, or set trainer.resume=false to start afresh",
                    "trainer.resume",
                )
            log.warning("checkpoints in %s are from %s: not resuming, starting afresh", self.folder, what)
        elif mode is True:
            raise ConfigError(
                f"trainer.resume=true, but {self.folder.parent} holds no checkpoint to continue from; pass the "
                f"interrupted run's folder (hydra.run.dir=<folder>), or set trainer.resume=auto",
                "trainer.resume",
            )
        self._unfinish()
        self.clear()
        try:
            write_json(marker, {"format": FORMAT, "fingerprint": self.fingerprint, "record": self.record})
        except (OSError, ValueError) as err:
            log.warning("checkpoint: cannot write %s (%s); this run cannot be resumed", marker, err)
        return False

    def _unfinish(self) -> None:
        """A finished run's folder trained again: its files are replaced as this run writes
        them (the backbone after stage 1), so until it finishes the folder must not pass for
        a finished run (``metrics.json``, and ``run.json``, which ``jei.predict.load`` reads)."""
        run_dir = self.folder.parent
        finished = [run_dir / name for name in FINISHED_FILES if (run_dir / name).is_file()]
        if finished:
            log.warning("%s holds a finished run: training it again, so its %s are removed now (pass another "
                        "hydra.run.dir to keep them)", run_dir, " and ".join(path.name for path in finished))
        for path in finished:
            path.unlink()

    def stage(self, name: str, *extra: str) -> StageCheckpoint:
        """The checkpoint of stage ``name``; ``extra`` (e.g. a weights hash) joins its fingerprint."""
        fingerprint = hashlib.sha256("\0".join([self.fingerprint, name, *extra]).encode()).hexdigest()[:32]
        return StageCheckpoint(self.folder / f"{name}.safetensors", name, fingerprint)

    def clear(self) -> None:
        """Delete every checkpoint of the folder (the run finished, or starts afresh)."""
        shutil.rmtree(self.folder, ignore_errors=True)
