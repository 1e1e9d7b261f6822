"""Image files: sample grids as PNG."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GRID_PADDING = 2  # black pixels between and around tiles


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> None:
    """Save (N, C, H, W) images in [-1, 1] (C = 1 or 3) as one PNG grid with nrow tiles per row."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"save_grid needs a non-empty (N, C, H, W) tensor with C = 1 or 3, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = math.ceil(n / nrow)
    p = GRID_PADDING
    grid = torch.zeros(c, p + rows * (h + p), p + nrow * (w + p), dtype=torch.uint8)
    tiles = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, nrow)
        grid[:, p + r * (h + p):p + r * (h + p) + h, p + col * (w + p):p + col * (w + p) + w] = tile
    array = np.ascontiguousarray(grid.permute(1, 2, 0).numpy())  # (H, W, C)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if c == 1 else array, "L" if c == 1 else "RGB").save(path, format="PNG")
