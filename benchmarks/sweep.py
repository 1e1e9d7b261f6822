"""The CollaFuse sweep on MNIST digits (5 non-IID clients): cuts, fair baselines, 3 seeds, two runs at a time.

    .venv/bin/python benchmarks/sweep.py                              # the README table (54 min, 2 cores)
    .venv/bin/python benchmarks/sweep.py --cuts 0.2,1 --rounds 1 --baselines "" --seeds 0   # a quick check
    .venv/bin/python benchmarks/sweep.py --resume                     # continue an interrupted sweep

The `default` preset (mnist at 16 px, 5 clients, Dirichlet alpha 0.5) with client.steps_per_round = auto
(the client trains c x 60 steps per round: its compute follows its share of the chain), --rounds rounds,
CollaFuse at c = 0, 0.2, 0.4 and 1 (local-only with the client's model), and the baselines local-server
and FedAvg with EMA (budget rules: collafuse/measure/sweep.py; --baselines adds local-4x and
local-server-4x), each with 3 seeds, --jobs runs at a time on one thread each. Writes
<out>/report/report.md and prints its summary table and the wall time of every run.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from collafuse.config import load_config
from collafuse.measure.sweep import parse_baselines, parse_cuts, parse_seeds, sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuts", default="0,0.2,0.4,1")
    p.add_argument("--baselines", default="local-server,fedavg",
                   help="add local-4x,local-server-4x for the 4x budgets (~55 min more on 2 cores)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one per core)")
    p.add_argument("--rounds", type=int, default=3, help="training rounds per run (default preset: 9)")
    p.add_argument("--set", dest="set_", action="append", default=[], help="extra overrides, key=value")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark-sweep"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # cut=0.2: the paper's cut, where `fresh` runs and FedAvg's FLOPs are matched (the sweep sets every other cut).
    cfg = load_config("default", ["cut=0.2", f"rounds={a.rounds}", "client.steps_per_round=auto",
                                  "client.full_chain_steps=60", *a.set_])
    t0 = time.perf_counter()
    folders = sweep(cfg, parse_cuts(a.cuts), parse_baselines(a.baselines), a.out, seeds=parse_seeds(a.seeds),
                    resume=a.resume, jobs=a.jobs, threads=a.threads)
    total = time.perf_counter() - t0
    report = (a.out / "report" / "report.md").read_text()
    print(report.split("## Summary\n", 1)[1].split("## KID per client", 1)[0])
    for f in folders:
        m = json.loads((f / "metrics.json").read_text())
        print(f"{f.parent.name}/{f.name}: {m['wall_seconds']:.0f} s")
    print(f"sweep wall time {total:.0f} s on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; report: {a.out / 'report' / 'report.md'}")


if __name__ == "__main__":
    main()
