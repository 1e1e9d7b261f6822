"""A role's training recipe: what its network predicts, how its loss weighs each level, its lr over the run.

Each side trains on its own diffusion process x_t = sqrt(a)·x0 + sqrt(1-a)·e. The client's is the chain
itself (a = ᾱ(t), x0 its images); the server's starts at the handoff (a = ᾱ'(t) = ᾱ(t)/ᾱ(t_c), x0 = y,
e = its re-noising noise e'). Both sides turn the network's output back into e for sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from collafuse.core.schedule import NoiseSchedule, per_record

PREDICTIONS = ("epsilon", "v")
LOSS_WEIGHTINGS = ("uniform", "min-snr")
LR_DECAYS = ("constant", "cosine")


def check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    """ValueError naming the key and the choices when value is not one of them."""
    if value not in choices:
        raise ValueError(f"{key} {value!r} is unknown; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class Objective:
    """Prediction target (ε, or v of Salimans & Ho 2022) and per-level weight (uniform, or min-SNR-γ)."""

    prediction: str = "epsilon"
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0

    def __post_init__(self):
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        gamma = self.min_snr_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ValueError(f"min_snr_gamma must be a number > 0, got {gamma!r}")

    def target(self, a: torch.Tensor, x0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """What the network should output at x_t = sqrt(a)·x0 + sqrt(1-a)·e; a (B,) per record."""
        if self.prediction == "epsilon":
            return e
        return per_record(a.sqrt(), x0) * e - per_record((1 - a).sqrt(), x0) * x0

    def weight(self, a: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ (Hang et al. 2023) on this side's SNR = a/(1-a): min(SNR, γ)/SNR for ε, /(SNR+1) for v."""
        snr = a / (1 - a)
        return snr.clamp(max=self.min_snr_gamma) / (snr if self.prediction == "epsilon" else snr + 1)

    def loss(self, out: torch.Tensor, a: torch.Tensor, x0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The batch loss of the network's output `out` for records (x0, e) noised with signal fractions a."""
        target = self.target(a, x0, e).to(out.device)
        if self.loss_weighting == "uniform":
            return F.mse_loss(out, target)  # the plain DDPM loss, bit for bit
        return (self.weight(a).to(out) * (out - target).pow(2).flatten(1).mean(1)).mean()

    def predicted_noise(self, out: torch.Tensor, a: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """This side's noise e predicted at x_t from the network's output (e = sqrt(a)·v + sqrt(1-a)·x_t for v)."""
        if self.prediction == "epsilon":
            return out
        return per_record(a.sqrt(), x_t) * out + per_record((1 - a).sqrt(), x_t) * x_t

    def client_noise(self, out: torch.Tensor, schedule: NoiseSchedule, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """The chain's noise ε at x_t (levels t <= t_c) from a client network's output: its process is the chain."""
        return self.predicted_noise(out, schedule.alpha_bar[t.cpu()], x_t)

    def server_noise(self, out: torch.Tensor, schedule: NoiseSchedule, t_c: int, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """The full chain's noise ε at x_t (levels t > t_c) from the server network's output: its own e', rescaled."""
        e = self.predicted_noise(out, schedule.server_alpha_bar(t_c, t), x_t)
        return per_record(schedule.server_eps_scale(t_c, t), x_t) * e


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate factor per optimiser step: linear warm-up, then constant or cosine decay to 0 at total_steps.

    A pure function of the role's step count, which its state already holds: a resumed run goes on exactly.
    """

    warmup_steps: int = 0
    decay: str = "constant"
    total_steps: int = 1

    def __post_init__(self):
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"lr_warmup_steps must be an integer >= 0, got {w!r}")
        check_choice("lr_decay", self.decay, LR_DECAYS)
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"an lr schedule needs total_steps >= 1, got {self.total_steps!r}")

    def factor(self, step: int) -> float:
        """The multiple of the base lr for optimiser step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        done = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def guided_output(net, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, null_label: int | None,
                  guidance: float) -> torch.Tensor:
    """net(x, t, label), or with classifier-free guidance w != 1 uncond + w·(cond - uncond), in one call of twice
    the rows; the mix carries over to the noise because each side's noise is affine in the output."""
    if guidance == 1:
        return net(x, t, label)
    cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]),
                       torch.cat([label, torch.full_like(label, null_label)])).chunk(2)
    return uncond + guidance * (cond - uncond)
