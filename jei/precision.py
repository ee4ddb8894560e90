"""Mixed precision for the backbone's passes: ``trainer.precision = fp32 | bf16 | fp16``.

Applies to every pass through the backbone (its training stage, feature extraction and real
early exit at evaluation), so the exits are evaluated in the precision their features were
computed in. ``fp32`` (the default) changes nothing. ``bf16`` and ``fp16`` run the backbone
under ``torch.autocast``; ``fp16`` trains with a gradient scaler (its range is too small for
unscaled gradients) and needs CUDA. The IMs and gates always train in float32 on the cached
features (their ops are tiny, and ``trainer.feature_dtype`` sets how those are stored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name: object, device: torch.device) -> str:
    """``name`` if it is a precision this device runs, else a ``ConfigError`` naming the fix."""
    from jei.validate import ConfigError, choice

    name = choice(name, "trainer.precision", tuple(PRECISIONS))
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision=fp16 needs a CUDA device (this run is on {device.type}); use trainer.precision=bf16 "
            f"or fp32 here",
            "trainer.precision",
        )
    return name


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The backbone's precision for a block (``fp32``: no autocast at all)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler that is enabled for fp16 only (a no-op pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
