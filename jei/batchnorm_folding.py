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
ResNet's; a named pair must be one where the norm reads the convolution's output and nothing
else reads it). The norm is replaced by ``nn.Identity``. Modules with hooks or parametrizations
are left alone (a fold would bypass them).
"""

from __future__ import annotations

import logging

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from jei.memory_format import to_channels_last, uses_channels_last

log = logging.getLogger(__name__)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every foldable (convolution, BatchNorm) pair of ``module`` in place, which must be in
    eval mode; returns how many were folded. A module that holds references to its layers
    outside its module tree (a ``SequentialBackbone``'s segments) is told what was replaced,
    through its ``replace_references(replaced)``."""
    if module.training:
        raise ValueError("fold_batchnorm needs the module in eval mode (freeze the backbone first): "
                         "BatchNorm in training mode normalises with each batch's own statistics")
    replaced: dict[nn.Module, nn.Module] = {}

    def fold(conv: nn.Module, norm: nn.Module) -> tuple[nn.Module, nn.Module]:
        fused, identity = fuse_conv_bn_eval(conv, norm), nn.Identity().train(norm.training)
        replaced[conv], replaced[norm] = fused, identity
        return fused, identity

    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            children = list(parent)
            for position, (conv, norm) in enumerate(zip(children, children[1:])):
                if _foldable(conv, norm):
                    parent[position], parent[position + 1] = fold(conv, norm)
        for conv_name, norm_name in getattr(parent, "batchnorm_pairs", ()):
            conv, norm = _named(parent, conv_name), _named(parent, norm_name)
            if _foldable(conv, norm):
                fused, identity = fold(conv, norm)
                setattr(parent, conv_name, fused)
                setattr(parent, norm_name, identity)
    if replaced and hasattr(module, "replace_references"):
        module.replace_references(replaced)
    return len(replaced) // 2


def fold_frozen_batchnorm(backbone: nn.Module, warn: bool = True) -> int:
    """``fold_batchnorm`` on a frozen backbone, as runs and ``jei-predict`` apply it: the folded
    convolutions stay frozen and in the backbone's memory format. With ``warn``, a backbone with
    nothing to fold gets a warning that says why (a run warns once, ``jei-predict`` not at all)."""
    channels_last = uses_channels_last(backbone)
    folded = fold_batchnorm(backbone)
    if folded == 0 and warn:
        log.warning(
            "trainer.fold_batchnorm: %s has no (Conv2d, BatchNorm2d) pair to fold; nothing changed (a block "
            "that calls them in its own forward can name them in batchnorm_pairs)", type(backbone).__name__
        )
    backbone.requires_grad_(False)
    if channels_last:  # the folded weights are new tensors: keep them in the backbone's layout
        to_channels_last(backbone)
    return folded


def _named(parent: nn.Module, name: str) -> nn.Module:
    module = getattr(parent, name, None)
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"{type(parent).__name__}.batchnorm_pairs names {name!r}, which is not a module of it: "
            "list (convolution, norm) attribute names"
        )
    return module


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(norm) is nn.BatchNorm2d
        and norm.running_mean is not None  # without running statistics, eval mode normalises per batch
        and norm.num_features == conv.out_channels
        and not any(_hooked(m) for m in (conv, norm))
    )


def _hooked(module: nn.Module) -> bool:
    """Hooks or parametrizations (e.g. weight norm) a folded module would silently lose."""
    return bool(module._forward_hooks or module._forward_pre_hooks or parametrize.is_parametrized(module))
