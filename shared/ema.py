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
        self._lists: tuple | None = None  # (source model, EMA tensors, source tensors), built once per source

    def _tensor_lists(self, model: torch.nn.Module) -> tuple[list, list, list, list]:
        """The EMA's and the source's parameters and buffers as lists, built at the first update instead of
        every step (a detach per parameter each step). An fp32 source is read as it is: under no_grad,
        lerp reads a parameter's values exactly as its detached view does."""
        if self._lists is None or self._lists[0] is not model:
            sources = list(model.parameters())
            if any(p.dtype != torch.float32 for p in sources):
                sources = None  # other precisions are converted at every update
            self._lists = (model, list(self.model.parameters()), sources,
                           list(self.model.buffers()), list(model.buffers()))
        return self._lists[1:]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Short warm-up of the decay so early evaluations are not dominated by the initialisation.
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        ema_params, params, ema_buffers, buffers = self._tensor_lists(model)
        if params is None:
            params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # one fused launch per tensor list
        for e, b in zip(ema_buffers, buffers):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
