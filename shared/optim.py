"""The optimiser's side of a step: the gradient norm that the skip guard reads (and clipping), and the
compiled optimiser step of --compile."""
from __future__ import annotations

import torch


def compile_optimizer_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """--compile takes the optimiser's update into the compiled step too (PyTorch's "compiled optimizer"
    recipe: inductor fuses Adamax's per-tensor loop into a few kernels; docs/performance.md). The
    learning rate stays a constant of the graph, as nothing schedules it."""
    optimizer.step = torch.compile(optimizer.step)
    return optimizer


def grad_norm(parameters, max_norm: float | None = None, accelerator=None) -> torch.Tensor:
    """The total 2-norm of the gradients (the skip guard's figure), clipping them to ``max_norm`` when set.

    ``torch.nn.utils.clip_grad_norm_(params, inf)``, the usual way to read the norm, still multiplies
    every gradient by 1.0, a pass over all of them for nothing; without ``max_norm`` the norm alone is
    taken. With an ``accelerator`` its ``clip_grad_norm_`` is used wherever gradients may be sharded
    (FSDP, DeepSpeed, XLA, ...), and fp16 gradients are unscaled first, as it does."""
    if accelerator is not None:
        from accelerate.utils import DistributedType

        plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        if max_norm is not None or accelerator.distributed_type not in plain:
            return accelerator.clip_grad_norm_(parameters, float("inf") if max_norm is None else max_norm)
        accelerator.unscale_gradients()
    elif max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
