"""The exported chain (jei.export): every segment, IM and gate as a torch.export program (and
ONNX file where the exporter is installed), run by the host loop, gives the model's exits and
predictions."""

from __future__ import annotations

import pytest
import torch

from jei.export import (
    ExportedChain,
    ExportError,
    OnnxChain,
    OnnxUnavailable,
    export_network,
    export_onnx,
    onnx_available,
    onnxruntime_available,
)
from jei.model import predict_from_outputs
from jei.policies import ConfidenceThreshold, JEIRule, confidence
from jei.types import ExitOutputs

from .helpers import tiny_network

INPUTS = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def between_middle_scores(scores: torch.Tensor) -> float:
    """A threshold halfway between the two middle scores: half leave, and no score sits on it
    (so last-bit differences between runtimes cannot flip a decision)."""
    ordered = scores.sort().values
    middle = len(ordered) // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def spread_policies(network) -> dict[str, object]:
    """Max-prob with per-exit thresholds that halve the samples still running and JEI's rule on
    gates shifted until samples leave at every exit (checked), so compaction is exercised."""
    with torch.no_grad():
        outputs = network(INPUTS)
    running = torch.ones(INPUTS.shape[0], dtype=torch.bool)
    thresholds = []
    for logits in outputs.logits[:-1]:
        scores = confidence(logits, "max_prob")
        thresholds.append(between_middle_scores(scores[running]))
        running &= scores < thresholds[-1]
    rule, shifts = JEIRule(), torch.zeros(network.num_gates)
    for index in range(network.num_gates):  # gate by gate: about half the samples reaching it leave
        low, high = -50.0, 50.0
        for _ in range(40):
            shifts[index] = (low + high) / 2
            exits = rule.decide(ExitOutputs(outputs.logits, outputs.gate_logits + shifts))
            reaching = exits >= index
            if (exits[reaching] == index).float().mean() < 0.5:
                low = float(shifts[index])
            else:
                high = float(shifts[index])
        shifts[index] = high + 1e-5  # just off the boundary: no sample on a tie (runtimes differ in last bits)
    for gate, shift in zip(network.gates, shifts):
        gate.linear.bias.data += shift
    return {"max_prob": ConfidenceThreshold("max_prob", thresholds), "jei": rule}


@pytest.fixture(scope="module")
def exported():
    network = tiny_network(3)
    network.ensemble_decay = 0.5
    network.temperature.copy_(torch.tensor([1.0, 1.5, 0.8, 1.2]))
    policies = spread_policies(network)
    return network, policies, export_network(network, INPUTS[:4])


@pytest.mark.parametrize("name", ["max_prob", "jei"])
def test_exported_chain_gives_the_models_exits_and_predictions(exported, name):
    network, policies, chain = exported
    network.policy = chain.policy = policies[name]
    with torch.no_grad():
        expected = predict_from_outputs(network(INPUTS), network.policy)
    assert len(expected.exit_index.unique()) == network.num_gates + 1, "every exit should be taken"
    for inputs, reference in ((INPUTS, expected), (INPUTS[5:12], None), (INPUTS[3:4], None)):
        reference = reference or network.early_exit(inputs)
        actual = chain.early_exit(inputs)  # batch sizes other than the example's, 1 included
        assert torch.equal(actual.exit_index, reference.exit_index), name
        torch.testing.assert_close(actual.logits, reference.logits, atol=1e-5, rtol=1e-5)


def test_saved_chain_loads_and_runs_the_same(exported, tmp_path):
    network, policies, chain = exported
    network.policy = policies["jei"]
    files = chain.save(tmp_path)
    assert {f.name for f in files} >= {"segment_0.pt2", "segment_3.pt2", "im_2.pt2", "gate_0.pt2", "chain.json"}
    loaded = ExportedChain.load(tmp_path, policies["jei"])
    expected = network.early_exit(INPUTS)
    actual = loaded.early_exit(INPUTS)
    assert torch.equal(actual.exit_index, expected.exit_index)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.temperature, network.temperature)


def test_empty_batch_and_bad_examples():
    network = tiny_network(0)
    chain = export_network(network, INPUTS[:2])
    empty = chain.early_exit(INPUTS[:0])
    assert empty.logits.shape == (0, 5) and empty.exit_index.shape == (0,)
    with pytest.raises(ExportError, match="at least 2"):
        export_network(network, INPUTS[:1])
    with pytest.raises(ExportError, match="tensor input"):
        export_network(network, [INPUTS[0]])


def test_onnx_chain_gives_the_models_exits(exported, tmp_path):
    reason = onnx_available()
    network, policies, _ = exported
    if reason is not None:
        with pytest.raises(OnnxUnavailable, match="onnx"):
            export_onnx(network, INPUTS[:4], tmp_path)
        pytest.skip(reason)
    files = export_onnx(network, INPUTS[:4], tmp_path)
    assert {f.name for f in files} >= {"segment_0.onnx", "im_0.onnx", "gate_2.onnx", "chain.json"}
    reason = onnxruntime_available()
    if reason is not None:
        pytest.skip(reason)
    for name in ("max_prob", "jei"):
        network.policy = policies[name]
        chain = OnnxChain.load(tmp_path, policies[name])
        expected, actual = network.early_exit(INPUTS), chain.early_exit(INPUTS)
        assert torch.equal(actual.exit_index, expected.exit_index), name
        torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)
