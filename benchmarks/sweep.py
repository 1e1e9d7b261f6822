"""The full CollaFuse sweep on MNIST digits (5 non-IID clients): CollaFuse at every cut plus the baselines.

    .venv/bin/python benchmarks/sweep.py                              # the README table (~55 min, 2 cores)
    .venv/bin/python benchmarks/sweep.py --cuts 0.2,1 --rounds 1 --baselines ""   # a quick check (~3 min)
    .venv/bin/python benchmarks/sweep.py --resume                     # continue an interrupted sweep

The `default` preset (mnist at 16 px, 5 clients, Dirichlet alpha 0.5), with --rounds rounds so that
the 6 cuts, `fresh` at c = 0.2 and FedAvg fit in an hour on 2 CPU cores. Writes <out>/report/report.md
and prints its summary table and the wall time of every run.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from collafuse.config import load_config
from collafuse.measure.sweep import parse_baselines, parse_cuts, sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuts", default="0,0.2,0.4,0.6,0.8,1")
    p.add_argument("--baselines", default="fresh,fedavg")
    p.add_argument("--rounds", type=int, default=4, help="training rounds per run (default preset: 6)")
    p.add_argument("--set", dest="set_", action="append", default=[], help="extra overrides, key=value")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark-sweep"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    # cut=0.2: the paper's cut, where the `fresh` baseline runs (the sweep sets every other cut itself).
    cfg = load_config("default", ["cut=0.2", f"rounds={a.rounds}", *a.set_])
    t0 = time.perf_counter()
    folders = sweep(cfg, parse_cuts(a.cuts), parse_baselines(a.baselines), a.out, resume=a.resume)
    total = time.perf_counter() - t0
    report = (a.out / "report" / "report.md").read_text()
    print(report.split("## Summary\n", 1)[1].split("## KID per client", 1)[0])
    for f in folders:
        m = json.loads((f / "metrics.json").read_text())
        print(f"{f.name}: {m['wall_seconds']:.0f} s")
    print(f"sweep wall time {total:.0f} s on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; report: {a.out / 'report' / 'report.md'}")


if __name__ == "__main__":
    main()
