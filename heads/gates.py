"""Exit gates: map an IM's logits to one gate logit per sample."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jei.native_exits import linear_parameters

from .uncertainty import uncertainty_features

# What a history gate carries per exit it has seen: the four uncertainty features, then the
# exit's predicted class (as a float: exact below 2**24 classes).
HISTORY_WIDTH = 5


class UncertaintyGate(nn.Module):
    """JEI-DNN's gate: Linear(4, 1) over detached uncertainty features of the IM's output.

    With ``history`` set, a **history gate** (``jei.types.HistoryGate``): gate l also reads the
    exits before it, as patience (PABEE) and ZTW do:

    - ``history``: ``None`` (the paper: exit l's own four features only), ``"all"`` (exits
      0..l) or an integer w >= 0 (a window: exits max(0, l - w)..l);
    - ``agreement`` (with history): also read, for the exits in the window, whether each exit's
      predicted class equals the next one's (consecutive agreement) and whether it equals exit
      l's (agreement with the current prediction): 0/1 indicators;
    - ``past_features`` (with history): read the earlier exits' four features too (default);
      False: only exit l's features and the agreement indicators. (With the JEI targets
      t_l = [l >= l*], earlier exits' confidence tells gate l "an earlier exit was already
      good enough", which is not whether exit l is right; gate_target=correct trains on that instead);
    - ``index``: this gate's exit l, given by the builder (``jei.build.network_factory``); it
      sizes the input: 4 (m + 1) + 2m features with m = min(l, w) previous exits (4m: past
      features, 2m: agreement).

    The model threads a per-sample history tensor from gate to gate (``step``) in both the
    all-exits pass and real early exit, where it is compacted with the samples still running.
    Every feature is detached: the gate learns to read the IMs, not to change them.
    """

    def __init__(
        self, num_classes: int, history: int | str | None = None, agreement: bool = True, index: int = 0,
        past_features: bool = True,
    ) -> None:
        super().__init__()
        if history is not None and history != "all" and (isinstance(history, bool) or not isinstance(history, int) or history < 0):
            raise ValueError(f"gate.history must be null, 'all' or an integer window >= 0, got {history!r}")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"gate index must be an integer >= 0, got {index!r}")
        self.num_classes = num_classes
        self.reads_history = history is not None
        self.history = history
        self.agreement = bool(agreement)
        self.past_features = bool(past_features)
        self.index = index
        if not self.reads_history:
            self.linear = nn.Linear(4, 1)
            return
        self.previous = index if history == "all" else min(index, int(history))
        width = 4 * (self.previous + 1 if self.past_features else 1) + (2 * self.previous if self.agreement else 0)
        self.linear = nn.Linear(width, 1)

    def forward(self, logits: Tensor, history: Tensor | None = None) -> Tensor:
        """The gate logit. A history gate called without its history (a caller that does not
        thread it, e.g. the cost counter) reads zeros in place of the previous exits."""
        if not self.reads_history:
            return self.linear(uncertainty_features(logits).to(self.linear.weight.dtype)).squeeze(-1)
        return self.step(logits, history)[0]

    def native_form(self) -> tuple[Tensor, Tensor] | None:
        """``(weight [1, 4], bias [1])`` of the paper's gate (Linear(4, 1) over the four
        uncertainty features), what native exits compute (``jei.native_exits``); None for a
        history gate."""
        parameters = None if self.reads_history else linear_parameters(self._modules["linear"])
        return parameters if parameters is not None and parameters[0].shape == (1, 4) else None

    def step(self, logits: Tensor, history: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(gate logit [B], history [B, 5 (l + 1)])`` from exit l's logits and the history of
        exits 0..l-1 (``None`` at exit 0): rows are samples, so a caller dropping samples
        drops the same rows of the history."""
        current = torch.cat([uncertainty_features(logits), logits.detach().argmax(dim=-1, keepdim=True).float()], dim=-1)
        full = current if history is None else torch.cat([history.to(current.dtype), current], dim=-1)
        if not self.reads_history:  # the paper's gate, keeping the history going for later gates
            return self.forward(logits), full
        inputs = history_features(full, self.previous, self.agreement, self.past_features)
        return self.linear(inputs.to(self.linear.weight.dtype)).squeeze(-1), full


def history_features(history: Tensor, previous: int, agreement: bool = True, past_features: bool = True) -> Tensor:
    """A history gate's input from ``[B, 5 n]`` history (exits 0..n-1, the current one last):
    the uncertainty features of the last ``previous`` + 1 exits, oldest first, then (with
    ``agreement``) ``previous`` consecutive-agreement and ``previous`` agree-with-current
    indicators (``past_features`` False: of the current exit's features only). Missing earlier
    exits (a history shorter than the window) read as zeros."""
    blocks = history.view(history.shape[0], -1, HISTORY_WIDTH)[:, -(previous + 1):]
    missing = previous + 1 - blocks.shape[1]
    if missing > 0:
        blocks = torch.cat([blocks.new_zeros(blocks.shape[0], missing, HISTORY_WIDTH), blocks], dim=1)
    parts = [blocks[..., :4].flatten(1) if past_features else blocks[:, -1, :4]]
    if agreement and previous > 0:
        predicted = blocks[..., 4]
        parts.append((predicted[:, 1:] == predicted[:, :-1]).to(blocks.dtype))
        parts.append((predicted[:, :-1] == predicted[:, -1:]).to(blocks.dtype))
    return torch.cat(parts, dim=-1)
