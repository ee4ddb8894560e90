"""The JEI-DNN bi-level objective (Regol, Chataoui, Coates, ICLR 2024, §4).

Its schedule (``phases``): a warm-up of the IMs with per-IM early stopping, then phases that
alternate between the gates (phi, IMs fixed) and the IMs (theta, gates fixed).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jei.exits import POS_WEIGHT_RULES, exit_probabilities, gate_targets, oracle_exit, per_exit_losses, positive_class_weights
from jei.full_batch import lbfgs_phase
from jei.im_phases import converged_ims, ims_phase
from jei.train import per_exit_accuracy
from jei.types import ExitOutputs, Phase, Step, TrainBatch
from jei.validate import boolean, choice, number

log = logging.getLogger(__name__)

ImWeighting = Literal["paper", "uniform"]
GATE_TARGETS = ("oracle", "correct")
GATE_SOLVERS = ("sgd", "lbfgs")


class JEIObjective:
    """JEI-DNN losses.

    Args:
        cost_weight: lambda in CE_l + lambda * c_l; higher means earlier exits. >= 0.
        im_weighting: ``"paper"`` weights each IM's cross-entropy by the exit probability
            pi_l(x) (expected loss under the learned exit distribution); ``"uniform"`` is plain
            mean cross-entropy over exits, what the authors' code effectively trains.
        renormalize: with ``"paper"``, divide each sample's weighted loss by its detached
            intermediate mass sum_{l<G} pi_l (no gradient flows through the factor).
        pos_weight_cap: upper bound of the gates' positive-class weights.
        pos_weight_rule: ``"balanced_nonzero"`` (negatives / positives of each gate's targets,
            and 1 for a gate whose targets have no negatives), ``"balanced"`` (0 there: that gate
            gets no gradient, and a large cost_weight silently switches gate training off) or
            ``"exit_share"`` (the authors' code); see ``jei.exits.positive_class_weights``. The
            paper re-estimates a positive-class weight per gate on validation data without saying
            what an empty class gets; the default only differs from "balanced" there.
        ims: instead of the paper's warm-up, fit the IMs to convergence with their own optimiser
            and calibrate them (``jei.im_phases.ConvergedIMs`` fields); None: the paper's warm-up.
        train_ims: False trains only the gates after the IM stage (the alternation has no IM
            phase), so the gates are measured on fixed IMs.
        gate_target: what gate l is trained to predict. ``"oracle"`` (the paper, §4.2):
            t_l = [l >= l*] with l* = argmin_l CE_l + cost_weight * c_l, balanced by
            ``pos_weight_rule``. ``"correct"``: t_l = [exit l's prediction is right], plain BCE,
            so g_l estimates P(exit l is correct | x): a learned confidence score for a threshold
            policy (``penalized`` or ``gate_threshold``), where the cost trade-off is then set;
            ``cost_weight`` and ``pos_weight_rule`` play no part in training.
        gate_solver: ``"sgd"`` (the paper: gate steps of the alternation, with the trainer's
            optimiser) or ``"lbfgs"`` (with ``train_ims=False`` only: the gates read fixed IMs,
            so their loss is a logistic regression; fitted on the whole training split by
            ``jei.full_batch.lbfgs_phase``, with ``gate_weight_decay``).
        gate_weight_decay: the L2 penalty of the L-BFGS gate fit.
    """

    default_policy = "jei"
    ensemble_decay = 0.0

    def __init__(
        self,
        cost_weight: float = 0.1,
        im_weighting: ImWeighting = "paper",
        renormalize: bool = False,
        pos_weight_cap: float = 1.0,
        pos_weight_rule: str = "balanced_nonzero",
        ims: dict[str, Any] | None = None,
        train_ims: bool = True,
        gate_target: str = "oracle",
        gate_solver: str = "sgd",
        gate_weight_decay: float = 1e-4,
    ) -> None:
        number(cost_weight, "objective.cost_weight", minimum=0, hint="e.g. 0.5; higher means earlier exits")
        choice(im_weighting, "objective.im_weighting", ("paper", "uniform"))
        boolean(renormalize, "objective.renormalize")
        number(pos_weight_cap, "objective.pos_weight_cap", above=0, hint="e.g. 1.0 (5 with pos_weight_rule=exit_share)")
        choice(pos_weight_rule, "objective.pos_weight_rule", POS_WEIGHT_RULES)  # before training, not after the warm-up
        self.cost_weight = float(cost_weight)
        self.im_weighting = im_weighting
        self.renormalize = renormalize
        self.pos_weight_cap = float(pos_weight_cap)
        self.pos_weight_rule = pos_weight_rule
        self.pos_weight: Tensor | None = None  # per gate; 1 until estimated on validation data
        self.ims = converged_ims(ims)
        boolean(train_ims, "objective.train_ims")
        self.train_ims = train_ims
        choice(gate_target, "objective.gate_target", GATE_TARGETS)
        self.gate_target = gate_target
        choice(gate_solver, "objective.gate_solver", GATE_SOLVERS)
        if gate_solver == "lbfgs" and train_ims:
            raise ValueError(
                "objective.gate_solver=lbfgs fits the gates on fixed IMs; set objective.train_ims=false "
                "(or gate_solver=sgd to alternate with the IMs)"
            )
        self.gate_solver = gate_solver
        self.gate_weight_decay = float(number(gate_weight_decay, "objective.gate_weight_decay", minimum=0.0))
        self._degenerate_warned: set[int] = set()

    def warmup_loss(self, im_logits: Tensor, labels: Tensor, active: Tensor | None = None) -> Tensor:
        """sum_l w_l CE(z_l, y) / sum_l w_l with w_l = G + 1 - l (earlier exits weigh more).

        ``active`` ([G] bool) leaves out IMs whose early stopping has ended. Dividing by the
        weights' sum keeps the learning rate's meaning independent of the number of exits.
        """
        num_gates = im_logits.shape[0]
        weights = torch.arange(num_gates + 1, 1, -1, dtype=im_logits.dtype, device=im_logits.device)
        if active is not None:
            weights = weights * active.to(weights)
        losses = per_exit_losses(im_logits, labels).mean(dim=0)  # [G]
        return (weights * losses).sum() / weights.sum().clamp(min=1e-12)

    def best_exits(self, exit_logits: Tensor, labels: Tensor, costs: Tensor) -> Tensor:
        """l* per sample over all G+1 exits (the backbone head's cost is c_G = 1)."""
        return oracle_exit(per_exit_losses(exit_logits.detach(), labels), costs, self.cost_weight)

    def gate_loss(self, exit_logits: Tensor, gate_logits: Tensor, labels: Tensor, costs: Tensor) -> Tensor:
        """Mean BCE between gate logits and their targets: the surrogate t_l = [l >= l*] with the
        positive-class weights, or (``gate_target="correct"``) whether exit l is right."""
        num_gates = gate_logits.shape[-1]
        if self.gate_target == "correct":
            correct = exit_logits[:num_gates].detach().argmax(dim=-1) == labels  # [G, B]
            return F.binary_cross_entropy_with_logits(gate_logits, correct.T.to(gate_logits))
        targets = gate_targets(self.best_exits(exit_logits, labels, costs), num_gates)
        pos_weight = self.pos_weight if self.pos_weight is not None else torch.ones(num_gates)
        return F.binary_cross_entropy_with_logits(gate_logits, targets, pos_weight=pos_weight.to(gate_logits))

    def im_loss(self, im_logits: Tensor, gate_logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over samples of sum_{l<G} pi_l(x) CE(z_l, y), gates fixed (or uniform)."""
        losses = per_exit_losses(im_logits, labels)  # [B, G]
        if self.im_weighting == "uniform":
            return losses.mean()
        weights = exit_probabilities(torch.sigmoid(gate_logits.detach()))[:, :-1]
        per_sample = (weights * losses).sum(dim=-1)
        if self.renormalize:
            per_sample = per_sample / weights.sum(dim=-1).clamp(min=1e-6)
        return per_sample.mean()

    def warn_one_class_correctness(self, exit_logits: Tensor, labels: Tensor) -> None:
        """Warn when a gate's correctness targets on the training split are all one class: its
        IM is always (or never) right on the images it learns from, typically because the IM
        was fitted on those very images; the gate then learns a constant."""
        correct = exit_logits[:-1].argmax(dim=-1) == labels  # [G, N]
        one_class = (correct.all(dim=1) | ~correct.any(dim=1)).nonzero().flatten().tolist()
        if one_class:
            log.warning(
                "gate(s) %s: exit is %s on every training sample, so gate_target=correct has one class and the "
                "gate learns a constant; fit the gates on images the IMs did not learn from (jei-compare "
                "protocol=crossfit crossfit_ims=train)", one_class,
                "/".join(sorted({"right" if bool(correct[i].all()) else "wrong" for i in one_class})),
            )

    def update_from_validation(self, exit_logits: Tensor, labels: Tensor, costs: Tensor) -> None:
        """Re-estimate the gates' positive-class weights from the validation split (the oracle
        targets only: correctness targets are unweighted)."""
        if self.gate_target == "correct":
            return
        num_gates = exit_logits.shape[0] - 1
        best = self.best_exits(exit_logits, labels, costs)
        self.pos_weight = positive_class_weights(best.cpu(), num_gates, self.pos_weight_cap, self.pos_weight_rule)
        positives = (gate_targets(best.cpu(), num_gates) > 0).sum(dim=0)
        one_class = ((positives == 0) | (positives == len(best))).nonzero().flatten().tolist()
        new = sorted(set(one_class) - self._degenerate_warned)
        if new:
            self._degenerate_warned.update(new)
            consequence = {
                "balanced": "the balanced class weight is 0 and these gates get no gradient; "
                            "pos_weight_rule=balanced_nonzero (the default) keeps one",
                "balanced_nonzero": "these gates learn that one class (class weight 1)",
                "exit_share": "the exit_share class weight is degenerate",
            }[self.pos_weight_rule]
            log.warning("gate(s) %s: every validation sample's target is the same class at cost_weight %g, so %s",
                        new, self.cost_weight, consequence)

    def phases(self, network: nn.Module, schedule: Any, costs: Tensor) -> list[Phase]:
        """Warm-up (``schedule.warmup_epochs``, early stopping per IM on validation accuracy with
        ``schedule.warmup_patience``), then ``schedule.epochs`` of gate/IM phases of
        ``schedule.phase_batches`` batches each, gates first (paper §4.3)."""
        ims_params = list(network.ims.parameters())

        def warmup(batch: TrainBatch, active: Tensor) -> Tensor:
            return self.warmup_loss(batch.outputs.logits[:-1], batch.labels, active)

        def gates(batch: TrainBatch) -> Tensor:
            return self.gate_loss(batch.outputs.logits, batch.outputs.gate_logits, batch.labels, costs)

        def ims(batch: TrainBatch) -> Tensor:
            return self.im_loss(batch.outputs.logits[:-1], batch.outputs.gate_logits, batch.labels)

        def reweigh(outputs: ExitOutputs, labels: Tensor) -> None:
            self.update_from_validation(outputs.logits, labels, costs.cpu())

        start = (
            self.ims.phases(network)
            if self.ims is not None
            else [  # the paper's warm-up: early stopping per IM on validation accuracy
                ims_phase(network, "warmup", schedule.warmup_epochs, schedule.warmup_patience, warmup,
                          metric=per_exit_accuracy)
            ]
        )
        steps = [Step("gates", list(network.gates.parameters()), gates)]
        if self.gate_solver == "lbfgs":
            def inspect(batch: TrainBatch) -> None:
                if self.gate_target == "correct":
                    self.warn_one_class_correctness(batch.outputs.logits, batch.labels)

            return [*start, lbfgs_phase("gates", network, steps[0], self.gate_weight_decay, on_start=reweigh,
                                        inspect=inspect)]
        if self.train_ims:
            steps.append(Step("ims", ims_params, ims))
        return [
            *start,
            Phase(
                "alternation", schedule.epochs, steps,
                block_batches=schedule.phase_batches if self.train_ims else 1,
                on_start=reweigh,
                on_epoch_end=lambda epoch, outputs, labels: reweigh(outputs, labels) or False,
            ),
        ]

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.pos_weight is None else {"pos_weight": self.pos_weight.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.pos_weight = state.get("pos_weight")
