"""Wall time per round and bytes per client per round: in-process vs Flower simulation vs Flower deployment.

    .venv/bin/python benchmarks/flower.py [--config smoke] [--set data.clients=3] [--out runs/bench-flower]

Protocol bytes are the encoded messages (what runner.Wire counts); network bytes are Flower's own count
(`flwr ls`: SuperLink inbound + outbound, TLS payload incl. Flower's framing; simulation reports 0).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from collafuse.config import load_config
from collafuse.federation.flower.local import run_local
from collafuse.federation.inprocess import start


def in_process(cfg, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    engine, fed, _ = start(cfg, out)
    walls = []
    for _ in range(cfg.rounds):
        t0 = time.perf_counter()
        engine.run_round()
        walls.append(time.perf_counter() - t0)
    up = sum(fed.wire.bytes_up.values())
    return {"round_s": walls, "protocol_bytes_per_client_round": up / cfg.data.clients / cfg.rounds,
            "network_bytes_per_client_round": None, "total_s": sum(walls)}


def flower(cfg, preset: str, overrides: list[str], out: Path, simulation: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = run_local(cfg, preset, overrides, out, simulation=simulation, round_timeout=300)
    log = result.metrics["participation"]["log"]
    n, rounds = cfg.data.clients, len(log)
    network = result.run.inbound_bytes + result.run.outbound_bytes
    return {"round_s": [e["wall_seconds"] for e in log],
            "protocol_bytes_per_client_round": log[-1]["bytes_up"] / n / rounds,
            "network_bytes_per_client_round": network / n / (rounds + 1) if network else None,  # + sampling msg
            "sampling_s": result.metrics["flower"]["sampling_seconds"], "total_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smoke")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", type=Path, default=Path("runs/bench-flower"))
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(a.config, a.set)
    rows = {"in-process": in_process(cfg, a.out / "in-process"),
            "simulation": flower(cfg, a.config, a.set, a.out / "simulation", simulation=True),
            "deployment (TLS+auth)": flower(cfg, a.config, a.set, a.out / "deployment", simulation=False)}
    print(f"{a.config} {' '.join(a.set)}: {cfg.data.clients} clients, {cfg.rounds} rounds, up-bytes per client-round")
    print("| engine | round 1 (s) | later rounds (s) | protocol bytes/client/round | network bytes/client/msg | run (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        later = r["round_s"][1:]
        net = r["network_bytes_per_client_round"]
        print(f"| {name} | {r['round_s'][0]:.2f} | {sum(later) / max(1, len(later)):.2f} | "
              f"{r['protocol_bytes_per_client_round']:,.0f} | {'-' if net is None else f'{net:,.0f}'} | "
              f"{r['total_s']:.1f} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
