"""Temperature scaling per exit (Guo et al. 2017): one scalar T_l per exit, fitted on validation
logits by minimising the negative log-likelihood of softmax(z_l / T_l)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fit_temperatures(logits: Tensor, labels: Tensor, steps: int = 100) -> Tensor:
    """``[E, N, K]`` logits -> ``[E]`` temperatures minimising each exit's validation NLL.

    Optimised over log T (so T > 0) with L-BFGS, from T = 1, in float64.
    """
    logits = logits.detach().double()
    labels = labels.to(logits.device)
    log_t = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    flat_labels = labels.repeat(logits.shape[0])

    def closure() -> Tensor:
        optimizer.zero_grad()
        scaled = logits / log_t.exp().view(-1, 1, 1)
        loss = F.cross_entropy(scaled.reshape(-1, logits.shape[-1]), flat_labels, reduction="sum") / len(labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_t.detach().exp().float().clamp(1e-2, 1e2)


def calibrate_network(network: torch.nn.Module, val_logits: Tensor, labels: Tensor, exits: slice = slice(None)) -> Tensor:
    """Fold temperatures fitted on ``val_logits`` (the network's current outputs) into
    ``network.temperature`` for the chosen exits; returns the new temperatures."""
    correction = fit_temperatures(val_logits[exits], labels)
    network.temperature[exits] *= correction.to(network.temperature)
    return network.temperature.clone()
