"""The CIFAR ResNets of He et al. 2016 (§4.2), with an exit after any residual block.

A 3x3 conv stem with 16 channels, then three stages of n = (depth - 2) / 6 BasicBlocks with
16, 32 and 64 channels (stride 2 at the start of stages 2 and 3), global average pooling and
a linear head. Shortcuts are the paper's option A: identity, or, where the shape changes,
stride-2 subsampling with zero-padded extra channels (no parameters). Parameter and buffer
names match the checkpoints of Idelbayev's "Proper ResNet Implementation for CIFAR10"
(``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jei.types import ExitSpec

from .base import ExitChoice, SequentialBackbone, exits_every, load_state_dict_strict, resolve_exits
from .weights import read_state_dict

STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    batchnorm_pairs = (("conv1", "bn1"), ("conv2", "bn2"))  # what jei.batchnorm_folding may fold

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


class CifarResNet(SequentialBackbone):
    """ResNet-``depth`` for 32x32 images, cut into segments at the chosen residual blocks.

    Args:
        depth: 6n + 2 layers (published: 20, 32, 44, 56, 110; 8 is allowed for tests).
        num_classes: classes of the linear head.
        exit_every: an exit after every ``k`` residual blocks (blocks k, 2k, ... < 3n): the
            same as ``exits={"every": k}``.
        exits: or the exits in ``resolve_exits``' numbering: ``"all"``, ``{"every": k}`` or
            positions k in 1..3n-1 (k: after residual block k, counted from 1 across the three
            stages); give exactly one of ``exit_every`` and ``exits``.
        weights: optional local weights file, loaded strictly (then the backbone is frozen).
    """

    batchnorm_pairs = (("conv1", "bn1"),)  # the stem's (jei.batchnorm_folding)

    def __init__(
        self,
        depth: int = 56,
        num_classes: int = 10,
        exit_every: int | None = 1,
        exits: ExitChoice | None = None,
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
        self.exit_specs = tuple(specs)
        # A flat view of the residual blocks (registered through layer1..3).
        self.set_segments([self.get_submodule(name) for name in names], positions)
        if weights is not None:
            state = read_state_dict(weights)
            load_state_dict_strict(self, _with_batchnorm_counters(self, state), str(weights))
            self.freeze()

    def stem(self, images: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(images)))

    def finish(self, state: Tensor) -> Tensor:
        return self.linear(state.mean(dim=(2, 3)))  # global average pooling


def _exit_positions(exit_every: int | None, exits: ExitChoice | None, total_blocks: int) -> list[int]:
    """Exit positions (after residual block k, from 1) from exactly one of the two fields."""
    if (exit_every is None) == (exits is None):
        raise ValueError(
            "give exactly one of backbone.exit_every and backbone.exits (set the other to null), "
            f"got exit_every={exit_every!r}, exits={exits!r}"
        )
    if exits is not None:
        return resolve_exits(exits, total_blocks, unit="residual block")
    return exits_every(exit_every, total_blocks, field="backbone.exit_every", unit="residual block")


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
