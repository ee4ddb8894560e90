"""``jei-compare``: every method on one frozen backbone, one feature cache, one set of splits.

Each method is an objective (how IMs and gates are trained) and an exit policy (how samples
leave), with one knob swept: an objective knob (``cost_weight``) retrains the exits per value;
a policy knob (threshold, q, patience) re-fits the policy on the validation split of one
trained model. Thresholds and budgets are chosen on validation, never on test; test numbers
come from the all-exits pass, which equals real early exit (tested for every policy).

Files in the output directory: ``compare.json``, ``compare.md``, ``compare.png``, and
``trained/`` + ``points/`` (one file per trained model and per point, so a re-run recomputes
nothing that is finished).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from jei.calibrate import ConformalSettings, Scored, calibration_folds, conformal_metrics
from jei.conformal import expected_calibration_error
from jei.features import CachedSplit
from jei.io import atomic_write, with_non_finite, write_json
from jei.model import EarlyExitNetwork, predict_from_outputs
from jei.pipeline import RunSettings, exits_state, seed_everything
from jei.registry import GATES, OBJECTIVES, POLICIES
from jei.train import exit_outputs, fit_exits
from jei.types import ExitOutputs

log = logging.getLogger(__name__)

SPLITS = ("val", "cal", "test")


@dataclass
class Method:
    """One method of the comparison: objective and policy settings, and the knob to sweep.

    ``sweep`` is ``{"group": "objective" | "policy", "key": <argument>, "values": [...]}``.
    ``gate``: overrides of the composed ``gate`` node for this method only (``{history: all}``;
    a different ``name`` replaces the node); ``None``: the composed gate.
    """

    name: str
    objective: dict[str, Any]
    policy: dict[str, Any]
    sweep: dict[str, Any]
    gate: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        group = self.sweep.get("group")
        if group not in ("objective", "policy"):
            raise ValueError(f"methods.{self.name}.sweep.group must be 'objective' or 'policy', got {group!r}")
        if not self.sweep.get("key") or not self.sweep.get("values"):
            raise ValueError(f"methods.{self.name}.sweep needs a key and a non-empty list of values")
        if "name" not in self.objective or "name" not in self.policy:
            raise ValueError(f"methods.{self.name}: objective.name and policy.name are required")
        OBJECTIVES.get(self.objective["name"])  # unknown names fail now, listing the known ones
        POLICIES.get(self.policy["name"])
        if self.gate is not None and not isinstance(self.gate, dict):
            raise ValueError(f"methods.{self.name}.gate must be a mapping of gate settings, got {self.gate!r}")
        if self.gate is not None and "name" in self.gate:
            GATES.get(self.gate["name"])

    def identity(self) -> list[Any]:
        """What the trained models and points of this method depend on besides the knob (the
        gate overrides only when set, so the keys of gate-less methods are as before)."""
        return [] if not self.gate else [{"gate": self.gate}]

    def settings(self, knob: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(objective kwargs, policy kwargs) with the knob set."""
        objective = {k: v for k, v in self.objective.items() if k != "name"}
        policy = {k: v for k, v in self.policy.items() if k != "name"}
        (objective if self.sweep["group"] == "objective" else policy)[self.sweep["key"]] = knob
        return objective, policy


@dataclass
class Trained:
    """A trained model's exit outputs on every split (what every point is computed from)."""

    outputs: dict[str, ExitOutputs]
    labels: dict[str, Tensor]

    def save(self, path: Path, state: dict[str, Tensor]) -> None:
        tensors = {f"state.{k}": v for k, v in state.items()}
        for split, out in self.outputs.items():
            tensors[f"{split}.logits"] = out.logits.float().contiguous()
            tensors[f"{split}.gate_logits"] = out.gate_logits.float().contiguous()
            tensors[f"{split}.labels"] = self.labels[split].contiguous()
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))

    @classmethod
    def load(cls, path: Path) -> Trained:
        tensors = load_file(str(path))
        return cls(
            {s: ExitOutputs(tensors[f"{s}.logits"], tensors[f"{s}.gate_logits"]) for s in SPLITS},
            {s: tensors[f"{s}.labels"] for s in SPLITS},
        )


def merge_gate(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """A method's gate node: the composed ``base`` with the method's overrides (a different
    ``name`` replaces the node: another gate's settings would not apply)."""
    if not override:
        return dict(base)
    if "name" in override and override["name"] != base.get("name"):
        return dict(override)
    return {**base, **override}


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _label(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def point_metrics(
    policies: list[Any], folds: list[Trained], costs: Tensor, conformal: ConformalSettings, alpha: float, seed: int
) -> dict[str, Any]:
    """Test accuracy, expected cost, ECE, exit fractions and per-exit conformal coverage of
    fitted policies (one per fold), pooled over the folds' test samples. Each fold calibrates
    its conformal sets on its own ``cal`` split (or test halves), as ``jei-train`` does."""
    probs, labels, exits, covered = [], [], [], []
    num_exits = folds[0].outputs["test"].num_exits
    one_alpha = ConformalSettings(**{**conformal.__dict__, "alphas": [alpha]})
    for policy, fold in zip(policies, folds):
        test = fold.outputs["test"]
        tested, calibrated = predict_from_outputs(test, policy), predict_from_outputs(fold.outputs["cal"], policy)
        fold_exits = tested.exit_index
        fold_probs = torch.softmax(tested.logits.double(), dim=-1)
        cal = Scored(torch.softmax(calibrated.logits.double(), dim=-1), fold.labels["cal"], calibrated.exit_index)
        scored = Scored(fold_probs, fold.labels["test"], fold_exits)
        calibrate_on = conformal.calibrate_on if len(folds) == 1 else "cal"
        splits = calibration_folds(cal, scored, calibrate_on, seed)
        sets = conformal_metrics(splits, scored, num_exits, one_alpha)["results"][0]["per_exit"]
        counts = torch.bincount(fold_exits, minlength=num_exits)
        covered.append([0.0 if c is None else c * n for c, n in zip(sets["per_exit_coverage"], counts.tolist())])
        probs.append(fold_probs)
        labels.append(fold.labels["test"])
        exits.append(fold_exits)
    probs_all, labels_all, exits_all = torch.cat(probs), torch.cat(labels), torch.cat(exits)
    counts = torch.bincount(exits_all, minlength=num_exits)
    covered_total = torch.tensor(covered, dtype=torch.float64).sum(dim=0)
    return {
        "accuracy": (probs_all.argmax(-1) == labels_all).double().mean().item(),
        "expected_cost": costs.double()[exits_all].mean().item(),
        "ece": expected_calibration_error(probs_all, labels_all, conformal.n_bins, "equal_mass"),
        "exit_fractions": (counts.double() / len(labels_all)).tolist(),
        "per_exit_coverage": [None if n == 0 else (c / n).item() for c, n in zip(covered_total, counts)],
        "alpha": alpha,
        "num_test_samples": len(labels_all),
    }


def validation_cost(policies: list[Any], folds: list[Trained], costs: Tensor) -> float:
    """Mean cost of the fitted policies on their folds' validation samples."""
    exits = torch.cat([policy.decide(fold.outputs["val"]) for policy, fold in zip(policies, folds)])
    return costs.double()[exits].mean().item()


def oracle_points(folds: list[Trained], costs: Tensor, grid: list[float]) -> list[dict[str, float]]:
    """Upper bounds on the pooled test samples: every sample at its earliest correct exit (the
    head if none), and the budgeted oracle: a mean cost spent on the samples that can be made
    correct, cheapest first (the others leave at exit 0)."""
    labels = torch.cat([fold.labels["test"] for fold in folds])
    correct = torch.cat([fold.outputs["test"].logits.argmax(-1) for fold in folds], dim=1) == labels  # [G+1, N]
    costs = costs.double()
    any_correct = correct.any(dim=0)
    earliest = torch.where(any_correct, correct.to(torch.uint8).argmax(dim=0), torch.full_like(labels, len(costs) - 1))
    points = [{
        "kind": "earliest_correct", "accuracy": any_correct.double().mean().item(),
        "expected_cost": costs[earliest].mean().item(),
    }]
    n = len(labels)
    extra = (costs[earliest] - costs[0])[any_correct].sort().values  # cost of making each correct
    spent = torch.cumsum(extra, dim=0) / n
    for budget in grid:
        if budget < costs[0] - 1e-6:  # below the first exit's cost: no way to spend so little
            points.append({"kind": "budgeted", "expected_cost": budget, "accuracy": None})
            continue
        affordable = int((spent <= budget - costs[0] + 1e-6).sum())  # costs arrive as float32
        points.append({"kind": "budgeted", "expected_cost": budget, "accuracy": affordable / n})
    return points


def interpolate(points: list[dict[str, Any]], cost: float) -> float | None:
    """Accuracy of a method's curve at ``cost``, linear between its points sorted by cost; None
    outside the range its points cover."""
    curve = sorted((p["expected_cost"], p["accuracy"]) for p in points)
    if not curve or cost < curve[0][0] - 1e-9 or cost > curve[-1][0] + 1e-9:
        return None
    for (c0, a0), (c1, a1) in zip(curve, curve[1:]):
        if c0 <= cost <= c1:
            return a0 if c1 == c0 else a0 + (a1 - a0) * (cost - c0) / (c1 - c0)
    return curve[0][1]


def matched_table(points: list[dict[str, Any]], costs: list[float], reference: str) -> list[dict[str, Any]]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        by_method.setdefault(point["method"], []).append(point)
    rows = []
    for cost in costs:
        base = interpolate(by_method.get(reference, []), cost)
        for method, curve in by_method.items():
            accuracy = interpolate(curve, cost)
            delta = None if accuracy is None or base is None else accuracy - base
            rows.append({"cost": cost, "method": method, "accuracy": accuracy, "delta_vs_threshold": delta})
    return rows


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def markdown(result: dict[str, Any], reference: str) -> str:
    methods = list(dict.fromkeys(p["method"] for p in result["points"]))
    costs = list(dict.fromkeys(row["cost"] for row in result["matched"]))
    cell = {(row["cost"], row["method"]): row for row in result["matched"]}
    lines = [
        f"Test accuracy (%) at matched expected cost; in brackets, the difference to `{reference}` (points).",
        "",
        "| method | " + " | ".join(f"cost {c:g}" for c in costs) + " |",
        "| --- |" + " --- |" * len(costs),
    ]
    for method in methods:
        cells = []
        for cost in costs:
            row = cell[(cost, method)]
            text = _percent(row["accuracy"])
            if method != reference and row["delta_vs_threshold"] is not None:
                text += f" ({_percent(row['delta_vs_threshold'], signed=True)})"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    oracle = {round(p["expected_cost"], 6): p["accuracy"] for p in result["oracle"] if p["kind"] == "budgeted"}
    lines.append("| oracle (budgeted) | " + " | ".join(_percent(oracle.get(round(c, 6))) for c in costs) + " |")
    if result.get("budget"):
        lines += ["", f"Budget mode: knob chosen on validation for expected cost <= {result['budget']['target']}.", "",
                  "| method | knob | val cost | test cost | test accuracy (%) |", "| --- | --- | --- | --- | --- |"]
        for row in result["budget"]["methods"]:
            lines.append(
                f"| {row['method']} | {row['knob']} | {row['val_cost']:.3f} | {row['test_cost']:.3f} | "
                f"{_percent(row['test_accuracy'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    from jei.plots import plt, save_figure

    figure, axis = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for point in result["points"]:
        by_method.setdefault(point["method"], []).append((point["expected_cost"], point["accuracy"]))
    colours = plt.get_cmap("tab20").colors  # distinct for up to 20 methods (the default cycle repeats after 10)
    markers = "os^vD<>ph*"
    for number, (method, curve) in enumerate(by_method.items()):
        curve.sort()
        axis.plot([c for c, _ in curve], [100 * a for _, a in curve], marker=markers[number % len(markers)],
                  markersize=3, color=colours[number % len(colours)], label=method)
    oracle = sorted((p["expected_cost"], p["accuracy"]) for p in result["oracle"]
                    if p["kind"] == "budgeted" and p["accuracy"] is not None)
    axis.plot([c for c, _ in oracle], [100 * a for _, a in oracle], "k--", label="oracle (budgeted)")
    axis.set_xlabel("expected cost (fraction of the backbone's mul-adds)")
    axis.set_ylabel("test accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    save_figure(figure, path)


def crossfit_folds(split: CachedSplit, folds: int, seed: int, shares: tuple[float, float] = (0.15, 0.15)) -> list[dict[str, CachedSplit]]:
    """k-fold cross-fitting over one split (the test set of a backbone that has memorised its
    training images): fold f's held-out samples are its ``test``; the other folds are cut into
    ``train``, ``val`` and ``cal`` (``shares`` of them for val and cal). Every reported number is
    then on images that neither the backbone nor the exits saw."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2 for protocol=crossfit, got {folds}")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    chunks = order.chunk(folds)
    result = []
    for held_out in range(folds):
        rest = torch.cat([c for i, c in enumerate(chunks) if i != held_out])
        n_val, n_cal = int(shares[0] * len(rest)), int(shares[1] * len(rest))
        parts = {"val": rest[:n_val], "cal": rest[n_val : n_val + n_cal], "train": rest[n_val + n_cal :],
                 "test": chunks[held_out]}
        result.append({name: subset(split, index) for name, index in parts.items()})
    return result


def memorisation_warnings(train: Any, test: CachedSplit, protocol: str, gap: float = 0.05) -> list[str]:
    """A warning when the backbone's head is far more accurate on the exit-training split than
    on held-out test images: exits trained there learn from a head that is always right."""
    if not isinstance(train, CachedSplit):
        return []
    accuracy = {name: (s.final_logits.argmax(-1) == s.labels).double().mean().item() for name, s in
                (("train", train), ("test", test))}
    if accuracy["train"] - accuracy["test"] <= gap:
        return []
    return [
        f"the backbone is {100 * accuracy['train']:.1f} % accurate on the exit-training split but "
        f"{100 * accuracy['test']:.1f} % on test: it has memorised its training images, so exits trained on them "
        f"see a head that is always right{'; protocol=crossfit trains and evaluates on test folds only' if protocol == 'standard' else ''}"
    ]


def subset(split: CachedSplit, index: Tensor) -> CachedSplit:
    return CachedSplit([p[index] for p in split.pooled], split.final_logits[index], split.labels[index])


class Comparison:
    """Trains and evaluates the methods; every trained model and point is stored on disk.

    ``folds``: one dict of ``train``/``val``/``cal``/``test`` features per fold (one fold for the
    standard protocol; k for cross-fitting), and optionally ``ims_train``: the features the
    IM-only phases train on instead (``jei.train.fit_exits``). A policy is fitted on each fold's validation split
    and evaluated on that fold's test samples; the points pool the folds.
    """

    def __init__(
        self,
        make_network: Callable[..., EarlyExitNetwork],  # (objective, policy node[, gate overrides])
        folds: list[dict[str, Any]],
        costs: Tensor,
        settings: RunSettings,
        output_dir: Path,
        alpha: float,
        fingerprint: str,
    ) -> None:
        self.make_network = make_network
        self.folds, self.costs = folds, costs.float()
        self.settings, self.output_dir, self.alpha = settings, Path(output_dir), alpha
        self.fingerprint = fingerprint

    def _train_fold(self, method: Method, objective_kwargs: dict[str, Any], number: int) -> Trained:
        name = method.objective["name"]
        identity = [self.fingerprint, name, OBJECTIVES.settings(name, **objective_kwargs), self.settings.seed,
                    *method.identity()]
        if len(self.folds) > 1:
            identity.append(f"fold {number} of {len(self.folds)}")
        path = self.output_dir / "trained" / f"{name}-{_digest(identity)}.safetensors"
        if path.is_file():
            return Trained.load(path)
        fold = self.folds[number]
        seed_everything(self.settings.seed)
        objective = OBJECTIVES.build(name, **objective_kwargs)
        # The policy's own defaults while training (it only shapes the logged validation numbers).
        policy = {"name": method.policy["name"]}
        network = self.make_network(objective, policy) if not method.gate else self.make_network(objective, policy, method.gate)
        log.info("training %s %s%s", name, objective_kwargs, f" (fold {number})" if len(self.folds) > 1 else "")
        fit_exits(network, objective, fold["train"], fold["val"], self.costs, self.settings.exit_training,
                  self.settings.device, self.settings.seed, ims_train=fold.get("ims_train"))
        result = Trained(
            {s: exit_outputs(network, fold[s], self.settings.device) for s in SPLITS},
            {s: fold[s].labels for s in SPLITS},
        )
        result.save(path, exits_state(network, objective))
        return result

    def trained(self, method: Method, objective_kwargs: dict[str, Any]) -> list[Trained]:
        return [self._train_fold(method, objective_kwargs, number) for number in range(len(self.folds))]

    def policies(self, method: Method, knob: Any, folds: list[Trained]) -> list[Any]:
        _, kwargs = method.settings(knob)
        result = []
        for fold in folds:
            policy = POLICIES.build(method.policy["name"], **kwargs)
            policy.fit(fold.outputs["val"], fold.labels["val"], self.costs)
            result.append(policy)
        return result

    def point(self, method: Method, knob: Any) -> dict[str, Any]:
        # Keyed by everything the point depends on, defaults filled in: a method renamed or
        # re-configured, or a default changed by an upgrade, never reuses another's points.
        objective_kwargs, policy_kwargs = method.settings(knob)
        identity = [self.fingerprint, method.objective["name"], OBJECTIVES.settings(method.objective["name"], **objective_kwargs),
                    method.policy["name"], POLICIES.settings(method.policy["name"], **policy_kwargs), len(self.folds),
                    self.alpha, *method.identity()]
        path = self.output_dir / "points" / method.name / f"{_digest(identity)}.json"
        if path.is_file():
            return with_non_finite(json.loads(path.read_text()))  # as computed: inf is "inf" in JSON
        folds = self.trained(method, objective_kwargs)
        metrics = point_metrics(self.policies(method, knob, folds), folds, self.costs, self.settings.conformal,
                                self.alpha, self.settings.seed)
        point = {"method": method.name, "knob": knob, "knob_name": f"{method.sweep['group']}.{method.sweep['key']}",
                 **metrics}
        write_json(path, point)
        return point

    def budgeted(self, method: Method, budget: float, iterations: int) -> dict[str, Any]:
        """The knob whose validation cost is the largest at or under ``budget``: the cost at every
        sweep value, then bisection between the two neighbouring values whose costs bracket the
        budget (on a log scale when they are positive and far apart; integer knobs: every integer
        between the sweep's extremes)."""
        values = method.sweep["values"]

        def val_cost(knob: Any) -> float:
            objective_kwargs, _ = method.settings(knob)
            folds = self.trained(method, objective_kwargs)
            return validation_cost(self.policies(method, knob, folds), folds, self.costs)

        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            candidates = [(val_cost(v), v) for v in range(min(values), max(values) + 1)]
        else:
            grid = sorted({float(v) for v in values})
            costs = [val_cost(v) for v in grid]
            candidates = list(zip(costs, grid))
            brackets = [(a, ca, b) for (ca, a), (cb, b) in zip(candidates, candidates[1:])
                        if min(ca, cb) <= budget < max(ca, cb)]
            if brackets:
                low, cost_low, high = brackets[0]
                log_scale = low > 0 and high / low > 20
                # Keep ``cheap`` on the side whose cost is under the budget.
                cheap, dear = (low, high) if cost_low <= budget else (high, low)
                for _ in range(iterations):
                    middle = math.sqrt(cheap * dear) if log_scale else (cheap + dear) / 2
                    cost = val_cost(middle)
                    candidates.append((cost, middle))
                    cheap, dear = (middle, dear) if cost <= budget else (cheap, middle)
        feasible = [c for c in candidates if c[0] <= budget + 1e-12]
        cost, knob = max(feasible) if feasible else min(candidates)
        point = self.point(method, knob)
        return {"method": method.name, "knob": knob, "val_cost": cost, "test_cost": point["expected_cost"],
                "test_accuracy": point["accuracy"], "feasible": bool(feasible)}

    def im_quality(self, method: Method) -> dict[str, list[float]]:
        """Per-exit test accuracy and ECE of a method's IMs (pooled over folds): IM quality apart
        from any exit policy."""
        folds = self.trained(method, method.settings(method.sweep["values"][0])[0])
        logits = torch.cat([f.outputs["test"].logits for f in folds], dim=1)
        labels = torch.cat([f.labels["test"] for f in folds])
        probs = torch.softmax(logits.double(), dim=-1)
        return {
            "accuracy": (logits.argmax(-1) == labels).double().mean(dim=1).tolist(),
            "ece": [expected_calibration_error(p, labels, self.settings.conformal.n_bins, "equal_mass") for p in probs],
        }

    def run(
        self, methods: list[Method], matched_costs: list[float], reference: str, budget: float | None, iterations: int
    ) -> dict[str, Any]:
        points = []
        for method in tqdm(methods, desc="methods", disable=None):
            for knob in tqdm(method.sweep["values"], desc=method.name, leave=False, disable=None):
                points.append(self.point(method, knob))
            log.info("%s: %d points", method.name, len(method.sweep["values"]))
        oracle_source = next((m for m in methods if m.name == reference), methods[0])
        result: dict[str, Any] = {
            "points": points,
            "matched": matched_table(points, matched_costs, reference),
            "oracle": oracle_points(
                self.trained(oracle_source, oracle_source.settings(oracle_source.sweep["values"][0])[0]),
                self.costs, matched_costs,
            ),
            "oracle_of": oracle_source.name,
            "reference": reference,
            "exit_costs": self.costs.double().tolist(),
            "folds": len(self.folds),
            "ims": {m.name: self.im_quality(m) for m in methods if m.sweep["group"] == "policy"},
        }
        if budget is not None:
            result["budget"] = {"target": budget, "methods": [self.budgeted(m, budget, iterations) for m in methods]}
        return result
