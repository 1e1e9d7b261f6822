"""Samplers over any sub-range of levels: DDPM (eta=1) and DDIM (eta=0) behind one signature.

Each sampler moves x from the first level of `levels` to the last, one generalised DDIM step
(Song et al. 2021, eq. 12) per consecutive pair. With eta=1 and unit steps this is exactly the DDPM
ancestral step with the posterior variance; with eta=0 it is deterministic DDIM. Nothing is
clipped: a handoff at level t_c is not an image and must not be bounded to [-1, 1].
"""
from __future__ import annotations

from typing import Callable

import torch

from collafuse.core.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = {"ddpm": 1.0, "ddim": 0.0}


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


def step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, s: int, eta: float,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One generalised DDIM step from level t down to level s < t."""
    ab_t, ab_s = schedule.alpha_bar[t], schedule.alpha_bar[s]
    x0_hat = (x_t - (1 - ab_t).sqrt().item() * eps) / ab_t.sqrt().item()
    var = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    x_s = ab_s.sqrt().item() * x0_hat + (1 - ab_s - var).clamp(min=0).sqrt().item() * eps
    if var > 0:
        # Drawn on the CPU so a seed gives the same stream on any device.
        z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
        x_s = x_s + var.sqrt().item() * z
    return x_s


@torch.no_grad()
def sample_levels(eps_fn: EpsFn, x: torch.Tensor, levels: list[int], schedule: NoiseSchedule,
                  eta: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the chain from levels[0] to levels[-1] with a full-chain noise predictor eps_fn(x, t)."""
    for t, s in zip(levels[:-1], levels[1:]):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = step(schedule, x, eps_fn(x, t_batch), t, s, eta, generator)
    return x
