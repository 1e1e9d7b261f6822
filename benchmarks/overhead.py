"""Orchestration overhead: a CollaFuse training step against a plain diffusers training step.

Same UNet, batch and optimizer; the plain step is the diffusers recipe (DDPMScheduler.add_noise,
MSE on the noise, AdamW). The ratio must stay <= 1.10 for both roles.

    .venv/bin/python benchmarks/overhead.py [--steps 40] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from collafuse.roles.client import Client
from collafuse.roles.noise import new_secret
from collafuse.roles.policy import ReleaseLedger
from collafuse.config import load_config
from collafuse.core.models import Denoiser
from collafuse.core.schedule import NoiseSchedule
from collafuse.roles.server import Server


def plain_steps(model: Denoiser, images: torch.Tensor, steps: int, batch: int, levels: tuple[int, int],
                label: torch.Tensor | None) -> float:
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        t = torch.randint(*levels, (batch,), generator=g)
        noise = torch.randn((batch, *images.shape[1:]), generator=g)
        x_t = sched.add_noise(images[idx], noise, t - 1)  # diffusers counts levels from 0
        loss = F.mse_loss(model.unet(x_t, t, class_labels=label).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    fn(steps)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config("default")
    schedule = NoiseSchedule(cfg.schedule.T)
    t_c = schedule.cut_level(cfg.cut)
    images = torch.rand(800, 1, 16, 16) * 2 - 1
    client = Client(0, images, torch.zeros(800, dtype=torch.long), schedule=schedule, cut_level=t_c,
                    model=cfg.client.model, batch_size=cfg.client.batch_size,
                    secret=new_secret(), ledger=ReleaseLedger(None))
    server = Server(schedule=schedule, cut_level=t_c, client_ids=[0], image_shape=(1, 16, 16),
                    model=cfg.server.model, batch_size=cfg.server.batch_size)
    for msg in client.make_handoffs([0], 800):
        server.ingest(msg)
    rows = []
    for role, obj, batch, levels, label in (
            ("client", client, cfg.client.batch_size, (1, t_c + 1), None),
            ("server", server, cfg.server.batch_size, (t_c + 1, schedule.T + 1),
             torch.zeros(cfg.server.batch_size, dtype=torch.long))):
        obj.train(3)  # warm-up
        plain_steps(obj.model, images, 3, batch, levels, label)
        ours = min(timed(obj.train, args.steps) for _ in range(2))
        plain = min(plain_steps(obj.model, images, args.steps, batch, levels, label) for _ in range(2))
        rows.append((role, obj.model.num_parameters(), batch, ours, plain, ours / plain))
    print(f"threads: {torch.get_num_threads()}, steps: {args.steps}")
    print("| role | params | batch | CollaFuse step (s) | plain diffusers step (s) | ratio |")
    print("|---|---|---|---|---|---|")
    for role, params, batch, ours, plain, ratio in rows:
        print(f"| {role} | {params:,} | {batch} | {ours:.4f} | {plain:.4f} | {ratio:.3f} |")
    worst = max(r[-1] for r in rows)
    print(f"worst ratio {worst:.3f} ({'within' if worst <= 1.10 else 'OVER'} the 1.10 budget)")


if __name__ == "__main__":
    main()
