"""The exponential moving average of the weights, kept in fp32: the model that validation, reports,
sampling and export use."""
from __future__ import annotations

import copy

import torch


class EMA:
    """Exponential moving average of the weights, kept in fp32; used for evaluation and export."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Short warm-up of the decay so early evaluations are not dominated by the initialisation.
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        ema_params = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # one fused launch per tensor list
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
