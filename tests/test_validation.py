"""Every bad setting or bad input fails before any work: one line on stderr naming the field,
exit status 2, no traceback, nothing written to the run directory but the log.

The table runs in-process (Hydra ``compose`` + ``jei.cli.train`` under ``jei.errors.cli_main``,
with a file handler standing in for Hydra's ``<run dir>/jei-train.log``); a few subprocess runs of the
real ``jei-train`` check the same end to end.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import jei.cli
from jei.build import _settings, build_objective, build_settings, check_data_settings
from jei.calibrate import ConformalSettings, calibration_warnings, min_calibration_size
from jei.cli import train
from jei.conformal import conformal_rank
from jei.data.base import TensorDataSplits, TensorSplit
from jei.data.digits import load_digits
from jei.errors import EXIT_CONFIG, ConfigError, cli_main, config_errors
from jei.registry import DATASETS
from jei.train import ExitTraining, OptimizerSettings
from jei.validate import check_backbone_fits, check_data

RESNET_WEIGHTS = Path("../shared/data/weights/resnet_cifar10_idelbayev/resnet56-4bfd9763.th")
needs_resnet_weights = pytest.mark.skipif(not RESNET_WEIGHTS.is_file(), reason="shared ResNet-56 weights not here")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def corrupt_digits(fractions=(0.5, 0.15, 0.15, 0.2), seed=0, max_per_split=None, corrupt="none"):
    """The digits dataset with one defect: ``corrupt="<split>:<nan|inf|label|negative>"``."""
    data = load_digits(fractions, seed, max_per_split)
    if corrupt != "none":
        split, defect = corrupt.split(":")
        part = data.splits[split]
        if defect in ("nan", "inf"):
            part.inputs[3, 0, 2, 2] = float(defect)
        else:
            part.labels[5] = data.num_classes if defect == "label" else -1
    return data


@pytest.fixture(autouse=True)
def _corrupt_dataset(monkeypatch):
    monkeypatch.setitem(DATASETS._objects, "corrupt_digits", corrupt_digits)


def corrupt(spec: str) -> list[str]:
    return ["data.name=corrupt_digits", f"+data.corrupt={spec}"]


# (overrides, text stderr must contain: the field, split or component at fault)
CASES = {
    # silent wrong results before
    "backbone batch size negative": (["trainer.backbone.batch_size=-5"], "trainer.backbone.batch_size must be >= 1"),
    "backbone epochs 0 when trained": (["trainer.backbone.epochs=0"], "trainer.backbone.epochs must be >= 1"),
    "backbone epochs negative": (["trainer.backbone.epochs=-1"], "trainer.backbone.epochs must be >= 0"),
    "backbone lr huge": (["trainer.backbone.optimizer.lr=1e9"], "trainer.backbone.optimizer.lr must be <= 10"),
    "exit lr infinite": (["trainer.exits.optimizer.lr=inf"], "trainer.exits.optimizer.lr must be a finite number"),
    "exits train nothing": (["trainer.exits.epochs=0", "trainer.exits.warmup_epochs=0"], "trainer.exits.epochs"),
    # late failures before (after the whole training)
    "cost weight infinite": (["objective.cost_weight=inf"], "objective.cost_weight must be a finite number"),
    "min group size negative": (["conformal.min_group_size=-1"], "conformal.min_group_size must be >= 0"),
    "eval batch size 0": (["trainer.eval_batch_size=0"], "trainer.eval_batch_size must be >= 1"),
    "NaN in test images": (corrupt("test:nan"), "'test' split's inputs hold NaN or inf"),
    "inf in val images": (corrupt("val:inf"), "'val' split's inputs hold NaN or inf"),
    "test label out of range": (corrupt("test:label"), "'test' split has 1 label(s) outside 0..9"),
    "cal label out of range": (corrupt("cal:label"), "'cal' split has 1 label(s) outside 0..9"),
    "val label negative": (corrupt("val:negative"), "'val' split has 1 label(s) outside 0..9"),
    # raw Python errors before
    "cost weight not a number": (["objective.cost_weight=abc"], "objective.cost_weight must be a number, got 'abc'"),
    "seed not a number": (["seed=abc"], "seed must be an integer, got 'abc'"),
    "seed fractional": (["seed=1.5"], "seed must be an integer, got 1.5"),
    "seed negative": (["seed=-1"], "seed must be in 0..4294967295"),
    "exit batch size fractional": (["trainer.exits.batch_size=1.5"], "trainer.exits.batch_size must be an integer"),
    "alphas not a list": (["conformal.alphas=0.1"], "conformal.alphas must be a list such as"),
    "alphas not numbers": (["conformal.alphas=[abc]"], "conformal.alphas must be a number, got 'abc'"),
    "alphas empty": (["conformal.alphas=[]"], "conformal.alphas must list at least 1"),
    "device unknown": (["device=foo"], "device='foo' is not a device"),
    "fractions of the wrong length": (["data.fractions=[0.5,0.3,0.2]"], "data.fractions must hold 4 fractions"),
    "train label out of range": (corrupt("train:label"), "'train' split has 1 label(s) outside 0..9"),
    "1-channel data into a 3-channel backbone": (
        ["backbone=cifar_resnet", "backbone.weights=null", "backbone.depth=8"],
        "data=digits has 1-channel inputs but backbone=cifar_resnet takes 3-channel inputs",
    ),
    "1-channel data into the ResNet-56 checkpoint": pytest.param(
        ["backbone=cifar_resnet"], "data=digits has 1-channel inputs but backbone=cifar_resnet", marks=needs_resnet_weights
    ),
    # more settings, checked for type and range
    "optimizer unknown": (["trainer.exits.optimizer.name=rmsprop"], "trainer.exits.optimizer.name must be one of"),
    "min lr above lr": (["trainer.exits.optimizer.min_lr=0.5"], "trainer.exits.optimizer.min_lr must be <= "),
    "momentum 1.5": (["trainer.backbone.optimizer.momentum=1.5"], "trainer.backbone.optimizer.momentum must be < 1"),
    "weight decay negative": (["trainer.exits.optimizer.weight_decay=-1"], "trainer.exits.optimizer.weight_decay"),
    "optimizer unknown key": (["+trainer.exits.optimizer.beta=0.9"], "trainer.exits.optimizer: unknown key(s) beta"),
    "warmup patience 0": (["trainer.exits.warmup_patience=0"], "trainer.exits.warmup_patience must be >= 1"),
    "phase batches fractional": (["trainer.exits.phase_batches=2.5"], "trainer.exits.phase_batches must be an integer"),
    "exit augment not bool": (["+trainer.exits.augment=maybe"], "trainer.exits.augment must be true or false"),
    "backbone augment not bool": (["trainer.backbone.augment=1"], "trainer.backbone.augment must be true or false"),
    "train_backbone unknown": (["trainer.train_backbone=maybe"], "trainer.train_backbone must be auto, true or false"),
    "feature cache not bool": (["trainer.feature_cache=yes_please"], "trainer.feature_cache must be true or false"),
    "n_bins 0": (["conformal.n_bins=0"], "conformal.n_bins must be >= 1"),
    "score unknown": (["conformal.score=softmax"], "conformal.score must be one of"),
    "allow_empty not bool": (["conformal.allow_empty=sometimes"], "conformal.allow_empty must be true or false"),
    "calibrate_on unknown": (["conformal.calibrate_on=test"], "conformal.calibrate_on must be one of"),
    "min group size fractional": (["conformal.min_group_size=2.5"], "conformal.min_group_size must be an integer"),
    "im_weighting unknown": (["objective.im_weighting=mean"], "objective.im_weighting must be one of"),
    "renormalize not bool": (["objective.renormalize=often"], "objective.renormalize must be true or false"),
    "pos_weight_cap 0": (["objective.pos_weight_cap=0"], "objective.pos_weight_cap must be > 0"),
    "sdn weighting": (["objective=sdn", "objective.weighting=deep"], "objective.weighting must be one of"),
    "boosted decay": (["objective=boosted", "objective.decay=0"], "objective.decay must be > 0"),
    "l2w meta interval": (["objective=l2w", "objective.meta_interval=0.5"], "objective.meta_interval must be an integer"),
    "l2w meta lr": (["objective=l2w", "objective.meta_lr=100"], "objective.meta_lr must be <= 10"),
    "product gates cost": (["objective=product_gates", "objective.cost_weight=nan"], "objective.cost_weight"),
    "fractions sum": (["data.fractions=[0.5,0.5,0.5,0.5]"], "data.fractions must sum to at most 1"),
    "fractions negative": (["data.fractions=[0.5,-0.1,0.3,0.3]"], "data.fractions must be >= 0"),
    "fractions not a list": (["data.fractions=0.5"], "data.fractions must be a list such as"),
    "max_per_split fractional": (["data.max_per_split=1.5"], "data.max_per_split must be an integer"),
    "policy setting without policy": (["+policy.threshold=0.5"], "policy: settings ['threshold'] need a policy name"),
    "IM setting it does not take": (["+im.bogus=1"], "inference module 'pool_linear': got an unexpected keyword"),
    "gate setting it does not take": (["+gate.bogus=1"], "gate 'uncertainty': got an unexpected keyword argument"),
    # cases that already failed clearly (tests/test_cli.py), now also in one line with status 2
    "cost weight negative": (["objective.cost_weight=-1"], "objective.cost_weight must be >= 0"),
    "exit position outside": (["backbone.exits=[1,2,9]"], "backbone.exits: exit position 9 is outside 1..3"),
    "max_per_split 0": (["data.max_per_split=0"], "data.max_per_split must be >= 1"),
    "empty val split": (["data.fractions=[0.9,0.0,0.05,0.05]"], "the 'val' split is empty"),
    "missing weights": (["backbone.weights=/nonexistent/weights.safetensors"], "backbone.weights: no file at /nonexistent"),
    "alpha outside (0, 1)": (["conformal.alphas=[1.5]"], "conformal.alphas: 1.5 is outside (0, 1)"),
    "small group policy": (["conformal.small_group_policy=drop"], "conformal.small_group_policy must be one of"),
    "exit batch size 0": (["trainer.exits.batch_size=0"], "trainer.exits.batch_size must be >= 1"),
    "unknown trainer key": (["+trainer.exits.bogus=1"], "trainer.exits: unknown key(s) bogus"),
    "unknown backbone": (["backbone.name=small_cn"], "Unknown backbone 'small_cn'"),
    "cuda without CUDA": pytest.param(["device=cuda"], "CUDA is not available", marks=no_cuda),
}


def compose_train(*overrides: str):
    with initialize_config_module("jei.configs", version_base="1.3"):
        return compose("train", overrides=["trainer.feature_cache=false", *overrides])


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with Hydra's job log file attached to the root logger."""
    folder = tmp_path / "run"
    folder.mkdir()
    handler = logging.FileHandler(folder / "jei-train.log")
    root = logging.getLogger()
    root.addHandler(handler)
    yield folder
    root.removeHandler(handler)
    handler.close()


@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv("JEI_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def run_train_main(cfg, run_dir: Path) -> int:
    with pytest.raises(SystemExit) as info:
        cli_main("jei-train")(train)(cfg, run_dir)
    return info.value.code


@pytest.mark.parametrize(("overrides", "expected"), list(CASES.values()), ids=list(CASES))
def test_bad_setting_fails_in_one_line_before_any_work(run_dir, capsys, no_debug, overrides, expected):
    cfg = compose_train(*overrides)
    capsys.readouterr()
    assert run_train_main(cfg, run_dir) == EXIT_CONFIG
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("jei-train: error: ")
    assert expected in lines[0]
    assert "Traceback" not in err
    assert [p.name for p in run_dir.iterdir()] == ["jei-train.log"]  # nothing but the log
    assert lines[0].removeprefix("jei-train: error: ") in (run_dir / "jei-train.log").read_text()


def test_the_log_file_keeps_the_traceback(run_dir, capsys, no_debug):
    run_train_main(compose_train("seed=abc"), run_dir)
    log = (run_dir / "jei-train.log").read_text()
    assert "Traceback" in log and "ConfigError: seed must be an integer" in log
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("switch", ["JEI_DEBUG", "HYDRA_FULL_ERROR"])
def test_debug_switch_raises_instead(monkeypatch, run_dir, switch):
    monkeypatch.setenv(switch, "1")
    with pytest.raises(ConfigError, match="seed must be an integer"):
        cli_main("jei-train")(train)(compose_train("seed=abc"), run_dir)


def test_other_errors_pass_through_unchanged(capsys, no_debug):
    def broken():
        raise RuntimeError("a bug, not a setting")

    with pytest.raises(RuntimeError, match="a bug"):
        cli_main("jei-compare")(broken)()
    assert capsys.readouterr().err == ""


def test_cli_main_keeps_the_function_and_its_result():
    @cli_main("jei-compare")
    def compare(x: int) -> int:
        """doc"""
        return x + 1

    assert compare(1) == 2 and compare.__name__ == "compare" and compare.__doc__ == "doc"


def test_config_error_is_a_value_error_and_renames_its_field():
    err = ConfigError("optimizer.lr must be <= 10, got 11", "optimizer.lr")
    assert isinstance(err, ValueError)
    moved = err.rebase("optimizer", "trainer.exits.optimizer")
    assert str(moved) == "trainer.exits.optimizer.lr must be <= 10, got 11"
    assert moved.field == "trainer.exits.optimizer.lr"
    assert err.rebase("conformal", "x") is err


def test_config_errors_converts_build_errors_only():
    with pytest.raises(ConfigError, match="bad value"), config_errors():
        raise ValueError("bad value")
    with pytest.raises(ConfigError, match="^missing key$"), config_errors():
        raise KeyError("missing key")  # without KeyError's quotes
    with pytest.raises(FloatingPointError), config_errors():
        raise FloatingPointError("not a setting")


def test_settings_name_their_node():
    with pytest.raises(ConfigError, match=r"^trainer\.backbone\.optimizer\.lr must be <= 10"):
        _settings(ExitTraining, {"optimizer": {"lr": 11.0}}, "trainer.backbone")
    with pytest.raises(ConfigError, match=r"^trainer\.exits must be a mapping"):
        _settings(ExitTraining, 5, "trainer.exits")
    with pytest.raises(ConfigError, match=r"did you mean batch_sise -> batch_size"):
        _settings(ExitTraining, {"batch_sise": 5}, "trainer.exits")
    # built directly, the dataclasses name their usual node
    with pytest.raises(ValueError, match=r"^trainer\.exits\.epochs must be an integer"):
        ExitTraining(epochs=2.5)
    with pytest.raises(ValueError, match=r"^optimizer\.lr must be > 0"):
        OptimizerSettings(lr=0.0)


# --- shipped configs stay valid --------------------------------------------------------------

SHIPPED = [
    [f"trainer={trainer}", f"objective={objective}"]
    for trainer in ("default", "paper", "graph", "vit_cpu")
    for objective in ("jei", "sdn", "boosted", "l2w", "product_gates")
] + [["conformal.calibrate_on=test_halves", "policy=max_prob"], ["device=cpu", "seed=4294967295"]]


@pytest.mark.parametrize("overrides", SHIPPED, ids=[" ".join(o) for o in SHIPPED])
def test_shipped_settings_pass(overrides):
    cfg = compose_train(*overrides)
    settings = build_settings(cfg)
    build_objective(cfg.objective)
    assert settings.exit_training.warmup_epochs + settings.exit_training.epochs >= 1


def test_a_valid_run_passes_validation_and_warns_about_small_calibration_sets(monkeypatch, caplog, tmp_path):
    """Everything up to the real work runs; alphas the calibration split cannot serve are warned
    about before it starts."""
    started = []
    monkeypatch.setattr(jei.cli, "run_experiment", lambda *args, **kwargs: started.append(args) or {"accuracy": 1.0})
    cfg = compose_train("conformal.alphas=[0.001,0.1]", "data.max_per_split=100")
    with caplog.at_level(logging.WARNING, logger="jei.cli"):
        assert train(cfg, tmp_path / "run") == 1.0
    assert started
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "alpha=0.001 needs at least 999 calibration samples, the calibration split has 100" in warnings[0]


def test_the_validation_draws_no_random_numbers(monkeypatch, tmp_path):
    """IMs and gates are built (seeded) after validation: the backbone probe and the trial build
    of the heads must leave the RNG as it was."""
    states = []
    monkeypatch.setattr(jei.cli, "run_experiment",
                        lambda *args, **kwargs: states.append(torch.random.get_rng_state()) or {"accuracy": 0.0})
    cfg = compose_train("data.max_per_split=50")
    train(cfg, tmp_path / "probed")
    monkeypatch.setattr(jei.cli, "check_backbone_fits", lambda *args, **kwargs: None)
    monkeypatch.setattr(jei.cli, "check_network_builds", lambda *args, **kwargs: None)
    train(cfg, tmp_path / "not_probed")
    assert torch.equal(states[0], states[1])


# --- the helpers on their own ----------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.1, 0.05, 0.01, 0.001, 0.07, 0.123])
def test_min_calibration_size_is_exact(alpha):
    n = min_calibration_size(alpha)
    assert conformal_rank(n, alpha) <= n and conformal_rank(n - 1, alpha) > n - 1
    assert calibration_warnings(n, [alpha]) == []
    assert len(calibration_warnings(n - 1, [alpha])) == 1


def test_calibration_warnings_name_each_alpha():
    messages = calibration_warnings(50, [0.001, 0.01, 0.1])
    assert len(messages) == 2
    assert messages[0].startswith("conformal.alphas: alpha=0.001 needs at least 999 calibration samples")
    assert "alpha=0.01 needs at least 99" in messages[1]
    assert calibration_warnings(1000, ConformalSettings().alphas) == []


def tiny_splits(**override):
    splits = {name: TensorSplit(torch.randn(6, 1, 4, 4), torch.arange(6) % 3) for name in ("train", "val", "cal", "test")}
    splits.update(override)
    return TensorDataSplits(splits, num_classes=3)


def test_check_data_accepts_clean_data_and_names_the_split():
    check_data(tiny_splits(), 3)
    with pytest.raises(ConfigError, match=r"'cal' split's labels must be a 1-D integer tensor"):
        check_data(tiny_splits(cal=TensorSplit(torch.randn(6, 1, 4, 4), torch.zeros(6))), 3)
    images = torch.randn(6, 1, 4, 4)
    images[4, 0, 1, 1] = float("nan")
    with pytest.raises(ConfigError, match=r"'train' split's inputs hold NaN or inf \(1 sample\(s\), the first at index 4\)"):
        check_data(tiny_splits(train=TensorSplit(images, torch.arange(6) % 3)), 3)
    with pytest.raises(ConfigError, match="num_classes=2"):
        check_data(tiny_splits(), 2)


def test_check_data_reads_graph_features():
    class Graph:
        def __init__(self, x):
            self.x, self.edge_attr = x, None

    class Graphs:
        num_classes = 2
        splits = {name: [Graph(torch.ones(3, 2)), Graph(torch.ones(2, 2))] for name in ("train", "val", "cal", "test")}

        def labels(self, split):
            return torch.tensor([0, 1])

        def size(self, split):
            return 2

    check_data(Graphs(), 2)
    Graphs.splits["val"][1].x[0, 0] = float("inf")
    with pytest.raises(ConfigError, match="'val' split's graphs' x hold NaN or inf"):
        check_data(Graphs(), 2)


def test_backbone_probe_leaves_the_backbone_as_it_was():
    from jei.registry import BACKBONES

    backbone = BACKBONES.build("small_cnn", in_channels=1, num_classes=3, widths=(4, 4), strides=(1, 1), exits=(1,))
    backbone.train()
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    check_backbone_fits(backbone, tiny_splits(), data_name="tiny", backbone_name="small_cnn", data_channels=1)
    assert backbone.training
    assert all(torch.equal(state[k], v) for k, v in backbone.state_dict().items())  # BatchNorm statistics too
    wrong = tiny_splits(**{s: TensorSplit(torch.randn(6, 2, 4, 4), torch.arange(6) % 3) for s in ("train",)})
    with pytest.raises(ConfigError, match="data=tiny has 2-channel inputs but backbone=small_cnn takes 1-channel"):
        check_backbone_fits(backbone, wrong, data_name="tiny", backbone_name="small_cnn", data_channels=2)


def test_a_backbone_that_cannot_take_the_datas_batches_is_told_so():
    """Graphs (not tensors) into an image backbone: the error says what the batches are and
    which backbone takes graphs, not the convolution's argument list."""
    from jei.registry import BACKBONES

    class GraphBatch:  # stands in for a PyG batch
        pass

    class Graphs:
        def batches(self, split, batch_size):
            yield GraphBatch(), torch.zeros(2, dtype=torch.long)

    backbone = BACKBONES.build("small_cnn", in_channels=1, num_classes=3, widths=(4, 4), strides=(1, 1), exits=(1,))
    with pytest.raises(ConfigError) as caught:
        check_backbone_fits(backbone, Graphs(), data_name="mutag", backbone_name="small_cnn")
    assert str(caught.value) == ("backbone=small_cnn takes image tensors, but data=mutag gives GraphBatch batches; "
                                 "pick a backbone for this data (graphs: backbone=graph_gps)")

    class GraphNet(torch.nn.Module):  # takes graphs, but fails for its own reason: that reason is kept
        def forward(self, batch):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)\nmore")

    with pytest.raises(ConfigError) as caught:
        check_backbone_fits(GraphNet(), Graphs(), data_name="mutag", backbone_name="my_gnn")
    assert str(caught.value) == ("backbone=my_gnn cannot run on data=mutag (a batch of GraphBatch): mat1 and mat2 "
                                 "shapes cannot be multiplied (2x3 and 4x5); pick a backbone that fits this data")


def test_data_settings_without_a_known_dataset_check_what_they_can():
    check_data_settings({"name": "not_registered", "fractions": [0.5, 0.5]})  # length unknown: build_data reports
    with pytest.raises(ConfigError, match="data must be a mapping"):
        check_data_settings("digits")


# --- the real command, in a subprocess --------------------------------------------------------


def jei_train(*overrides: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("jei-train")
    return subprocess.run(
        [str(script), *overrides], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={"HYDRA_FULL_ERROR": "0", "PATH": "/usr/bin:/bin", "HOME": str(cwd), **env},
    )


@pytest.mark.slow
@pytest.mark.parametrize(("override", "expected"), [
    ("seed=abc", "seed must be an integer, got 'abc'"),
    ("backbone=cifar_resnet backbone.weights=null backbone.depth=8",
     "data=digits has 1-channel inputs but backbone=cifar_resnet takes 3-channel inputs"),
    ("policy=max_prob policy.threshold=[0.9,0.8]",
     "policy.threshold has 2 values but the network has 3 intermediate exits: give one value, or one per exit"),
    ("policy=max_prob policy.threshold=abc", "policy.threshold must be a number, or a list of numbers"),
])
def test_jei_train_reports_one_line_and_exits_2(tmp_path, override, expected):
    run_dir = tmp_path / "run"
    result = jei_train(*override.split(), "trainer.feature_cache=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == EXIT_CONFIG, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("jei-train: error: ") and expected in lines[0], result.stderr
    assert {p.name for p in run_dir.iterdir()} <= {".hydra", "jei-train.log"}
    assert expected in (run_dir / "jei-train.log").read_text()


@pytest.mark.slow
def test_jei_debug_shows_the_traceback(tmp_path):
    result = jei_train("seed=abc", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, JEI_DEBUG="1")
    assert result.returncode not in (0, EXIT_CONFIG)
    assert "ConfigError" in result.stderr and "seed must be an integer" in result.stderr
