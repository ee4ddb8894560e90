"""Registries: lookup, helpful errors, decorator registration, entry-point plugins."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jei.registry import BACKBONES, DATASETS, GATES, IMS, OBJECTIVES, Registry, UnknownComponentError


def test_every_builtin_name_resolves():
    optional = {"torch_geometric"}  # graph components need the [graph] extra
    for registry in (BACKBONES, IMS, GATES, OBJECTIVES, DATASETS):
        for name in registry.names():
            try:
                assert callable(registry.get(name))
            except ImportError as err:
                assert any(dep in str(err) for dep in optional), err


def test_unknown_name_lists_choices_and_close_matches():
    with pytest.raises(UnknownComponentError) as info:
        BACKBONES.get("small_cn")
    message = str(info.value)
    assert "Unknown backbone 'small_cn'" in message
    assert "cifar_resnet" in message and "Did you mean 'small_cnn'" in message


def test_build_names_an_unexpected_argument():
    with pytest.raises(TypeError, match="backbone 'small_cnn'.*exit.*accepts: .*exits"):
        BACKBONES.build("small_cnn", exit=[1])


def test_register_decorator_and_duplicates():
    registry: Registry[object] = Registry("widget", "jei.test_widgets", {"builtin": "collections:OrderedDict"})

    @registry.register("mine")
    def make_mine():
        return "made"

    assert registry.build("mine") == "made"
    assert registry.names() == ["builtin", "mine"]
    assert registry.names("m*") == ["mine"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("builtin")(make_mine)
    registry.register("mine", override=True)(lambda: "again")
    assert registry.build("mine") == "again"


def test_missing_module_is_reported_with_the_component():
    registry: Registry[object] = Registry("widget", "jei.test_widgets", {"ghost": "jei.no_such_module:Thing"})
    with pytest.raises(ImportError, match="widget 'ghost'.*missing module 'jei.no_such_module'"):
        registry.get("ghost")


PLUGIN_MODULE = '''
from torch import nn
from jei.backbones.small_cnn import SmallCNN

class PluginCNN(SmallCNN):
    """A third-party backbone: a SmallCNN with a fixed narrow shape."""
    def __init__(self, num_classes: int, in_channels: int | None = None, weights=None):
        super().__init__(in_channels=in_channels, num_classes=num_classes, widths=(4, 8, 8), strides=(1, 2, 1),
                         exits=(1, 2), weights=weights)
'''


def make_plugin_distribution(root: Path) -> None:
    """A throw-away installed distribution: a module plus a .dist-info with an entry point,
    exactly what `pip install` of a plugin package leaves in site-packages."""
    (root / "jei_test_plugin.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    info = root / "jei_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jei-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[jei.backbones]\nplugin_cnn = jei_test_plugin:PluginCNN\n")
    # Its config group option, found through hydra.searchpath.
    (root / "plugin_configs" / "backbone").mkdir(parents=True)
    (root / "plugin_configs" / "backbone" / "plugin_cnn.yaml").write_text("name: plugin_cnn\nin_channels: null\n")


def test_entry_point_plugin_is_used_from_a_config(tmp_path):
    """A plugin distribution's backbone is listed, built and trained by name from a Hydra config."""
    make_plugin_distribution(tmp_path)
    script = textwrap.dedent(
        """
        from hydra import compose, initialize_config_module
        from jei.build import build_backbone, build_data
        from jei.registry import BACKBONES
        assert "plugin_cnn" in BACKBONES.names(), BACKBONES.names()
        with initialize_config_module("jei.configs", version_base="1.3"):
            cfg = compose("train", overrides=["hydra.searchpath=[file://{ROOT}/plugin_configs]",
                                              "backbone=plugin_cnn", "data.max_per_split=40"])
        data = build_data(cfg.data)
        backbone = build_backbone(cfg.backbone, data)
        print(type(backbone).__module__, backbone.num_gates, backbone.num_classes)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    script = script.replace("{ROOT}", str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["jei_test_plugin", "2", "10"]


def test_plugin_autoload_can_be_disabled(tmp_path):
    make_plugin_distribution(tmp_path)
    script = "from jei.registry import BACKBONES; print('plugin_cnn' in BACKBONES.names())"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "JEI_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_settings_fill_in_the_factory_defaults():
    from jei.registry import OBJECTIVES

    settings = OBJECTIVES.settings("jei", cost_weight=2.0)
    assert settings["cost_weight"] == 2.0 and settings["pos_weight_rule"] == "balanced_nonzero"
    assert settings["gate_target"] == "oracle" and "self" not in settings
