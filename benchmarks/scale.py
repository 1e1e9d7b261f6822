"""Server memory and checkpoint time against the number of handoffs it holds, and whole runs against the
number of clients, as markdown tables.

    .venv/bin/python benchmarks/scale.py                                  # 5 k and 50 k handoffs
    .venv/bin/python benchmarks/scale.py --sizes 5000 50000 500000
    .venv/bin/python benchmarks/scale.py --sizes --clients 10 100 1000    # whole in-process runs

Clients: `collafuse run -c smoke` over the 5,000 MNIST digits at 8 px, IID (5 records a client at 1,000; a
30% held-out share so that each keeps >= 2 for FID/KID), clients trained together (batch_clients), each
count in a fresh process, 2 torch threads. Peak RSS is the whole process: server and every client.

Each size runs in a fresh process, since peak RSS is a process's high-water mark: a server with the
smoke preset's model and its store in a run folder ingests N synthetic handoffs of 1x16x16 in
messages of handoff.batch (512), is checkpointed as the round engine does it (swap_in, then prune)
three times, then trains a few steps. Peak RSS is getrusage's ru_maxrss, read after the checkpoints
and again after training: the kernel counts the shard pages a batch maps (page cache, which it can
drop at any time) into RSS, so the second one grows with the steps, not with the store; anonymous RSS
(/proc/self/status RssAnon, after training) is the process's own memory.

The synthetic handoffs are drawn into one buffer, refilled per message: a fresh 512 KB tensor per
message leaves holes in glibc's heap (freed and reusable, given back by malloc_trim) that grow with
the number of messages, which would measure the allocator rather than the store.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from collafuse.config import load_config
from collafuse.core.protocol import HandoffBatch
from collafuse.core.schedule import NoiseSchedule
from collafuse.core.state import save_state, swap_in
from collafuse.federation.engine import CHECKPOINT, HANDOFFS
from collafuse.roles.server import Server

SHAPE = (1, 16, 16)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def anon_rss_mb() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def measure(n: int, steps: int, store_dtype: str, run: Path) -> dict:
    """One server holding n handoffs: ingest, index, checkpoint and training times, and peak RSS."""
    torch.set_num_threads(1)
    cfg = load_config("smoke", [f"server.store_dtype={store_dtype}"])
    server = Server.from_config(cfg, schedule=NoiseSchedule(cfg.schedule.T, cfg.schedule.kind), image_shape=SHAPE,
                                device=torch.device("cpu"))
    server.keep_handoffs_in(run / HANDOFFS)
    gen, batch, clients = torch.Generator().manual_seed(0), cfg.handoff.batch, cfg.data.clients
    drawn = torch.empty((batch, *SHAPE))
    t0 = time.perf_counter()
    for m, first in enumerate(range(0, n, batch)):  # message m: client m % clients, its next records
        own, size = m // clients * batch, min(batch, n - first)
        ids = torch.arange(own, own + size)
        server.ingest(HandoffBatch(client_id=m % clients, level=server.t_c, record_ids=ids, views=torch.zeros_like(ids),
                                   handoffs=drawn[:size].normal_(generator=gen)))
    ingest = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert server.num_handoffs() == n  # the live index, rebuilt once a round after the ingests
    index = time.perf_counter() - t0

    def write(folder: Path) -> None:
        save_state(folder / "server", *server.state())

    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        swap_in(run, CHECKPOINT, write)
        server.store.prune()
        seconds.append(time.perf_counter() - t0)
    rss_checkpoint = peak_rss_mb()
    server.train(1)  # warm-up
    t0 = time.perf_counter()
    server.train(steps)
    step = (time.perf_counter() - t0) / steps
    return {"n": n, "ingest_s": ingest, "index_s": index, "checkpoint_s": statistics.median(seconds),
            "checkpoint_mb": folder_mb(run / CHECKPOINT), "store_mb": folder_mb(run / HANDOFFS),
            "rss_checkpoint_mb": rss_checkpoint, "step_s": step, "rss_train_mb": peak_rss_mb(),
            "anon_mb": anon_rss_mb()}


CLIENT_RUN = ["data.name=mnist", "data.image_size=8", "data.max_records=5000", "data.partition=iid",
              "data.test_fraction=0.3", "batch_clients=true"]


def measure_clients(n: int, run: Path) -> dict:
    """A whole smoke run (training, sampling, every measurement) with n clients: per-round and total times."""
    from collafuse.federation.inprocess import run as run_federation
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    metrics, _ = run_federation(load_config("smoke", [*CLIENT_RUN, f"data.clients={n}"]), run, progress=False)
    wall = time.perf_counter() - t0
    rounds = [e["wall_seconds"] for e in metrics["participation"]["log"]]
    measured = [c for c in metrics["clients"].values() if c.get("kid_mean") is not None]
    return {"clients": n, "round_s": rounds, "checkpoint_s": metrics["checkpoint_seconds"] / len(rounds),
            "after_training_s": wall - sum(rounds), "wall_s": wall, "rss_mb": peak_rss_mb(),
            "store_mb": folder_mb(run / HANDOFFS), "checkpoint_mb": folder_mb(run / CHECKPOINT),
            "sampled": len(metrics["clients"]), "with_kid": len(measured)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[5_000, 50_000])
    ap.add_argument("--clients", type=int, nargs="*", default=[], help="whole in-process runs with this many clients")
    ap.add_argument("--steps", type=int, default=5, help="training steps timed (batch: the smoke server's 32)")
    ap.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure this size in this process
    ap.add_argument("--one-run", type=int, help=argparse.SUPPRESS)  # internal: a run with this many clients
    args = ap.parse_args()
    if args.one is not None or args.one_run is not None:
        with tempfile.TemporaryDirectory() as run:
            r = (measure(args.one, args.steps, args.store_dtype, Path(run)) if args.one is not None
                 else measure_clients(args.one_run, Path(run) / "run"))
            print(json.dumps(r))
        return
    if args.clients:
        print("smoke preset, 8 px MNIST, 2 rounds, clients trained together, 2 threads; peak RSS: the whole process")
        print("| clients | round 1 (s) | round 2 (s) | checkpoint (s/round) | checkpoint (MB) | store (MB) | "
              "sampling + evaluation (s) | whole run (s) | peak RSS (MB) | clients with KID |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.clients:
        out = subprocess.run([sys.executable, __file__, "--one-run", str(n)], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.splitlines()[-1])
        print(f"| {n:,} | {r['round_s'][0]:.1f} | {r['round_s'][-1]:.1f} | {r['checkpoint_s']:.2f} | "
              f"{r['checkpoint_mb']:.1f} | {r['store_mb']:.1f} | {r['after_training_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['rss_mb']:.0f} | {r['with_kid']} of {r['sampled']} |", flush=True)
    if not args.sizes:
        return
    print(f"store {args.store_dtype}, handoffs 1x16x16, smoke server model, 1 thread, {args.steps} steps timed")
    print("| handoffs | store (MB) | ingest (s) | index (s) | checkpoint (s) | checkpoint (MB) | peak RSS after "
          "checkpoints (MB) | train step (s) | peak RSS after training (MB) | anonymous RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--steps", str(args.steps),
                              "--store-dtype", args.store_dtype], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.splitlines()[-1])
        print(f"| {r['n']:,} | {r['store_mb']:.1f} | {r['ingest_s']:.2f} | {r['index_s']:.3f} | "
              f"{r['checkpoint_s']:.3f} | {r['checkpoint_mb']:.2f} | {r['rss_checkpoint_mb']:.0f} | "
              f"{r['step_s']:.4f} | {r['rss_train_mb']:.0f} | {r['anon_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
