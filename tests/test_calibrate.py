"""Pipeline glue for conformal sets: calibration folds and per-exit metrics."""

from __future__ import annotations

import pytest
import torch

from jei.calibrate import ConformalSettings, Scored, calibration_folds, conformal_metrics


def scored(n: int, exits: int = 3, classes: int = 4, seed: int = 0) -> Scored:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, classes, generator=generator) * 2, dim=-1).double()
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return Scored(probs, labels, torch.randint(0, exits, (n,), generator=generator))


def test_cal_fold_calibrates_every_test_sample_on_the_calibration_split():
    cal, test = scored(50), scored(30, seed=1)
    ((fold_cal, index),) = calibration_folds(cal, test, "cal", seed=0)
    assert fold_cal is cal and torch.equal(index, torch.arange(30))


def test_test_halves_calibrate_each_half_on_the_other():
    test = scored(31)
    (cal_a, index_b), (cal_b, index_a) = calibration_folds(scored(5), test, "test_halves", seed=0)
    assert sorted(torch.cat([index_a, index_b]).tolist()) == list(range(31))  # every sample once
    assert set(index_a.tolist()).isdisjoint(index_b.tolist())
    torch.testing.assert_close(cal_a.probs, test.probs[index_a])  # half A calibrates half B
    torch.testing.assert_close(cal_b.labels, test.labels[index_b])


def test_conformal_metrics_cover_each_exit_on_exchangeable_data():
    settings = ConformalSettings(alphas=[0.1], min_group_size=20)
    cal, test = scored(3000, seed=2), scored(3000, seed=3)
    metrics = conformal_metrics(calibration_folds(cal, test, "cal", 0), test, 3, settings)
    (result,) = metrics["results"]
    assert metrics["n_test_per_exit"] == torch.bincount(test.exits, minlength=3).tolist()
    for coverage in result["per_exit"]["per_exit_coverage"]:
        assert abs(coverage - 0.9) < 0.04  # ~1000 samples per exit: 4 standard deviations
    assert result["global"]["coverage"] >= 0.88


def test_invalid_conformal_settings_name_the_field():
    with pytest.raises(ValueError, match="conformal.calibrate_on"):
        ConformalSettings(calibrate_on="test")
    with pytest.raises(ValueError, match="conformal.score"):
        ConformalSettings(score="softmax")
