"""Non-conformity scores on class probabilities: LAC, APS and RAPS.

A score maps (probabilities, candidate label) to a number that is large when the label is
implausible. Predictors calibrate a threshold on ``score(probs, labels)`` and build a set
from ``score_all(probs)``; both come from one computation so they agree bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ._checks import check_labels, check_probs


class Score(ABC):
    """Base class of non-conformity scores.

    A custom score subclasses this, sets ``name`` and implements ``_score_all``, which receives
    validated probabilities (float32 or wider). ``score`` is derived from it, so calibration
    and set construction always run the identical computation.
    """

    name: str

    def score_all(self, probs: Tensor) -> Tensor:
        """Score of every candidate label, ``[N, K]``, used to build prediction sets."""
        return self._score_all(check_probs(probs))

    def score(self, probs: Tensor, labels: Tensor) -> Tensor:
        """Score of the true label, ``[N]``, used for calibration."""
        probs = check_probs(probs)
        labels = check_labels(labels, probs)
        return self._score_all(probs).gather(1, labels.unsqueeze(1)).squeeze(1)

    @property
    def params(self) -> dict[str, object]:
        """JSON-serialisable hyper-parameters, so results can record which score was used."""
        return {}

    @abstractmethod
    def _score_all(self, probs: Tensor) -> Tensor: ...


class LAC(Score):
    """``1 - p_y`` (Sadinle, Lei & Wasserman 2019): gives the smallest average sets.

    Deterministic: it has no randomised variant, since ties at the threshold have probability
    zero for continuous probabilities.
    """

    name = "lac"

    def _score_all(self, probs: Tensor) -> Tensor:
        return 1.0 - probs


class APS(Score):
    """Adaptive prediction sets (Romano, Sesia & Candes 2020).

    The score of label y is the probability mass of all classes ranked at or above y:
    ``sum_{j: p_j > p_y} p_j + p_y``. Classes tied with y count as ranked below it, so tied
    classes get equal scores and the score is independent of class order. The randomised
    version subtracts ``U * p_y`` with ``U ~ Uniform[0, 1)`` drawn once per sample, which makes
    coverage exact rather than conservative, at the cost of occasionally empty sets.
    """

    name = "aps"

    def __init__(self, randomized: bool = False, generator: torch.Generator | None = None) -> None:
        self.randomized = bool(randomized)
        self.generator = generator

    @property
    def params(self) -> dict[str, object]:
        return {"randomized": self.randomized}

    def _score_all(self, probs: Tensor) -> Tensor:
        return self._aps_and_rank(probs)[0]

    def _aps_and_rank(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """APS scores and the 1-based rank ``1 + #{j: p_j > p_y}`` of every label."""
        n, k = probs.shape
        descending = probs.sort(dim=1, descending=True).values
        # top_mass[:, m] = total mass of the m most probable classes, m = 0..K.
        top_mass = torch.cat([probs.new_zeros(n, 1), descending.cumsum(dim=1)], dim=1)
        n_at_most = torch.searchsorted(descending.flip(1).contiguous(), probs.contiguous(), right=True)
        n_above = k - n_at_most
        scores = top_mass.gather(1, n_above) + probs
        if self.randomized:
            scores = scores - self._uniform(n, probs) * probs
        return scores, n_above + 1

    def _uniform(self, n: int, probs: Tensor) -> Tensor:
        device = self.generator.device if self.generator is not None else probs.device
        u = torch.rand((n, 1), generator=self.generator, device=device, dtype=probs.dtype)
        return u.to(probs.device)


class RAPS(APS):
    """Regularised APS (Angelopoulos, Bates, Malik & Jordan 2021).

    Adds ``penalty * max(0, rank(y) - k_reg)`` (1-based rank) to the APS score, which
    discourages sets larger than ``k_reg`` when many tail classes have small probabilities.
    """

    name = "raps"

    def __init__(
        self,
        penalty: float = 0.01,
        k_reg: int = 5,
        randomized: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(randomized=randomized, generator=generator)
        if not float(penalty) >= 0.0:
            raise ValueError(f"penalty must be >= 0 (the RAPS lambda), got {penalty!r}")
        if isinstance(k_reg, bool) or not isinstance(k_reg, int) or k_reg < 0:
            raise ValueError(f"k_reg must be a non-negative int (set size left unpenalised), got {k_reg!r}")
        self.penalty = float(penalty)
        self.k_reg = k_reg

    @property
    def params(self) -> dict[str, object]:
        return {"randomized": self.randomized, "penalty": self.penalty, "k_reg": self.k_reg}

    def _score_all(self, probs: Tensor) -> Tensor:
        aps, rank = self._aps_and_rank(probs)
        return aps + self.penalty * (rank - self.k_reg).clamp(min=0).to(aps.dtype)


SCORES: dict[str, type[Score]] = {"lac": LAC, "aps": APS, "raps": RAPS}


def make_score(name: str, **kwargs: object) -> Score:
    """Build a score by name; ``kwargs`` go to its constructor (e.g. ``randomized=True``)."""
    if name not in SCORES:
        raise ValueError(
            f"unknown score name {name!r}; valid names for score are: {', '.join(sorted(SCORES))}"
        )
    return SCORES[name](**kwargs)
