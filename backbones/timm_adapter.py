"""Any timm classifier of a supported family as a frozen backbone, with exits at timm's own taps.

The candidate exits come from timm's metadata, never from hand-made lists: for a
VisionTransformer (ViT, DeiT, distilled DeiT) one per block, for the CNN families (ResNet,
ConvNeXt, EfficientNet, MobileNetV3) one per ``model.feature_info`` tap. The last block / tap
feeds the backbone's own head (exit G), so it is never an intermediate exit.

To run segment by segment (real early exit), the adapter replays ``forward_features`` as a
flat list of steps (stem, stages or blocks, final norm) and finishes with ``forward_head``;
the tests check this against ``model(x)`` and ``forward_intermediates``.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlparse

import torch.nn.functional as F
from torch import Tensor, nn

from jei.types import ExitSpec

from .base import ExitChoice, SequentialBackbone, class_token_norm_form, resolve_exits
from .weights import load_keeping_head, read_state_dict

Step = tuple[str, Callable[[Any], Any]]
# A candidate exit: (position of the step it follows, name, kind, channels, reduction).
Candidate = tuple[int, str, str, int, int | None]

# forward_features of each CNN family as its top-level modules in call order (timm 1.0.x).
# A module holding feature_info taps (e.g. ``stages``, ``blocks``) is replayed child by child.
_CNN_LAYOUTS: dict[str, tuple[str, ...]] = {
    "ResNet": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    "ConvNeXt": ("stem", "stages", "norm_pre"),
    "EfficientNet": ("conv_stem", "bn1", "blocks", "conv_head", "bn2"),
    "MobileNetV3": ("conv_stem", "bn1", "blocks"),
}
_PROBE_TIMEOUT_S = 3.0


class TimmBackbone(SequentialBackbone):
    """A timm model (``timm.create_model(model_name)``) cut into segments at its exits.

    Args:
        model_name: any timm name of a supported family, e.g. ``"deit_tiny_patch16_224"``,
            ``"resnet18"``, ``"convnext_tiny"``, ``"mobilenetv3_small_100"``, ``"test_vit"``.
        num_classes: classes of the head (filled in from the dataset by the pipeline).
        exits: in ``resolve_exits``' numbering, where the blocks are a ViT's transformer blocks
            and a CNN's ``feature_info`` taps (for ResNet and MobileNetV3 the stem is tap 1):
            ``"all"``, ``{"every": k}`` or positions k (after block / tap k, counted from 1) in
            1..N-1; the last block / tap feeds the head. On a ViT, ``exits=[k]`` taps module
            ``blocks.{k-1}``, as on T2T-ViT. Position k is ``candidate_exits(model_name)[k - 1]``.
        token: ViT exit representation, after the model's final norm: ``"cls"`` (the class
            token, as in the JEI-DNN paper) or ``"mean"`` (mean of the patch tokens, prefix
            tokens such as a distillation token or registers left out). Ignored for CNNs.
        weights: a local weights file (safetensors or torch state dict in timm's layout, e.g.
            the ``model.safetensors`` of a timm hub repository), loaded strictly.
        pretrained: load timm's own pretrained weights by name (needs the Hugging Face hub or
            its local cache; on an offline machine use ``weights`` instead).
        reset_head: replace the checkpoint's head by a new one for ``num_classes`` (needed when
            the checkpoint's class count differs); the backbone then has to be fine-tuned
            (``trainer.train_backbone=true``) before its exits are fitted.
        input_size: resize every batch to ``input_size`` x ``input_size`` (bilinear) first,
            e.g. 224 to feed 32x32 CIFAR images to an ImageNet model; ``None`` keeps inputs.
        model_kwargs: extra ``timm.create_model`` kwargs, e.g. ``{"img_size": 32}``.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        exits: ExitChoice = "all",
        token: Literal["cls", "mean"] = "cls",
        weights: str | None = None,
        pretrained: bool = False,
        reset_head: bool = False,
        input_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if token not in ("cls", "mean"):
            raise ValueError(f"backbone.token must be 'cls' or 'mean', got {token!r}")
        if weights is not None and pretrained:
            raise ValueError("backbone.weights and backbone.pretrained=true both load weights: choose one")
        if reset_head and weights is None and not pretrained:
            raise ValueError("backbone.reset_head=true needs backbone.weights or backbone.pretrained=true")
        if input_size is not None and input_size < 1:
            raise ValueError(f"backbone.input_size must be a positive image size or null, got {input_size}")
        self.num_classes = num_classes
        self.input_size = input_size
        self.token = token
        self.model = _create_model(model_name, num_classes, pretrained, reset_head, dict(model_kwargs or {}))
        self._is_vit = _is_vit(self.model)
        if self._is_vit and token == "cls" and getattr(self.model, "cls_token", None) is None:
            raise ValueError(f"backbone.token: {model_name} has no class token; use token: mean")
        self._steps, candidates = _vit_layout(self.model) if self._is_vit else _cnn_layout(self.model, model_name)
        if not candidates:
            raise ValueError("backbone.model_name: the model has no intermediate exit candidates (too shallow)")
        unit = "transformer block" if self._is_vit else "feature_info tap"
        chosen = [candidates[position - 1] for position in resolve_exits(exits, len(candidates) + 1, unit=unit)]
        self.exit_specs = tuple(ExitSpec(index, *candidate[1:]) for index, candidate in enumerate(chosen))
        # Segment i runs the steps up to candidate i's; the last one then applies forward_head.
        self.set_segments([step for _, step in self._steps], [candidate[0] + 1 for candidate in chosen])
        if weights is not None:
            state = read_state_dict(weights)
            if state and all(key.startswith("model.") for key in state):  # saved from this adapter (jei-train)
                state = {key.removeprefix("model."): value for key, value in state.items()}
            load_keeping_head(self.model, state, weights, _head_prefixes(self.model), num_classes, reset_head)

    def begin(self, inputs: Tensor) -> Tensor:
        if self.input_size is not None and tuple(inputs.shape[-2:]) != (self.input_size, self.input_size):
            inputs = F.interpolate(inputs, size=(self.input_size,) * 2, mode="bilinear", antialias=True)
        return inputs

    def finish(self, state: Tensor) -> Tensor:
        return self.model.forward_head(state)

    def represent(self, index: int, state: Tensor) -> Tensor:
        if not self._is_vit:
            return state
        # The final norm, as in the paper's ViT IMs. It normalises each token on its own, so the
        # class token alone is normalised (1 token of N: real early exit runs it at every exit).
        if self.token == "cls":
            pooled = self.model.norm(state[:, 0])
        else:
            pooled = self.model.norm(state)[:, self.model.num_prefix_tokens :].mean(1)
        return self.model.fc_norm(pooled)  # identity unless the model pools before its norm

    def native_represent(self, index: int) -> tuple[str, Tensor, Tensor, float] | None:
        """The class token's final LayerNorm, for native exits (``jei.types.NativeRepresentation``)."""
        if not self._is_vit or self.token != "cls":
            return None
        # Read from the module dicts: native exits call this for every exit at every call, and
        # each ``Module.__getattr__`` costs about 0.7 µs, half the kernel's work on one image.
        modules = self._modules["model"]._modules
        norm = modules["norm"]
        if vars(norm).get("_fast_norm", False):  # (timm sets the flag on the instance)
            return None
        return class_token_norm_form(norm, modules["fc_norm"], _layer_norms())


@functools.cache
def _layer_norms() -> tuple[type, ...]:
    """The norms a timm ViT's final norm may be that compute ``F.layer_norm``: torch's, and
    timm's own (unless its fast-norm flag is set, checked by the caller)."""
    from timm.layers import LayerNorm

    return nn.LayerNorm, LayerNorm


def candidate_exits(model_name: str, **model_kwargs: Any) -> list[str]:
    """The module names of ``model_name``'s candidate exits: ``exits=[k]`` taps the k-th (from 1)."""
    import timm

    model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    _, candidates = _vit_layout(model) if _is_vit(model) else _cnn_layout(model, model_name)
    return [name for _, name, *_ in candidates]


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _vit_layout(model: nn.Module) -> tuple[list[Step], list[Candidate]]:
    """VisionTransformer.forward_features as steps; one candidate exit per block but the last."""
    steps: list[Step] = [
        ("patch_embed", model.patch_embed),
        ("pos_embed", model._pos_embed),  # adds the prefix tokens (class, distillation, registers)
        ("patch_drop", model.patch_drop),
        ("norm_pre", model.norm_pre),
    ]
    first_block = len(steps)
    steps += [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    steps.append(("norm", model.norm))
    candidates = [
        (first_block + i, f"blocks.{i}", "vector", model.embed_dim, None) for i in range(len(model.blocks) - 1)
    ]
    return steps, candidates


def _cnn_layout(model: nn.Module, model_name: str) -> tuple[list[Step], list[Candidate]]:
    """forward_features of a CNN as steps; one candidate exit per feature_info tap but the last."""
    family = type(model).__name__
    if family not in _CNN_LAYOUTS:
        raise ValueError(
            f"backbone.model_name: {model_name} is a timm {family}; the timm adapter "
            f"supports VisionTransformer (ViT, DeiT) and {', '.join(_CNN_LAYOUTS)} models. "
            f"Pick one of those, or register an adapter for this family in jei.registry.BACKBONES."
        )
    taps = [info["module"] for info in model.feature_info]
    steps: list[Step] = []
    for name in _CNN_LAYOUTS[family]:
        module = model.get_submodule(name)
        if any(tap.startswith(f"{name}.") for tap in taps):
            steps += [(f"{name}.{child}", sub) for child, sub in module.named_children()]
        else:
            steps.append((name, module))
    positions = {name: position for position, (name, _) in enumerate(steps)}
    missing = [tap for tap in taps if tap not in positions]
    if missing:
        raise ValueError(
            f"backbone.model_name: {model_name}'s feature_info taps {missing} are not in its {family} "
            f"layout; this timm version is not supported by the timm adapter"
        )
    candidates = [
        (positions[info["module"]], info["module"], "map", info["num_chs"], info["reduction"])
        for info in model.feature_info[:-1]
    ]
    return steps, candidates


def _create_model(
    model_name: str, num_classes: int, pretrained: bool, reset_head: bool, model_kwargs: dict[str, Any]
) -> nn.Module:
    import timm

    if not timm.is_model(model_name):
        raise ValueError(f"backbone.model_name: timm has no model {model_name!r} (see timm.list_models())")
    if not pretrained:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **model_kwargs)
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.has_weights:
        raise ValueError(f"backbone.pretrained: timm publishes no pretrained weights for {model_name}")
    if num_classes != cfg.num_classes and not reset_head:
        raise ValueError(
            f"backbone.pretrained: {model_name}'s head has {cfg.num_classes} classes but the data has "
            f"{num_classes}; set backbone.reset_head=true to train a new head"
        )
    _check_hub_reachable(model_name, cfg)
    try:
        model = timm.create_model(model_name, pretrained=True, num_classes=num_classes, **model_kwargs)
    except OSError as err:  # also huggingface_hub's LocalEntryNotFoundError and urllib's URLError
        raise RuntimeError(_offline_message(model_name, str(err))) from err
    if reset_head:
        model.reset_classifier(num_classes)
    return model


def _check_hub_reachable(model_name: str, cfg: Any) -> None:
    """Fail in seconds, not after minutes of download retries, when the weights host is unreachable.

    In Hugging Face offline mode (``HF_HUB_OFFLINE=1``) timm reads its local cache, so no probe.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    host = urlparse(constants.ENDPOINT if cfg.hf_hub_id else cfg.url).hostname
    if host is None:  # a local pretrained file
        return
    try:
        socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise RuntimeError(_offline_message(model_name, f"{host} is unreachable: {err}")) from err


def _offline_message(model_name: str, reason: str) -> str:
    return (
        f"backbone.pretrained: could not fetch timm's weights for {model_name} ({reason}). This "
        f"machine cannot download them: download the weights file elsewhere (e.g. model.safetensors "
        f"from https://huggingface.co/timm/{model_name}) and pass backbone.weights=<file> with "
        f"backbone.pretrained=false, or fill the Hugging Face cache and set HF_HUB_OFFLINE=1."
    )


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)
