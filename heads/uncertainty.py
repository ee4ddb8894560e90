"""Uncertainty statistics of a class distribution: the JEI-DNN gate's inputs (paper §4.1)."""

from __future__ import annotations

import torch
from torch import Tensor


def uncertainty_features(logits: Tensor) -> Tensor:
    """Four detached statistics of p = softmax(logits): ``[B, K]`` -> ``[B, 4]``.

    1. max_c p_c; 2. entropy H(p); 3. margin between the two largest p_c;
    4. entropy of q with q_c = p_c^2 / sum_j p_j^2 (a sharpened p).
    Detached: the gate learns to read the IM's uncertainty, not to change it.

    Written in few tensor operations, because real early exit computes it at every exit: p and
    q come from one softmax over both, the two entropies from one sum. q is the softmax of
    2 log p, computed from log space so tiny probabilities do not underflow to 0/0.
    """
    logits = logits.detach().float()
    doubled = 2.0 * torch.log_softmax(logits, dim=-1)
    both = torch.softmax(torch.stack([logits, doubled], dim=1), dim=-1)  # [B, 2, K]: p, q
    # entr(x) = -x log x with entr(0) = 0, so one-hot rows stay finite.
    entropy_p, entropy_q = torch.special.entr(both).sum(dim=-1).unbind(dim=-1)
    if logits.shape[-1] == 1:  # one class: no runner-up, the margin is max p
        first = both[:, 0, 0]
        second = torch.zeros_like(first)
    else:
        first, second = both[:, 0].topk(2, dim=-1).values.unbind(dim=-1)
    return torch.stack([first, entropy_p, first - second, entropy_q], dim=-1)
