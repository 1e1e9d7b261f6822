"""Training-step time of each dataset preset's server and client model at 32 and 64 px, as a markdown table.

    .venv/bin/python benchmarks/step_time.py                      # every dataset preset, 32 and 64 px
    .venv/bin/python benchmarks/step_time.py --presets celeba-64 --sizes 64 --steps 5

One step = forward, backward and AdamW update on random images of the preset's batch size, with the
preset's conditioning (server: client id; client: class ids or attribute vectors). No data is read.
A first step slower than SLOW_STEP seconds is the measurement itself (its warm-up share is small);
models that match in every size field are timed once and their row repeated.
FLOPs are torch's FlopCounterMode model FLOPs (collafuse/cost.py), the same on every device, counted
on one image and multiplied by the batch (every layer works per image).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from collafuse.config import Config, load_config, presets
from collafuse.measure.cost import train_step_flops
from collafuse.core.models import Denoiser, ModelConfig, device_auto

# What each client model conditions on, per data set: the class count or the attribute-vector length.
CLASSES = {"cifar10": 10, "awa2": 50, "imagefolder": 2}
ATTRIBUTES = {"celeba": 40, "awa2": 85}
SLOW_STEP = 10.0  # seconds


def dataset_presets() -> list[str]:
    """The shipped presets that name a real data set (not the digit demos)."""
    return [p for p in presets() if load_config(p).data.name not in ("mnist", "digits")]


def role_models(cfg: Config) -> list[tuple[str, ModelConfig, int, dict]]:
    """(role, model config, batch size, conditioning) for the server and the client of a preset."""
    server_cond = {"num_labels": cfg.data.clients} if cfg.server.client_cond else {}
    kind, name = cfg.client.condition, cfg.data.name
    client_cond = ({"num_labels": CLASSES[name]} if kind == "class" else
                   {"vector_dim": ATTRIBUTES[name]} if kind == "attributes" else {})
    return [("server", cfg.server.model, cfg.server.batch_size, server_cond),
            ("client", cfg.client.model, cfg.client.batch_size, client_cond)]


def time_steps(model: Denoiser, batch: int, size: int, channels: int, T: int, device: torch.device,
               steps: int, warmup: int) -> tuple[float, int]:
    """Mean seconds per training step after `warmup` steps, and the FLOPs of one step."""
    step, _ = _step(model, batch, size, channels, T, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    if first < SLOW_STEP:
        for _ in range(warmup - 1):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        first = (time.perf_counter() - t0) / steps
    _, one_image = _step(model, 1, size, channels, T, device)
    return first, batch * train_step_flops(model, one_image)


def _step(model: Denoiser, batch: int, size: int, channels: int, T: int, device: torch.device):
    """A training-step closure on seeded random inputs, and its loss function."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device)  # (B, C, H, W)
    eps = torch.randn(x.shape, generator=g).to(device)
    t = torch.randint(1, T + 1, (batch,), generator=g).to(device)
    cond = None
    if model.num_labels:
        cond = torch.randint(model.num_labels, (batch,), generator=g).to(device)
    elif model.vector_dim:
        cond = torch.randint(2, (batch, model.vector_dim), generator=g).float().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = lambda: F.mse_loss(model(x, t, cond), eps)  # noqa: E731

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, loss_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=None, help="comma-separated preset names (default: every dataset preset)")
    ap.add_argument("--sizes", default="32,64", help="image sizes in px, comma-separated")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least one always runs)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else device_auto()
    names = args.presets.split(",") if args.presets else dataset_presets()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"Device: {where}; torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up.\n")
    print("| preset | px | role | channels | attention | params (M) | batch | GFLOP/step | s/step | img/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    timed: dict[tuple, tuple[float, int]] = {}
    for name in names:
        cfg = load_config(name)
        for size in (int(s) for s in args.sizes.split(",")):
            for role, model_cfg, batch, cond in role_models(cfg):
                torch.manual_seed(0)  # UNet2DModel draws its initial weights from the global RNG
                model = Denoiser(model_cfg, size, cfg.data.channels, **cond).to(device)
                key = (tuple(model_cfg.channels), model_cfg.attention, model_cfg.layers_per_block, size,
                       cfg.data.channels, batch, role)
                if key not in timed:
                    timed[key] = time_steps(model, batch, size, cfg.data.channels, cfg.schedule.T, device,
                                            args.steps, args.warmup)
                seconds, flops = timed[key]
                native = "" if size == cfg.data.image_size else " (not native)"
                print(f"| {name} | {size}{native} | {role} | {list(model_cfg.channels)} | "
                      f"{'yes' if model_cfg.attention else 'no'} | {model.num_parameters() / 1e6:.2f} | {batch} | "
                      f"{flops / 1e9:.1f} | {seconds:.3f} | {batch / seconds:.0f} |", flush=True)
                del model


if __name__ == "__main__":
    main()
