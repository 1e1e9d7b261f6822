"""The in-memory image set every loader returns, and the pixel conversions they share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Single-band PIL modes: a folder made only of these loads as greyscale by default.
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# High-bit-depth modes (e.g. 16-bit MRI slices): scaled per image to the full 8-bit range.
DEEP_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class ImageSet:
    """Images in [-1, 1] with their class ids, optional attributes and optional natural group ids."""

    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64; all -1 when the set has no classes
    class_names: list[str]
    name: str
    attributes: torch.Tensor | None = None  # (N, A) float32 0/1
    attribute_names: list[str] | None = None
    groups: torch.Tensor | None = None  # (N,) int64 natural ids (patient, site, ...)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabelled set)."""
        return len(self.class_names)

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        """The records at `idx`, with their labels, attributes and groups."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]
        return ImageSet(self.images[idx], self.labels[idx], list(self.class_names), self.name,
                        pick(self.attributes), self.attribute_names, pick(self.groups))


def subsample(n: int, max_records: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded random subset of range(n) of size max_records (all when None)."""
    if max_records is None or max_records >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_records].sort().values


def from_unit_tensor(x: torch.Tensor, image_size: int | None, channels: int | None) -> torch.Tensor:
    """(N, C, H, W) floats in [0, 1] -> centre-cropped, resized, channel-converted, in [-1, 1]."""
    x = x.float()
    if channels is not None and channels != x.shape[1]:
        x = _convert_channels(x, channels)
    if image_size is not None and x.shape[-2:] != (image_size, image_size):
        h, w = x.shape[-2:]
        s = min(h, w)
        x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        # Antialiased bilinear matches PIL's resize, so tensor and file loaders agree.
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.mul(2).sub_(1).clamp_(-1, 1).contiguous()


def _convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if channels == 3:
        return x.expand(-1, 3, -1, -1)
    # ITU-R 601-2 luma, the weights PIL uses for RGB -> L.
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def read_image(path: Path, image_size: int | None) -> np.ndarray:
    """Decode one file to an (H, W, C) uint8 array, C = 1 for single-band images else 3."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} is missing: restore it or drop it from the listing that names it")
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_array(img, image_size)
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for truncated or foreign files
        raise ValueError(f"cannot read image {path}: {e}; remove or replace the file") from e


def pil_to_array(img: Image.Image, image_size: int | None) -> np.ndarray:
    """PIL image -> (H, W, C) uint8, centre-cropped to a square and resized when image_size is set."""
    mode = img.mode
    img = img.convert("F" if mode in DEEP_MODES else "L" if mode in GREY_MODES else "RGB")
    if image_size is not None and img.size != (image_size, image_size):
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    a = np.asarray(img)
    if mode in DEEP_MODES:
        lo, hi = float(a.min()), float(a.max())
        a = np.round((a - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
    return a[..., None] if a.ndim == 2 else a


def stack_arrays(arrays: list[np.ndarray], paths: list, channels: int | None) -> torch.Tensor:
    """(H, W, C) uint8 arrays of one size -> (N, C, H, W) in [-1, 1]; greyscale by default only if all are."""
    if not arrays:
        raise ValueError("no images to load: the listing (CSV, attribute or split file) selects none")
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape[:2]
        odd = next(p for p, a in zip(paths, arrays) if a.shape[:2] != first)
        raise ValueError(f"images have mixed sizes ({paths[0]} is {first[1]}x{first[0]}, {odd} is not; "
                         f"{len(sizes)} sizes in all): pass image_size to resize them to one square size")
    native = max(a.shape[2] for a in arrays)
    x = torch.from_numpy(np.stack([np.repeat(a, 3, 2) if a.shape[2] < native else a for a in arrays]))
    x = x.permute(0, 3, 1, 2).contiguous().float().div_(255)  # (N, C, H, W)
    return from_unit_tensor(x, None, channels or native)
