"""Wall time per round, bytes per client per round and memory: in-process vs Flower simulation vs deployment.

    .venv/bin/python benchmarks/flower.py [--config smoke] [--set data.clients=3] [--out runs/bench-flower]
    .venv/bin/python benchmarks/flower.py --set data.clients=10 --engines deployment          # 10 SuperNodes
    .venv/bin/python benchmarks/flower.py --set data.clients=100 --set data.max_records=1797 --engines simulation

Protocol bytes are the encoded messages (what runner.Wire counts); network bytes are Flower's own count
(`flwr ls`: SuperLink inbound + outbound, TLS payload incl. Flower's framing; simulation reports 0).
Memory (Linux): every 0.5 s the resident set of each process this one started (SuperLink, SuperNodes,
ClientApp processes, Ray workers) is read from /proc; the table gives the peak of their sum and the peak of
one process of each kind.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

from collafuse.config import load_config
from collafuse.federation.flower.local import run_local
from collafuse.federation.inprocess import start

# What a process is, from its command line (first match wins).
KINDS = (("flower-superlink", "superlink"), ("flower-supernode", "supernode"), ("flwr-clientapp", "clientapp"),
         ("flwr-serverapp", "serverapp"), ("flwr-simulation", "simulation"), ("ray::", "ray worker"),
         ("raylet", "ray"), ("gcs_server", "ray"), ("ray/", "ray"), ("bin/flwr ", "flwr CLI"))


def _children() -> dict[int, list[int]]:
    kids = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            kids[ppid].append(int(entry))
    return kids


def _rss_mb(pid: int) -> tuple[str, float] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    kind = next((k for marker, k in KINDS if marker in cmd), "other")
    return kind, rss / 1024


class MemoryWatch:
    """Peak summed RSS of this process's descendants, and the peak RSS of one process per kind."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak_total, self.peak_one = every, 0.0, defaultdict(float)
        self.seen = defaultdict(set)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            kids, todo, total = _children(), list(_children().get(os.getpid(), [])), 0.0
            while todo:
                pid = todo.pop()
                todo.extend(kids.get(pid, []))
                got = _rss_mb(pid)
                if got is None or got[1] == 0:
                    continue
                kind, mb = got
                total += mb
                self.peak_one[kind] = max(self.peak_one[kind], mb)
                self.seen[kind].add(pid)
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.every)

    def __enter__(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"peak_children_mb": self.peak_total,
                "peak_per_process_mb": {k: round(v) for k, v in sorted(self.peak_one.items())},
                "processes": {k: len(v) for k, v in sorted(self.seen.items())}}


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
            "network_bytes_per_client_round": None, "total_s": sum(walls),
            "memory": {"peak_this_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}


def flower(cfg, preset: str, overrides: list[str], out: Path, simulation: bool, round_timeout: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with MemoryWatch() as memory:
        result = run_local(cfg, preset, overrides, out, simulation=simulation, round_timeout=round_timeout,
                           timeout=max(1800.0, 4 * round_timeout * (cfg.rounds + 1)))
    log = result.metrics["participation"]["log"]
    n, rounds = cfg.data.clients, len(log)
    network = result.run.inbound_bytes + result.run.outbound_bytes
    return {"round_s": [e["wall_seconds"] for e in log],
            "protocol_bytes_per_client_round": log[-1]["bytes_up"] / n / rounds,
            "network_bytes_per_client_round": network / n / (rounds + 1) if network else None,  # + sampling msg
            "sampling_s": result.metrics["flower"]["sampling_seconds"], "total_s": time.perf_counter() - t0,
            "clients_measured": len(result.metrics["clients"]), "memory": memory.summary()}


ENGINES = ("in-process", "simulation", "deployment")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smoke")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--round-timeout", type=float, default=300.0, help="seconds a Flower round waits for replies")
    p.add_argument("--out", type=Path, default=Path("runs/bench-flower"))
    a = p.parse_args()
    engines = a.engines.split(",")
    if unknown := set(engines) - set(ENGINES):
        p.error(f"unknown engine(s) {', '.join(sorted(unknown))}; choose from {', '.join(ENGINES)}")
    torch.set_num_threads(1)
    cfg = load_config(a.config, a.set)
    rows = {}
    for engine in engines:
        if engine == "in-process":
            rows[engine] = in_process(cfg, a.out / engine)
        else:
            rows[engine] = flower(cfg, a.config, a.set, a.out / engine, engine == "simulation", a.round_timeout)
        print(engine, json.dumps(rows[engine]), flush=True)
    print(f"{a.config} {' '.join(a.set)}: {cfg.data.clients} clients, {cfg.rounds} rounds, up-bytes per client-round")
    print("| engine | round 1 (s) | later rounds (s) | protocol bytes/client/round | network bytes/client/msg | run (s) "
          "| peak memory (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        later = r["round_s"][1:]
        net = r["network_bytes_per_client_round"]
        mem = r["memory"]
        peak = mem.get("peak_children_mb", mem.get("peak_this_process_mb"))
        print(f"| {name} | {r['round_s'][0]:.2f} | {sum(later) / max(1, len(later)):.2f} | "
              f"{r['protocol_bytes_per_client_round']:,.0f} | {'-' if net is None else f'{net:,.0f}'} | "
              f"{r['total_s']:.1f} | {peak:,.0f} {mem.get('peak_per_process_mb', '')} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
