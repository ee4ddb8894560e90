"""Shared test set-up: Hypothesis profiles and the double-import guard."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import settings

# Tests use tiny tensors, where a second thread costs more than it gives (and contends badly
# on shared machines).
torch.set_num_threads(1)

# Hypothesis loads its built-in "ci" profile by itself when CI is set; locally, keep runs short.
settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("nightly", max_examples=500, deadline=None)
if not os.environ.get("CI"):
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# The repository's folders install under `jei.*`; importing them as top-level packages (which a
# repository-root sys.path allows) would load each module twice.
_MAPPED_FOLDERS = ("backbones", "heads", "objectives", "conformal", "configs")


@pytest.fixture(autouse=True, scope="session")
def _no_double_imports():
    yield
    doubled = [name for name in _MAPPED_FOLDERS if name in sys.modules]
    assert not doubled, f"imported as top-level packages instead of jei.*: {doubled}"
