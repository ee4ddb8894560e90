"""Small builders shared by tests: a tiny frozen CNN with random IMs and gates, or such heads on any backbone."""

from __future__ import annotations

import torch

from jei.model import EarlyExitNetwork
from jei.registry import BACKBONES, GATES, IMS


def tiny_network(seed: int = 0, num_classes: int = 5, gate_bias: float = 0.0, gate_init: bool = True) -> EarlyExitNetwork:
    """``gate_init``: spread the gates' weights (std 3) so random gates route samples to every exit."""
    torch.manual_seed(seed)
    backbone = BACKBONES.build(
        "small_cnn", in_channels=1, num_classes=num_classes, widths=(4, 6, 6, 8), strides=(1, 2, 1, 1), exits=(1, 2, 3)
    ).freeze()
    return with_heads(backbone, num_classes, gate_bias, gate_init)


def with_heads(backbone: torch.nn.Module, num_classes: int, gate_bias: float = 0.0, gate_init: bool = True) -> EarlyExitNetwork:
    """Random pool-linear IMs and uncertainty gates on ``backbone`` (``gate_init`` as in ``tiny_network``)."""
    ims = [IMS.build("pool_linear", spec=spec, num_classes=num_classes) for spec in backbone.exit_specs]
    gates = [GATES.build("uncertainty", num_classes=num_classes) for _ in backbone.exit_specs]
    for gate in gates if gate_init else ():
        torch.nn.init.normal_(gate.linear.weight, std=3.0)
        torch.nn.init.constant_(gate.linear.bias, gate_bias)
    return EarlyExitNetwork(backbone, ims, gates).eval()
