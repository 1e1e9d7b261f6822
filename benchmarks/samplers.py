"""Split sampling on a trained run: sampler and step counts per side against quality and network calls.

    .venv/bin/python benchmarks/samplers.py --run runs/benchmark-sweep/seed-0/cut-0.40 --n 64
    .venv/bin/python benchmarks/samplers.py --run runs/default --threads 2     # the README demo's nets

Every setting samples the same clients from the same checkpoint with the same seeds (the run's own
sampling seeds) and measures each client's samples on its held-out images, with the run's evaluator
(FID/KID on the domain features, own-class share). Network calls = server levels + client levels.
"ddpm-full" is the ancestral chain over every level (T calls): the reference the fast samplers are
judged against. A setting is SAMPLER-SERVER+CLIENT steps, or SERVER/CLIENT samplers for one per side
("ddim/ddpm-40+200": DDIM above the cut, DDPM below it, as sampling.sampler / sampling.client_sampler).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from collafuse.config import load_config
from collafuse.federation.engine import sampling_seed
from collafuse.federation.inprocess import build, load_checkpoint
from collafuse.measure.evaluate import client_evaluations

SETTINGS = ("ddpm-full", "ddpm-100+200", "ddpm-50+100", "ddpm-25+25", "ddim/ddpm-40+200", "ddim-40+10",
            "ddim-25+25")


def parse(setting: str, cut_level: int, T: int) -> tuple[str, str, int, int]:
    """(server sampler, client sampler, server steps, client steps) of a setting name."""
    samplers, steps = setting.split("-")
    sampler, _, client_sampler = samplers.partition("/")
    if steps == "full":
        return sampler, client_sampler or sampler, T - cut_level, cut_level
    server, client = steps.split("+")
    return sampler, client_sampler or sampler, int(server), int(client)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a trained run folder (with checkpoint/)")
    p.add_argument("--n", type=int, default=64, help="samples per client")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1,
                   help="sample each setting this many times with other seeds (the first: the run's own) and "
                        "average: per-client KID at 64 samples moves by ~0.04 from draw to draw")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(str(a.run / "config.json"))
    fed = build(cfg, device=torch.device("cpu"))
    load_checkpoint(fed, a.run)
    evaluations = client_evaluations(fed)
    rows = []
    for setting in a.settings.split(","):
        sampler, client_sampler, server_steps, client_steps = parse(setting, fed.cut_level, cfg.schedule.T)
        t0, draws = time.perf_counter(), []
        for r in range(a.repeats):
            seed = {c.id: sampling_seed(cfg, c.id) + 7919 * r for c in fed.clients}
            # The server's levels for every client in one batch (as the round engine samples), then each client's.
            reqs = [c.sampling_request(a.n, server_steps, sampler, seed=seed[c.id]) for c in fed.clients]
            draws.append({c.id: evaluations[c.id].measure(c.finish(handoffs, client_steps, client_sampler,
                                                                   seed[c.id] + 1))
                          for c, handoffs in zip(fed.clients, fed.server.sample_to_cut_many(reqs))})
        calls = min(server_steps, cfg.schedule.T - fed.cut_level) + min(client_steps, fed.cut_level)
        mean = lambda key, per_client: statistics.mean(m[key] for m in per_client.values())  # noqa: E731
        kid_draws = [mean("kid_mean", d) for d in draws]
        row = {"setting": setting, "calls": calls, "kid_mean": statistics.mean(kid_draws), "kid_draws": kid_draws,
               "kids": [statistics.mean(d[c.id]["kid_mean"] for d in draws) for c in fed.clients],
               "fid_mean": statistics.mean(mean("fid", d) for d in draws),
               "own_class_share_min": min(statistics.mean(d[c.id].get("own_class_share", float("nan")) for d in draws)
                                          for c in fed.clients),
               "seconds": (time.perf_counter() - t0) / a.repeats}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = next((r for r in rows if r["setting"] == "ddpm-full"), None)
    print(f"{a.run}: c = {cfg.cut}, {a.n} samples per client, {len(fed.clients)} clients, "
          f"{a.repeats} draw{'s' if a.repeats > 1 else ''} each (seconds: one draw)")
    print("| setting | network calls | mean KID | vs ddpm-full | mean FID | lowest own-class share | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rel = "" if ref is None else f"{(r['kid_mean'] / ref['kid_mean'] - 1) * 100:+.0f}%"
        print(f"| {r['setting']} | {r['calls']} | {r['kid_mean']:.3f} | {rel} | {r['fid_mean']:.2f} | "
              f"{r['own_class_share_min']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
