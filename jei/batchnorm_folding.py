"""Folding a frozen backbone's BatchNorm into the convolution before it: ``trainer.fold_batchnorm``.

In eval mode BatchNorm is an affine map per channel, y = (x - mean) / sqrt(var + eps) * gamma
+ beta (Ioffe & Szegedy 2015, the inference form), so a convolution followed by it is one
convolution with scaled weights and a bias. A frozen backbone never leaves eval mode, so the
fold holds for good; it drops one memory-bound pass over every feature map (the README's Speed
section measures it). Other arithmetic computes the same function, so outputs change in the
last bits; the folded weights are other weights, so the feature cache keys them apart by itself.

Which pairs fold: a ``Conv2d`` directly followed by a ``BatchNorm2d`` with running statistics
inside any ``nn.Sequential``, and the pairs a module names in ``batchnorm_pairs`` (attribute
names ``(conv, norm)``, for blocks that call them in their own ``forward``, like the CIFAR
ResNet's). The norm is replaced by ``nn.Identity``.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from jei.memory_format import to_channels_last, uses_channels_last

log = logging.getLogger(__name__)


def fold_frozen_batchnorm(backbone: nn.Module) -> int:
    """``fold_batchnorm`` on a frozen backbone, as runs and ``jei-predict`` apply it: the folded
    convolutions stay frozen and in the backbone's memory format; a backbone with nothing to
    fold gets a warning that says why."""
    channels_last = uses_channels_last(backbone)
    folded = fold_batchnorm(backbone)
    if folded == 0:
        log.warning(
            "trainer.fold_batchnorm: %s has no (Conv2d, BatchNorm2d) pair to fold; nothing changed (a block "
            "that calls them in its own forward can name them in batchnorm_pairs)", type(backbone).__name__
        )
    backbone.requires_grad_(False)
    if channels_last:  # the folded weights are new tensors: keep them in the backbone's layout
        to_channels_last(backbone)
    return folded


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every foldable (convolution, BatchNorm) pair of ``module`` in place, which must be in
    eval mode; returns how many were folded."""
    if module.training:
        raise ValueError("fold_batchnorm needs the module in eval mode (freeze the backbone first): "
                         "BatchNorm in training mode normalises with each batch's own statistics")
    folded = 0
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            children = list(parent)
            for position, (conv, norm) in enumerate(zip(children, children[1:])):
                if _foldable(conv, norm):
                    parent[position], parent[position + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
                    folded += 1
        for conv_name, norm_name in getattr(parent, "batchnorm_pairs", ()):
            conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
            if _foldable(conv, norm):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, nn.Identity())
                folded += 1
    return folded


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(norm) is nn.BatchNorm2d
        and norm.running_mean is not None  # without running statistics, eval mode normalises per batch
        and norm.num_features == conv.out_channels
    )
