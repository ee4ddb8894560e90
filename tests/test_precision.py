"""trainer.precision: bf16 / fp16 autocast for the backbone's passes, fp32 unchanged."""

from __future__ import annotations

import pytest
import torch

from jei.errors import ConfigError
from jei.features import cache_key, cached_split, compute_split
from jei.precision import check_precision

from .helpers import tiny_network
from .test_cache_integrity import toy_data

CPU = torch.device("cpu")


def test_precision_names_are_checked_before_any_work() -> None:
    assert check_precision("fp32", CPU) == "fp32" and check_precision("bf16", CPU) == "bf16"
    with pytest.raises(ConfigError, match="trainer.precision must be one of fp32, bf16, fp16"):
        check_precision("half", CPU)
    with pytest.raises(ConfigError, match="trainer.precision=fp16 needs a CUDA device"):
        check_precision("fp16", CPU)


def test_bf16_features_are_close_to_fp32_and_cached_apart(tmp_path) -> None:
    network, data = tiny_network(0), toy_data()
    full = compute_split(network, data, "val", 8, CPU)
    half = compute_split(network, data, "val", 8, CPU, precision="bf16")
    assert any(not torch.equal(a, b) for a, b in zip(full.pooled, half.pooled))  # autocast did run
    for a, b in zip([*full.pooled, full.final_logits], [*half.pooled, half.final_logits]):
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
    # fp32 keeps the key entries had before precision existed; bf16 features get their own.
    assert cache_key(network, data, "val", "") == cache_key(network, data, "val", "", precision="fp32")
    assert cache_key(network, data, "val", "", precision="bf16") != cache_key(network, data, "val", "")
    cached = cached_split(network, data, "val", 8, CPU, tmp_path, precision="bf16")
    assert all(torch.equal(a, b) for a, b in zip(cached.pooled, half.pooled))
    assert len(list(tmp_path.iterdir())) == 1
