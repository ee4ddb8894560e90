"""L2W-DEN (Han et al., "Learning to Weight Samples for Dynamic Early-Exiting Networks", ECCV 2022).

A weight network maps a sample's G per-exit losses to per-exit loss weights
w = 1 + 0.3 * (m - mean(m)), m = tanh(MLP(losses)) (Linear(G, 500), ReLU, Linear(500, G)). The IMs
train on the weighted loss. Every ``meta_interval`` batches a meta step updates the weight network:
a virtual SGD step of the IMs on half the batch with the weighted loss, then the meta loss on the
other half: each sample's cross-entropy at the exit it would take under MSDNet's budgeted
thresholds (target exit fractions proportional to q^k, q = ``meta_q``) with the virtual IMs.
Adam (lr 1e-4, weight decay 1e-4) for the weight network. Exits by budgeted thresholds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from jei import distributed
from jei.exits import per_exit_losses
from jei.policies import budget_fractions, budgeted_thresholds, confidence, first_true
from jei.im_phases import ims_phase
from jei.types import Phase, TrainBatch
from jei.validate import MAX_LR, integer, number


class WeightNetwork(nn.Module):
    def __init__(self, num_gates: int, hidden: int = 500, spread: float = 0.3) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(num_gates, hidden), nn.ReLU(), nn.Linear(hidden, num_gates), nn.Tanh())
        self.spread = spread

    def forward(self, losses: Tensor) -> Tensor:
        m = self.layers(losses)
        return 1.0 + self.spread * (m - m.mean(dim=-1, keepdim=True))


class L2WObjective:
    """Args:
        meta_interval: batches between meta steps (100 in the paper).
        meta_q: q of the target exit fractions in the meta loss (0.75 in the paper).
        virtual_lr: step size of the virtual SGD step of the IMs.
        meta_lr, meta_weight_decay: Adam settings of the weight network.

    Schedule: one phase of ``warmup_epochs + epochs``; the IMs are kept at their best epoch by
    mean validation loss (patience ``warmup_patience``).
    """

    default_policy = "budgeted"
    ensemble_decay = 0.0

    def __init__(
        self,
        meta_interval: int = 100,
        meta_q: float = 0.75,
        virtual_lr: float = 0.1,
        meta_lr: float = 1e-4,
        meta_weight_decay: float = 1e-4,
    ) -> None:
        integer(meta_interval, "objective.meta_interval", minimum=1, hint="batches between meta steps, 100 in the paper")
        number(meta_q, "objective.meta_q", above=0, hint="0.75 in the paper")
        for name, value in (("virtual_lr", virtual_lr), ("meta_lr", meta_lr)):
            number(value, f"objective.{name}", above=0, maximum=MAX_LR, hint=f"a learning rate in (0, {MAX_LR:g}]")
        number(meta_weight_decay, "objective.meta_weight_decay", minimum=0, maximum=1)
        self.meta_interval = meta_interval
        self.meta_q = float(meta_q)
        self.virtual_lr = float(virtual_lr)
        self.meta_lr = float(meta_lr)
        self.meta_weight_decay = float(meta_weight_decay)
        self.weight_network: WeightNetwork | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._batches = 0

    def _ensure_weight_network(self, num_gates: int, device: torch.device) -> WeightNetwork:
        if self.weight_network is None:
            self.weight_network = WeightNetwork(num_gates)
        self.weight_network.to(device)
        if self._optimizer is None:
            distributed.broadcast_module(self.weight_network)  # one initial weight network on every process
            self._optimizer = torch.optim.Adam(
                self.weight_network.parameters(), lr=self.meta_lr, weight_decay=self.meta_weight_decay
            )
        return self.weight_network

    def weighted_loss(self, im_logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
        """Mean over samples and exits of w_l * CE_l."""
        return (weights * per_exit_losses(im_logits, labels)).mean()

    def meta_step(self, ims: nn.ModuleList, pooled: list[Tensor], labels: Tensor) -> None:
        """One update of the weight network through a virtual step of the IMs (first half of the
        batch) and the budgeted-exit loss of the virtual IMs (second half)."""
        half = len(labels) // 2
        if half == 0:
            return
        weight_network = self.weight_network
        params = dict(ims.named_parameters())

        def logits_with(values: dict[str, Tensor], rows: slice) -> Tensor:
            return torch.stack([
                functional_call(im.classifier, {k.split(".", 2)[2]: v for k, v in values.items() if k.startswith(f"{i}.")},
                                (pooled[i][rows],))
                for i, im in enumerate(ims)
            ])

        first, second = slice(0, half), slice(half, len(labels))
        virtual_logits = logits_with(params, first)
        losses = per_exit_losses(virtual_logits, labels[first])
        virtual_loss = (weight_network(losses.detach()) * losses).mean()
        grads = torch.autograd.grad(virtual_loss, list(params.values()), create_graph=True)
        stepped = {name: p - self.virtual_lr * g for (name, p), g in zip(params.items(), grads)}
        meta_logits = logits_with(stepped, second)  # [G, B2, K]
        scores = torch.stack([confidence(z.detach(), "max_prob") for z in meta_logits])
        fractions = budget_fractions(self.meta_q, len(ims) + 1)
        thresholds = budgeted_thresholds(scores.cpu(), fractions).to(scores.device)
        exits = first_true((scores >= thresholds.unsqueeze(-1)).T)
        early = exits < len(ims)
        # Under torchrun each process meta-steps on its slice; the weight network's gradients are
        # averaged (a process with no early exit adds zero), and all skip the step together.
        if not any(distributed.gather_objects(bool(early.any()))):
            return
        self._optimizer.zero_grad(set_to_none=True)
        if early.any():
            rows = torch.arange(len(exits), device=exits.device)[early]
            meta_loss = F.cross_entropy(meta_logits[exits[early], rows], labels[second][early])
            meta_loss.backward(inputs=list(weight_network.parameters()))
        distributed.average_gradients(weight_network.parameters())
        self._optimizer.step()

    def phases(self, network: nn.Module, schedule: Any, costs: Tensor) -> list[Phase]:
        weight_network = self._ensure_weight_network(network.num_gates, costs.device)
        self._batches = 0

        def loss(batch: TrainBatch, active: Tensor) -> Tensor:
            if self._batches % self.meta_interval == 0:
                self.meta_step(network.ims, batch.pooled, batch.labels)
            self._batches += 1
            logits = batch.outputs.logits[:-1]
            with torch.no_grad():
                weights = weight_network(per_exit_losses(logits, batch.labels))
            return self.weighted_loss(logits, batch.labels, weights)

        epochs = schedule.warmup_epochs + schedule.epochs
        return [ims_phase(network, "ims", epochs, schedule.warmup_patience, loss, together=True)]

    def state_dict(self) -> dict[str, Tensor]:
        if self.weight_network is None:
            return {}
        return {f"weight_network.{k}": v for k, v in self.weight_network.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        weights = {k.removeprefix("weight_network."): v for k, v in state.items() if k.startswith("weight_network.")}
        if weights:
            num_gates = weights["layers.0.weight"].shape[1]
            self.weight_network = WeightNetwork(num_gates)
            self.weight_network.load_state_dict(weights)
