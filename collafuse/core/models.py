"""Denoisers: a diffusers UNet2DModel sized per role, with optional label embeddings."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from torch import nn


@dataclass
class ModelConfig:
    """Size of one role's UNet. The client's may be much smaller than the server's."""

    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = True  # self-attention at the lowest resolution
    norm_groups: int = 8  # 8 suits tiny widths; every channel count must divide by it


def optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> torch.Tensor:
    """One optimiser step on `loss` at learning rate `lr`; returns the loss, detached and still on its device.

    Reading it (.item()) would make the host wait for the device every step: callers read a round's losses once.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on `device`; to a GPU from pinned memory without blocking, so the host runs ahead of the device
    (a copy from pageable memory waits for every queued kernel first)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class EMA:
    """Exponential moving average of a model's weights: what the role samples with.

    Warm-up decay min(decay, (1+n)/(10+n)) keeps short runs from sampling with mostly initial weights.
    decay = 0 turns it off: the trained weights themselves are used.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {decay}")
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).requires_grad_(False).eval() if decay else model

    def current_decay(self, updates: int) -> float:
        """The decay of the update after `updates` updates: the warm-up, then self.decay."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if not self.decay:
            return
        d = self.current_decay(self.updates)
        # One fused kernel for all weights on a GPU (one launch per tensor otherwise); the same arithmetic on a CPU.
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - d)
        for ema, b in zip(self.model.buffers(), model.buffers()):
            ema.copy_(b)
        self.updates += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {f"ema/{k}": v for k, v in self.model.state_dict().items()} if self.decay else {}

    def load(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        if self.decay:
            self.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
        self.updates = updates


def device_auto() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Denoiser(nn.Module):
    """Noise predictor net(x_t, level, cond) for one role.

    `cond` is an integer label (a client id on the server, a class on a client) when num_labels is
    set, or a float vector (e.g. CelebA attributes, 0/1) when vector_dim is set.
    """

    def __init__(self, cfg: ModelConfig, image_size: int, channels: int, num_labels: int | None = None,
                 vector_dim: int | None = None, seed: int = 0):
        super().__init__()
        depth = len(cfg.channels)
        if image_size % 2 ** (depth - 1):
            raise ValueError(
                f"image size {image_size} does not halve {depth - 1} times for model channels "
                f"{tuple(cfg.channels)}; use fewer channel levels or an image size divisible by {2 ** (depth - 1)}")
        bad = [c for c in cfg.channels if c % cfg.norm_groups]
        if bad:
            raise ValueError(f"model channels {bad} do not divide by norm_groups={cfg.norm_groups}")
        down = ["DownBlock2D"] * depth
        up = ["UpBlock2D"] * depth
        if cfg.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        if num_labels and vector_dim:
            raise ValueError("a denoiser conditions on labels or on vectors, not both")
        self.num_labels, self.vector_dim = num_labels, vector_dim
        time_dim = cfg.channels[0] * 4  # UNet2DModel's time-embedding width
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's RNG untouched
            torch.manual_seed(seed)
            # A vector is projected to the time-embedding width and added to it ("identity" class embedding).
            self.vector_embed = nn.Linear(vector_dim, time_dim) if vector_dim else None
            self.unet = UNet2DModel(
                sample_size=image_size, in_channels=channels, out_channels=channels,
                block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
                down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=cfg.norm_groups,
                attention_head_dim=min(cfg.channels[-1], 32), num_class_embeds=num_labels,
                class_embed_type="identity" if vector_dim else None)

    @property
    def conditional(self) -> bool:
        return bool(self.num_labels or self.vector_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.vector_embed is not None:
            cond = self.vector_embed(cond.to(x.dtype))
        return self.unet(x, t, class_labels=cond if self.conditional else None).sample

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
