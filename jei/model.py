"""EarlyExitNetwork: a frozen backbone with one IM and one gate per intermediate exit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from jei.policies import JEIRule, select_state
from jei.types import EarlyExitResult, ExitOutputs, ExitPolicy


class EarlyExitNetwork(nn.Module):
    """Composes a backbone adapter with IMs and gates built from its ``exit_specs``.

    Two ways to run it, which give the same predictions (tested):
    - ``forward``: the all-exits pass (training, calibration): every exit's logits and gates;
    - ``early_exit``: real inference, segment by segment; a sample that exits leaves the batch
      and no later segment is computed for it.

    ``policy`` (an ``ExitPolicy``, JEI's rule by default) decides where samples leave, in both.
    ``ensemble_decay`` > 0 makes exit l predict out_l + decay * F_{l-1}, the previous exit's
    prediction detached (BoostedNet, Yu et al. 2023); the backbone head joins as the last stage.
    """

    def __init__(
        self,
        backbone: nn.Module,
        ims: Sequence[nn.Module],
        gates: Sequence[nn.Module],
        policy: ExitPolicy | None = None,
        ensemble_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= ensemble_decay:
            raise ValueError(f"ensemble_decay must be >= 0, got {ensemble_decay}")
        num_gates = len(backbone.exit_specs)
        if num_gates == 0:
            raise ValueError("the backbone declares no exit: an early-exit network needs at least one")
        if not len(ims) == len(gates) == num_gates:
            raise ValueError(f"need one IM and one gate per exit ({num_gates}); got {len(ims)} IMs, {len(gates)} gates")
        self.backbone = backbone
        self.ims = nn.ModuleList(ims)
        self.gates = nn.ModuleList(gates)
        self.policy: ExitPolicy = policy if policy is not None else JEIRule()
        self.ensemble_decay = float(ensemble_decay)
        # Per-exit temperature (G IMs, then the head): every exit's logits are divided by it
        # before gates, policies and losses see them; 1 until fitted (``jei.temperature``).
        self.register_buffer("temperature", torch.ones(num_gates + 1))

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

    def _combine(self, logits: Tensor, previous: Tensor | None) -> Tensor:
        if self.ensemble_decay == 0.0 or previous is None:
            return logits
        return logits + self.ensemble_decay * previous.detach().to(logits.dtype)

    def _scaled(self, logits: Tensor, index: int) -> Tensor:
        return logits / self.temperature[index].to(logits.dtype)

    def from_pooled(self, pooled: Sequence[Tensor], final_logits: Tensor) -> ExitOutputs:
        """Exit outputs from pooled features (cached or fresh)."""
        raw: list[Tensor] = []  # before temperature: what ensembles accumulate
        for im, p in zip(self.ims, pooled):
            raw.append(self._combine(im.classifier(p), raw[-1] if raw else None))
        raw.append(self._combine(final_logits.to(raw[0].dtype), raw[-1]))
        logits = [self._scaled(z, index) for index, z in enumerate(raw)]
        gate_logits = [gate(z) for gate, z in zip(self.gates, logits)]
        return ExitOutputs(logits=torch.stack(logits), gate_logits=torch.stack(gate_logits, dim=-1))

    def forward(self, inputs: Any) -> ExitOutputs:
        return self.from_pooled(*self.pooled_features(inputs))

    @torch.no_grad()
    def early_exit(self, inputs: Any) -> EarlyExitResult:
        """Real early-exit inference: stop computing each sample at the exit it takes."""
        backbone, policy = self.backbone, self.policy
        total = backbone.batch_size(inputs)
        state = backbone.begin(inputs)
        active = torch.arange(total)  # original positions of the samples still running
        decision: dict[str, Tensor] | None = None
        previous: Tensor | None = None  # the last exit's prediction, for ensembles
        logits_out: Tensor | None = None
        exit_index = torch.full((total,), self.num_gates, dtype=torch.long)
        for index, (im, gate) in enumerate(zip(self.ims, self.gates)):
            state = backbone.run_segment(index, state)
            raw = self._combine(im(backbone.represent(index, state)), previous)
            logits = self._scaled(raw, index)
            if logits_out is None:
                logits_out = logits.new_zeros(total, logits.shape[-1])
                decision = policy.begin(total, logits.device)
            leaving, decision = policy.step(index, logits, gate(logits), decision)
            leaving_cpu = leaving.cpu()
            logits_out[active[leaving_cpu]] = logits[leaving]
            exit_index[active[leaving_cpu]] = index
            staying = (~leaving).nonzero().squeeze(-1)
            active = active[~leaving_cpu]
            if active.numel() == 0:
                return EarlyExitResult(logits=logits_out, exit_index=exit_index)
            decision, previous = select_state(decision, staying), raw[staying]
            state = backbone.select(state, staying)
        final = self._combine(backbone.run_segment(self.num_gates, state).to(logits_out.dtype), previous)
        logits_out[active] = self._scaled(final, self.num_gates)
        return EarlyExitResult(logits=logits_out, exit_index=exit_index)


def predict_from_outputs(outputs: ExitOutputs, policy: ExitPolicy | None = None) -> EarlyExitResult:
    """The prediction the all-exits pass implies under ``policy`` (JEI's rule by default):
    what ``early_exit`` computes for real."""
    exit_index = (policy or JEIRule()).decide(outputs)
    logits = outputs.logits.gather(0, exit_index.view(1, -1, 1).expand(1, -1, outputs.logits.shape[-1]))[0]
    return EarlyExitResult(logits=logits, exit_index=exit_index)
