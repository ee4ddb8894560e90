"""Bad input to jei.conformal fails early with a ValueError that names the argument."""

from __future__ import annotations

import math

import pytest
import torch

from jei.conformal import (
    MondrianConformal,
    SplitConformal,
    conformal_rank,
    coverage,
    coverage_by_group,
    expected_calibration_error,
    make_score,
    split_conformal_threshold,
)

PROBS = torch.softmax(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), dim=1)
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, math.nan, True, "0.1"])
def test_alpha_outside_open_unit_interval(alpha: object) -> None:
    with pytest.raises(ValueError, match="alpha"):
        SplitConformal(alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        MondrianConformal(alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        split_conformal_threshold(torch.zeros(5), alpha)


def test_empty_calibration_set() -> None:
    with pytest.raises(ValueError, match="calibration set is empty"):
        SplitConformal().calibrate(PROBS[:0], LABELS[:0])
    with pytest.raises(ValueError, match="calibration set is empty"):
        MondrianConformal().calibrate(PROBS[:0], LABELS[:0], GROUPS[:0])
    with pytest.raises(ValueError, match="scores"):
        split_conformal_threshold(torch.zeros(0), 0.1)


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        (
            PROBS.masked_fill(torch.eye(8, 3, dtype=torch.bool), math.nan),
            "probs contains NaN or inf.*softmax",
        ),
        (PROBS.masked_fill(torch.eye(8, 3, dtype=torch.bool), math.inf), "probs contains NaN or inf"),
        (torch.tensor([[1.2, -0.2, 0.0]]), "probs contains negative values.*softmax"),
        (torch.log(PROBS), "probs contains negative"),
        (PROBS * 1.01, "rows of probs must sum to 1.*softmax"),
        (torch.ones(2, 3), "rows of probs must sum to 1"),
        (torch.ones(4, 3, dtype=torch.long), "probs must be a floating-point"),
        (PROBS[0], r"probs must have shape \[N, K\]"),
    ],
)
def test_invalid_probabilities(probs: torch.Tensor, match: str) -> None:
    labels = torch.zeros(probs.shape[0] if probs.ndim else 1, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        SplitConformal().calibrate(probs, labels)
    with pytest.raises(ValueError, match=match):
        make_score("aps").score_all(probs)


def test_row_sum_tolerance_is_about_1e_3() -> None:
    SplitConformal().calibrate(PROBS * (1 + 5e-4), LABELS)  # float32 noise is accepted
    with pytest.raises(ValueError, match="rows of probs"):
        SplitConformal().calibrate(PROBS * (1 + 5e-3), LABELS)


def test_probs_must_be_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"probs must be a torch\.Tensor"):
        SplitConformal().calibrate(PROBS.numpy(), LABELS)


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2, 3, 0, 1, 2, 0]), torch.full((8,), -1)])
def test_labels_out_of_range(labels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 2\]"):
        SplitConformal().calibrate(PROBS, labels)
    with pytest.raises(ValueError, match="labels must be class indices"):
        coverage(torch.ones(8, 3, dtype=torch.bool), labels)


def test_labels_must_be_integers() -> None:
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        SplitConformal().calibrate(PROBS, LABELS.float())


def test_mismatched_lengths_name_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"labels has shape \(7,\) but probs has shape \(8, 3\)"):
        SplitConformal().calibrate(PROBS, LABELS[:7])
    with pytest.raises(ValueError, match=r"groups has shape \(7,\) but probs has shape \(8, 3\)"):
        MondrianConformal().calibrate(PROBS, LABELS, GROUPS[:7])
    cp = MondrianConformal(min_group_size=0).calibrate(PROBS, LABELS, GROUPS)
    with pytest.raises(ValueError, match=r"groups has shape \(3,\) but probs has shape \(8, 3\)"):
        cp.predict(PROBS, GROUPS[:3])
    with pytest.raises(ValueError, match=r"labels has shape \(7,\) but sets has shape \(8, 3\)"):
        coverage(torch.ones(8, 3, dtype=torch.bool), LABELS[:7])


def test_groups_out_of_range() -> None:
    with pytest.raises(ValueError, match="groups contains id 1 but num_groups=1"):
        MondrianConformal().calibrate(PROBS, LABELS, GROUPS, num_groups=1)
    with pytest.raises(ValueError, match="groups must be non-negative"):
        MondrianConformal().calibrate(PROBS, LABELS, GROUPS - 1)
    cp = MondrianConformal().calibrate(PROBS, LABELS, GROUPS)
    with pytest.raises(ValueError, match="groups contains id 2 but num_groups=2"):
        cp.predict(PROBS, GROUPS + 1)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        MondrianConformal().calibrate(PROBS, LABELS, GROUPS, num_groups=0)
    with pytest.raises(ValueError, match="groups contains id 1 but num_groups=1"):
        coverage_by_group(torch.ones(8, 3, dtype=torch.bool), LABELS, GROUPS, 1)


def test_predict_before_calibrate() -> None:
    with pytest.raises(ValueError, match=r"predict was called before calibrate\(\)"):
        SplitConformal().predict(PROBS)
    with pytest.raises(ValueError, match=r"predict was called before calibrate\(\)"):
        MondrianConformal().predict(PROBS, GROUPS)


def test_unknown_score_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown score name 'thr'.*aps, lac, raps"):
        make_score("thr")
    with pytest.raises(ValueError, match="unknown score name"):
        SplitConformal("APS ")


def test_score_kwargs_with_a_score_instance() -> None:
    with pytest.raises(ValueError, match="score keyword arguments"):
        SplitConformal(make_score("aps"), randomized=True)


def test_unknown_small_group_policy() -> None:
    with pytest.raises(ValueError, match=r"unknown small_group_policy 'skip'.*pool, full_set"):
        MondrianConformal(small_group_policy="skip")
    with pytest.raises(ValueError, match="min_group_size"):
        MondrianConformal(min_group_size=-1)


def test_raps_parameters() -> None:
    with pytest.raises(ValueError, match="penalty"):
        make_score("raps", penalty=-1.0)
    with pytest.raises(ValueError, match="k_reg"):
        make_score("raps", k_reg=1.5)


def test_metric_arguments() -> None:
    with pytest.raises(ValueError, match="sets must be a boolean"):
        coverage(torch.ones(8, 3), LABELS)
    with pytest.raises(ValueError, match="sets has 0 rows"):
        coverage(torch.ones(0, 3, dtype=torch.bool), LABELS[:0])
    with pytest.raises(ValueError, match="unknown binning 'quantile'"):
        expected_calibration_error(PROBS, LABELS, binning="quantile")
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(PROBS, LABELS, n_bins=0)


def test_conformal_rank_arguments() -> None:
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        conformal_rank(-1, 0.1)
    with pytest.raises(ValueError, match="scores must be floating point without NaN"):
        split_conformal_threshold(torch.tensor([0.1, math.nan]), 0.1)
