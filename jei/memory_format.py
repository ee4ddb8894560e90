"""The memory format of the backbone's feature maps: ``trainer.channels_last``.

Convolutions on 4-D maps stored channels-last (NHWC) run faster than in PyTorch's default
NCHW layout on CPUs (oneDNN) and on recent GPUs (the README's Speed section measures it).
The maps hold the same values but other kernels compute them, so outputs change in the last
bits: features cached in one format are not reused for the other.

``to_channels_last`` converts a module's 4-D weights; its convolutions then return
channels-last maps whatever the input's layout. ``select_rows`` gathers samples without losing
the layout (``index_select`` returns NCHW, which the next convolution would convert back).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its 4-D parameters and buffers stored channels-last (in place)."""
    return module.to(memory_format=torch.channels_last)


def is_channels_last(tensor: Tensor) -> bool:
    """A 4-D tensor stored channels-last where that differs from plain NCHW. Compared on the exact
    strides: ``is_contiguous`` ignores size-1 dimensions, so it calls a channels-last 1x1 kernel
    or one-channel map contiguous in both layouts, although convolutions treat it as NHWC."""
    if tensor.dim() != 4:
        return False
    _, channels, height, width = tensor.shape
    nhwc = (height * width * channels, 1, width * channels, channels)
    return tensor.stride() == nhwc and nhwc != (channels * height * width, height * width, width, 1)


def uses_channels_last(module: nn.Module) -> bool:
    """Whether any 4-D parameter or buffer of ``module`` is stored channels-last."""
    tensors = [*module.parameters(), *module.buffers()]
    return any(is_channels_last(tensor) for tensor in tensors)


def selects_rows(select: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a backbone class's ``select`` method as ``select_rows`` on a tensor state (and
    nothing else), so native exits (``jei.native_exits``) may copy the staying rows out
    themselves as they compact the batch (``plain_row_select``)."""
    select.selects_rows = True  # type: ignore[attr-defined]
    return select


def plain_row_select(backbone: object) -> bool:
    """Whether ``backbone.select`` is a method its class marked with ``selects_rows``. An
    override in a subclass, or anything set on the instance (a function, a wrapper that copies
    the method's attributes, a mock), is not: native exits then call it."""
    select = getattr(backbone, "select", None)
    return (
        isinstance(select, types.MethodType)
        and select.__self__ is backbone
        and getattr(select.__func__, "selects_rows", False) is True
    )


def select_rows(tensor: Tensor, keep: Tensor) -> Tensor:
    """Rows ``keep`` of ``tensor`` (one gather, like ``index_select(0, keep)``), keeping a
    channels-last map channels-last."""
    if is_channels_last(tensor):  # gather on the NHWC view, which is plain contiguous
        return tensor.permute(0, 2, 3, 1).index_select(0, keep).permute(0, 3, 1, 2)
    return tensor.index_select(0, keep)
