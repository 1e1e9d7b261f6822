"""Noise schedules, forward noising, the cut and the server's re-noising from a handoff."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def per_record(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One coefficient per record (B,) shaped to broadcast over a batch like `like` (B, C, H, W)."""
    return values.to(dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """Signal fractions ᾱ(t) for levels t = 0..T, with ᾱ(0) = 1 (the clean image)."""

    def __init__(self, T: int = 1000, kind: str = "linear"):
        if not isinstance(T, int) or T < 2:
            raise ValueError(f"schedule.T must be an integer >= 2, got {T!r}: a chain needs at least two levels")
        if kind not in SCHEDULES:
            raise ValueError(f"schedule.kind {kind!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        self.T, self.kind = T, kind
        if kind == "linear":
            # DDPM's 1e-4..0.02 range is tuned for T=1000; rescale it so ᾱ(T) stays ~4e-5 (T=1000) to ~2e-5 (T=100).
            scale = 1000.0 / T
            betas = torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64).clamp(max=0.999)
            alpha_bar = torch.cumprod(1.0 - betas, 0)
        else:
            # Nichol & Dhariwal (2021), cosine ᾱ with offset s = 0.008, betas capped at 0.999.
            s = 0.008
            f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - f(t) / f(t - 1), 0.999) for t in range(1, T + 1)], dtype=torch.float64)
            alpha_bar = torch.cumprod(1.0 - betas, 0)
        # Index by level: alpha_bar[t] for t in 0..T.
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar])

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.T}, kind={self.kind!r})"

    def cut_level(self, c: float) -> int:
        """t_c = round(c·T): the client runs levels 1..t_c, the server t_c+1..T."""
        if not (isinstance(c, (int, float)) and 0.0 <= float(c) <= 1.0):
            raise ValueError(f"cut ratio c must be in [0, 1] (0 = centralised, 1 = local-only), got {c!r}")
        return int(round(float(c) * self.T))

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Forward noising q(x_t | x_0): sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·eps, one level per record."""
        ab = self.alpha_bar[t.cpu()]
        return per_record(ab.sqrt(), x0) * x0 + per_record((1 - ab).sqrt(), x0) * eps

    def server_alpha_bar(self, t_c: int, t: torch.Tensor) -> torch.Tensor:
        """ᾱ'(t) = ᾱ(t)/ᾱ(t_c): the signal fraction of the handoff y left in x_t on the server's own process."""
        return self.alpha_bar[t.cpu()] / self.alpha_bar[t_c]

    def renoise(self, y: torch.Tensor, t_c: int, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Server-side noising of a handoff y = x_{t_c} to level t > t_c with ᾱ'(t) = ᾱ(t)/ᾱ(t_c).

        Gives x_t exactly the marginal q(x_t | x_0) of the full chain without x_0 or the client's noise.
        """
        ab = self.server_alpha_bar(t_c, t)
        return per_record(ab.sqrt(), y) * y + per_record((1 - ab).sqrt(), y) * eps

    def server_eps_scale(self, t_c: int, t: torch.Tensor) -> torch.Tensor:
        """sqrt((1-ᾱ(t)) / (1-ᾱ'(t))): turns the server's re-noising noise e' into full-chain noise.

        Both E[e'|x_t]/sqrt(1-ᾱ') and E[eps|x_t]/sqrt(1-ᾱ) equal minus the score of x_t, so a server
        network trained to predict e' gives the full-chain prediction after this scale.
        """
        return ((1 - self.alpha_bar[t.cpu()]) / (1 - self.server_alpha_bar(t_c, t))).sqrt()
