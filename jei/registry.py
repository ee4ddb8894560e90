"""Name -> component registries, with lazy built-ins and third-party entry points.

Three sources, looked up in this order: objects registered at run time (decorator), the
built-in table of ``"module:attr"`` strings (imported only when the name is asked for), and
the entry-point group of the registry (``jei.backbones``, ...), so installing a package is
enough to make its components available by name. A name offered by two sources is an error.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Mapping
from fnmatch import fnmatch
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")

DISABLE_PLUGINS_ENV = "JEI_DISABLE_PLUGIN_AUTOLOAD"


class UnknownComponentError(LookupError):
    """An unknown registry name. Not a KeyError, whose str() would quote the message."""


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str, builtins: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self.group = group
        self._lazy: dict[str, str] = dict(builtins or {})
        self._objects: dict[str, Callable[..., T]] = {}

    def register(self, name: str, *, override: bool = False) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@BACKBONES.register("my_net")`` on a class or factory."""

        def decorate(obj: Callable[..., T]) -> Callable[..., T]:
            if not override and name in self.names():
                raise ValueError(f"{self.kind} {name!r} is already registered; pass override=True to replace it")
            self._objects[name] = obj
            return obj

        return decorate

    def _entry_points(self) -> dict[str, EntryPoint]:
        if os.environ.get(DISABLE_PLUGINS_ENV):
            return {}
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=self.group):
            if ep.name in found and found[ep.name].value != ep.value:
                raise RuntimeError(
                    f"{self.kind} {ep.name!r} is published by two plugins "
                    f"({_dist_name(found[ep.name])} and {_dist_name(ep)}); uninstall one of them"
                )
            if ep.name in self._lazy:
                raise RuntimeError(
                    f"plugin {_dist_name(ep)} publishes {self.kind} {ep.name!r}, a built-in name; rename it"
                )
            found[ep.name] = ep
        return found

    def names(self, pattern: str = "*") -> list[str]:
        """Every available name (wildcards allowed). Imports nothing."""
        every = {*self._objects, *self._lazy, *self._entry_points()}
        return sorted(n for n in every if fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def get(self, name: str) -> Callable[..., T]:
        if name in self._objects:
            return self._objects[name]
        if name in self._lazy:
            obj = self._import(name, self._lazy[name], origin="jei-dnn")
        else:
            ep = self._entry_points().get(name)
            if ep is None:
                raise UnknownComponentError(self._unknown_message(name))
            obj = self._import(name, ep.value, origin=_dist_name(ep))
        self._objects[name] = obj  # imported once; later lookups (e.g. multirun jobs) reuse it
        return obj

    def _import(self, name: str, target: str, origin: str) -> Callable[..., T]:
        module_name, _, attr = target.partition(":")
        try:
            module = import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                raise ImportError(f"{self.kind} {name!r} (from {origin}) points at missing module {module_name!r}") from err
            raise ImportError(
                f"{self.kind} {name!r} needs the package {err.name!r}; install it "
                f"(e.g. pip install 'jei-dnn[graph]' for graph backbones)"
            ) from err
        try:
            return getattr(module, attr)
        except AttributeError as err:
            raise ImportError(f"{self.kind} {name!r} (from {origin}): {module_name!r} has no attribute {attr!r}") from err

    def _unknown_message(self, name: str) -> str:
        available = self.names()
        message = f"Unknown {self.kind} {name!r}. Available: {', '.join(available) or '(none)'}."
        close = difflib.get_close_matches(name, available, n=3)
        if close:
            message += " Did you mean " + " or ".join(repr(c) for c in close) + "?"
        return message

    def settings(self, name: str, /, **kwargs: Any) -> dict[str, Any]:
        """The keyword settings ``build(name, **kwargs)`` runs with: ``kwargs`` plus the defaults
        the factory fills in, so that a stored result keyed by them changes when a default does."""
        try:
            parameters = inspect.signature(self.get(name)).parameters.values()
        except (TypeError, ValueError):
            return dict(kwargs)
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        defaults = {p.name: p.default for p in parameters if p.kind in keyword and p.default is not p.empty}
        return {**defaults, **kwargs}

    def build(self, name: str, /, **kwargs: Any) -> T:
        """Look ``name`` up and call it with ``kwargs``, naming any argument it does not take."""
        factory = self.get(name)
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):  # some builtins have no signature; let the call speak
            return factory(**kwargs)
        try:
            signature.bind_partial(**kwargs)
        except TypeError as err:
            accepted = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
            raise TypeError(f"{self.kind} {name!r}: {err}. It accepts: {', '.join(accepted)}") from err
        return factory(**kwargs)


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else f"entry point {ep.value!r}"


BACKBONES: Registry[Any] = Registry(
    "backbone",
    "jei.backbones",
    {
        "small_cnn": "jei.backbones.small_cnn:SmallCNN",
        "cifar_resnet": "jei.backbones.cifar_resnet:CifarResNet",
        "timm": "jei.backbones.timm_adapter:TimmBackbone",
        "t2t_vit": "jei.backbones.t2t_vit:T2TViT",
        "graph_gps": "jei.backbones.graph_gps:GraphGPS",
    },
)
IMS: Registry[Any] = Registry(
    "inference module",
    "jei.ims",
    {
        "pool_linear": "jei.heads.ims:PoolLinearIM",
        "pool_mlp": "jei.heads.ims:PoolMLPIM",
    },
)
GATES: Registry[Any] = Registry(
    "gate",
    "jei.gates",
    {"uncertainty": "jei.heads.gates:UncertaintyGate"},
)
OBJECTIVES: Registry[Any] = Registry(
    "objective",
    "jei.objectives",
    {
        "jei": "jei.objectives.jei:JEIObjective",
        "sdn": "jei.objectives.sdn:SDNObjective",
        "boosted": "jei.objectives.boosted:BoostedObjective",
        "l2w": "jei.objectives.l2w:L2WObjective",
        "product_gates": "jei.objectives.product_gates:ProductGatesObjective",
    },
)
POLICIES: Registry[Any] = Registry(
    "exit policy",
    "jei.policies",
    {
        "jei": "jei.policies:JEIRule",
        "gate_threshold": "jei.policies:GateThreshold",
        "max_prob": "jei.policies:max_prob",
        "entropy": "jei.policies:entropy",
        "budgeted": "jei.policies:BudgetedThreshold",
        "penalized": "jei.policies:PenalizedThreshold",
        "patience": "jei.policies:Patience",
    },
)
DATASETS: Registry[Any] = Registry(
    "dataset",
    "jei.datasets",
    {
        "digits": "jei.data.digits:load_digits",
        "cifar10": "jei.data.cifar:load_cifar10",
        "cifar100": "jei.data.images:load_cifar100",
        "cifar100_lt": "jei.data.images:load_cifar100_lt",
        "svhn": "jei.data.images:load_svhn",
        "imagenet": "jei.data.images:load_imagenet",
        "tu": "jei.data.graphs:load_tu",
        "superpixels": "jei.data.graphs:load_superpixels",
    },
)
