"""Predictions of a finished ``jei-train`` run on new inputs, from any directory.

    from jei.predict import load

    predictor = load("outputs/train/2025-01-31_12-00-00_123456")
    result = predictor.predict(["digit.png", "more_digits/"], alpha=0.1)
    for row in result.rows():
        print(row["source"], row["class"], row["exit"], row["cost"], row["set"])

A run directory holds ``run.json`` (the *run record*, written by ``jei-train`` just before
``metrics.json``): the resolved config with absolute paths, the preprocessing of the data
(``jei.data.base.ImagePreprocessing`` / ``GraphPreprocessing``: size, channels, value range,
normalisation, class names), the exit costs, and the per-exit (Mondrian) conformal thresholds
at each of the run's alphas. ``calibration.safetensors`` holds the calibration samples those
thresholds come from (probabilities at the exit taken, labels, exits), so sets at any other
alpha are calibrated the same way on demand. ``load`` rebuilds the network from the record,
``exits.safetensors`` (IMs, gates, exit policy state, temperature) and the backbone weights
(the run's ``backbone.safetensors`` when it trained the backbone, else the weights file the
config named, by absolute path, checked against its recorded SHA-256), **without loading any
dataset**. Files inside the run directory are found relative to ``run.json`` itself, so a run
folder can be moved or copied whole.

Predictions use real early exit (``EarlyExitNetwork.early_exit``): each input stops at the
exit its policy picks, and the rest of the network is not computed for it. For each input:
the label, the probabilities (softmax of the temperature-scaled logits at the exit taken, in
float64, as the run's evaluation computes them), the exit, its cost (cumulative mul-adds,
normalised so the full network is 1) and the conformal prediction set at ``alpha``.

Conformal thresholds are those the run's evaluation computed (``jei.calibrate``: the
calibration split scored by the all-exits pass under the run's policy, LAC/APS/RAPS per the
config, ``MondrianConformal`` with the config's small-group policy). With
``conformal.calibrate_on=test_halves`` the evaluation calibrates each half of the test split
on the other; a predictor has no test half to leave out, so its thresholds are calibrated on
the **whole test split** (scored the same way), which is disjoint from every image the exits
and the backbone were trained or selected on: valid for new images from the test
distribution (the metrics' coverage numbers come from the two halves, not from these).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jei.data.base import GraphPreprocessing, ImagePreprocessing, preprocessing_from_dict
from jei.errors import ConfigError
from jei.io import with_non_finite

RECORD = "run.json"
CALIBRATION = "calibration.safetensors"
EXITS = "exits.safetensors"
BACKBONE = "backbone.safetensors"
FORMAT = "jei-run/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAPH_SUFFIXES = (".json",)
SET_KINDS = ("per_exit", "global")
# Config keys whose string values are file system paths (made absolute in the record).
PATH_KEYS = frozenset({"root", "cache_dir", "weights", "shared_data", "data_dir", "checkpoint"})


class InputError(ConfigError):
    """An input that does not match the run's preprocessing; ``path`` names the file (or None)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


# --- writing the record (at train time) ---------------------------------------------------------


def _absolute_paths(node: Any, key: str | None = None) -> Any:
    """``node`` with every path-valued setting (``PATH_KEYS``) absolute (``~`` expanded)."""
    if isinstance(node, dict):
        return {k: _absolute_paths(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_absolute_paths(v) for v in node]
    if key in PATH_KEYS and isinstance(node, str) and node and "://" not in node:
        return str(Path(os.path.expanduser(node)).resolve())
    return node


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_threshold(value: float) -> float | None:
    return None if math.isinf(value) else float(value)


def _threshold(value: float | None) -> float:
    return math.inf if value is None else float(value)


def _policy_name(config: dict[str, Any]) -> str:
    name = (config.get("policy") or {}).get("name") or "auto"
    if name != "auto":
        return str(name)
    from jei.registry import OBJECTIVES

    try:
        return str(OBJECTIVES.get(config["objective"]["name"]).default_policy)
    except (LookupError, ImportError, AttributeError, KeyError, TypeError):
        return "auto"


def write_run_record(output_dir: str | Path, data: Any, network: Any, splits: dict[str, Any], settings: Any,
                     metrics: dict[str, Any]) -> Path:
    """Write ``run.json`` and ``calibration.safetensors`` into ``output_dir`` (``run_experiment``
    calls it after evaluation, before ``metrics.json``); see the module docstring."""
    from safetensors.torch import save_file

    from jei.build import data_input_channels
    from jei.calibrate import Scored
    from jei.conformal import MondrianConformal, SplitConformal
    from jei.io import atomic_write, write_json
    from jei.model import predict_from_outputs
    from jei.train import exit_outputs

    output_dir = Path(output_dir).resolve()
    conformal = settings.conformal
    # Scored exactly as ``pipeline.evaluate`` scores the calibration split; test_halves: the whole test split.
    split = "cal" if conformal.calibrate_on == "cal" else "test"
    prediction = predict_from_outputs(exit_outputs(network, splits[split], settings.device), network.policy)
    cal = Scored(torch.softmax(prediction.logits.double(), dim=-1), splits[split].labels, prediction.exit_index)
    num_exits = network.num_gates + 1
    alphas = []
    for alpha in conformal.alphas:
        per_exit = MondrianConformal(
            conformal.score, alpha=alpha, min_group_size=conformal.min_group_size,
            small_group_policy=conformal.small_group_policy, allow_empty=conformal.allow_empty,
        ).calibrate(cal.probs, cal.labels, cal.exits, num_groups=num_exits)
        overall = SplitConformal(conformal.score, alpha=alpha, allow_empty=conformal.allow_empty).calibrate(
            cal.probs, cal.labels
        )
        alphas.append({
            "alpha": alpha,
            "per_exit": {
                "thresholds": [_json_threshold(t) for t in per_exit.thresholds.tolist()],
                "pooled_threshold": _json_threshold(per_exit.pooled_threshold),
                "fallback_exits": list(per_exit.fallback_groups),
            },
            "global": {"threshold": _json_threshold(overall.threshold)},
        })
    tensors = {"probs": cal.probs.contiguous(), "labels": cal.labels.contiguous(), "exits": cal.exits.contiguous()}
    atomic_write(output_dir / CALIBRATION, lambda tmp: save_file(tensors, str(tmp)))

    config = _absolute_paths(metrics.get("config") or {})
    backbone_node = config.get("backbone") or {}
    weights = None
    trained = (output_dir / BACKBONE).is_file() and settings.train_backbone
    if not trained and isinstance(backbone_node.get("weights"), str):
        path = Path(backbone_node["weights"])
        if path.is_file():
            weights = {"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256(path)}
    preprocessing = getattr(data, "preprocessing", None)
    record = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(output_dir),  # where it was written; files are looked up beside run.json
        "files": {"exits": EXITS, "backbone": BACKBONE if trained else None, "calibration": CALIBRATION},
        "backbone_weights": weights,
        "data": {
            "name": (config.get("data") or {}).get("name"),
            "num_classes": int(data.num_classes),
            "input_channels": data_input_channels(data),
            "edge_dim": getattr(data, "edge_dim", None),
            "class_names": None if preprocessing is None or preprocessing.class_names is None
            else list(preprocessing.class_names),
        },
        "preprocessing": None if preprocessing is None else preprocessing.to_dict(),
        "policy": _policy_name(config),
        "num_exits": num_exits,
        "exit_costs": list(metrics["exit_costs"]),
        "exit_mul_adds": list(metrics.get("exit_mul_adds") or []),
        "eval_batch_size": int(settings.eval_batch_size),
        "conformal": {
            "score": conformal.score,
            "min_group_size": conformal.min_group_size,
            "small_group_policy": conformal.small_group_policy,
            "allow_empty": conformal.allow_empty,
            "calibrate_on": conformal.calibrate_on,
            "calibration_split": split,
            "n_calibration": len(cal.labels),
            "n_calibration_per_exit": torch.bincount(cal.exits, minlength=num_exits).tolist(),
            "alphas": alphas,
        },
        "config": config,
    }
    return write_json(output_dir / RECORD, record)


# --- loading ---------------------------------------------------------------------------------


def read_record(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``run.json``, or an error saying what is missing."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory: give the folder of a finished jei-train run")
    path = run_dir / RECORD
    if not path.is_file():
        runs = sorted((p.parent.name for p in run_dir.glob(f"*/{RECORD}")), key=lambda name: (len(name), name))
        if runs:  # a sweep's (or jei-compare's) folder: its runs are one level down
            hint = f"it holds runs in its subfolders ({', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''}): pass one of them"
        elif (run_dir / "metrics.json").is_file():
            hint = "it was trained before runs saved run.json: train it again with this version of jei-train"
        else:
            hint = "is it the folder of a finished jei-train run? (a run writes run.json just before metrics.json)"
        raise FileNotFoundError(f"{path} is missing; {hint}")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable run record ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise ValueError(f"{path}: unknown run record format {found!r}, expected {FORMAT!r}")
    record["config"] = with_non_finite(record.get("config") or {})  # e.g. policy.threshold: inf
    return record


def build_network(record: dict[str, Any], run_dir: str | Path) -> Any:
    """The trained ``EarlyExitNetwork`` of a run (CPU, eval mode), from its record; no data."""
    from safetensors.torch import load_file

    from jei.backbones.base import load_state_dict_strict
    from jei.batchnorm_folding import fold_frozen_batchnorm
    from jei.build import build_backbone, build_objective, network_factory
    from jei.memory_format import to_channels_last
    from jei.pipeline import load_exits_state

    run_dir = Path(run_dir).expanduser()
    config, info = record["config"], record["data"]
    backbone_node = dict(config["backbone"])
    trained = record["files"].get("backbone")
    if trained:  # the run's own weights: build the architecture only, then load them
        backbone_node["weights"] = None
        if "pretrained" in backbone_node:
            backbone_node["pretrained"] = False
    elif record.get("backbone_weights"):
        _check_weights(record["backbone_weights"])
    shapes = SimpleNamespace(num_classes=info["num_classes"], in_channels=info["input_channels"], edge_dim=info["edge_dim"])
    backbone = build_backbone(backbone_node, shapes)
    if trained:
        path = _run_file(run_dir, trained)
        load_state_dict_strict(backbone, load_file(str(path)), str(path))
    trainer = config.get("trainer") or {}  # the backbone as the run computed its features
    if trainer.get("channels_last"):
        to_channels_last(backbone)
    backbone.freeze()
    if trainer.get("fold_batchnorm"):
        fold_frozen_batchnorm(backbone, warn=False)  # the run warned when it trained
    objective = build_objective(config["objective"])
    network = network_factory(config["im"], config["gate"], info["num_classes"], config.get("policy"), objective)(backbone)
    exits_path = _run_file(run_dir, record["files"]["exits"])
    state = load_file(str(exits_path))

    return load_exits_state(network, state).eval()


def _run_file(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run folder {run_dir} is incomplete")
    return path


def _check_weights(weights: dict[str, Any]) -> None:
    path = Path(weights["path"])
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights {path} (recorded by the run) are missing: put the same file back at that path"
        )
    if path.stat().st_size != weights["bytes"] or _sha256(path) != weights["sha256"]:
        raise ValueError(
            f"backbone weights {path} changed since the run was trained (SHA-256 differs from the run record): "
            f"the exits were trained on the original file; restore it"
        )


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Load a finished run for prediction, from any working directory (see the module docstring)."""
    from jei.build import resolve_device

    run_dir = Path(run_dir).expanduser().resolve()
    record = read_record(run_dir)
    device = resolve_device(device) if isinstance(device, str) else device
    return Predictor(run_dir, record, build_network(record, run_dir).to(device), device)


# --- predicting ----------------------------------------------------------------------------------


@dataclass
class Predictions:
    """Predictions for N inputs, in input order.

    ``labels`` [N], ``probs`` [N, K] (float64, at the exit taken), ``exits`` [N] (0..G; G is the
    backbone's head), ``costs`` [N] (normalised cumulative cost of the exit taken), ``sets``
    [N, K] (bool: the conformal set at ``alpha``, ``set_kind`` per_exit or global).
    """

    labels: Tensor
    probs: Tensor
    exits: Tensor
    costs: Tensor
    mul_adds: Tensor
    sets: Tensor
    alpha: float
    set_kind: str
    class_names: tuple[str, ...] | None = None
    sources: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, label: int) -> str:
        return self.class_names[label] if self.class_names is not None else str(label)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per input: source, label, class, probability, probabilities, exit,
        cost, mul_adds, set (labels), set_names."""
        rows = []
        for i in range(len(self)):
            label = int(self.labels[i])
            members = self.sets[i].nonzero().view(-1).tolist()
            rows.append({
                "source": None if self.sources is None else self.sources[i],
                "label": label,
                "class": self.name(label),
                "probability": float(self.probs[i, label]),
                "probabilities": self.probs[i].tolist(),
                "exit": int(self.exits[i]),
                "cost": float(self.costs[i]),
                "mul_adds": float(self.mul_adds[i]),
                "set": members,
                "set_names": [self.name(m) for m in members],
            })
        return rows


class Predictor:
    """A loaded run (``load``): its record, network and preprocessing, and prediction methods.

    - ``predict(inputs)``: image or graph files and folders (paths), raw image arrays, PIL
      images or PyG graphs; dispatches to the methods below.
    - ``predict_files(paths)``: PNG/JPEG files (folders: every image inside, sorted), or
      graph ``.json`` files for graph runs (``read_graph``).
    - ``predict_raw(images)``: ``[N, C, H, W]`` (or ``[N, H, W]`` for grey) arrays of raw
      values in the data's own range (``preprocessing.max_value``: 255 for 8-bit images, 16
      for digits), before normalisation.
    - ``predict_graphs(graphs)``: raw PyG ``Data`` (``GraphPreprocessing.apply`` prepares them).
    - ``predict_prepared(batch)``: inputs already prepared as the run's dataset prepares them
      (what ``DataSplits.batches`` yields: normalised image tensors, or a list of graphs).
    """

    def __init__(self, run_dir: Path, record: dict[str, Any], network: Any, device: torch.device) -> None:
        self.run_dir, self.record, self.network, self.device = run_dir, record, network, device
        self.preprocessing: ImagePreprocessing | GraphPreprocessing | None = preprocessing_from_dict(record["preprocessing"])
        names = record["data"].get("class_names")
        self.class_names: tuple[str, ...] | None = None if names is None else tuple(names)
        self.num_classes: int = record["data"]["num_classes"]
        self.num_exits: int = record["num_exits"]
        self.exit_costs = torch.tensor(record["exit_costs"], dtype=torch.float64)
        mul_adds = record.get("exit_mul_adds") or [math.nan] * self.num_exits
        self.exit_mul_adds = torch.tensor(mul_adds, dtype=torch.float64)
        self.batch_size: int = record.get("eval_batch_size", 256)
        self.alphas: list[float] = [entry["alpha"] for entry in record["conformal"]["alphas"]]
        self._conformal: dict[tuple[float, str], Any] = {}

    # -- conformal ---------------------------------------------------------------------------

    def conformal(self, alpha: float = 0.1, kind: str = "per_exit") -> Any:
        """The calibrated ``MondrianConformal`` (``kind="per_exit"``) or ``SplitConformal``
        (``"global"``) at ``alpha``: the run's own thresholds at its alphas, else calibrated on
        the run's saved calibration samples with the run's settings."""
        from jei.conformal import MondrianConformal, SplitConformal

        if kind not in SET_KINDS:
            raise ValueError(f"conformal set kind must be one of {', '.join(SET_KINDS)}, got {kind!r}")
        if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        key = (float(alpha), kind)
        if key in self._conformal:
            return self._conformal[key]
        settings = self.record["conformal"]
        if kind == "per_exit":
            predictor = MondrianConformal(
                settings["score"], alpha=alpha, min_group_size=settings["min_group_size"],
                small_group_policy=settings["small_group_policy"], allow_empty=settings["allow_empty"],
            )
        else:
            predictor = SplitConformal(settings["score"], alpha=alpha, allow_empty=settings["allow_empty"])
        stored = [entry for entry in settings["alphas"] if abs(entry["alpha"] - alpha) < 1e-12]
        if stored:
            entry = stored[0][kind]
            if kind == "per_exit":
                predictor.thresholds = torch.tensor([_threshold(t) for t in entry["thresholds"]], dtype=torch.float64)
                predictor.group_counts = torch.tensor(settings["n_calibration_per_exit"], dtype=torch.long)
                predictor.fallback_groups = list(entry["fallback_exits"])
                predictor.pooled_threshold = _threshold(entry["pooled_threshold"])
            else:
                predictor.threshold = _threshold(entry["threshold"])
            predictor.n_calibration = settings["n_calibration"]
        else:
            from safetensors.torch import load_file

            cal = load_file(str(_run_file(self.run_dir, self.record["files"]["calibration"])))
            if kind == "per_exit":
                predictor.calibrate(cal["probs"], cal["labels"], cal["exits"], num_groups=self.num_exits)
            else:
                predictor.calibrate(cal["probs"], cal["labels"])
        self._conformal[key] = predictor
        return predictor

    # -- entry points --------------------------------------------------------------------------

    def predict(self, inputs: Any, alpha: float = 0.1, sets: str = "per_exit", batch_size: int | None = None) -> Predictions:
        """Predictions for ``inputs``: a path or a list of paths (files or folders), a raw image
        array/tensor, a list of PIL images, or a list of raw PyG graphs (see the class docstring)."""
        if isinstance(inputs, (str, os.PathLike)) or (hasattr(inputs, "mode") and hasattr(inputs, "getbands")):
            inputs = [inputs]  # one path, or one PIL image
        if isinstance(inputs, (Tensor, np.ndarray)):
            return self.predict_raw(inputs, alpha, sets, batch_size)
        inputs = list(inputs)
        if inputs and all(isinstance(item, (str, os.PathLike)) for item in inputs):
            return self.predict_files(inputs, alpha, sets, batch_size)
        if isinstance(self.preprocessing, GraphPreprocessing):
            return self.predict_graphs(inputs, alpha, sets, batch_size)
        images = self._image_preprocessing()
        raw = [decode_image(item, images, f"input {i}") for i, item in enumerate(inputs)]
        return self._run(torch.stack(raw) if raw else torch.zeros(0, images.channels, images.height, images.width),
                         alpha, sets, batch_size, None, prepare=images.normalize)

    def predict_files(self, paths: Iterable[str | os.PathLike[str]], alpha: float = 0.1, sets: str = "per_exit",
                      batch_size: int | None = None) -> Predictions:
        graphs = isinstance(self.preprocessing, GraphPreprocessing)
        files = expand_inputs(paths, GRAPH_SUFFIXES if graphs else IMAGE_SUFFIXES,
                              "this run takes graphs (.json files, jei.predict.read_graph)" if graphs
                              else "this run takes image files")
        sources = [str(f) for f in files]
        if graphs:
            prepared = []
            for path in files:
                try:
                    prepared.append(self.preprocessing.apply(read_graph(path)))
                except InputError:
                    raise
                except (ValueError, AttributeError, RuntimeError) as err:
                    raise InputError(f"{path}: {err}; the run expects {self.preprocessing.format()}", path) from None
            return self._run(prepared, alpha, sets, batch_size, sources)
        images = self._image_preprocessing()
        raw = [read_image(f, images) for f in files]
        return self._run(torch.stack(raw), alpha, sets, batch_size, sources, prepare=images.normalize)

    def predict_raw(self, images: Any, alpha: float = 0.1, sets: str = "per_exit",
                    batch_size: int | None = None) -> Predictions:
        pre = self._image_preprocessing()
        raw = check_raw_images(images, pre)
        return self._run(raw, alpha, sets, batch_size, None, prepare=pre.normalize)

    def predict_graphs(self, graphs: Sequence[Any], alpha: float = 0.1, sets: str = "per_exit",
                       batch_size: int | None = None) -> Predictions:
        if not isinstance(self.preprocessing, GraphPreprocessing):
            raise InputError(f"this run's data ({self.record['data']['name']}) are not graphs")
        prepared = []
        for i, graph in enumerate(graphs):
            try:
                prepared.append(self.preprocessing.apply(graph))
            except (ValueError, AttributeError, RuntimeError) as err:
                raise InputError(f"graph {i}: {err}; the run expects {self.preprocessing.format()}") from None
        return self._run(prepared, alpha, sets, batch_size, None)

    def predict_prepared(self, inputs: Any, alpha: float = 0.1, sets: str = "per_exit",
                         batch_size: int | None = None) -> Predictions:
        """Inputs prepared as the run's dataset prepares them: a normalised image tensor
        ``[N, C, H, W]``, or prepared PyG graphs (a list, or a ``Batch``)."""
        if hasattr(inputs, "to_data_list"):
            inputs = inputs.to_data_list()
        return self._run(inputs, alpha, sets, batch_size, None)

    # -- the work ------------------------------------------------------------------------------

    def _image_preprocessing(self) -> ImagePreprocessing:
        if isinstance(self.preprocessing, ImagePreprocessing):
            return self.preprocessing
        if self.preprocessing is None:
            raise InputError(
                f"this run's dataset ({self.record['data']['name']}) did not describe its preprocessing, so raw "
                f"inputs cannot be prepared; pass prepared inputs to Predictor.predict_prepared"
            )
        raise InputError(f"this run's data ({self.record['data']['name']}) are graphs, not images: "
                         f"give graph .json files (jei.predict.read_graph) or PyG Data objects")

    @torch.no_grad()
    def _run(self, inputs: Any, alpha: float, sets: str, batch_size: int | None, sources: list[str] | None,
             prepare: Any = None) -> Predictions:
        from jei.features import to_device

        conformal = self.conformal(alpha, sets)  # a bad alpha fails before any work
        batch_size = batch_size or self.batch_size
        total = len(inputs)
        logits, exits = [], []
        for start in range(0, total, batch_size):
            chunk = inputs[start : start + batch_size]
            if prepare is not None:
                chunk = prepare(chunk)
            elif isinstance(chunk, list):
                from torch_geometric.data import Batch

                chunk = Batch.from_data_list(chunk)
            result = self.network.early_exit(to_device(chunk, self.device))
            logits.append(result.logits.float().cpu())
            exits.append(result.exit_index.cpu())
        if not logits:
            raise InputError("no inputs to predict on")
        logits, exit_index = torch.cat(logits), torch.cat(exits)
        probs = torch.softmax(logits.double(), dim=-1)
        members = conformal.predict(probs, exit_index) if sets == "per_exit" else conformal.predict(probs)
        return Predictions(
            labels=logits.argmax(-1), probs=probs, exits=exit_index, costs=self.exit_costs[exit_index],
            mul_adds=self.exit_mul_adds[exit_index], sets=members, alpha=float(alpha), set_kind=sets,
            class_names=self.class_names, sources=sources,
        )


# --- reading inputs --------------------------------------------------------------------------------


def expand_inputs(paths: Iterable[str | os.PathLike[str]], suffixes: Sequence[str], expected: str = "") -> list[Path]:
    """Files as given, and every file with one of ``suffixes`` inside each folder (recursively,
    sorted by path); a missing path or a folder without such files is an ``InputError`` (which
    says ``expected``: what the run takes)."""
    files: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                kinds = "/".join(s.lstrip(".") for s in suffixes)
                raise InputError(f"{path}: no {kinds} files in this folder{f'; {expected}' if expected else ''}", path)
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder", path)
    if not files:
        raise InputError("no input files given")
    return files


def read_image(path: str | Path, pre: ImagePreprocessing) -> Tensor:
    """One image file as raw values ``[C, H, W]`` (float32, in ``[0, pre.max_value]``); an image
    that does not match ``pre`` (size, channels, bit depth) is an ``InputError`` naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return decode_image(image, pre, str(path))
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{path}: not a readable image ({err}); the run expects {pre.format()}", path) from None


def decode_image(image: Any, pre: ImagePreprocessing, name: str = "image") -> Tensor:
    """A PIL image -> raw values ``[C, H, W]`` per ``pre`` (see ``read_image``)."""
    from PIL import Image

    from jei.data.images import resize_center_crop

    def fail(problem: str) -> InputError:
        return InputError(f"{name}: {problem}; the run expects {pre.format()}", None if name.startswith("input ") else name)

    if not isinstance(image, Image.Image):
        raise fail(f"is a {type(image).__name__}, not an image file path or PIL image")
    mode = image.mode
    if mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "La", "RGBa", "CMYK", "YCbCr"):
        raise fail(f"is a {mode!r} image (16-bit, 32-bit or float pixels)")
    if "A" in mode or "a" in mode or (mode in ("P", "PA") and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if (alpha != 255).any():
            raise fail("has transparent pixels")
    if pre.channels == 1:
        if mode in ("1", "L", "LA", "La"):
            converted = image.convert("L")
        else:
            rgb = np.asarray(image.convert("RGB"))
            if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                raise fail("is a colour image")
            converted = Image.fromarray(rgb[..., 0])
    elif pre.channels == 3:
        converted = image.convert("RGB")
    else:
        raise fail(f"cannot be read for a {pre.channels}-channel run")
    if pre.resize is not None:
        pixels = resize_center_crop(converted, pre.resize, pre.height)
    else:
        pixels = np.asarray(converted, dtype=np.uint8)
        if pixels.shape[:2] != (pre.height, pre.width):
            raise fail(f"is {pixels.shape[1]}x{pixels.shape[0]} pixels")
    pixels = pixels.reshape(pre.height, pre.width, -1).transpose(2, 0, 1)
    return pre.from_8bit(torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)))


def check_raw_images(images: Any, pre: ImagePreprocessing) -> Tensor:
    """Raw image values ``[N, C, H, W]`` (or ``[N, H, W]`` for grey) as a float32 tensor, checked
    against ``pre``'s shape and value range ``[0, max_value]``."""
    raw = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    expected = f"[N, {pre.channels}, {pre.height}, {pre.width}]"
    if raw.dim() == 3 and pre.channels == 1:
        raw = raw.unsqueeze(1)
    if raw.dim() != 4 or tuple(raw.shape[1:]) != (pre.channels, pre.height, pre.width):
        raise InputError(f"inputs of shape {list(raw.shape)}: the run expects raw images {expected}")
    if raw.is_complex() or raw.dtype == torch.bool:
        raise InputError(f"inputs of dtype {raw.dtype}: the run expects real raw pixel values")
    raw = raw.float()
    if raw.numel() and (not torch.isfinite(raw).all() or raw.min() < 0 or raw.max() > pre.max_value):
        low, high = raw.min().item(), raw.max().item()
        raise InputError(
            f"inputs hold values in [{low:g}, {high:g}]: the run expects raw {pre.name or 'image'} values in "
            f"0..{pre.max_value:g}, before normalisation (the network normalises them itself)"
        )
    return raw


def read_graph(path: str | Path) -> Any:
    """A graph ``.json`` file -> a raw PyG ``Data``: ``{"edge_index": [[sources...], [targets...]],
    "x": [[...], ...] (node features; omit it for datasets without any), "edge_attr": [[...], ...]
    (when the dataset has edge features), "num_nodes": n (optional when x is given)}``."""
    from torch_geometric.data import Data

    path = Path(path)
    try:
        values = json.loads(path.read_text())
        edge_index = torch.tensor(values["edge_index"], dtype=torch.long).view(2, -1)
        graph = Data(edge_index=edge_index)
        if values.get("x") is not None:
            graph.x = torch.tensor(values["x"], dtype=torch.float32)
        if values.get("edge_attr") is not None:
            graph.edge_attr = torch.tensor(values["edge_attr"], dtype=torch.float32)
        if values.get("num_nodes") is not None:
            graph.num_nodes = int(values["num_nodes"])
        elif graph.x is None:
            graph.num_nodes = int(edge_index.max()) + 1 if edge_index.numel() else 0
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise InputError(
            f"{path}: not a graph file ({type(err).__name__}: {err}); expected JSON with edge_index "
            f"[[sources], [targets]] and x / edge_attr lists", path
        ) from None
    return graph
