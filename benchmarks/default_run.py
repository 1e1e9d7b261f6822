"""The README demo, measured: wall time and per-client quality of `collafuse run -c default`.

    .venv/bin/python benchmarks/default_run.py [--threads 1] [--out runs/benchmark-default]

Prints a markdown table for benchmarks/README.md and the README.
"""
from __future__ import annotations

import argparse
import shutil
import time

import torch

from collafuse.config import load_config
from collafuse.federation.inprocess import run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/benchmark-default")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shutil.rmtree(args.out, ignore_errors=True)
    start = time.perf_counter()
    m, _ = run(load_config("default", args.overrides), args.out, progress=True)
    wall = time.perf_counter() - start
    cost = m["cost"]["server"]
    print(f"\nthreads {torch.get_num_threads()}, wall {wall:.0f} s, c = {m['cut']} (t_c = {m['cut_level']}), "
          f"bytes up {m['bytes_up']:,}, down {m['bytes_down']:,}, server train {cost['train_seconds']:.0f} s")
    print("| client | train / test records | FID (domain) | KID | KID score (pure noise / real images) "
          "| own-class share (pure noise / real images) | client train s |")
    print("|---|---|---|---|---|---|---|")
    num = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731 (null: too few images to measure)
    for cid, c in m["clients"].items():
        print(f"| {cid} | {c['n_train']} / {c['n_test']} | {num(c['fid'], '.2f')} | {num(c['kid_mean'], '.4f')} "
              f"| {num(c['kid_score'], '.2f')} ({num(c['kid_noise'], '.3f')} / {num(c['kid_ceiling'], '.3f')}) "
              f"| {num(c.get('own_class_share'), '.2f')} ({num(c.get('own_class_share_noise'), '.2f')} / "
              f"{num(c.get('own_class_share_ceiling'), '.2f')}) "
              f"| {c['train_seconds']:.0f} |")

if __name__ == "__main__":
    main()
