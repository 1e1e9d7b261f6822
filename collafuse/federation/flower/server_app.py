"""Flower ServerApp: the round engine over a Flower Grid. This file only moves protocol bytes.

Per round one "train.round" message per client (a RoundRequest down; the client's answer up), then one
"query.sample" per client (SamplingHandoffs down, a ClientReport up). Which node is which client is
learnt once per node with a "query.hello", checked against the node's authentication key (`client-keys`),
and kept (in the checkpoint) for the run. A node that errs,
misses the timeout or sends a reply the engine rejects is skipped for that round and asked again in
the next; the run goes on with the others.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from collafuse.core import protocol
from collafuse.core.protocol import ClientReport, Limits, ProtocolError
from collafuse.federation.engine import ROUND, Engine
from collafuse.federation.flower.certs import key_fingerprint, load_client_keys
from collafuse.federation.flower.roles import bind_node, flower_config

app = ServerApp()
MESSAGE_TYPES = {ROUND: "train.round", "sample": "query.sample", "hello": "query.hello"}


class FlowerTransport:
    """The round engine's transport over a Flower Grid: client ids <-> node ids, bytes in ConfigRecords."""

    def __init__(self, grid: Grid, *, clients: int, timeout: float, client_keys: dict[str, int] | None = None):
        self.grid, self.timeout, self.client_keys = grid, timeout, client_keys
        self.known = frozenset(range(clients))
        self.client_of: dict[int, int] = {}  # node id -> client id, bound at the node's first hello
        self.run_id = ""

    def _ask(self, message_type: str, configs: dict[int, dict], group: str) -> dict[int, list[bytes] | str]:
        msgs = [Message(RecordDict({"wire": ConfigRecord(config)}), dst_node_id=node, message_type=message_type,
                        group_id=group, ttl=self.timeout + 10)  # a node back later must not start stale work
                for node, config in configs.items()]
        replies: dict[int, list[bytes] | str] = {}
        for m in self.grid.send_and_receive(msgs, timeout=self.timeout):
            node = m.metadata.src_node_id
            if m.has_error():
                replies[node] = f"error {m.error.code}: {m.error.reason}"
                continue
            try:
                blobs = list(m.content["wire"]["blobs"])
            except (KeyError, TypeError, ValueError):  # a reply that is not a record of blobs at all
                blobs = None
            # Only bytes count (bytes(n) of a hostile int would allocate n bytes): the rest is malformed.
            ok = blobs is not None and all(isinstance(b, bytes) for b in blobs)
            replies[node] = blobs if ok else "rejected: malformed reply, not a list of byte strings"
        return replies

    def _greet(self) -> None:
        """Learn which client every connected node not yet bound speaks for: by its key (roles.bind_node)."""
        new = [n for n in sorted(self.grid.get_node_ids()) if n not in self.client_of]
        if not new:
            return
        keys = {info.node_id: _fingerprint(info.public_key) for info in self.grid.get_nodes()} \
            if self.client_keys is not None else {}
        limits = Limits(known_clients=self.known)
        for node, reply in self._ask("query.hello", {n: {"run": self.run_id} for n in new}, "hello").items():
            try:
                if isinstance(reply, str) or len(reply) != 1:
                    raise ProtocolError(f"no valid hello: {reply if isinstance(reply, str) else len(reply)}")
                claimed = protocol.decode(reply[0], limits, expect=ClientReport).client_id
                self.client_of[node] = bind_node(node, claimed, keys.get(node), self.client_keys, self.client_of)
            except ProtocolError as e:
                print(f"node {node} refused: {e}; asked again next round", flush=True)

    def clients(self) -> list[int]:
        self._greet()
        connected = set(self.grid.get_node_ids())
        return sorted(c for n, c in self.client_of.items() if n in connected)

    def exchange(self, kind: str, requests: dict[int, bytes]) -> dict[int, list[bytes] | str]:
        node_of = {c: n for n, c in self.client_of.items()}
        configs = {node_of[cid]: {"run": self.run_id, "blobs": [blob]} for cid, blob in requests.items()}
        replies = self._ask(MESSAGE_TYPES[kind], configs, kind)
        return {self.client_of[node]: replies.get(node, "no reply within the round timeout") for node in configs}

    def state(self, folder: Path) -> None:
        (folder / "nodes.json").write_text(json.dumps({str(n): c for n, c in self.client_of.items()}))

    def load(self, folder: Path) -> None:
        self.client_of = {int(n): c for n, c in json.loads((folder / "nodes.json").read_text()).items()}


def _fingerprint(public_key: bytes) -> str | None:
    """A node's key fingerprint; None for a node without a key, or with one that is no public key."""
    try:
        return key_fingerprint(public_key) if public_key else None
    except ValueError:
        return None


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    """The connected nodes once n are there (or whatever is there after timeout)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < n and time.monotonic() < deadline:
        time.sleep(1.0)
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = flower_config(rc)
    out = Path(str(rc["out-dir"]) or f"runs/flower-{context.run_id}")
    keys = load_client_keys(str(rc["client-keys"])) if str(rc.get("client-keys", "")) else None
    transport = FlowerTransport(grid, clients=cfg.data.clients, timeout=float(rc["round-timeout"]), client_keys=keys)
    engine = Engine(cfg, out, transport, resume=bool(rc["resume"]))
    transport.run_id = engine.run_id
    wait_for_nodes(grid, cfg.data.clients, float(rc["node-timeout"]))
    engine.run_rounds(echo=lambda line: print(line, flush=True))
    t0 = time.perf_counter()
    dropped = engine.sample()
    metrics = engine.metrics(dropped)
    metrics["flower"] = {"run_id": context.run_id, "sampling_seconds": time.perf_counter() - t0,
                         "nodes": {str(n): c for n, c in transport.client_of.items()}}
    path = engine.write_metrics(metrics)
    print(f"sampled clients {sorted(metrics['clients'], key=int)}, dropped {dropped}; metrics: {path}", flush=True)
