"""Denoisers: a diffusers UNet2DModel sized per role, with optional label embeddings."""
from __future__ import annotations

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


def device_auto() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Denoiser(nn.Module):
    """Noise predictor net(x_t, level, label) for one role; `label` is a client id or a class."""

    def __init__(self, cfg: ModelConfig, image_size: int, channels: int, num_labels: int | None = None):
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
        self.num_labels = num_labels
        self.unet = UNet2DModel(
            sample_size=image_size, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
            down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=cfg.norm_groups,
            attention_head_dim=min(cfg.channels[-1], 32), num_class_embeds=num_labels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, class_labels=label if self.num_labels else None).sample

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
