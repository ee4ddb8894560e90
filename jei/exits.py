"""Exit math of JEI-DNN (Regol, Chataoui, Coates, ICLR 2024, §3): pure torch functions.

Notation: G intermediate gates with probabilities g_0..g_{G-1}; exits 0..G, exit G being the
backbone's own head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def exit_probabilities(gate_probs: Tensor) -> Tensor:
    """Map gate probabilities ``[..., G]`` to exit probabilities ``[..., G+1]``.

    pi_l = max(0, min(g_l, 1 - sum_{k<l} g_k)) for l < G, and pi_G = 1 - sum_{l<G} pi_l
    (paper, eq. for P(G = l | x)). pi_l depends on g_0..g_l only, so it can be computed while
    the backbone runs forward; once the running sum of gates reaches one, later exits get 0.
    """
    used = _gates_before(gate_probs)
    intermediate = torch.clamp(torch.minimum(gate_probs, 1.0 - used), min=0.0)
    final = torch.clamp(1.0 - intermediate.sum(dim=-1, keepdim=True), min=0.0)
    return torch.cat([intermediate, final], dim=-1)


def _gates_before(gate_probs: Tensor) -> Tensor:
    """sum_{k<l} g_k, accumulated in the same order as the streaming ``exit_step``."""
    running = torch.cumsum(gate_probs, dim=-1)
    return torch.cat([torch.zeros_like(running[..., :1]), running[..., :-1]], dim=-1)


def product_exit_probabilities(gate_probs: Tensor) -> Tensor:
    """Product-form exit probabilities (Scardapane et al. 2020), ``[..., G]`` -> ``[..., G+1]``:
    P(exit l) = g_l * prod_{k<l} (1 - g_k), and the backbone head takes prod_k (1 - g_k)."""
    survive = torch.cumprod(1.0 - gate_probs, dim=-1)
    before = torch.cat([torch.ones_like(survive[..., :1]), survive[..., :-1]], dim=-1)
    return torch.cat([gate_probs * before, survive[..., -1:]], dim=-1)


def exit_step(gate_prob: Tensor, used: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One streaming step at an intermediate exit.

    Args:
        gate_prob: g_l for the samples still in the network, ``[B]``.
        used: sum_{k<l} g_k for the same samples (zeros before the first gate).

    Returns:
        ``(pi_l, exits_now, used_next)``: the exit probability, whether the sample leaves
        here under the inference rule, and the running gate sum for the next step.

    The inference rule (paper §3.3) leaves at the first l with
    P(G = l | x) >= P(G > l | x), i.e. pi_l >= 0.5 * (1 - sum_{k<l} pi_k). The mass already
    spent, sum_{k<l} pi_k, equals min(1, sum_{k<l} g_k), so one running sum is enough.
    """
    pi = torch.clamp(torch.minimum(gate_prob, 1.0 - used), min=0.0)
    exits_now, used_next = leaves_now(gate_prob, used)
    return pi, exits_now, used_next


def leaves_now(gate_prob: Tensor, used: Tensor) -> tuple[Tensor, Tensor]:
    """``exit_step`` without pi_l, in the fewest tensor operations (real early exit runs it at
    every exit): whether each sample leaves under the inference rule, and the running gate sum.

    With r = 1 - sum_{k<l} g_k > 0, pi_l = max(0, min(g_l, r)) >= r / 2 holds exactly when
    g_l >= r / 2 (for g_l > r both hold, r / 2 being an exact halving), so pi_l need not be formed;
    r <= 0 never fires. The same floating-point comparisons as ``first_exit``.
    """
    remaining = 1.0 - used
    return (remaining > 0) & (gate_prob >= 0.5 * remaining), used + gate_prob


def first_exit(gate_probs: Tensor) -> Tensor:
    """Index in ``0..G`` of the exit each sample takes under the inference rule."""
    *batch, num_gates = gate_probs.shape
    probs = exit_probabilities(gate_probs)[..., :num_gates]
    remaining = torch.clamp(1.0 - _gates_before(gate_probs), min=0.0)  # see exit_step
    fires = (remaining > 0) & (probs >= 0.5 * remaining)
    # The first firing exit; G (the backbone head) when no gate fires.
    fires = torch.cat([fires, torch.ones(*batch, 1, dtype=torch.bool, device=gate_probs.device)], dim=-1)
    return fires.to(torch.uint8).argmax(dim=-1)


def expected_cost(exit_probs: Tensor, costs: Tensor) -> Tensor:
    """Expected cost sum_l pi_l c_l per sample, for exit probabilities ``[..., G+1]``."""
    return (exit_probs * costs.to(exit_probs)).sum(dim=-1)


def per_exit_losses(exit_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of every exit, ``[E, B, K]`` logits -> ``[B, E]`` losses."""
    num_exits, batch, classes = exit_logits.shape
    losses = F.cross_entropy(
        exit_logits.reshape(num_exits * batch, classes), labels.repeat(num_exits), reduction="none"
    )
    return losses.view(num_exits, batch).T


def oracle_exit(exit_losses: Tensor, costs: Tensor, cost_weight: float) -> Tensor:
    """l* = argmin_l CE_l + cost_weight * c_l over exits 0..G (ties go to the earlier exit).

    ``exit_losses`` is ``[B, G+1]`` and ``costs`` ``[G+1]`` (normalised, c_G = 1).
    """
    if cost_weight < 0:
        raise ValueError(f"cost_weight must be >= 0, got {cost_weight}")
    total = exit_losses + cost_weight * costs.to(exit_losses)
    return torch.argmin(total, dim=-1)  # torch returns the first minimum


def gate_targets(best_exit: Tensor, num_gates: int) -> Tensor:
    """Surrogate gate targets t_l = 1 if l >= l* else 0, ``[B]`` -> ``[B, G]`` floats.

    A sample that should leave at l* should also leave at any later gate (paper §4.2).
    """
    positions = torch.arange(num_gates, device=best_exit.device)
    return (positions.unsqueeze(0) >= best_exit.unsqueeze(-1)).float()


POS_WEIGHT_RULES = ("balanced", "exit_share", "balanced_nonzero")


def positive_class_weights(best_exit: Tensor, num_gates: int, cap: float = 5.0, rule: str = "balanced") -> Tensor:
    """Per-gate positive-class weight for the gates' BCE, capped at ``cap``.

    ``"balanced"``: negatives / positives of gate l's own targets, where the positives are the
    samples with l* <= l (``gate_targets``). ``"exit_share"``: (N - n_l) / n_l with n_l the
    samples with l* == l, what the authors' code does; since gate l's positives include every
    earlier l*, it over-weights the later gates' positives. A gate without positives gets ``cap``.
    ``"balanced_nonzero"``: ``"balanced"``, except that a gate without negatives (every sample's
    best exit is at or before it) gets weight 1 instead of 0, so it still gets a gradient.
    """
    if rule not in POS_WEIGHT_RULES:
        raise ValueError(f"objective.pos_weight_rule must be one of {POS_WEIGHT_RULES}, got {rule!r}")
    total = best_exit.numel()
    counts = torch.bincount(best_exit.flatten(), minlength=num_gates + 1)[:num_gates].float()
    positives = torch.cumsum(counts, dim=0) if rule == "balanced" else counts
    ratio = (total - positives) / positives.clamp(min=1)
    ratio[positives == 0] = cap
    if rule == "balanced_nonzero":
        ratio[positives == total] = 1.0
    return ratio.clamp(max=cap)
