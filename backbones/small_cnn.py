"""A small CNN: the default backbone, trained on the spot (stage 1) and then frozen."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from jei.types import ExitSpec

from .base import ExitChoice, SequentialBackbone, resolve_exits
from .weights import load_weights


class SmallCNN(SequentialBackbone):
    """``len(widths)`` conv-BN-ReLU blocks, global average pooling and a linear head.

    Args:
        in_channels: image channels.
        num_classes: classes of the head.
        widths: output channels of each block.
        strides: stride of each block.
        exits: where the exits sit, in ``resolve_exits``' numbering: ``"all"``, ``{"every": k}``
            or positions k in 1..len(widths)-1 (k: after block k, counted from 1).
        weights: optional weights file (safetensors or torch) to load strictly.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 32, 64),
        strides: Sequence[int] = (1, 1, 2, 1),
        exits: ExitChoice = (1, 2, 3),
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if len(strides) != len(widths):
            raise ValueError(f"backbone.strides needs one entry per block ({len(widths)}), got {len(strides)}")
        positions = resolve_exits(exits, len(widths))
        self.num_classes = num_classes
        blocks, channels, reduction, specs = [], in_channels, 1, []
        for width, stride in zip(widths, strides):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
            )
            channels, reduction = width, reduction * stride
            if len(blocks) in positions:
                specs.append(ExitSpec(len(specs), f"blocks.{len(blocks) - 1}", "map", width, reduction))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        self.exit_specs = tuple(specs)
        self.set_segments(self.blocks, positions)
        if weights is not None:
            load_weights(self, weights)

    def finish(self, state: Tensor) -> Tensor:
        return self.head(state)
