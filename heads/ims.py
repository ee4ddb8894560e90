"""Inference modules (IMs): one classifier per intermediate exit.

Every IM is a parameter-free ``pool`` followed by a trainable ``classifier``. Because the
backbone is frozen, ``pool(representation)`` is a fixed function of the input, so the
trainer caches it once per split and trains the classifiers from the cache.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from jei.native_exits import linear_parameters
from jei.types import ExitSpec


def global_pool(features: Tensor, kind: str, pool_size: int = 1) -> Tensor:
    """[B, C, H, W] maps -> spatial mean over a ``pool_size`` x ``pool_size`` grid, flattened;
    [B, N, C] tokens -> token mean; [B, C] unchanged."""
    if kind == "map":
        if pool_size == 1:
            return features.mean(dim=(-2, -1))
        return F.adaptive_avg_pool2d(features, pool_size).flatten(1)
    if kind == "tokens":
        return features.mean(dim=1)
    if kind == "vector":
        return features
    raise ValueError(f"unknown exit kind {kind!r}; expected 'map', 'tokens' or 'vector'")


def pooled_width(spec: ExitSpec, pool_size: int) -> int:
    if pool_size < 1:
        raise ValueError(f"im.pool_size must be >= 1, got {pool_size}")
    return spec.channels * pool_size**2 if spec.kind == "map" else spec.channels


class PoolIM(nn.Module):
    """Pooling, then ``classifier``: the common shape of every built-in IM.

    ``pool_size`` > 1 keeps a coarse spatial grid of a feature map (1 is the paper's global
    pooling); it has no effect on tokens and vectors.
    """

    def __init__(self, spec: ExitSpec, classifier: nn.Module, pool_size: int = 1) -> None:
        super().__init__()
        self.kind = spec.kind
        self.pool_size = pool_size
        self.classifier = classifier

    def pool(self, features: Tensor) -> Tensor:
        return global_pool(features, self.kind, self.pool_size)

    def pool_signature(self) -> str:
        """What ``pool`` computes, for the feature cache's key."""
        return f"global_pool:{self.kind}:{self.pool_size}"

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.pool(features))

    def native_form(self) -> tuple[str, int, Tensor, Tensor] | None:
        """``(kind, pool_size, weight, bias)`` when the classifier is one linear layer with a bias
        (what native exits compute, ``jei.native_exits``); None otherwise."""
        parameters = linear_parameters(self._modules["classifier"])
        return None if parameters is None else (self.kind, self.pool_size, *parameters)


class PoolLinearIM(PoolIM):
    """Global pooling + Linear(C, K): the paper's IM."""

    def __init__(self, spec: ExitSpec, num_classes: int, pool_size: int = 1) -> None:
        super().__init__(spec, nn.Linear(pooled_width(spec, pool_size), num_classes), pool_size)


class PoolMLPIM(PoolIM):
    """Global pooling + a one-hidden-layer MLP (the paper's IM for graphs)."""

    def __init__(
        self, spec: ExitSpec, num_classes: int, hidden: int = 128, dropout: float = 0.0, pool_size: int = 1
    ) -> None:
        if hidden < 1:
            raise ValueError(f"im.hidden must be >= 1, got {hidden}")
        layers = [nn.Linear(pooled_width(spec, pool_size), hidden), nn.ReLU(), nn.Dropout(dropout)]
        super().__init__(spec, nn.Sequential(*layers, nn.Linear(hidden, num_classes)), pool_size)
