"""Uncertainty statistics of a class distribution: the JEI-DNN gate's inputs (paper §4.1)."""

from __future__ import annotations

import torch
from torch import Tensor


def _entropy(probs: Tensor) -> Tensor:
    # xlogy gives 0 * log 0 = 0, so one-hot rows stay finite.
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def uncertainty_features(logits: Tensor) -> Tensor:
    """Four detached statistics of p = softmax(logits): ``[B, K]`` -> ``[B, 4]``.

    1. max_c p_c; 2. entropy H(p); 3. margin between the two largest p_c;
    4. entropy of q with q_c = p_c^2 / sum_j p_j^2 (a sharpened p).
    Detached: the gate learns to read the IM's uncertainty, not to change it.
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top2[:, 0] - top2[:, 1] if probs.shape[-1] > 1 else top2[:, 0]
    # q from log-space so tiny probabilities do not underflow to 0/0.
    log_probs = torch.log_softmax(logits.detach().float(), dim=-1)
    sharpened = torch.softmax(2.0 * log_probs, dim=-1)
    return torch.stack([top2[:, 0], _entropy(probs), margin, _entropy(sharpened)], dim=-1)
