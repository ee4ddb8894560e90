"""Atomic file writes: a result file is either complete or absent, never half-written.

The temporary file is created beside the target (same filesystem, so the final ``os.replace``
is atomic) with mode ``0o666`` filtered by the process umask, exactly like a file opened
normally, and keeps that mode whatever the writer does: results are as readable as any other
file the user creates (``tempfile.mkstemp``, and safetensors' ``save_file``, would leave them
``0600``). Its name, ``.<name>.<16 hex>.tmp<suffix>``, keeps the target's
suffix (``savefig`` picks the format from it) and is recognisable, so a temporary file
orphaned by a killed process can be removed later (``remove_stale_temp_files``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# ".<name>.<16 hex>.tmp<suffix>" (this module), or ".<name>.<8 chars><suffix>" (tempfile.mkstemp,
# which earlier versions used).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:[0-9a-f]{16}\.tmp|[a-z0-9_]{8})(?P<suffix>(\.[^.]*)?)$")
# ".tmpXXXXXX": the Rust tempfile crate's default, which safetensors' save_file writes beside its target.
_WRITER_TEMP_NAME = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp{path.suffix}")


def is_temp_file(name: str) -> bool:
    """Whether ``name`` looks like a temporary file of ``atomic_path`` or of the writers it runs."""
    if _WRITER_TEMP_NAME.match(name):
        return True
    match = _TEMP_NAME.match(name)
    return bool(match) and match["name"].endswith(match["suffix"])


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    The temporary file already exists (empty) when the block starts. If the writer recreates it
    (safetensors' ``save_file`` does, with mode ``0600``), its umask-based mode is restored,
    unless the writer made it a hard link to another file (``jei.backbone_cache.place``): that
    file's mode is not this writer's to change. Its content is flushed to disk before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_path(path)
        try:  # O_EXCL: never share a temporary file with another writer
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 less the umask, as the OS applied it
        finally:
            os.close(fd)
        break
    try:
        yield tmp
        written = os.stat(tmp)
        if stat.S_IMODE(written.st_mode) != mode and written.st_nlink == 1:  # recreated (safetensors: 0600)
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support it; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


# Strict JSON has no inf or NaN (and other tools refuse Python's ``Infinity``): such floats are
# written as these strings, and ``with_non_finite`` turns them back into floats.
NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def finite_json(data: Any) -> Any:
    """``data`` with every non-finite float as ``"inf"``, ``"-inf"`` or ``"nan"`` (e.g. a
    per-exit threshold of ``inf``, which closes an exit)."""
    if isinstance(data, float) and not math.isfinite(data):
        return "nan" if math.isnan(data) else ("inf" if data > 0 else "-inf")
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(value) for value in data]
    return data


def with_non_finite(data: Any) -> Any:
    """The inverse of ``finite_json``: ``"inf"``, ``"-inf"`` and ``"nan"`` back to floats (a
    string setting spelled so would come back as a float too; no setting here is one)."""
    if isinstance(data, str):
        return NON_FINITE.get(data, data)
    if isinstance(data, dict):
        return {key: with_non_finite(value) for key, value in data.items()}
    if isinstance(data, list):
        return [with_non_finite(value) for value in data]
    return data


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as strict JSON (non-finite floats as strings, ``finite_json``), atomically."""
    text = json.dumps(finite_json(data), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def remove_stale_temp_files(folder: str | Path, older_than_s: float) -> list[Path]:
    """Delete the temporary files of ``atomic_path`` in ``folder`` last modified more than
    ``older_than_s`` seconds ago (left behind by a process killed mid-write); return them.

    A write in progress keeps its temporary file for seconds at most, so a threshold of minutes
    never touches another process's live write. Errors (a file removed meanwhile, a read-only
    folder) are ignored: this is housekeeping.
    """
    removed: list[Path] = []
    cutoff = time.time() - older_than_s
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not is_temp_file(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    for path in removed:
        log.info("removed a stale temporary file left by an interrupted write: %s", path)
    return removed


class RefusedFileError(ValueError):
    """A torch file that ``torch_load_strict`` would not load; ``path`` and ``reason`` say why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} {reason}")


def torch_load_strict(path: str | Path, map_location: Any = "cpu", allowed_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)``, and never a full unpickling.

    Use this for every torch file a user or a cache supplies. (PyG's ``fs.torch_load``, for one,
    retries a refused file with ``weights_only=False``, which runs whatever code the file holds.)
    ``allowed_globals`` extends torch's allowlist for this call only. A file holding other
    objects, or a damaged one, raises ``RefusedFileError`` naming the file; a missing file
    raises ``FileNotFoundError``.
    """
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" not in text:
            raise RefusedFileError(path, f"is damaged or not a torch file ({text})") from None
        unpickler = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:\n\n|$)", text, re.DOTALL)
        said = " ".join(unpickler.group(1).split()) if unpickler else ""
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found is None:
            raise RefusedFileError(path, f"is damaged or not a torch file (the safe unpickler says: {said or text})") from None
        raise RefusedFileError(
            path,
            f"holds Python objects other than tensors and plain containers (it refers to {found.group(1)}); "
            f"it was not loaded, since unpickling such objects can run arbitrary code",
        ) from None
    except Exception as err:  # noqa: BLE001 (truncated zip, empty file, ...: all name the file)
        raise RefusedFileError(
            path, f"is damaged or not a torch file ({type(err).__name__}: {str(err) or 'unexpected end of file'})"
        ) from None
