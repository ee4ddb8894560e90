"""Temperature scaling: it recovers a known temperature, lowers validation NLL, keeps arg-max
predictions, and applies identically in the all-exits pass and real early exit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jei.model import predict_from_outputs
from jei.policies import ConfidenceThreshold
from jei.temperature import calibrate_network, fit_temperatures

from .helpers import tiny_network


def test_fit_recovers_the_temperature_that_generated_the_labels():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(2, 20000, 5, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(true_logits[0], -1), 1, generator=generator).squeeze(-1)
    observed = torch.stack([true_logits[0] * 3.0, true_logits[0] * 0.5])  # over- and under-confident
    fitted = fit_temperatures(observed, labels)
    torch.testing.assert_close(fitted, torch.tensor([3.0, 0.5]), rtol=0.05, atol=0)
    scaled = observed / fitted.view(-1, 1, 1)
    for before, after in zip(observed, scaled):
        assert F.cross_entropy(after, labels) <= F.cross_entropy(before, labels)
        assert torch.equal(before.argmax(-1), after.argmax(-1))


def test_temperatures_apply_the_same_way_in_both_passes():
    network = tiny_network(2)
    network.policy = ConfidenceThreshold("max_prob", 0.3)
    network.ensemble_decay = 0.5
    inputs = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(48) % 5
    calibrate_network(network, network(inputs).logits, labels)
    assert not torch.allclose(network.temperature, torch.ones(4))
    outputs = network(inputs)
    expected = predict_from_outputs(outputs, network.policy)
    actual = network.early_exit(inputs)
    assert torch.equal(actual.exit_index, expected.exit_index)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
