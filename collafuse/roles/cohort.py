"""Simulated clients of one architecture trained together, and sampled together: one vectorised call for all.

A client's step on a small denoiser is all overhead (68 ms for a 42 k-parameter UNet at batch 32 on a CPU
core, measured, whatever the batch); N clients one after another pay it N times. Here their weights are
stacked and one step runs every client's forward and backward at once (torch.func.vmap over
functional_call), then one AdamW step updates the stacked weights. Each client keeps what makes it itself:
its batches (Client.draw_batch, from its own generator, exactly as Client.train draws them); its optimiser
moments and EMA (Adam and the EMA are elementwise, so stacked state is per-client state); its step count.
The result equals training the clients one by one up to float rounding (the batched convolutions sum in
another order). Where a step is compute rather than overhead (16 px, batch 64, on a CPU) it is slower:
config.batch_clients is off by default. Sampling is the same story without gradients: finish_together runs
every client's levels below the cut in one call per level, each client with its own EMA weights and noise stream.

In-process simulation only: real clients train on their own machines, one each.
"""
from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Callable

import torch
import torch._C._functorch as functorch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from torch.overrides import TorchFunctionMode

from collafuse.core.protocol import SamplingHandoffs
from collafuse.core.recipe import guided_output
from collafuse.core.sampling import eta_of, level_grid, sample_levels
from collafuse.roles.client import Client


def _shapes(model: torch.nn.Module) -> tuple:
    """Every weight's name and shape: fixed once a model is built (loading weights keeps them), so kept per model."""
    if model not in _SHAPES:
        _SHAPES[model] = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return _SHAPES[model]


_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sampling_key(client: Client) -> tuple:
    """Clients with equal keys can evaluate their networks together: one architecture below one cut.

    The EMA (sampling) weights are a copy of the model, so the model's shapes are theirs too."""
    shapes = _shapes(client.model)
    cond = None if client.condition is None else (client.condition.dtype, tuple(client.condition.shape[1:]))
    return (shapes, cond, tuple(client.images.shape[1:]), client.t_c, client.objective, str(client.device))


def cohort_key(client: Client, steps: int) -> tuple | None:
    """Clients with equal keys train together; None: the client has nothing to train."""
    if client.t_c == 0 or steps == 0:
        return None
    # Everything a step's arithmetic depends on besides the weights, the data and the random stream.
    return (*sampling_key(client), client.batch_size, client.lr, client.lr_schedule, client.label_dropout,
            client.steps_done, client.ema.decay, client.ema.updates, steps)


class _Batchable(TorchFunctionMode):
    """Two ops of diffusers' UNet, as vmap can batch them, and fast.

    group_norm: every client's GroupNorm at once is one GroupNorm of N x groups over the clients' channels side
    by side, each client's affine weights in its own channels (_stacked_group_norm). vmap's own rule instead
    moves the clients in front of the batch (a copy), normalises, moves them back (another) and applies each
    client's affine weights as separate multiplies and adds: a smoke cohort's step 0.40-0.43 s against
    0.34-0.38 s (measured; the same losses, the gradients equal but for those that are zero up to rounding).
    Where that does not apply, vmap's rule, with a copy of a transposed input (diffusers' attention passes
    one, which vmap cannot take).
    scaled_dot_product_attention: the CPU kernel has no batching rule (vmap would loop over the clients), so
    it is written out as softmax(q kᵀ · scale) v, the same function.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm:
            call = dict(zip(("input", "num_groups", "weight", "bias", "eps"), args), **kwargs)
            out = _stacked_group_norm(call["input"], call["num_groups"], call.get("weight"), call.get("bias"),
                                      call.get("eps", 1e-5))
            if out is not None:
                return out
            args = (args[0].contiguous(), *args[1:])
        elif func is F.scaled_dot_product_attention and _plain_attention(*args[3:], **kwargs):
            q, k, v = args[:3]
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v
        return func(*args, **kwargs)


def _stacked_group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor | None:
    """F.group_norm of every client at once inside one vmap over stacked clients (weights batched like the input),
    as one native call on the physical tensors; None where that does not apply (it then takes vmap's rule).

    Uses functorch's tensor-level API (torch is pinned); tests/test_cohort.py checks that the path is taken and
    that clients trained together end where they end one by one."""
    if weight is None or bias is None or not all(functorch.is_batchedtensor(v) for v in (x, weight, bias)):
        return None
    level = functorch.maybe_get_level(x)
    if {functorch.maybe_get_level(weight), functorch.maybe_get_level(bias)} != {level}:
        return None
    (x, xd), (w, wd), (b, bd) = ((functorch.get_unwrapped(v), functorch.maybe_get_bdim(v)) for v in (x, weight, bias))
    if any(functorch.is_batchedtensor(v) for v in (x, w, b)):  # vmap inside vmap: leave it to vmap
        return None
    x = x.movedim(xd, 1)  # (batch, clients, channels, ...): the layout the batched convolutions leave
    rows, clients, channels = x.shape[:3]
    out = F.group_norm(x.reshape(rows, clients * channels, *x.shape[3:]), clients * groups,
                       w.movedim(wd, 0).reshape(-1), b.movedim(bd, 0).reshape(-1), eps)
    return functorch._add_batch_dim(out.view(x.shape), 1, level)


def _plain_attention(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> bool:
    return attn_mask is None and not dropout_p and not is_causal and not enable_gqa


def train_together(clients: list[Client], steps: int, on_step: Callable[[], object] | None = None
                   ) -> list[tuple[float, float]]:
    """`steps` steps of every client (all of one cohort_key) at once; each one's (mean loss, seconds share).

    on_step is called after each step (a progress bar).
    """
    if len({cohort_key(c, steps) for c in clients}) != 1 or cohort_key(clients[0], steps) is None:
        raise ValueError("train_together needs clients of one cohort_key with something to train")
    t0 = time.perf_counter()
    first = clients[0]
    names = [k for k, _ in first.model.named_parameters()]
    params, buffers = stack_module_state([c.model for c in clients])
    params = {k: params[k] for k in names}  # stack_module_state's order is not guaranteed to be named_parameters'
    opt = torch.optim.AdamW(list(params.values()))
    opt.param_groups[0].update({k: v for k, v in first.opt.param_groups[0].items() if k != "params"})
    owns = [dict(c.model.named_parameters()) for c in clients]
    for k, p in params.items():
        states = [c.opt.state.get(own[k]) for c, own in zip(clients, owns)]
        if states[0]:
            opt.state[p] = {s: v.clone() if v.dim() == 0 else torch.stack([st[s] for st in states])
                            for s, v in states[0].items()}
    ema = None
    if first.ema.decay:
        ema, _ = stack_module_state([c.ema.model for c in clients])
    skeleton = copy.deepcopy(first.model).to("meta").train()

    def loss_of(p, b, x_t, t, cond, a, x0, eps):
        return first.objective.loss(functional_call(skeleton, (p, b), (x_t, t, cond)), a, x0, eps)

    batched_loss = vmap(loss_of, in_dims=(0, 0, 0, 0, None if first.condition is None else 0, 0, 0, 0))
    losses = torch.zeros(len(clients), dtype=torch.float64, device=first.device)
    updates = first.ema.updates
    for step in range(first.steps_done, first.steps_done + steps):
        draws = [c.draw_batch() for c in clients]
        x_t, t, cond, a, x0, eps = (None if d[0] is None else torch.stack(d) for d in zip(*draws))
        for group in opt.param_groups:
            group["lr"] = first.lr * first.lr_schedule.factor(step)
        opt.zero_grad(set_to_none=True)
        with _Batchable():
            loss = batched_loss(params, buffers, x_t, t, cond, a, x0, eps)
        loss.sum().backward()  # client i's weights get exactly the gradient of client i's loss
        opt.step()
        losses += loss.detach().double()  # read once after the last step, not every step
        if ema is not None:
            d = first.ema.current_decay(updates)
            with torch.no_grad():
                torch._foreach_lerp_([ema[k] for k in params], list(params.values()), 1 - d)  # as EMA.update
            updates += 1
        if on_step is not None:
            on_step()
    _unstack(clients, owns, params, buffers, opt, ema, steps)
    share = (time.perf_counter() - t0) / len(clients)
    return [(loss_sum / steps, share) for loss_sum in losses.tolist()]


@torch.no_grad()
def _unstack(clients: list[Client], owns: list[dict], params: dict, buffers: dict, opt, ema: dict | None,
             steps: int) -> None:
    """Each client's slice back into its own model (owns: its parameters by name), optimiser state and EMA.

    Slices are views (unbind): weights are copied out of them, one fused call a client; optimiser moments stay
    views of the stacked moments, which nothing else holds once the stacked optimiser is gone."""
    names = list(params)
    rows = {k: p.unbind(0) for k, p in params.items()}
    moments = {k: {s: v if v.dim() == 0 else v.unbind(0) for s, v in opt.state[p].items()}
               for k, p in params.items() if p in opt.state}
    buffer_rows = {k: b.unbind(0) for k, b in buffers.items()}
    ema_rows = None if ema is None else {k: ema[k].unbind(0) for k in names}
    for i, (c, own) in enumerate(zip(clients, owns)):
        torch._foreach_copy_([own[k] for k in names], [rows[k][i] for k in names])
        for k, state in moments.items():  # a 0-d state (Adam's step) is shared by all: each gets its own copy
            c.opt.state[own[k]] = {s: v.clone() if torch.is_tensor(v) else v[i] for s, v in state.items()}
        if buffer_rows:
            mine = dict(c.model.named_buffers())
            torch._foreach_copy_([mine[k] for k in buffer_rows], [b[i] for b in buffer_rows.values()])
        if ema_rows is not None:
            mine = dict(c.ema.model.named_parameters())
            torch._foreach_copy_([mine[k] for k in names], [ema_rows[k][i] for k in names])
            if buffer_rows:
                mine = dict(c.ema.model.named_buffers())
                torch._foreach_copy_([mine[k] for k in buffer_rows], [b[i] for b in buffer_rows.values()])
            c.ema.updates += steps
        c.steps_done += steps


def finish_key(client: Client, n: int) -> tuple:
    """Clients with equal keys finish their samples together (n samples each)."""
    return (*sampling_key(client), client.guidance, n)


def stacked_eps_fn(clients: list[Client], conds: list[torch.Tensor | None], rows: list[int], guidance: float = 1.0):
    """Each client's eps_fn (its EMA weights, its conditions, guidance w) over its own consecutive rows of one
    batch, in one vmapped call (all of one sampling_key). Rows are padded to the largest client's count with copies
    of its first row, whose outputs are dropped: every row is computed on its own, so the padding changes no other
    row."""
    if len({sampling_key(c) for c in clients}) != 1:
        raise ValueError("stacked_eps_fn needs clients of one sampling_key")
    first, most = clients[0], max(rows)
    params, buffers = stack_module_state([c.ema.model for c in clients])
    skeleton = copy.deepcopy(first.ema.model).to("meta").eval()
    cond = None if first.condition is None else torch.stack([_pad(c, most) for c in conds])

    def guided(p, b, x, t, c):  # one client's rows, as its own eps_fn computes them
        return guided_output(lambda *args: functional_call(skeleton, (p, b), args), x, t, c, first.null_class,
                             guidance)

    net = vmap(guided, in_dims=(0, 0, 0, 0, None if cond is None else 0))

    @torch.no_grad()
    def fn(x, t):
        with _Batchable():
            out = net(params, buffers, torch.stack([_pad(v, most) for v in x.split(rows)]),
                      torch.stack([_pad(v, most) for v in t.split(rows)]), cond)
        out = torch.cat([o[:n] for o, n in zip(out, rows)])
        return first.objective.client_noise(out, first.schedule, x, t)
    return fn


def _pad(v: torch.Tensor, rows: int) -> torch.Tensor:
    return v if len(v) == rows else torch.cat([v, v[:1].expand(rows - len(v), *v.shape[1:])])


@torch.no_grad()
def finish_together(clients: list[Client], handoffs: list[SamplingHandoffs], steps: int, sampler: str,
                    seeds: list[int]) -> list[torch.Tensor]:
    """Client.finish of every client (all of one finish_key) at once: client i's images from handoffs[i] and seeds[i],
    equal to its own finish up to float rounding (its conditions and noise come from its own stream)."""
    if len({finish_key(c, len(h.handoffs)) for c, h in zip(clients, handoffs)}) != 1:
        raise ValueError("finish_together needs clients of one finish_key")
    first, rows = clients[0], [len(h.handoffs) for h in handoffs]
    streams = [c.sampling_stream(n, seed) for c, n, seed in zip(clients, rows, seeds)]
    eps_fn = stacked_eps_fn(clients, [cond for _, cond in streams], rows, first.guidance)
    x = torch.cat([h.handoffs for h in handoffs]).to(first.device)
    x = sample_levels(eps_fn, x, level_grid(first.t_c, 0, steps), first.schedule, eta_of(sampler),
                      [(g, n) for (g, _), n in zip(streams, rows)])
    return list(x.clamp(-1, 1).cpu().split(rows))
