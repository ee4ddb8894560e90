"""Loading backbone weights from local files (safetensors or torch pickles), strictly."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

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
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"backbone.weights: {path} does not hold a state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_weights(module: nn.Module, path: str | Path) -> None:
    load_state_dict_strict(module, read_state_dict(path), str(path))
