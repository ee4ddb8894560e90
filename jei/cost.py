"""Per-exit cost in mul-adds, measured by running the real modules (METHOD §4)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from jei.model import EarlyExitNetwork

R = TypeVar("R")


def _count(fn: Callable[..., R], *args: Any) -> tuple[R, int]:
    """Run ``fn`` and return its result with the mul-adds it performed (FLOPs / 2).

    nn.MultiheadAttention's fused inference path hides its matmuls from the counter, so it
    is switched off while counting (attention is real work: METHOD §4).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            result = fn(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return result, counter.get_total_flops() // 2


def _im_logits(backbone: Any, im: torch.nn.Module, index: int, state: Any) -> torch.Tensor:
    """An exit's prediction: the backbone's representation there, then its IM."""
    return im(backbone.represent(index, state))


@dataclass
class ExitCosts:
    """Cumulative mul-adds per sample to reach each exit's prediction and decision.

    ``mul_adds[l]`` counts the backbone up to exit l plus every IM and gate evaluated on the
    way (exit l's included); the final exit counts the whole backbone and all IMs and gates.
    ``normalized`` divides by the final exit's count, so it ends at 1 and increases strictly.
    """

    mul_adds: list[float]
    backbone_mul_adds: float

    @property
    def normalized(self) -> torch.Tensor:
        values = torch.tensor(self.mul_adds, dtype=torch.float64)
        return values / values[-1]


@torch.no_grad()
def measure_exit_costs(network: EarlyExitNetwork, example_inputs: Any) -> ExitCosts:
    """Measure per-sample cumulative costs on ``example_inputs`` (averaged over the batch,
    which matters for graphs of different sizes)."""
    backbone = network.backbone
    batch = backbone.batch_size(example_inputs)
    state = backbone.begin(example_inputs)
    spent, backbone_spent, cumulative = 0, 0, []
    for index, (im, gate) in enumerate(zip(network.ims, network.gates)):
        state, segment = _count(backbone.run_segment, index, state)
        logits, head = _count(_im_logits, backbone, im, index, state)
        _, decision = _count(gate, logits)
        backbone_spent += segment
        spent += segment + head + decision
        cumulative.append(spent / batch)
    _, last = _count(backbone.run_segment, network.num_gates, state)
    cumulative.append((spent + last) / batch)
    costs = ExitCosts(mul_adds=cumulative, backbone_mul_adds=(backbone_spent + last) / batch)
    if any(b <= a for a, b in zip(cumulative, cumulative[1:])) or cumulative[0] <= 0:
        raise ValueError(
            f"measured exit costs are not positive and strictly increasing: {cumulative}; "
            "every backbone segment must do some counted work (conv/matmul)"
        )
    return costs
