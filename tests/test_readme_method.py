"""The README's "Adding a method" example, run verbatim through the objective contract."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from jei.features import compute_split
from jei.pipeline import exits_state
from jei.train import exit_outputs, fit_exits

from .helpers import tiny_network
from .test_objectives_contract import COSTS, SCHEDULE
from .test_train import toy_data

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_objective():
    block = re.search(r"```python\n(# my_pkg/my_objective.py\n.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace["LastExitFirst"]


def test_readme_objective_trains_its_exit_and_round_trips():
    objective = readme_objective()()
    network = tiny_network(0)
    split = compute_split(network, toy_data(), "train", 64, torch.device("cpu"))
    before = [p.clone() for p in network.ims[0].parameters()]
    fit_exits(network, objective, split, split, COSTS, SCHEDULE, torch.device("cpu"), 0)
    accuracy = (exit_outputs(network, split, torch.device("cpu")).logits[-2].argmax(-1) == split.labels).float().mean()
    assert accuracy > 0.9
    assert all(torch.equal(a, b) for a, b in zip(before, network.ims[0].parameters()))  # only the last IM trained
    assert {k.split(".")[0] for k in exits_state(network, objective)} == {"ims", "gates", "temperature"}
