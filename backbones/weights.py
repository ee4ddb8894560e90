"""Loading backbone weights from local files (safetensors or torch pickles), strictly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from jei.io import RefusedFileError, torch_load_strict

from .base import load_state_dict_strict


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``{'state_dict': ...}`` allowed).

    A ``module.`` prefix (DataParallel checkpoints) is removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone.weights: no file at {path}. Give the path of a local weights file "
            f"(this framework never downloads weights at run time)."
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except SafetensorError as err:
            raise ValueError(
                f"backbone.weights: {path} is damaged or not a safetensors file ({err}); copy the weights file again"
            ) from None
    else:
        state = load_torch_weights(path)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"backbone.weights: {path} does not hold a state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_torch_weights(path: str | Path, allowed_globals: Sequence[Any] = ()) -> Any:
    """A torch weights file, loaded with ``weights_only=True`` only (never a full unpickling).

    ``allowed_globals`` extends torch's allowlist for this file (e.g. ``argparse.Namespace`` in
    training checkpoints). A refused or damaged file is a ``ValueError`` that names it.
    """
    try:
        return torch_load_strict(path, map_location="cpu", allowed_globals=allowed_globals)
    except RefusedFileError as err:
        raise ValueError(
            f"backbone.weights: {err.path} {err.reason}. Use the original checkpoint, or convert it to "
            f".safetensors on a machine where you trust the file (safetensors.torch.save_file)"
        ) from None


def load_weights(module: nn.Module, path: str | Path) -> None:
    load_state_dict_strict(module, read_state_dict(path), str(path))


def load_keeping_head(
    module: nn.Module,
    state: dict[str, Tensor],
    source: str,
    head_prefixes: Sequence[str],
    num_classes: int,
    reset_head: bool,
) -> None:
    """Load ``state`` strictly; with ``reset_head`` the module keeps its own (new) head.

    ``head_prefixes`` name the classifier modules (e.g. ``("head",)``, ``("head", "head_dist")``).
    Without ``reset_head``, a head of another class count is an error that names the fix.
    """
    def in_head(key: str) -> bool:
        return any(key.startswith(f"{prefix}.") for prefix in head_prefixes)

    own = module.state_dict()
    head = [key for key in own if in_head(key)]
    if reset_head:
        state = {key: value for key, value in state.items() if not in_head(key)}
        state.update({key: own[key] for key in head})
    else:
        mismatched = [key for key in head if key in state and state[key].shape != own[key].shape]
        if mismatched:
            key = mismatched[0]
            raise ValueError(
                f"backbone.weights: {source} has a head of shape {tuple(state[key].shape)} ({key}), the "
                f"model needs {tuple(own[key].shape)} for {num_classes} classes; set "
                f"backbone.reset_head=true to train a new head"
            )
    load_state_dict_strict(module, state, source)
