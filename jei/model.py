"""EarlyExitNetwork: a frozen backbone with one IM and one gate per intermediate exit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from jei.exits import exit_step, first_exit
from jei.types import EarlyExitResult, ExitOutputs


class EarlyExitNetwork(nn.Module):
    """Composes a backbone adapter with IMs and gates built from its ``exit_specs``.

    Two ways to run it, which give the same predictions (tested):
    - ``forward``: the all-exits pass (training, calibration): every exit's logits and gates;
    - ``early_exit``: real inference, segment by segment; a sample that exits leaves the batch
      and no later segment is computed for it.
    """

    def __init__(self, backbone: nn.Module, ims: Sequence[nn.Module], gates: Sequence[nn.Module]) -> None:
        super().__init__()
        num_gates = len(backbone.exit_specs)
        if num_gates == 0:
            raise ValueError("the backbone declares no exit: an early-exit network needs at least one")
        if not len(ims) == len(gates) == num_gates:
            raise ValueError(f"need one IM and one gate per exit ({num_gates}); got {len(ims)} IMs, {len(gates)} gates")
        self.backbone = backbone
        self.ims = nn.ModuleList(ims)
        self.gates = nn.ModuleList(gates)

    @property
    def num_gates(self) -> int:
        return len(self.ims)

    def exit_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters: IMs (theta) and gates (phi). The backbone has none."""
        return {"ims": list(self.ims.parameters()), "gates": list(self.gates.parameters())}

    @torch.no_grad()
    def pooled_features(self, inputs: Any) -> tuple[list[Tensor], Tensor]:
        """Each IM's pooled input and the backbone's logits: what the feature cache stores."""
        out = self.backbone.forward_exits(inputs)
        return [im.pool(feature) for im, feature in zip(self.ims, out.features)], out.logits

    def from_pooled(self, pooled: Sequence[Tensor], final_logits: Tensor) -> ExitOutputs:
        """Exit outputs from pooled features (cached or fresh)."""
        logits = [im.classifier(p) for im, p in zip(self.ims, pooled)]
        gate_logits = [gate(z) for gate, z in zip(self.gates, logits)]
        return ExitOutputs(
            logits=torch.stack([*logits, final_logits.to(logits[0].dtype)]),
            gate_logits=torch.stack(gate_logits, dim=-1),
        )

    def forward(self, inputs: Any) -> ExitOutputs:
        return self.from_pooled(*self.pooled_features(inputs))

    @torch.no_grad()
    def early_exit(self, inputs: Any) -> EarlyExitResult:
        """Real early-exit inference: stop computing each sample at the exit it takes."""
        backbone = self.backbone
        total = backbone.batch_size(inputs)
        state = backbone.begin(inputs)
        active = torch.arange(total)  # original positions of the samples still running
        used: Tensor | None = None  # running sum of gate probabilities per active sample
        logits_out: Tensor | None = None
        exit_index = torch.full((total,), self.num_gates, dtype=torch.long)
        for index, (im, gate) in enumerate(zip(self.ims, self.gates)):
            state = backbone.run_segment(index, state)
            logits = im(backbone.represent(index, state))
            if logits_out is None:
                logits_out = logits.new_zeros(total, logits.shape[-1])
            gate_prob = torch.sigmoid(gate(logits))
            used = torch.zeros_like(gate_prob) if used is None else used
            _, leaving, used = exit_step(gate_prob, used)
            leaving_cpu = leaving.cpu()
            logits_out[active[leaving_cpu]] = logits[leaving]
            exit_index[active[leaving_cpu]] = index
            staying = (~leaving).nonzero().squeeze(-1)
            active, used = active[~leaving_cpu], used[staying]
            if active.numel() == 0:
                return EarlyExitResult(logits=logits_out, exit_index=exit_index)
            state = backbone.select(state, staying)
        final = backbone.run_segment(self.num_gates, state)
        logits_out[active] = final.to(logits_out.dtype)
        return EarlyExitResult(logits=logits_out, exit_index=exit_index)


def predict_from_outputs(outputs: ExitOutputs) -> EarlyExitResult:
    """The prediction the all-exits pass implies (what ``early_exit`` computes for real)."""
    exit_index = first_exit(torch.sigmoid(outputs.gate_logits))
    logits = outputs.logits.gather(0, exit_index.view(1, -1, 1).expand(1, -1, outputs.logits.shape[-1]))[0]
    return EarlyExitResult(logits=logits, exit_index=exit_index)
