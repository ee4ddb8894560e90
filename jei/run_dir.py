"""Unique run folders: the ``${jei.unique_dir:<parent>}`` resolver of ``configs/train.yaml``.

Hydra's usual ``outputs/<task>/${now:%Y-%m-%d_%H-%M-%S}`` gives two runs started in the same
second the same folder, so one overwrites the other's results. ``unique_dir`` names the folder
by the time to the microsecond (``2025-01-31_12-00-00_123456``) and *creates* it with
``exist_ok=False``: of two launches that pick the same name, one wins and the other takes the
next free name (``..._123456-2``), on any filesystem where ``mkdir`` is atomic (local, NFS).
A folder that already exists is never reused.

The resolver is registered with ``use_cache=True``: within one launch every interpolation of
the same parent gives the same folder, and Hydra copies this cache from the launch's config to
each job of a sweep, so all jobs of a sweep share one sweep folder. Importing this module
registers it (``jei.cli`` does).

Under ``torchrun`` the N processes of one launch must share one folder, and they resolve it
before they can talk to each other, so there the name is what they have in common: the
launch's rendezvous id (``--rdzv-id``, or the one ``--standalone`` draws), or, with the default
id "none", the rendezvous port and the launching agent's process id:
``<parent>/torchrun_<id>``. Every process creates it if it is missing (so a folder of an
earlier launch with the same id is reused; give each launch its own ``--rdzv-id`` or
``hydra.run.dir`` on shared multi-node storage).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

RESOLVER = "jei.unique_dir"
TIME_FORMAT = "%Y-%m-%d_%H-%M-%S_%f"
MAX_ATTEMPTS = 10_000


def clock() -> datetime:
    """The time that names a folder (a module attribute, so tests can freeze it)."""
    return datetime.now()


def torchrun_launch() -> str | None:
    """What names the folder of a torchrun launch, shared by its processes; None outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id in ("", "none"):
        run_id = f"{os.environ.get('MASTER_PORT', '0')}-{os.getppid()}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)


def unique_dir(parent: str | os.PathLike[str]) -> str:
    """Create and return a new, empty folder ``<parent>/<time to the microsecond>[-k]``; under
    torchrun, the launch's shared ``<parent>/torchrun_<id>`` (see the module docstring)."""
    parent = Path(parent).expanduser()
    stem = clock().strftime(TIME_FORMAT)
    launch = torchrun_launch()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if launch is not None:
            folder = parent / f"torchrun_{launch}"
            folder.mkdir(exist_ok=True)
            return str(folder)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            folder = parent / (stem if attempt == 1 else f"{stem}-{attempt}")
            try:
                folder.mkdir()  # atomic: exactly one caller creates a given folder
            except FileExistsError:
                continue
            return str(folder)
    except OSError as err:
        raise OSError(
            f"hydra.run.dir / hydra.sweep.dir: cannot create a run folder under {parent} ({err}); run "
            f"jei-train from a writable folder or set hydra.run.dir=<folder> (hydra.sweep.dir for -m)"
        ) from err
    raise FileExistsError(
        f"hydra.run.dir / hydra.sweep.dir: {MAX_ATTEMPTS} folders named {parent / stem}[-k] exist already; "
        f"remove old runs there or set hydra.run.dir=<folder>"
    )


def register() -> None:
    OmegaConf.register_new_resolver(RESOLVER, unique_dir, use_cache=True, replace=True)


register()
