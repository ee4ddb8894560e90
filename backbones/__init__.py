"""Backbone adapters (``FrozenBackbone`` in ``base``), found by name through ``jei.registry.BACKBONES``.

Modules are imported lazily by the registry, so optional dependencies (timm, torch_geometric)
load only when their backbone is asked for.
"""
