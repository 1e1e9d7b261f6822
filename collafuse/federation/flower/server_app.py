"""Flower ServerApp: moves the Server role's protocol bytes; rounds, dropouts and checkpoints live in roles.py.

Per round one message per node ("train.round": local steps + handoffs back), then one "query.sample" per
node (handoffs down, a ClientReport of numbers up). A node that errs or misses the round timeout is skipped
for that round and asked again in the next; whatever the server already holds stays.
"""
from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from collafuse.federation.flower.roles import ServerSide, flower_config
from collafuse.core.protocol import ProtocolError

app = ServerApp()


def ask(grid: Grid, configs: dict[int, dict], message_type: str, group: str,
        timeout: float) -> tuple[dict[int, list[bytes]], dict[int, str]]:
    """Send each node its config record; return (replies by node, why each other node dropped out)."""
    msgs = [Message(RecordDict({"wire": ConfigRecord(config)}), dst_node_id=node, message_type=message_type,
                    group_id=group, ttl=timeout + 10)  # a node that returns later must not start stale work
            for node, config in configs.items()]
    replies, dropped = {}, {}
    for m in grid.send_and_receive(msgs, timeout=timeout):
        node = m.metadata.src_node_id
        if m.has_error():
            dropped[node] = f"error {m.error.code}: {m.error.reason}"
        else:
            replies[node] = list(m.content["wire"]["blobs"])
    dropped.update({n: "no reply within the round timeout" for n in configs if n not in replies and n not in dropped})
    return replies, dropped


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    """The connected nodes once n are there (or whatever is there after timeout)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < n and time.monotonic() < deadline:
        time.sleep(1.0)
    return nodes


def take(replies: dict[int, list[bytes]], dropped: dict[int, str], store) -> list[int]:
    """Hand every reply to the server's bookkeeping; a reply that fails validation counts as a dropout."""
    accepted = []
    for node, blobs in replies.items():
        try:
            accepted.append(store(node, blobs))
        except ProtocolError as e:
            dropped[node] = f"rejected: {e}"
    return accepted


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = flower_config(rc)
    out = Path(str(rc["out-dir"]) or f"runs/flower-{context.run_id}")
    side = ServerSide(cfg, out, resume=bool(rc["resume"]))
    timeout = float(rc["round-timeout"])
    wait_for_nodes(grid, cfg.data.clients, float(rc["node-timeout"]))
    while side.round < cfg.rounds:
        t0 = time.perf_counter()
        nodes = sorted(grid.get_node_ids())  # every round: nodes that dropped out earlier may be back
        configs = {n: side.round_request(n) for n in nodes}
        replies, dropped = ask(grid, configs, "train.round", str(side.round), timeout)
        replied = take(replies, dropped, side.take_round_reply)
        entry = side.end_round(replied, dropped, time.perf_counter() - t0)
        print(f"round {entry['round']}/{cfg.rounds}: clients {replied}, dropped {dropped}", flush=True)
    t0 = time.perf_counter()
    configs = {}
    for node in sorted(grid.get_node_ids()):
        if (blob := side.sampling_handoffs(node)) is not None:
            configs[node] = {"session": side.session, "blobs": [blob]}
    replies, dropped = ask(grid, configs, "query.sample", "sample", timeout)
    sampled = take(replies, dropped, side.take_sample_reply)
    path = side.write_metrics({"run_id": context.run_id, "sampling_seconds": time.perf_counter() - t0,
                               "sampling_dropped": {str(n): r for n, r in dropped.items()}})
    print(f"sampled clients {sampled}, dropped {dropped}; metrics: {path}", flush=True)
