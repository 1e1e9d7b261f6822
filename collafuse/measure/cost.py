"""Compute cost in FLOPs, counted by torch's FlopCounterMode (matmuls, convolutions, attention).

Elementwise work (activations, norms, the optimiser update) is not counted: the numbers are the
standard "model FLOPs" (2 per multiply-add), the same for every role, so costs compare across cuts.
"""

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch 2.13 counts the CUDA attention kernels but not the CPU one, so attention layers would cost
# nothing on CPU; the same formulas make counts agree across devices.
_CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of running fn(*args, **kwargs) once, forward and any backward it performs."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def denoiser_flops(eps_fn: Callable, x_t: torch.Tensor, t: torch.Tensor) -> int:
    """FLOPs of one denoiser evaluation on the batch x_t at levels t (no gradients)."""
    with torch.no_grad():
        return count_flops(eps_fn, x_t, t)


def train_step_flops(model: nn.Module, loss_fn: Callable[..., torch.Tensor], *args, **kwargs) -> int:
    """FLOPs of one training step: loss_fn(*args, **kwargs) forward plus the backward to model's parameters.

    Gradients are taken with torch.autograd.grad, so the model's .grad fields are left untouched.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: nothing to count a training step for")

    def step():
        loss = loss_fn(*args, **kwargs)
        if loss.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}; reduce with .mean()")
        torch.autograd.grad(loss, params, allow_unused=True)

    return count_flops(step)
