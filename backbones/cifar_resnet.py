"""The CIFAR ResNets of He et al. 2016 (§4.2), with an exit after any residual block.

A 3x3 conv stem with 16 channels, then three stages of n = (depth - 2) / 6 BasicBlocks with
16, 32 and 64 channels (stride 2 at the start of stages 2 and 3), global average pooling and
a linear head. Shortcuts are the paper's option A: identity, or, where the shape changes,
stride-2 subsampling with zero-padded extra channels (no parameters). Parameter and buffer
names match the checkpoints of Idelbayev's "Proper ResNet Implementation for CIFAR10"
(``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``linear``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jei.types import ExitSpec

from .base import FrozenBackbone, check_exit_positions, load_state_dict_strict
from .weights import read_state_dict

STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = stride != 1 or in_channels != out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self._shortcut(x, out.shape[1]))

    def _shortcut(self, x: Tensor, channels: int) -> Tensor:
        if not self.downsample:
            return x
        # Option A (He et al. 2016 §4.2): subsample by 2, zero-pad channels C/2 -> C.
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, channels // 4, channels // 4))


class CifarResNet(FrozenBackbone):
    """ResNet-``depth`` for 32x32 images, cut into segments at the chosen residual blocks.

    Args:
        depth: 6n + 2 layers (published: 20, 32, 44, 56, 110; 8 is allowed for tests).
        num_classes: classes of the linear head.
        exit_every: an exit after every ``k`` residual blocks (blocks k, 2k, ... < 3n).
        exits: or explicit 1-based residual-block counts (1..3n-1); give exactly one of the two.
        weights: optional local weights file, loaded strictly (then the backbone is frozen).
    """

    def __init__(
        self,
        depth: int = 56,
        num_classes: int = 10,
        exit_every: int | None = 1,
        exits: Sequence[int] | None = None,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"backbone.depth must be 6n + 2 with n >= 1 (CIFAR ResNets: 20, 32, 44, 56, 110), got {depth!r}"
            )
        per_stage = (depth - 2) // 6
        total_blocks = 3 * per_stage
        positions = _exit_positions(exit_every, exits, total_blocks)
        self.num_classes = num_classes

        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        channels, names, specs = STAGE_WIDTHS[0], [], []
        for stage, width in enumerate(STAGE_WIDTHS):
            blocks = []
            for index in range(per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
                names.append(f"layer{stage + 1}.{index}")
                if len(names) in positions:
                    specs.append(ExitSpec(len(specs), names[-1], "map", width, 2**stage))
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(channels, num_classes)
        self._blocks = [self.get_submodule(name) for name in names]  # flat view, registered via layer1..3
        self.exit_specs = tuple(specs)
        # Segment i runs residual blocks [bounds[i], bounds[i+1]).
        self._bounds = [0, *positions, total_blocks]
        if weights is not None:
            state = read_state_dict(weights)
            load_state_dict_strict(self, _with_batchnorm_counters(self, state), str(weights))
            self.freeze()

    def run_segment(self, index: int, state: Tensor) -> Tensor:
        if index == 0:
            state = F.relu(self.bn1(self.conv1(state)))
        for block in self._blocks[self._bounds[index] : self._bounds[index + 1]]:
            state = block(state)
        if index == self.num_gates:
            return self.linear(state.mean(dim=(2, 3)))  # global average pooling
        return state


def _exit_positions(exit_every: int | None, exits: Sequence[int] | None, total_blocks: int) -> list[int]:
    """1-based residual-block counts after which an exit sits, from exactly one of the two fields."""
    if (exit_every is None) == (exits is None):
        raise ValueError(
            "give exactly one of backbone.exit_every and backbone.exits (set the other to null), "
            f"got exit_every={exit_every!r}, exits={exits!r}"
        )
    if exits is not None:
        return check_exit_positions(list(exits), total_blocks, "backbone.exits")
    if isinstance(exit_every, bool) or not isinstance(exit_every, int) or not 1 <= exit_every < total_blocks:
        raise ValueError(
            f"backbone.exit_every must be an integer in 1..{total_blocks - 1} (this ResNet has "
            f"{total_blocks} residual blocks), got {exit_every!r}"
        )
    return list(range(exit_every, total_blocks, exit_every))


def _with_batchnorm_counters(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add the ``num_batches_tracked`` counters that pre-0.4.1 PyTorch checkpoints lack.

    The counter only matters when training with ``momentum=None``; it is filled in (as 0)
    only for BatchNorm layers whose statistics the file has, so a mismatched file still fails.
    """
    filled = dict(state)
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and f"{name}.running_mean" in state:
            filled.setdefault(f"{name}.num_batches_tracked", torch.zeros((), dtype=torch.long))
    return filled
