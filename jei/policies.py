"""Exit policies: the rule that decides, exit by exit, whether a sample leaves (pure torch).

Every policy implements the ``jei.types.ExitPolicy`` contract twice over: ``decide`` on a whole
all-exits pass, and ``begin``/``step`` one exit at a time for real early exit, where the samples
that left are dropped from the batch (``select_state``). Decisions at exit l read exit l's
logits and gate logit and the policy's own running state only, so both paths agree.

Policies with data-dependent settings choose them in ``fit`` on the validation split, never on
test; their settings are tensors returned by ``state_dict`` and saved with the run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from jei.exits import first_exit, leaves_now
from jei.types import ExitOutputs

State = dict[str, Tensor]


def select_state(state: State, keep: Tensor) -> State:
    """The streaming state of the samples at positions ``keep`` (those still running)."""
    return {key: value[keep] for key, value in state.items()}


def first_true(fires: Tensor) -> Tensor:
    """``[B, G]`` bool -> ``[B]`` index of the first True, or G (the backbone head) if none."""
    head = torch.ones(*fires.shape[:-1], 1, dtype=torch.bool, device=fires.device)
    return torch.cat([fires, head], dim=-1).to(torch.uint8).argmax(dim=-1)


class Policy:
    """Base class: stateless, parameter-free, gate-free, nothing to fit. Subclasses override."""

    uses_gates = False

    def begin(self, batch_size: int, device: torch.device) -> State:
        return {}

    def may_leave(self, index: int) -> bool:
        return True

    def check_exits(self, num_gates: int) -> None:
        return None

    def step(self, index: int, logits: Tensor, gate_logit: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError

    def decide(self, outputs: ExitOutputs) -> Tensor:
        """Run ``step`` over the exits of an all-exits pass, keeping every sample."""
        batch = outputs.logits.shape[1]
        state = self.begin(batch, outputs.logits.device)
        fires = []
        for index in range(outputs.num_gates):
            leaving, state = self.step(index, outputs.logits[index], outputs.gate_logits[:, index], state)
            fires.append(leaving)
        return first_true(torch.stack(fires, dim=-1))

    def fit(self, outputs: ExitOutputs, labels: Tensor, costs: Tensor) -> None:
        return None

    def native_rule(self, index: int) -> tuple[str, float] | None:
        """What ``step`` computes at exit ``index``, for native exits (``jei.native_exits``); None:
        only the Python ``step`` can run it."""
        return None

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        return None


class JEIRule(Policy):
    """JEI-DNN's rule (paper §3.3): leave at the first l with P(G = l | x) >= P(G > l | x).

    ``decide`` uses the vectorised ``jei.exits.first_exit``; ``step`` the streaming
    ``leaves_now``; the two are property-tested to agree.
    """

    uses_gates = True

    def begin(self, batch_size: int, device: torch.device) -> State:
        return {"used": torch.zeros(batch_size, device=device)}

    def step(self, index: int, logits: Tensor, gate_logit: Tensor, state: State) -> tuple[Tensor, State]:
        gate_prob = torch.sigmoid(gate_logit)
        leaving, used = leaves_now(gate_prob, state["used"].to(gate_prob.dtype))
        return leaving, {"used": used}

    def native_rule(self, index: int) -> tuple[str, float] | None:
        return "jei", 0.0  # the state is {"used": the running gate sum}, as in ``step``

    def decide(self, outputs: ExitOutputs) -> Tensor:
        return first_exit(torch.sigmoid(outputs.gate_logits))


class GateThreshold(Policy):
    """Leave at the first gate whose own probability reaches ``threshold``.

    The rule of product-form gates (Scardapane et al. 2020, g_l >= 1/2), and for JEI's gates
    the rule consistent with their targets: gate l is trained on t_l = [l >= l*], so g_l
    estimates P(l* <= l), and g_l >= 1/2 means "more likely than not, exit l is good enough".
    """

    uses_gates = True

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"policy.threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def step(self, index: int, logits: Tensor, gate_logit: Tensor, state: State) -> tuple[Tensor, State]:
        return torch.sigmoid(gate_logit) >= self.threshold, state

    def native_rule(self, index: int) -> tuple[str, float] | None:
        return "gate_probability", self.threshold

    def decide(self, outputs: ExitOutputs) -> Tensor:
        return first_true(torch.sigmoid(outputs.gate_logits) >= self.threshold)


SCORES = ("max_prob", "entropy", "gate")
NATIVE_RULES = {"max_prob": "max_prob", "entropy": "negative_entropy", "gate": "gate_logit"}  # jei.native_exits.RULES


def confidence(logits: Tensor, score: str) -> Tensor:
    """``[..., K]`` logits -> a confidence score where higher means surer: the max softmax
    probability, or minus the entropy (so one "leave when score >= threshold" rule serves both)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if score == "max_prob":  # amax: no indices (real early exit computes it at every exit)
        return log_probs.amax(dim=-1).exp()
    return (log_probs.exp() * log_probs).sum(dim=-1)  # -H(p)


class ConfidenceThreshold(Policy):
    """Leave at the first exit whose confidence passes its threshold (SDN, Kaya et al. 2019).

    Args:
        score: ``"max_prob"`` (leave when max_c p_c >= threshold), ``"entropy"`` (leave when
            H(p) <= threshold) or ``"gate"`` (a learned exit score: leave when the gate's
            probability >= threshold).
        threshold: one value shared by every exit, or one per intermediate exit.
    """

    def __init__(self, score: str = "max_prob", threshold: float | Sequence[float] = 0.9) -> None:
        if score not in SCORES:
            raise ValueError(f"policy.score must be one of {SCORES}, got {score!r}")
        self.score = score
        try:
            values = torch.as_tensor(threshold, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"policy.threshold must be a number, or a list of numbers (one per intermediate exit), got {threshold!r}"
            ) from None
        if torch.isnan(values).any():
            raise ValueError(f"policy.threshold must not be NaN, got {threshold}")
        finite = torch.isfinite(values)  # (inf for max_prob and gate, -inf for entropy: nobody leaves there)
        if score != "entropy" and (finite & ((values < 0) | (values > 1))).any():
            raise ValueError(
                f"policy.threshold must be a probability in [0, 1] with score={score} (inf: nobody leaves at that "
                f"exit), got {threshold}"
            )
        if score == "entropy" and (finite & (values < 0)).any():
            raise ValueError(
                f"policy.threshold is an entropy (nats) with score=entropy and must be >= 0 (-inf: nobody leaves "
                f"at that exit), got {threshold}"
            )
        self.thresholds = self._internal(values)

    @property
    def thresholds(self) -> Tensor:
        """The internal per-exit (or one shared) thresholds, ``[G]`` or ``[1]``."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, values: Tensor) -> None:
        if values.is_inference():  # made under inference mode: an ordinary copy keeps a version counter
            with torch.inference_mode(False):
                values = values.clone()
        self._thresholds = values
        self._split()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Copies and unpickled policies go through the setter too: a deepcopy made under
        # inference mode holds inference tensors, which have no version counter.
        self.__dict__.update(state)
        self.thresholds = state["_thresholds"]

    def _split(self) -> None:
        """Per-exit views of the thresholds, made once rather than at every exit: one 0-dim
        tensor each, which ``step`` compares against as it is (a CPU scalar tensor works with any
        device's scores), and which exits no sample can leave."""
        values = self._thresholds
        self._version = values._version  # an in-place edit of ``thresholds`` re-splits them
        self._each = values.cpu().unbind()
        self._floats = values.tolist()  # the same values as Python floats, for native exits
        # A threshold of +inf on a bounded score (max-prob <= 1, -entropy <= 0) fires for nobody;
        # a gate logit is unbounded, so its exits are always asked.
        self._closed = [self.score != "gate" and value == float("inf") for value in self._floats]

    def may_leave(self, index: int) -> bool:
        position = self._position(index)  # first: it re-splits edited thresholds
        return not self._closed[position]

    def _position(self, index: int) -> int:
        """Where exit ``index``'s threshold is (0 when one value is shared by every exit)."""
        # (Not while torch.compile or torch.export traces ``step``: the thresholds are then
        # constants of the traced program, and dynamo cannot read a version counter.)
        if not torch.compiler.is_compiling() and self._thresholds._version != self._version:
            self._split()
        if len(self._each) == 1:
            return 0
        if index >= len(self._each):
            raise ValueError(
                f"policy.threshold has {len(self._each)} values but the network has more than {index} "
                "intermediate exits: give one value, or one per exit"
            )
        return index

    def _internal(self, thresholds: Tensor) -> Tensor:
        """Thresholds on the "higher is surer" score: the entropy's are negated; the gate's are
        compared on the logit scale (no rounding from a sigmoid that could differ between the
        streaming and the vectorised pass)."""
        if self.score == "gate":  # (an infinite threshold stays one: logit(inf) is NaN)
            return torch.where(thresholds.isinf(), thresholds, torch.logit(thresholds.double()).float())
        return thresholds if self.score == "max_prob" else -thresholds

    def check_exits(self, num_gates: int) -> None:
        self.per_exit(num_gates)

    def per_exit(self, num_gates: int) -> Tensor:
        if self.thresholds.numel() == 1:
            return self.thresholds.expand(num_gates)
        if self.thresholds.numel() != num_gates:
            raise ValueError(
                f"policy.threshold has {self.thresholds.numel()} values but the network has {num_gates} "
                "intermediate exits: give one value, or one per exit"
            )
        return self.thresholds

    @property
    def uses_gates(self) -> bool:  # type: ignore[override]
        return self.score == "gate"

    def _score(self, logits: Tensor, gate_logit: Tensor) -> Tensor:
        return gate_logit.float() if self.score == "gate" else confidence(logits, self.score)

    def scores(self, outputs: ExitOutputs) -> Tensor:
        """``[G, B]`` score of every intermediate exit."""
        return torch.stack([self._score(outputs.logits[l], outputs.gate_logits[:, l]) for l in range(outputs.num_gates)])

    def step(self, index: int, logits: Tensor, gate_logit: Tensor, state: State) -> tuple[Tensor, State]:
        position = self._position(index)  # first: it re-splits edited thresholds
        return self._score(logits, gate_logit) >= self._each[position], state

    def native_rule(self, index: int) -> tuple[str, float] | None:
        position = self._position(index)  # first: it re-splits edited thresholds
        return NATIVE_RULES[self.score], self._floats[position]  # on the internal "higher is surer" scale

    def decide(self, outputs: ExitOutputs) -> Tensor:
        scores = self.scores(outputs).T
        return first_true(scores >= self.per_exit(outputs.num_gates).to(scores.device))

    def state_dict(self) -> State:
        return {"thresholds": self.thresholds.clone()}

    def load_state_dict(self, state: State) -> None:
        self.thresholds = state["thresholds"].clone().float()


def budget_fractions(q: float, num_exits: int) -> Tensor:
    """MSDNet's target exit fractions, proportional to q^k for exits k = 1..G+1, summing to one."""
    powers = torch.tensor([q**k for k in range(1, num_exits + 1)], dtype=torch.float64)
    return powers / powers.sum()


def budgeted_thresholds(scores: Tensor, fractions: Tensor) -> Tensor:
    """Per-exit thresholds from ``[G, N]`` validation scores so that, walking the exits in
    order, exit k takes ``fractions[k]`` of *all* samples from those still running (Huang et
    al. 2018). An exit whose share is zero gets +inf (nobody leaves)."""
    num_gates, total = scores.shape
    running = torch.ones(total, dtype=torch.bool)
    thresholds = torch.full((num_gates,), float("inf"))
    for index in range(num_gates):
        wanted = int(round(float(fractions[index]) * total))
        candidates = scores[index][running]
        if wanted <= 0 or candidates.numel() == 0:
            continue
        wanted = min(wanted, candidates.numel())
        thresholds[index] = candidates.topk(wanted).values[-1]
        running &= ~(scores[index] >= thresholds[index])
    return thresholds


class BudgetedThreshold(ConfidenceThreshold):
    """MSDNet's budgeted per-exit thresholds (Huang et al. 2018), set on validation data.

    ``q`` > 0 is the knob: target exit fractions proportional to q^k; q < 1 favours early exits.
    """

    def __init__(self, q: float = 1.0, score: str = "max_prob") -> None:
        if not q > 0:
            raise ValueError(f"policy.q must be > 0, got {q}")
        super().__init__(score, closed(score))  # nobody leaves early until fitted
        self.q = float(q)

    @torch.no_grad()
    def fit(self, outputs: ExitOutputs, labels: Tensor, costs: Tensor) -> None:
        scores = self.scores(outputs).cpu()
        self.thresholds = budgeted_thresholds(scores, budget_fractions(self.q, outputs.num_exits))


def threshold_objective(
    scores: Tensor, correct: Tensor, costs: Tensor, thresholds: Tensor, cost_weight: float
) -> float:
    """Validation accuracy minus ``cost_weight`` times expected cost of per-exit thresholds.

    ``scores``: ``[G, N]``; ``correct``: ``[G+1, N]`` bool (is exit l right for sample i).
    """
    exits = first_true((scores >= thresholds.unsqueeze(-1)).T)
    accuracy = correct.gather(0, exits.unsqueeze(0)).double().mean()
    return float(accuracy - cost_weight * costs.double()[exits].mean())


class PenalizedThreshold(ConfidenceThreshold):
    """Per-exit thresholds that maximise validation accuracy minus ``cost_weight`` x cost.

    Coordinate ascent from the best shared threshold: each exit in turn takes the candidate
    (a quantile of its validation scores, or +inf) that most improves the objective, until a
    sweep over the exits changes nothing. ``cost_weight`` is the knob: higher, earlier exits.
    """

    def __init__(self, cost_weight: float = 0.5, score: str = "max_prob", candidates: int = 64, sweeps: int = 4) -> None:
        if not cost_weight >= 0:
            raise ValueError(f"policy.cost_weight must be >= 0, got {cost_weight}")
        if candidates < 2 or sweeps < 1:
            raise ValueError(f"policy.candidates must be >= 2 and policy.sweeps >= 1, got {candidates}, {sweeps}")
        super().__init__(score, closed(score))  # nobody leaves early until fitted
        self.cost_weight = float(cost_weight)
        self.candidates = candidates
        self.sweeps = sweeps

    @torch.no_grad()
    def fit(self, outputs: ExitOutputs, labels: Tensor, costs: Tensor) -> None:
        scores = self.scores(outputs).cpu()
        correct = (outputs.logits.argmax(-1).cpu() == labels.cpu().unsqueeze(0))
        costs = costs.cpu()
        levels = torch.linspace(0, 1, self.candidates, dtype=torch.float64)
        inf = torch.tensor([float("inf")])
        grids = [torch.cat([torch.quantile(s.double(), levels).float(), inf]) for s in scores]
        shared = torch.cat([torch.quantile(scores.flatten().double(), levels).float(), inf])

        def value(thresholds: Tensor) -> float:
            return threshold_objective(scores, correct, costs, thresholds, self.cost_weight)

        best = max((torch.full((len(scores),), float(t)) for t in shared), key=value)
        best_value = value(best)
        for _ in range(self.sweeps):
            changed = False
            for index, grid in enumerate(grids):
                for candidate in grid:
                    trial = best.clone()
                    trial[index] = candidate
                    trial_value = value(trial)
                    if trial_value > best_value + 1e-12:
                        best, best_value, changed = trial, trial_value, True
            if not changed:
                break
        self.thresholds = best


class Patience(Policy):
    """PABEE (Zhou et al. 2020): leave at the first exit where the predicted class has been
    the same for ``patience`` consecutive exits."""

    def __init__(self, patience: int = 2) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"policy.patience must be an integer >= 1, got {patience!r}")
        self.patience = patience

    def begin(self, batch_size: int, device: torch.device) -> State:
        return {
            "previous": torch.full((batch_size,), -1, dtype=torch.long, device=device),
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def step(self, index: int, logits: Tensor, gate_logit: Tensor, state: State) -> tuple[Tensor, State]:
        predicted = logits.argmax(dim=-1)
        count = torch.where(predicted == state["previous"], state["count"] + 1, torch.ones_like(state["count"]))
        return count >= self.patience, {"previous": predicted, "count": count}


def closed(score: str) -> float:
    """The threshold no sample passes with ``score``: +inf, or -inf for an entropy bound."""
    return -math.inf if score == "entropy" else math.inf


def max_prob(threshold: float | Sequence[float] = 0.9) -> ConfidenceThreshold:
    """Max-softmax thresholding (one shared value or one per exit)."""
    return ConfidenceThreshold("max_prob", threshold)


def entropy(threshold: float | Sequence[float] = 0.5) -> ConfidenceThreshold:
    """Entropy thresholding: leave when H(p) <= threshold (nats)."""
    return ConfidenceThreshold("entropy", threshold)
