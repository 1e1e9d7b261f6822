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
    print(f"\nthreads {torch.get_num_threads()}, wall {wall:.0f} s, c = {m['cut']} (t_c = {m['cut_level']}), "
          f"bytes up {m['bytes_up']:,}, down {m['bytes_down']:,}, server train {m['server']['train_seconds']:.0f} s")
    print("| client | train / test records | own classes | FID (domain) | KID | own-class share | client train s |")
    print("|---|---|---|---|---|---|---|")
    for cid, c in m["clients"].items():
        print(f"| {cid} | {c['n_train']} / {c['n_test']} | {c['classes']} | {c['fid']:.2f} | {c['kid_mean']:.4f} "
              f"| {c['own_class_share']:.2f} | {c['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
