"""Exit gates: map an IM's logits to one gate logit per sample."""

from __future__ import annotations

from torch import Tensor, nn

from .uncertainty import uncertainty_features


class UncertaintyGate(nn.Module):
    """JEI-DNN's gate: Linear(4, 1) over detached uncertainty features of the IM's output."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(4, 1)

    def forward(self, logits: Tensor) -> Tensor:
        return self.linear(uncertainty_features(logits).to(self.linear.weight.dtype)).squeeze(-1)
