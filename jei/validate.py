"""Checks that run before any work: settings values, the loaded data, and data vs backbone.

Each check raises ``jei.errors.ConfigError`` naming the field (or split) and the fix. The value
checks return the value, so ``self.lr = number(self.lr, "optimizer.lr", ...)`` reads well.
Plain arguments only (no OmegaConf): the settings dataclasses and objectives use them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from jei.data.base import SPLITS
from jei.errors import ConfigError

__all__ = [
    "MAX_LR", "ConfigError", "boolean", "check_backbone_fits", "check_data", "check_network_builds", "choice",
    "integer", "number", "sequence", "string",
]

# The largest learning rate the optimizer settings accept: no optimizer here trains a network
# above it (SGD with lr=1e9 gives a finite 3e18 loss and garbage, not an error).
MAX_LR = 10.0


def _hint(hint: str) -> str:
    return f"; {hint}" if hint else ""


def integer(
    value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None, hint: str = ""
) -> int:
    """An int (not a bool, not a float such as 1.5) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field} must be an integer, got {value!r}{_hint(hint)}", field)
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ConfigError(f"{field} must be in {minimum}..{maximum}, got {value}{_hint(hint)}", field)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{field} must be >= {minimum}, got {value}{_hint(hint)}", field)
    if maximum is not None and value > maximum:
        raise ConfigError(f"{field} must be <= {maximum}, got {value}{_hint(hint)}", field)
    return value


def number(
    value: Any,
    field: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    hint: str = "",
) -> float:
    """A finite int or float with ``minimum <= value <= maximum`` and ``above < value < below``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field} must be a number, got {value!r}{_hint(hint)}", field)
    if not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, got {value}{_hint(hint)}", field)
    for bound, ok, text in (
        (minimum, lambda b: value >= b, ">="),
        (above, lambda b: value > b, ">"),
        (maximum, lambda b: value <= b, "<="),
        (below, lambda b: value < b, "<"),
    ):
        if bound is not None and not ok(bound):
            raise ConfigError(f"{field} must be {text} {bound:g}, got {value}{_hint(hint)}", field)
    return value


def boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be true or false, got {value!r}", field)
    return value


def choice(value: Any, field: str, options: Iterable[str]) -> str:
    options = list(options)
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{field} must be one of {', '.join(map(str, options))}, got {value!r}", field)
    return value


def string(value: Any, field: str, hint: str = "") -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field} must be a non-empty string, got {value!r}{_hint(hint)}", field)
    return value


def sequence(value: Any, field: str, example: str, *, min_length: int = 0) -> list[Any]:
    """A list or tuple (what a YAML list becomes), at least ``min_length`` long."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{field} must be a list such as {example}, got {value!r}", field)
    if len(value) < min_length:
        raise ConfigError(f"{field} must list at least {min_length} value(s), such as {example}, got {list(value)}", field)
    return list(value)


# --- data ----------------------------------------------------------------------------------

CHUNK = 4096  # samples per finiteness check: bounded extra memory on large in-memory splits


def check_data(data: Any, num_classes: int) -> None:
    """Every split's labels are integers in ``[0, num_classes)``, and its inputs (when held in
    memory as tensors, or as graphs' node/edge features) are finite. Before any training."""
    integer(num_classes, "data: num_classes", minimum=2, hint="the dataset must declare at least 2 classes")
    for split in SPLITS:
        labels = data.labels(split)
        _check_labels(labels, split, num_classes, data.size(split))
        for where, tensor in _input_tensors(data, split):
            _check_finite(tensor, split, where)


def _check_labels(labels: Tensor, split: str, num_classes: int, size: int) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        dtype = labels.dtype if isinstance(labels, Tensor) else ""
        raise ConfigError(
            f"data: the {split!r} split's labels must be a 1-D integer tensor of class indices, got {shape} {dtype}; "
            f"fix the dataset loader"
        )
    if len(labels) != size:
        raise ConfigError(f"data: the {split!r} split has {size} samples but {len(labels)} labels; fix the dataset loader")
    if len(labels) == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ConfigError(
            f"data: the {split!r} split has {len(bad)} label(s) outside 0..{num_classes - 1} (e.g. {int(bad[0])}) "
            f"for a dataset of num_classes={num_classes}; fix the labels or the dataset's num_classes"
        )


def _input_tensors(data: Any, split: str) -> Iterable[tuple[str, Tensor]]:
    """The split's inputs where they are cheap to reach: ``TensorDataSplits`` tensors, or the
    ``x`` / ``edge_attr`` of in-memory graphs. Datasets read lazily from files are skipped."""
    splits = getattr(data, "splits", None)
    if not isinstance(splits, dict) or split not in splits:
        return
    part = splits[split]
    inputs = getattr(part, "inputs", None)
    if isinstance(inputs, Tensor):
        yield "inputs", inputs
        return
    if isinstance(part, (list, tuple)):
        for attribute in ("x", "edge_attr"):
            tensors = [getattr(item, attribute, None) for item in part]
            tensors = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
            if tensors:
                yield f"graphs' {attribute}", torch.cat([t.reshape(-1) for t in tensors])


def _check_finite(tensor: Tensor, split: str, where: str) -> None:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    bad = 0
    first = None
    for start in range(0, len(tensor), CHUNK):
        chunk = tensor[start : start + CHUNK]
        finite = torch.isfinite(chunk.reshape(len(chunk), -1)).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().flatten()
            bad += len(rows)
            if first is None:
                first = start + int(rows[0])
    if bad:
        unit = "sample(s)" if where == "inputs" else "value(s)"
        raise ConfigError(
            f"data: the {split!r} split's {where} hold NaN or inf ({bad} {unit}, the first at index {first}); "
            f"clean the dataset or fix its normalisation before training"
        )


# --- data vs backbone ------------------------------------------------------------------------


def first_conv_channels(module: nn.Module) -> int | None:
    """Input channels of the first convolution in ``module``'s registration order, if any."""
    for child in module.modules():
        if isinstance(child, nn.modules.conv._ConvNd):
            return int(child.in_channels)
    return None


def check_backbone_fits(
    backbone: nn.Module, data: Any, *, data_name: str = "?", backbone_name: str = "?", data_channels: int | None = None
) -> None:
    """Run ``backbone`` on two training samples (eval mode, no gradients, RNG untouched) before
    any training, so data the backbone cannot take (e.g. 1-channel digits into a 3-channel
    CIFAR ResNet) fails now with both names, not deep inside the cost counter after stage 1."""
    inputs, _ = next(iter(data.batches("train", 2)))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            logits = backbone(inputs)
    except ConfigError:
        raise
    except ValueError as err:  # the adapter's own input check: already names its field
        raise ConfigError(f"backbone={backbone_name} on data={data_name}: {err}") from err
    except (RuntimeError, TypeError, IndexError, AttributeError) as err:
        expected = first_conv_channels(backbone)
        if data_channels is not None and expected is not None and expected != data_channels:
            raise ConfigError(
                f"data={data_name} has {data_channels}-channel inputs but backbone={backbone_name} takes "
                f"{expected}-channel inputs; pick a backbone for {data_channels}-channel data (e.g. backbone=small_cnn, "
                f"which takes its channels from the data) or a {expected}-channel dataset"
            ) from err
        first = one_line_error(err)
        if not isinstance(inputs, Tensor) and expected is not None:  # graphs (a PyG batch) into a CNN
            raise ConfigError(
                f"backbone={backbone_name} takes image tensors, but data={data_name} gives {type(inputs).__name__} "
                f"batches; pick a backbone for this data (graphs: backbone=graph_gps)"
            ) from err
        batch = f"shape {tuple(inputs.shape)}" if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ConfigError(
            f"backbone={backbone_name} cannot run on data={data_name} (a batch of {batch}): {first}; pick a "
            f"backbone that fits this data"
        ) from err
    finally:
        backbone.train(was_training)
    num_classes = getattr(data, "num_classes", None)
    if isinstance(logits, Tensor) and num_classes is not None and (logits.dim() != 2 or logits.shape[-1] != num_classes):
        raise ConfigError(
            f"backbone={backbone_name} outputs logits of shape {tuple(logits.shape)} but data={data_name} has "
            f"{num_classes} classes; set the backbone's head to the data's classes (backbone.reset_head=true)"
        )


def check_network_builds(make_network: Callable[[nn.Module], nn.Module], backbone: nn.Module) -> None:
    """Build the IMs, gates and exit policy once on ``backbone`` and throw them away, so their
    settings (``im.*``, ``gate.*``, ``policy.*``) fail now and not after the backbone stage.
    The RNG is restored: the run's seeded heads are built later as if this never happened."""
    with torch.random.fork_rng(devices=[]):
        make_network(backbone)


def one_line_error(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
