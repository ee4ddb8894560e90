"""jei-compare: the schema it writes, points it does not recompute, budget mode, and the curve maths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module

from jei.compare import Trained, interpolate, matched_table, oracle_points
from jei.compare_cli import compare
from jei.types import ExitOutputs

QUICK = [
    "trainer.backbone.epochs=3",
    "trainer.exits.warmup_epochs=4",
    "trainer.exits.epochs=2",
    "trainer.feature_cache=false",
    "include=[jei,max_prob,patience]",
    "methods.jei.sweep.values=[0.1,5.0]",
    "methods.max_prob.sweep.values=[0.2,0.6,0.9,1.0]",
    "methods.patience.sweep.values=[1,2,3]",
    "device=cpu",
]


def run_compare(tmp_path, *extra):
    with initialize_config_module("jei.configs", version_base="1.3"):
        cfg = compose("compare", overrides=[*QUICK, *extra])
    return compare(cfg, tmp_path)


def test_compare_writes_its_schema_and_reuses_finished_points(tmp_path):
    result = run_compare(tmp_path)
    written = json.loads((tmp_path / "compare.json").read_text())
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| jei |" in (tmp_path / "compare.md").read_text()
    assert {p["method"] for p in written["points"]} == {"jei", "max_prob", "patience"}
    for point in written["points"]:
        assert {"method", "knob", "accuracy", "expected_cost", "ece", "exit_fractions", "per_exit_coverage"} <= set(point)
        assert abs(sum(point["exit_fractions"]) - 1) < 1e-9 and 0 < point["expected_cost"] <= 1
    assert {row["cost"] for row in written["matched"]} == {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}
    for row in written["matched"]:
        if row["method"] == "max_prob" and row["accuracy"] is not None:
            assert row["delta_vs_threshold"] == 0
    assert written["oracle"][0]["kind"] == "earliest_correct"
    # The same IMs serve every threshold of a policy sweep; one model per objective knob.
    assert len(list((tmp_path / "trained").glob("sdn-*.safetensors"))) == 1
    assert len(list((tmp_path / "trained").glob("jei-*.safetensors"))) == 2

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "trained").iterdir()}
    again = run_compare(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "trained").iterdir()} == stamps  # nothing retrained
    assert again["points"] == result["points"]
    changed = run_compare(tmp_path, "converged_ims.temperature=false")  # same name, new settings
    assert len(list((tmp_path / "trained").glob("sdn-*.safetensors"))) == 2
    assert len(list((tmp_path / "points" / "max_prob").glob("*.json"))) == 8
    assert changed["points"] != result["points"]


def test_budget_mode_keeps_validation_cost_under_the_budget(tmp_path):
    result = run_compare(tmp_path, "include=[max_prob,patience]", "methods.max_prob.sweep.values=[0.0,1.0]", "budget=0.55")
    rows = {row["method"]: row for row in result["budget"]["methods"]}
    assert set(rows) == {"max_prob", "patience"}
    for row in rows.values():
        assert row["feasible"] and row["val_cost"] <= 0.55
    assert "Budget mode" in (tmp_path / "compare.md").read_text()


def test_budget_mode_bisects_between_the_sweep_values_that_bracket_the_budget(tmp_path):
    sweep = "methods.max_prob.sweep.values=[0.1,0.5,0.9,0.99,0.999,1.0]"
    result = run_compare(tmp_path, "include=[max_prob]", sweep, "budget=0.5", "budget_iterations=8")
    row = result["budget"]["methods"][0]
    assert row["feasible"] and 0.48 <= row["val_cost"] <= 0.5, row  # within 0.02 under the budget
    assert row["knob"] not in (0.1, 0.5, 0.9, 0.99, 0.999, 1.0)  # found between two sweep values


def test_unknown_methods_and_bad_sweeps_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="include: unknown method"):
        run_compare(tmp_path, "include=[jei,nope]")
    with pytest.raises(ValueError, match="methods.jei.sweep.group"):
        run_compare(tmp_path, "methods.jei.sweep.group=trainer")
    assert not (tmp_path / "trained").exists()


def test_interpolation_and_matched_differences():
    points = [{"method": "a", "expected_cost": 0.2, "accuracy": 0.5}, {"method": "a", "expected_cost": 0.6, "accuracy": 0.9},
              {"method": "b", "expected_cost": 0.4, "accuracy": 0.6}, {"method": "b", "expected_cost": 0.8, "accuracy": 0.8}]
    assert interpolate(points[:2], 0.4) == pytest.approx(0.7)
    assert interpolate(points[:2], 0.7) is None
    rows = {(r["cost"], r["method"]): r for r in matched_table(points, [0.4, 0.6], "a")}
    assert rows[(0.4, "b")]["delta_vs_threshold"] == pytest.approx(-0.1)
    assert rows[(0.6, "b")]["accuracy"] == pytest.approx(0.7)


def test_oracle_sends_each_sample_to_its_earliest_correct_exit():
    # 4 samples, 3 exits: sample 0 right at exit 0, 1 at exit 1, 2 only at the head, 3 never.
    correct = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)  # [exit, sample]
    logits = torch.where(correct.unsqueeze(-1), torch.tensor([5.0, -5.0]), torch.tensor([-5.0, 5.0]))
    labels = torch.zeros(4, dtype=torch.long)
    outputs = ExitOutputs(logits, torch.zeros(4, 2))
    trained = Trained({s: outputs for s in ("val", "cal", "test")}, {s: labels for s in ("val", "cal", "test")})
    costs = torch.tensor([0.2, 0.5, 1.0])
    earliest, *budgeted, = oracle_points([trained], costs, [0.2, 0.275, 0.5])
    assert oracle_points([trained], costs, [0.1])[1]["accuracy"] is None  # cheaper than any exit
    assert earliest["accuracy"] == 0.75 and earliest["expected_cost"] == pytest.approx((0.2 + 0.5 + 1.0 + 1.0) / 4)
    assert [p["accuracy"] for p in budgeted] == [0.25, 0.5, 0.75]


@pytest.mark.slow
def test_jei_compare_command_runs(tmp_path):
    script = __import__("pathlib").Path(sys.executable).with_name("jei-compare")
    result = subprocess.run([str(script), *QUICK, "include=[max_prob]", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| max_prob |" in result.stdout
    assert (tmp_path / "run" / "compare.json").is_file()


def test_crossfit_protocol_pools_held_out_folds_of_the_test_split(tmp_path):
    result = run_compare(tmp_path, "include=[max_prob]", "protocol=crossfit", "folds=3")
    test_size = json.loads((tmp_path / "compare.json").read_text())["points"][0]["num_test_samples"]
    assert result["folds"] == 3 and result["protocol"] == "crossfit"
    assert test_size == 359  # every digits test image, each predicted by exits that never saw it
    assert len(list((tmp_path / "trained").glob("sdn-*.safetensors"))) == 3  # one model per fold
    assert set(result["ims"]["max_prob"]) == {"accuracy", "ece"}


def test_crossfit_ims_on_train_fits_the_ims_on_the_training_images(tmp_path):
    folds = run_compare(tmp_path / "folds", "include=[max_prob]", "protocol=crossfit", "folds=3")
    train = run_compare(tmp_path / "train", "include=[max_prob]", "protocol=crossfit", "folds=3", "crossfit_ims=train")
    assert train["points"][0]["num_test_samples"] == 359  # still every test image, held out
    # the same test images, other IMs: learnt from the training split instead of the test folds
    assert train["ims"]["max_prob"]["accuracy"] != folds["ims"]["max_prob"]["accuracy"]
    with pytest.raises(Exception, match="crossfit_ims"):
        run_compare(tmp_path / "bad", "include=[max_prob]", "protocol=crossfit", "crossfit_ims=test")


def test_crossfit_folds_are_disjoint_and_cover_the_split():
    from jei.compare import crossfit_folds
    from jei.features import CachedSplit

    split = CachedSplit([torch.arange(50).float().view(-1, 1)], torch.zeros(50, 3), torch.arange(50))
    folds = crossfit_folds(split, 5, seed=0)
    held_out = torch.cat([f["test"].labels for f in folds])
    assert sorted(held_out.tolist()) == list(range(50))
    for fold in folds:
        parts = [set(fold[name].labels.tolist()) for name in ("train", "val", "cal", "test")]
        assert sum(len(p) for p in parts) == 50 and len(set().union(*parts)) == 50
