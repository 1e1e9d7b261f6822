"""Compute cost in FLOPs, counted by torch's FlopCounterMode (matmuls, convolutions, attention).

Elementwise work (activations, norms, the optimiser update) is not counted: the numbers are the
standard "model FLOPs" (2 per multiply-add), the same for every role, so costs compare across cuts.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
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


# ---------------------------------------------------------------- per role, and the metrics block

METHOD = ("torch FlopCounterMode on one step per role and phase, times the steps done; model FLOPs "
          "(2 per multiply-add), elementwise work not counted")


# (architecture, shapes, guidance, device) -> (training step, sampling step) FLOPs. The counts depend on nothing else
# (guidance w != 1 evaluates the net twice per sampling step),
# and counting traces a forward and a backward (~0.5 s): 100 clients of one architecture count once.
_STEP_FLOPS: dict[tuple, tuple[int, int]] = {}


def _step_flops(model, eps_fn, *, shape, levels: tuple[int, int], schedule, batch: int, n: int, train_cond,
                sample_cond, guidance: float, device, seed: int) -> tuple[int, int]:
    """(training step, sampling step) FLOPs of one role over its levels; random data, FLOPs do not depend on it."""
    key = (type(model), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()), tuple(shape), batch, n,
           *(None if c is None else (c.dtype, tuple(c.shape)) for c in (train_cond, sample_cond)), guidance != 1,
           str(device))
    if key not in _STEP_FLOPS:
        _STEP_FLOPS[key] = _count_step_flops(model, eps_fn, shape=shape, levels=levels, schedule=schedule,
                                             batch=batch, n=n, train_cond=train_cond, sample_cond=sample_cond,
                                             device=device, seed=seed)
    return _STEP_FLOPS[key]


def _count_step_flops(model, eps_fn, *, shape, levels, schedule, batch, n, train_cond, sample_cond, device,
                      seed) -> tuple[int, int]:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn((batch, *shape), generator=gen).clamp(-1, 1)
    t = torch.randint(levels[0], levels[1] + 1, (batch,), generator=gen)
    eps = torch.randn((batch, *shape), generator=gen)
    x_t = schedule.noise(x0, t, eps).to(device)
    train = train_step_flops(model, lambda: F.mse_loss(model(x_t, t.to(device), train_cond), eps.to(device)))
    x = torch.randn((n, *shape), generator=gen).to(device)
    return train, denoiser_flops(eps_fn(sample_cond), x, torch.full((n,), levels[1], dtype=torch.long, device=device))


def client_step_flops(client, n_samples: int) -> tuple[int, int]:
    """A client's (training step, sampling step) FLOPs on levels 1..t_c (0, 0 when it has none)."""
    if client.t_c == 0:
        return 0, 0
    gen = torch.Generator().manual_seed(client.id)

    def cond(n):
        return None if client.condition is None else \
            client.condition[torch.randint(client.num_records, (n,), generator=gen)].to(client.device)
    return _step_flops(client.model, lambda c: client.eps_fn(c, client.guidance), shape=tuple(client.images.shape[1:]),
                       levels=(1, client.t_c), schedule=client.schedule, batch=client.batch_size, n=n_samples,
                       train_cond=cond(client.batch_size), sample_cond=cond(n_samples), guidance=client.guidance,
                       device=client.device, seed=0)


def server_step_flops(server, n_samples: int) -> tuple[int, int]:
    """The server's (training step, sampling step) FLOPs on levels t_c+1..T (0, 0 when it has none)."""
    if not server.has_levels:
        return 0, 0
    label = torch.zeros(server.batch_size, dtype=torch.long, device=server.device) if server.client_cond else None
    return _step_flops(server.model, lambda _: server.eps_fn(0, server.guidance), shape=server.image_shape,
                       levels=(server.t_c + 1, server.schedule.T), schedule=server.schedule, batch=server.batch_size,
                       n=n_samples, train_cond=label, sample_cond=None, guidance=server.guidance, device=server.device,
                       seed=1)


def cost_block(clients: dict[str, dict], server: dict) -> dict:
    """metrics.json's `cost`: per client and server FLOPs, steps, seconds and bytes, with totals and means."""
    totals = {k: sum(v[k] for v in clients.values()) for k in ("train_flops", "sample_flops", "bytes_up", "bytes_down")}
    return {"method": METHOD, "clients": clients, "client_total": totals,
            "client_mean": {k: v / max(1, len(clients)) for k, v in totals.items()}, "server": server,
            "bytes_up": totals["bytes_up"], "bytes_down": totals["bytes_down"]}


def model_train_step_flops(model_cfg, image_shape: tuple[int, int, int], batch: int) -> int:
    """FLOPs of one training step of a role's UNet on a batch, before any run: what a budget rule divides by.

    Labels are left out: an embedding lookup has no counted FLOPs.
    """
    from collafuse.core.models import Denoiser
    c, h, _ = image_shape
    model = Denoiser(model_cfg, h, c)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *image_shape), generator=gen)
    t = torch.randint(1, 1000, (batch,), generator=gen)
    return train_step_flops(model, lambda: F.mse_loss(model(x, t), x))
