"""The compiled batch-1 program (jei.batch1_program): one AOTInductor package that gives
``network.early_exit``'s exits and logits for every policy, written to a file that loads again;
networks it cannot run and programs that disagree with the model are refused."""

from __future__ import annotations

import pytest
import torch

from jei.batch1_program import Batch1Program, compile_batch1
from jei.export import ExportError
from jei.policies import Patience
from jei.types import EarlyExitResult

from .helpers import tiny_network
from .test_export import INPUTS, spread_policies


@pytest.fixture(scope="module")
def network():
    return tiny_network(3)


@pytest.mark.parametrize("policy", ["max_prob", "jei", "patience"])
def test_the_program_gives_the_models_exits_and_logits(network, policy, tmp_path):
    network.policy = Patience(2) if policy == "patience" else spread_policies(network)[policy]
    network.temperature.copy_(torch.tensor([1.3, 0.8, 1.0, 1.1]))
    try:
        program = compile_batch1(network, INPUTS[:8], tmp_path / "early_exit.pt2")
        expected = network.early_exit(INPUTS)
        if policy != "patience":  # (random exits rarely agree twice in a row: Patience keeps all to the end)
            assert len(expected.exit_index.unique()) > 2  # samples leave at several exits
        for compiled in (program, Batch1Program.load(tmp_path / "early_exit.pt2")):
            result = compiled.early_exit(INPUTS)
            assert torch.equal(result.exit_index, expected.exit_index)
            torch.testing.assert_close(result.logits, expected.logits, rtol=1e-5, atol=1e-5)
        single = program(INPUTS[5:6])
        assert isinstance(single, EarlyExitResult) and single.logits.shape == (1, 5)
        empty = program.early_exit(INPUTS[:0])
        assert empty.logits.shape == (0, 5) and empty.exit_index.shape == (0,)
        # AOTInductor does not check shapes itself: a larger map would run and give garbage.
        for wrong, message in ((INPUTS[:2], "use early_exit"), (torch.randn(1, 1, 12, 12), r"shape \[1, 1, 8, 8\]"),
                               (INPUTS[:1].double(), "float32")):
            with pytest.raises(ValueError, match=message):
                program(wrong)
    finally:
        network.temperature.fill_(1.0)


def test_a_program_that_disagrees_with_the_model_is_not_kept(network, tmp_path, monkeypatch):
    network.policy = spread_policies(network)["max_prob"]
    true_early_exit = network.early_exit

    def shifted(inputs):  # the model as the check sees it: every sample one exit later
        result = true_early_exit(inputs)
        return EarlyExitResult(result.logits, (result.exit_index + 1).clamp(max=network.num_gates))

    monkeypatch.setattr(network, "early_exit", shifted)
    path = tmp_path / "early_exit.pt2"
    path.write_bytes(b"the program already served")  # a refused build leaves it as it was
    with pytest.raises(ExportError, match=r"other exits or logits than network.early_exit on \d+ of 8"):
        compile_batch1(network, INPUTS[:8], path)
    assert path.read_bytes() == b"the program already served" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_networks_it_cannot_run_are_refused_before_building(tmp_path):
    network = tiny_network(0)
    network.ensemble_decay = 0.5
    with pytest.raises(ExportError, match="ensemble"):
        compile_batch1(network, INPUTS[:2], tmp_path / "p.pt2")
    network.ensemble_decay = 0.0
    with pytest.raises(ExportError, match="example_inputs must be a tensor"):
        compile_batch1(network, [INPUTS[0]], tmp_path / "p.pt2")
    with pytest.raises(ExportError, match="must end in .pt2"):
        compile_batch1(network, INPUTS[:2], tmp_path / "p.so")
    run_segment = network.backbone.run_segment
    network.backbone.run_segment = lambda index, state: (run_segment(index, state),)  # a state of two parts
    with pytest.raises(ExportError, match="segment 0 returns tuple, not one tensor"):
        compile_batch1(network, INPUTS[:2], tmp_path / "p.pt2")
    assert not (tmp_path / "p.pt2").exists()
    with pytest.raises(FileNotFoundError, match="compile_batch1"):
        Batch1Program.load(tmp_path / "missing.pt2")
