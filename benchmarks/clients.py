"""Simulated clients one by one against together (roles/cohort.py), as a markdown table.

    .venv/bin/python benchmarks/clients.py                       # 10 and 100 clients
    .venv/bin/python benchmarks/clients.py --clients 10 100 --steps 10

The smoke preset (8x8 digits, 42 k-parameter client UNets, batch 32) split over N clients of all 1,797
records; each client takes `steps` training steps, as in one round. Each (N, mode) runs in a fresh process
(peak RSS is a process's high-water mark), after one warm-up step per client. The losses of the two modes
are compared in a third process that runs both.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from collafuse.config import load_config
from collafuse.federation.inprocess import build
from collafuse.roles.cohort import train_together


def federation(n: int):
    return build(load_config("smoke", [f"data.clients={n}", "data.max_records=1797"]))


def one_by_one(clients, steps: int) -> list[float]:
    return [c.train(steps) for c in clients]


def together(clients, steps: int) -> list[float]:
    return [loss for loss, _ in train_together(clients, steps)]


def measure(n: int, steps: int, mode: str) -> dict:
    """Wall seconds of `steps` steps of n clients in one mode, and the process's peak RSS."""
    train = together if mode == "together" else one_by_one
    fed = federation(n)
    train(fed.clients, 1)  # warm-up: first-call allocations and lazy imports
    t0 = time.perf_counter()
    train(fed.clients, steps)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def agreement(n: int, steps: int) -> float:
    """The largest relative difference between a client's mean loss one by one and together."""
    a, b = federation(n), federation(n)
    return max(abs(x - y) / x for x, y in zip(one_by_one(a.clients, steps), together(b.clients, steps)))


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--child", nargs=3, metavar=("N", "STEPS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        n, steps, mode = int(args.child[0]), int(args.child[1]), args.child[2]
        print(json.dumps(measure(n, steps, mode) if mode != "agreement" else {"max_rel": agreement(n, steps)}))
        return
    print(f"torch threads {torch.get_num_threads()}; {args.steps} steps per client\n")
    print("| clients | one by one (s) | together (s) | speed-up | peak RSS one by one (MB) | peak RSS together (MB) "
          "| max rel. loss difference |")
    print("|---|---|---|---|---|---|---|")
    for n in args.clients:
        alone, both = (child([str(n), str(args.steps), m]) for m in ("one-by-one", "together"))
        diff = child([str(n), str(args.steps), "agreement"])["max_rel"]
        print(f"| {n} | {alone['seconds']:.1f} | {both['seconds']:.1f} | {alone['seconds'] / both['seconds']:.1f}x "
              f"| {alone['peak_rss_mb']:.0f} | {both['peak_rss_mb']:.0f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
