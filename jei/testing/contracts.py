"""The contracts a backbone adapter, an inference module (IM) and a gate must keep.

What the framework relies on, and so what these checks test:

- **Backbone** (see ``jei.backbones.base.FrozenBackbone``): ``exit_specs`` (one ``ExitSpec``
  per intermediate exit) and ``num_classes`` exist right after construction, because IMs and
  gates are built from them before any forward pass; ``freeze()`` leaves no trainable
  parameter and eval mode everywhere, and ``.train()`` (which a trainer calls on the whole
  network) does not undo that; ``forward_exits`` returns one representation per exit, shaped as
  its ``ExitSpec`` says, and the logits of the backbone's own head; running ``begin`` /
  ``run_segment`` / ``represent`` by hand gives the same; and dropping samples with ``select``
  between segments (real early exit) leaves the remaining samples' rows unchanged; a
  ``native_represent`` (``jei.types.NativeRepresentation``), if any, describes ``represent``.
- **IM**: ``im(features)`` gives ``[B, K]`` logits and equals ``im.classifier(im.pool(features))``
  (the trainer caches ``pool``'s output once, so ``pool`` must be parameter-free and
  deterministic); its parameters are trainable; samples do not interact.
- **Gate**: ``gate(logits [B, K])`` gives one finite gate logit per sample (``[B]``), also for
  extreme logits; samples do not interact; its parameters receive gradients.

Every check raises ``AssertionError`` with a message that names the component, the rule and
usually the fix. Only torch is imported, so plugin test suites need nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jei.types import ExitSpec

KINDS = ("map", "tokens", "vector")
_SHAPES = {"map": "[B, C, H, W]", "tokens": "[B, N, C]", "vector": "[B, C]"}


def _require(condition: Any, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _close(actual: Tensor, expected: Tensor, atol: float, rtol: float) -> bool:
    if actual.shape != expected.shape:
        return False
    return bool(torch.allclose(actual.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=False))


def _max_diff(actual: Tensor, expected: Tensor) -> str:
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    return f"max abs difference {(actual.float() - expected.float()).abs().max().item():.3g}"


# --- backbones ---------------------------------------------------------------------------


def check_exit_specs(backbone: nn.Module) -> tuple[ExitSpec, ...]:
    """``exit_specs`` and ``num_classes`` as published by the constructor (no forward pass)."""
    name = type(backbone).__name__
    specs = getattr(backbone, "exit_specs", None)
    _require(
        specs is not None,
        f"{name} has no exit_specs: set a tuple with one ExitSpec per intermediate exit in __init__, "
        f"before any forward pass (IMs and gates are built from it)",
    )
    specs = tuple(specs)
    _require(len(specs) >= 1, f"{name}.exit_specs is empty: an early-exit backbone needs at least one exit")
    for position, spec in enumerate(specs):
        _require(isinstance(spec, ExitSpec), f"{name}.exit_specs[{position}] is {spec!r}, not a jei.types.ExitSpec")
        _require(spec.index == position, f"{name}.exit_specs[{position}].index is {spec.index}; indices must be 0..G-1 in order")
        _require(spec.kind in KINDS, f"{name}: exit {position} has kind {spec.kind!r}; use one of {', '.join(KINDS)}")
        _require(
            isinstance(spec.channels, int) and not isinstance(spec.channels, bool) and spec.channels >= 1,
            f"{name}: exit {position} ({spec.name}) has channels={spec.channels!r}; it must be a positive int",
        )
        _require(
            spec.reduction is None or (isinstance(spec.reduction, int) and spec.reduction >= 1),
            f"{name}: exit {position} ({spec.name}) has reduction={spec.reduction!r}; use a positive int or None",
        )
        _require(isinstance(spec.name, str) and spec.name, f"{name}: exit {position} needs a module name")
    names = [spec.name for spec in specs]
    _require(len(set(names)) == len(names), f"{name}: exit names repeat ({names}); each exit taps its own module")
    num_gates = getattr(backbone, "num_gates", len(specs))
    _require(num_gates == len(specs), f"{name}.num_gates is {num_gates} but exit_specs has {len(specs)} entries")
    num_classes = getattr(backbone, "num_classes", None)
    _require(
        isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 1,
        f"{name}.num_classes is {num_classes!r}: set it in __init__ (the classes of the backbone's head)",
    )
    return specs


def check_representation(feature: Any, spec: ExitSpec, batch: int, inputs: Any = None, *, where: str = "") -> None:
    """One exit's representation agrees with its ``ExitSpec`` (kind, channels, batch, spatial size)."""
    where = where or f"exit {spec.index} ({spec.name})"
    _require(isinstance(feature, Tensor), f"{where}: the representation is a {type(feature).__name__}, not a Tensor")
    _require(feature.is_floating_point(), f"{where}: the representation has dtype {feature.dtype}, not a float type")
    shape = tuple(feature.shape)
    ndim = {"map": 4, "tokens": 3, "vector": 2}[spec.kind]
    channel_axis = {"map": 1, "tokens": 2, "vector": 1}[spec.kind]
    _require(
        feature.ndim == ndim and shape[channel_axis] == spec.channels,
        f"{where}: its ExitSpec says kind={spec.kind!r} {_SHAPES[spec.kind]} with C={spec.channels}, "
        f"but the representation has shape {shape}",
    )
    _require(shape[0] == batch, f"{where}: batch axis {shape[0]}, expected {batch} (one row per sample)")
    _require(bool(torch.isfinite(feature).all()), f"{where}: the representation has NaN or infinite values")
    if spec.kind == "map" and spec.reduction and isinstance(inputs, Tensor) and inputs.ndim == 4:
        for size, full in zip(shape[2:], inputs.shape[2:]):
            _require(
                size <= math.ceil(full / spec.reduction) + 1,
                f"{where}: spatial size {shape[2:]} is too large for reduction={spec.reduction} on "
                f"{tuple(inputs.shape[2:])} inputs; fix ExitSpec.reduction",
            )


def check_backbone(
    backbone: nn.Module,
    example_inputs: Any,
    *,
    num_classes: int | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    random_plans: int = 3,
    seed: int = 0,
) -> None:
    """Check a backbone adapter against the contract (see the module docstring).

    Args:
        backbone: a freshly built adapter (weights loaded or not). It is frozen here, as the
            trainer does before fitting exits.
        example_inputs: a batch of at least 2 samples, as ``begin`` takes it (a tensor, a PyG
            ``Batch``, ...).
        num_classes: if given, the class count ``backbone.num_classes`` must have.
        atol, rtol: tolerances for "the same values" (segment-by-segment vs all-exits pass).
        random_plans: how many random keep/drop patterns to try besides the fixed ones.
        seed: seed of those patterns.
    """
    name = type(backbone).__name__
    specs = check_exit_specs(backbone)  # before any forward pass
    if num_classes is not None:
        _require(backbone.num_classes == num_classes, f"{name}.num_classes is {backbone.num_classes}, expected {num_classes}")
    _check_freezing(backbone)
    batch = backbone.batch_size(example_inputs)
    _require(isinstance(batch, int) and batch >= 2, f"{name}: example_inputs need at least 2 samples (batch_size gave {batch!r})")

    reference = backbone.forward_exits(example_inputs)
    features, logits = reference.features, reference.logits
    _require(
        len(features) == len(specs),
        f"{name}.forward_exits gave {len(features)} representations for {len(specs)} ExitSpecs",
    )
    for feature, spec in zip(features, specs):
        check_representation(feature, spec, batch, example_inputs, where=f"{name}: exit {spec.index} ({spec.name})")
    _check_logits(name, logits, batch, backbone.num_classes, "the backbone's head (last segment)")

    again = backbone.forward_exits(example_inputs)
    for index, (first, second) in enumerate(zip([*features, logits], [*again.features, again.logits])):
        _require(
            _close(second, first, atol, rtol),
            f"{name}: two all-exits passes on the same inputs differ at exit {index} ({_max_diff(second, first)}); "
            f"a frozen backbone must be deterministic (dropout or batch statistics still active?)",
        )
    with torch.no_grad():
        direct = backbone(example_inputs)
    _require(
        isinstance(direct, Tensor) and _close(direct, logits, atol, rtol),
        f"{name}: backbone(inputs) differs from forward_exits(inputs).logits "
        f"({_max_diff(direct, logits) if isinstance(direct, Tensor) else type(direct).__name__}); "
        f"forward must run all segments",
    )

    _check_segments_by_hand(backbone, example_inputs, features, logits, atol, rtol)
    _check_native_representation(backbone, example_inputs, atol, rtol)
    for plan in _keep_plans(batch, len(specs), random_plans, seed):
        check_select_keeps_rows(backbone, example_inputs, plan, reference=reference, atol=atol, rtol=rtol)
    _require(
        tuple(backbone.exit_specs) == specs,
        f"{name}.exit_specs changed during a forward pass; publish them once, in __init__",
    )


def check_select_keeps_rows(
    backbone: nn.Module,
    example_inputs: Any,
    plan: Sequence[Sequence[int] | Tensor],
    *,
    reference: Any = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> None:
    """Real early exit on ``example_inputs`` gives the rows of the all-exits pass.

    ``plan[i]`` lists the positions, among the samples still running after exit ``i``, of the
    samples that go on, in the order ``select`` receives them (any order must work). An empty
    entry means every sample exited there; the run stops. The backbone must already be frozen.
    """
    name = type(backbone).__name__
    num_gates = len(backbone.exit_specs)
    _require(len(plan) >= num_gates, f"check_select_keeps_rows: the plan needs one entry per exit ({num_gates}), got {len(plan)}")
    if reference is None:
        reference = backbone.forward_exits(example_inputs)
    alive = torch.arange(backbone.batch_size(example_inputs))
    with torch.no_grad():
        state = backbone.begin(example_inputs)
        for index in range(num_gates):
            state = backbone.run_segment(index, state)
            seen = backbone.represent(index, state)
            expected = reference.features[index][alive]
            _require(
                isinstance(seen, Tensor) and _close(seen, expected, atol, rtol),
                f"{name}: exit {index} ({backbone.exit_specs[index].name}) after dropping samples differs from the "
                f"all-exits pass for samples {alive.tolist()} ({_max_diff(seen, expected)}); select(state, keep) "
                f"must return the state of exactly the samples at positions keep, in that order, and no segment "
                f"may mix samples",
            )
            keep = torch.as_tensor(plan[index], dtype=torch.long).reshape(-1)
            if keep.numel() == 0:
                return  # everyone exited here: inference stops
            _require(
                bool(((keep >= 0) & (keep < len(alive))).all()),
                f"check_select_keeps_rows: plan[{index}]={keep.tolist()} has positions outside 0..{len(alive) - 1}",
            )
            state, alive = backbone.select(state, keep), alive[keep]
        final = backbone.run_segment(num_gates, state)
    expected = reference.logits[alive]
    _require(
        isinstance(final, Tensor) and _close(final, expected, atol, rtol),
        f"{name}: the head's logits after dropping samples differ from the all-exits pass for samples "
        f"{alive.tolist()} ({_max_diff(final, expected)}); select() or a later segment mixes samples",
    )


def _check_freezing(backbone: nn.Module) -> None:
    name = type(backbone).__name__
    _require(callable(getattr(backbone, "freeze", None)), f"{name} has no freeze(); subclass jei.backbones.base.FrozenBackbone")
    backbone.freeze()
    _require(getattr(backbone, "frozen", True), f"{name}.frozen is False after freeze()")
    trainable = [key for key, parameter in backbone.named_parameters() if parameter.requires_grad]
    _require(not trainable, f"{name}: parameters {trainable[:5]} still require gradients after freeze()")
    wrapper = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(1, 1)})
    wrapper.train()  # what a trainer does on the whole early-exit network
    backbone.train()
    training = [key or "<root>" for key, module in backbone.named_modules() if module.training]
    _require(
        not training and wrapper["head"].training,
        f"{name}: modules {training[:5]} are in training mode after .train() on a frozen backbone; it must "
        f"stay in eval mode (BatchNorm statistics and dropout fixed): FrozenBackbone.train does this",
    )


def _check_logits(name: str, logits: Any, batch: int, num_classes: int, what: str) -> None:
    _require(isinstance(logits, Tensor), f"{name}: {what} returned a {type(logits).__name__}, not a logits Tensor")
    _require(
        tuple(logits.shape) == (batch, num_classes),
        f"{name}: {what} returned shape {tuple(logits.shape)}, expected [batch, num_classes] = {(batch, num_classes)}",
    )
    _require(bool(torch.isfinite(logits).all()), f"{name}: {what} returned NaN or infinite logits")


def _check_native_representation(backbone: nn.Module, example_inputs: Any, atol: float, rtol: float) -> None:
    """What ``native_represent`` says native exits may compute instead of ``represent`` is what
    ``represent`` computes, at every exit that describes itself."""
    from jei.native_exits import representation_form  # (imports only torch)

    describe = representation_form(backbone)  # None where native exits keep represent in Python
    if describe is None:
        return
    name = type(backbone).__name__
    with torch.no_grad():
        state = backbone.begin(example_inputs)
        for index in range(len(backbone.exit_specs)):
            state = backbone.run_segment(index, state)
            form = describe(index)
            if form is None:
                continue
            _require(
                len(form) == 4 and form[0] == "class_token_layer_norm",
                f"{name}.native_represent({index}) gave {form[0]!r}: the one known form is "
                f"('class_token_layer_norm', weight, bias, eps), or None to keep represent in Python",
            )
            _, weight, bias, eps = form
            described = F.layer_norm(state[:, 0], (state.shape[-1],), weight, bias, eps)
            seen = backbone.represent(index, state)
            _require(
                _close(described, seen, atol, rtol),
                f"{name}.native_represent({index}) does not describe represent(index, state) "
                f"({_max_diff(described, seen)}): native exits would compute other features; return None there",
            )


def _check_segments_by_hand(
    backbone: nn.Module, inputs: Any, features: Sequence[Tensor], logits: Tensor, atol: float, rtol: float
) -> None:
    name = type(backbone).__name__
    with torch.no_grad():
        state = backbone.begin(inputs)
        for index, spec in enumerate(backbone.exit_specs):
            state = backbone.run_segment(index, state)
            seen = backbone.represent(index, state)
            _require(
                isinstance(seen, Tensor) and _close(seen, features[index], atol, rtol),
                f"{name}: exit {index} ({spec.name}) differs between forward_exits and begin/run_segment/represent "
                f"({_max_diff(seen, features[index])}); does a later segment change the state in place (e.g. an "
                f"inplace ReLU on the tensor represent returned)? Return a new tensor instead",
            )
        final = backbone.run_segment(len(features), state)
    _require(
        isinstance(final, Tensor) and _close(final, logits, atol, rtol),
        f"{name}: the last segment's logits differ from forward_exits' ({_max_diff(final, logits)})",
    )


def _keep_plans(batch: int, num_gates: int, random_plans: int, seed: int) -> list[list[list[int]]]:
    """Fixed patterns (reverse the order, drop the first sample at each exit, keep one sample)
    and seeded random subsets in random order."""
    reverse = [list(range(batch - 1, -1, -1))] + [list(range(batch))] * (num_gates - 1)
    drop_first, alive = [], batch
    for _ in range(num_gates):
        drop_first.append(list(range(1, alive)) if alive > 1 else [0])
        alive = max(alive - 1, 1)
    keep_last = [[batch - 1]] + [[0]] * (num_gates - 1)
    plans = [reverse, drop_first, keep_last]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(random_plans):
        plan, alive = [], batch
        for _ in range(num_gates):
            count = int(torch.randint(1, alive + 1, (1,), generator=generator))
            plan.append(torch.randperm(alive, generator=generator)[:count].tolist())
            alive = count
        plans.append(plan)
    return plans


# --- heads ---------------------------------------------------------------------------------


def check_im(
    im: nn.Module,
    spec: ExitSpec,
    example_feature: Tensor,
    num_classes: int,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> None:
    """Check an inference module built for ``spec`` on an exit representation ``example_feature``."""
    name = type(im).__name__
    batch = example_feature.shape[0]
    check_representation(example_feature, spec, batch, where=f"{name}: example_feature for {spec.name}")
    _require(batch >= 2, f"{name}: example_feature needs at least 2 samples, got {batch}")
    for attribute in ("pool", "classifier"):
        _require(
            callable(getattr(im, attribute, None)),
            f"{name} has no {attribute}(): the framework runs im.classifier(im.pool(features)) and caches "
            f"the pooled features (subclass jei.heads.ims.PoolIM)",
        )
    was_training = im.training
    try:
        im.eval()
        with torch.no_grad():
            out = im(example_feature)
        _check_logits(name, out, batch, num_classes, "im(features)")
        with torch.enable_grad():
            pooled = im.pool(example_feature.detach())
        _require(
            isinstance(pooled, Tensor) and not pooled.requires_grad,
            f"{name}.pool has trainable parameters (its output requires grad); the trainer computes it once "
            f"and caches it, so put every trainable layer in classifier",
        )
        with torch.no_grad():
            composed = im.classifier(pooled)
            _require(
                _close(composed, out, atol, rtol),
                f"{name}: im(features) differs from im.classifier(im.pool(features)) ({_max_diff(composed, out)})",
            )
            single = im(example_feature[:1])
            _require(
                _close(single, out[:1], atol, rtol),
                f"{name}: a sample's logits depend on the other samples of the batch ({_max_diff(single, out[:1])})",
            )
            im.train()
            again = im.pool(example_feature)
            _require(
                _close(again, pooled, atol, rtol),
                f"{name}.pool is not deterministic in training mode ({_max_diff(again, pooled)}); its output is cached once",
            )
        _require(
            any(parameter.requires_grad for parameter in im.parameters()),
            f"{name} has no trainable parameter: an IM is trained on the frozen backbone's features",
        )
        im.zero_grad(set_to_none=True)
        labels = torch.arange(batch) % num_classes
        F.cross_entropy(im(example_feature.detach()).float(), labels.to(example_feature.device)).backward()
        updated = [p for p in im.parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
        _require(updated, f"{name}: no parameter receives a gradient from a loss on its logits")
    finally:
        im.zero_grad(set_to_none=True)
        im.train(was_training)


def check_gate(gate: nn.Module, num_classes: int, *, batch: int = 8, seed: int = 0, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Check a gate: one finite logit per sample from the IM's ``[B, num_classes]`` logits."""
    name = type(gate).__name__
    _require(num_classes >= 2 and batch >= 2, f"check_gate needs num_classes >= 2 and batch >= 2, got {num_classes}, {batch}")
    generator = torch.Generator().manual_seed(seed)
    parameter = next(gate.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    logits = (3 * torch.randn(batch, num_classes, generator=generator)).to(device)
    was_training = gate.training
    try:
        gate.eval()
        with torch.no_grad():
            out = gate(logits)
            _require(isinstance(out, Tensor), f"{name} returned a {type(out).__name__}, not a Tensor")
            _require(
                tuple(out.shape) == (batch,),
                f"{name}: gate(logits [{batch}, {num_classes}]) has shape {tuple(out.shape)}, expected [{batch}] "
                f"(one gate logit per sample)",
            )
            _require(out.is_floating_point() and bool(torch.isfinite(out).all()), f"{name}: non-finite gate logits {out.tolist()}")
            one_hot = torch.eye(num_classes, device=device)[: min(num_classes, 2)]
            extreme = torch.cat([torch.zeros(1, num_classes, device=device), 1e4 * one_hot, -1e4 * one_hot, 1e4 * one_hot - 1e4])
            extreme_out = gate(extreme)
            _require(
                bool(torch.isfinite(extreme_out).all()),
                f"{name}: gate logits are not finite for extreme IM logits (uniform, +-1e4 one-hot): {extreme_out.tolist()}",
            )
            single = gate(logits[:1])
            _require(
                _close(single.reshape(-1), out[:1], atol, rtol),
                f"{name}: a sample's gate logit depends on the other samples of the batch",
            )
        params = [p for p in gate.parameters() if p.requires_grad]
        _require(params, f"{name} has no trainable parameter (a JEI gate is learned)")
        gate.train()
        gate.zero_grad(set_to_none=True)
        targets = (torch.arange(batch, device=device) % 2).float()
        F.binary_cross_entropy_with_logits(gate(logits).float(), targets).backward()
        updated = [p for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0)]
        _require(updated, f"{name}: no parameter receives a gradient from a loss on its gate logits")
    finally:
        gate.zero_grad(set_to_none=True)
        gate.train(was_training)
