"""Backbone cache: a backbone trained once serves every run with the same settings (a sweep).

``jei-train -m objective.cost_weight=0.1,1,3`` would otherwise train the same backbone in every
job. The trained weights are stored in ``<paths.cache_dir>/backbones/<key>.safetensors``, where
the key hashes everything the trained weights depend on: the backbone's config, class, module
structure and initial weights, the backbone-training settings, the data config and the
training and validation inputs and labels, the seed, the device type and the state of the
random generators when training starts. Each entry also records the training history and the
random generators' state after training, which a hit restores: a run that hits the cache goes
on exactly as if it had trained the backbone itself (same IMs' initial weights, same result).

Like the feature cache, the cache can never change a result: an entry records its format, key,
tensor names, shapes and a checksum and is verified on load (a bad entry is retrained and
replaced); writes are atomic; a cache folder that cannot be written gives a warning and the
run goes on. The run folder always gets its ``backbone.safetensors`` (a hard link to the entry,
or a copy), in the same format, so a resumed run (``jei.checkpoint``) finds its backbone there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from jei import distributed
from jei.checkpoint import RunCheckpoints, from_json, open_signed, rng_digest, rng_state, set_rng_state, state_digest, tensor_digest, to_json
from jei.data.base import DataSplits
from jei.features import input_digest
from jei.io import atomic_path, atomic_write, remove_stale_temp_files
from jei.memory_format import uses_channels_last
from jei.train import BackboneTraining, fit_backbone

if TYPE_CHECKING:
    from jei.tracking import TrainingLog

log = logging.getLogger(__name__)

FORMAT = "jei-backbone/1"
RUN_FILE = "backbone.safetensors"
STALE_TEMP_AFTER_S = 15 * 60


class BackboneEntryError(Exception):
    """A stored backbone that cannot be used (damaged, or trained with other settings)."""


def backbone_key(
    backbone: nn.Module,
    data: DataSplits,
    training: BackboneTraining,
    seed: int,
    device: torch.device,
    data_fingerprint: str = "",
    backbone_config: Any = None,
    precision: str = "fp32",
    world_size: int = 1,
) -> str:
    """Hash of everything the trained backbone depends on (see the module docstring); call it
    just before training, with the backbone still at its initial weights."""
    digest = hashlib.sha256(FORMAT.encode())
    settings = {
        "backbone": backbone_config,
        "training": dataclasses.asdict(training),
        "seed": seed,
        "device": device.type,
        "data": data_fingerprint,
        "class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
        "structure": repr(backbone),
    }
    # Only when not the default, so the keys of entries made before these existed still hold.
    if precision != "fp32":
        settings["precision"] = precision
    if uses_channels_last(backbone):  # other kernels: not the same trained weights
        settings["memory_format"] = "channels_last"
    if world_size > 1:  # each process's BatchNorm sees its slice of the batch: not the same weights
        settings["world_size"] = world_size
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        tensor_digest(digest, tensor)
    digest.update(rng_digest().encode())
    for split in ("train", "val"):
        digest.update(f"{split}{data.size(split)}".encode())
        digest.update(input_digest(data, split).encode())
        tensor_digest(digest, data.labels(split))
    return digest.hexdigest()[:32]


def write_entry(path: Path, backbone: nn.Module, key: str, history: Mapping[str, Any], rng: Mapping[str, Any]) -> None:
    """Store the trained weights atomically at ``path`` with their key, history and the random state."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "key": key,
        "history": json.dumps(history),
        "rng": to_json(rng),
        "sha256": state_digest(tensors),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        read_entry(tmp, key, backbone)  # a short write (full disk) fails here, before the entry is replaced

    atomic_write(path, write)


def read_entry(path: Path, key: str, backbone: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """``(state, history, rng)`` of the entry at ``path``, verified; ``BackboneEntryError`` says what is wrong."""
    state, metadata = open_signed(path, FORMAT, BackboneEntryError)
    if metadata.get("key") != key:
        raise BackboneEntryError(f"was trained with other settings (key {metadata.get('key')!r}, expected {key!r})")
    own = backbone.state_dict()
    if set(state) != set(own):
        raise BackboneEntryError(f"holds {len(state)} tensors that are not this backbone's {len(own)}")
    wrong = [k for k in sorted(own) if state[k].shape != own[k].shape or state[k].dtype != own[k].dtype]
    if wrong:
        raise BackboneEntryError(f"holds tensors of other shapes or types ({', '.join(wrong[:3])})")
    if metadata.get("sha256") != state_digest(state):
        raise BackboneEntryError("fails its checksum (the tensors were changed after writing)")
    try:
        history = json.loads(metadata["history"])
        rng = from_json(metadata["rng"])
    except (KeyError, ValueError, TypeError) as err:
        raise BackboneEntryError(f"has no readable history or random state ({err})") from err
    return state, history, rng


def place(source: Path, target: Path) -> str:
    """Put ``source`` at ``target`` atomically: a hard link where possible, else a copy."""
    with atomic_path(target) as tmp:
        try:
            os.unlink(tmp)
            os.link(source, tmp)
            how = "linked"
        except OSError:
            shutil.copyfile(source, tmp)
            how = "copied"
    return how


def _use(
    backbone: nn.Module, entry: tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]], tracker: Any, replay: bool
) -> dict[str, Any]:
    """Load a stored backbone; its epochs go to the training log (``replay``: already in its
    TensorBoard files, as for a resumed run)."""
    state, history, rng = entry
    backbone.load_state_dict(state)
    set_rng_state(rng)  # as if this run had trained it: what is drawn next is the same
    if tracker is not None:
        from jei.tracking import backbone_rows

        for row in backbone_rows(history):
            tracker.record(row, replay=replay)
    return history


def trained_backbone(
    backbone: nn.Module,
    data: DataSplits,
    training: BackboneTraining,
    device: torch.device,
    seed: int,
    run_dir: Path,
    *,
    cache_dir: Path | None = None,
    data_fingerprint: str = "",
    backbone_config: Any = None,
    tracker: TrainingLog | None = None,
    checkpoints: RunCheckpoints | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The backbone stage: load the trained ``backbone`` from the run folder (a resumed run),
    else from ``cache_dir``, else train it (continuing from a checkpoint if there is one) and
    store it there; ``run_dir/backbone.safetensors`` is written in every case. Returns the
    backbone's training history. Under torchrun every process trains (``fit_backbone``), and
    rank 0 alone writes the files."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    world = distributed.current()
    key = backbone_key(backbone, data, training, seed, device, data_fingerprint, backbone_config, precision, world.size)
    if checkpoints is not None and checkpoints.resuming and run_file.is_file():
        try:
            entry = read_entry(run_file, key, backbone)
        except BackboneEntryError as err:
            log.warning("backbone: %s %s; training it again", run_file, err)
        else:
            log.info("backbone: trained before the interruption, loaded from %s", run_file)
            return _use(backbone, entry, tracker, replay=True)
    cache_file = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
        remove_stale_temp_files(cache_dir, STALE_TEMP_AFTER_S)
        cache_file = cache_dir / f"{key}.safetensors"
        present = False
        try:
            present = cache_file.is_file()
        except OSError as err:
            log.warning("backbone cache: cannot look up %s (%s); training the backbone", cache_file, err)
        if present:
            try:
                entry = read_entry(cache_file, key, backbone)
            except BackboneEntryError as err:
                log.warning("backbone cache: entry %s %s; training the backbone and replacing the entry", cache_file, err)
            else:
                history = entry[1]
                log.info("backbone cache hit: %s (%d epochs, best val accuracy %.4f)", cache_file,
                         len(history["val_accuracy"]), max(history["val_accuracy"], default=float("nan")))
                _use(backbone, entry, tracker, replay=False)
                if world.main:
                    _place_in_run(cache_file, run_file, backbone, key, history)
                return history

    checkpoint = checkpoints.stage("backbone", key) if checkpoints is not None else None
    history = fit_backbone(
        backbone, data, training, device, seed, tracker=tracker, checkpoint=checkpoint, precision=precision
    )
    rng = rng_state()
    if not world.main:
        return history
    stored = False
    if cache_file is not None:
        try:
            write_entry(cache_file, backbone, key, history, rng)
        except Exception as err:  # noqa: BLE001 (OSError, SafetensorError: the cache is optional)
            log.warning(
                "backbone cache: cannot write %s (%s: %s); this run goes on without caching its backbone. Free space "
                "in or allow writing to %s, or set paths.cache_dir=<a writable folder> or trainer.backbone_cache=false",
                cache_file, type(err).__name__, err, cache_dir,
            )
        else:
            stored = True
            log.info("trained backbone saved to cache: %s", cache_file)
    if stored:
        _place_in_run(cache_file, run_file, backbone, key, history, rng)
    else:
        write_entry(run_file, backbone, key, history, rng)
    if checkpoint is not None:
        checkpoint.remove()  # the run folder's backbone.safetensors replaces it
    return history


def _place_in_run(
    cache_file: Path, run_file: Path, backbone: nn.Module, key: str, history: Any, rng: Any = None
) -> None:
    try:
        place(cache_file, run_file)
    except OSError:
        write_entry(run_file, backbone, key, history, rng if rng is not None else rng_state())
