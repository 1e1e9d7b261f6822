"""Samplers over any sub-range of levels: DDPM (eta=1) and DDIM (eta=0) behind one signature.

Each sampler moves x from the first level of `levels` to the last, one generalised DDIM step
(Song et al. 2021, eq. 12) per consecutive pair. With eta=1 and unit steps this is exactly the DDPM
ancestral step with the posterior variance; with eta=0 it is deterministic DDIM. Nothing is
clipped: a handoff at level t_c is not an image and must not be bounded to [-1, 1].
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from collafuse.core.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# One random stream, or one per group of consecutive rows: (generator, rows) pairs. With groups, a batch of
# several requests draws each request's rows from its own stream, exactly as if it were sampled alone.
Streams = torch.Generator | list[tuple[torch.Generator, int]] | None
SAMPLERS = {"ddpm": 1.0, "ddim": 0.0}
# Pixels (rows x height x width) one batched no-grad network call may hold: 1,024 images at 16 px, 256 at 32 px.
BATCH_PIXELS = 1 << 18
# ...but one model runs fastest on a CPU in calls of ~2^16 pixels; larger ones spill the caches. Measured on 2 cores,
# no grad: the smoke server (8 px) 75-83 us a row in calls of 1,024 rows against 131-137 us at 4,096; the default
# server (16 px) 0.34-0.42 ms a row at 256 rows against 0.54-0.59 ms at 1,024. A GPU wants the largest calls.
CPU_CALL_PIXELS = 1 << 16


def in_cpu_calls(net: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """net(x, t, cond) in calls of at most CPU_CALL_PIXELS on a CPU (rows are independent: the same function)."""
    def fn(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        rows = max(1, CPU_CALL_PIXELS // (x.shape[-1] * x.shape[-2]))
        if x.device.type != "cpu" or len(x) <= rows:
            return net(x, t, cond)
        conds = [None] * math.ceil(len(x) / rows) if cond is None else cond.split(rows)
        return torch.cat([net(*args) for args in zip(x.split(rows), t.split(rows), conds)])
    return fn


def row_batches(sizes: list[int], image_shape: tuple[int, ...]) -> list[list[int]]:
    """Indices of consecutive items (of `sizes` rows each) grouped to fit BATCH_PIXELS per call; a larger one alone."""
    rows_max = max(1, BATCH_PIXELS // (image_shape[-1] * image_shape[-2]))
    batches, rows = [], rows_max
    for i, n in enumerate(sizes):
        if rows + n > rows_max:
            batches.append([])
            rows = 0
        batches[-1].append(i)
        rows += n
    return batches


def level_grid(start: int, stop: int, steps: int) -> list[int]:
    """Descending integer levels from `start` to `stop` inclusive in at most `steps` even steps."""
    if start < stop:
        raise ValueError(f"a sampling range runs downwards; got start {start} < stop {stop}")
    if start == stop:
        return [start]
    if steps < 1:
        raise ValueError(f"steps must be >= 1 to cover levels {start}..{stop}, got {steps}")
    steps = min(steps, start - stop)
    grid = torch.linspace(start, stop, steps + 1, dtype=torch.float64).round().long().tolist()
    return grid


def eta_of(sampler: str) -> float:
    """The eta of a named sampler ('ddpm' or 'ddim')."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]


def randn(shape: tuple[int, ...], generator: Streams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` on the CPU, from one stream or from one stream per group of rows."""
    if isinstance(generator, list):
        if sum(n for _, n in generator) != shape[0]:
            raise ValueError(f"the streams' groups cover {sum(n for _, n in generator)} rows, the batch has {shape[0]}")
        return torch.cat([torch.randn((n, *shape[1:]), generator=g, dtype=dtype) for g, n in generator])
    return torch.randn(shape, generator=generator, dtype=dtype)


def step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, s: int, eta: float,
         generator: Streams = None) -> torch.Tensor:
    """One generalised DDIM step from level t down to level s < t."""
    ab_t, ab_s = schedule.alpha_bar[t], schedule.alpha_bar[s]
    x0_hat = (x_t - (1 - ab_t).sqrt().item() * eps) / ab_t.sqrt().item()
    var = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    x_s = ab_s.sqrt().item() * x0_hat + (1 - ab_s - var).clamp(min=0).sqrt().item() * eps
    if var > 0:
        # Drawn on the CPU so a seed gives the same stream on any device.
        z = randn(tuple(x_t.shape), generator, x_t.dtype).to(x_t.device)
        x_s = x_s + var.sqrt().item() * z
    return x_s


@torch.no_grad()
def sample_levels(eps_fn: EpsFn, x: torch.Tensor, levels: list[int], schedule: NoiseSchedule,
                  eta: float, generator: Streams = None) -> torch.Tensor:
    """Run the chain from levels[0] to levels[-1] with a full-chain noise predictor eps_fn(x, t)."""
    for t, s in zip(levels[:-1], levels[1:]):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = step(schedule, x, eps_fn(x, t_batch), t, s, eta, generator)
    return x
