"""In-process federation: N clients and one server in one process, talking only through the protocol."""
from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from collafuse.core import protocol
from collafuse.roles.client import Client
from collafuse.config import Config, load_config
from collafuse.data import ClientSplit, ImageSet, client_splits, load_images
from collafuse.core.models import device_auto
from collafuse.core.protocol import Limits
from collafuse.core.schedule import NoiseSchedule
from collafuse.roles.server import Server
from collafuse.core.state import load_state, save_state

CHECKPOINT = "checkpoint"


class Wire:
    """The in-process transport: every message is encoded to bytes, counted, optionally kept, then decoded."""

    def __init__(self, capture: bool = False):
        self.bytes_up: Counter = Counter()  # client id -> bytes sent to the server
        self.bytes_down: Counter = Counter()  # client id -> bytes received from the server
        self.captured: list[tuple[str, int, bytes]] | None = [] if capture else None

    def _carry(self, direction: str, msg, limits: Limits):
        blob = protocol.encode(msg)
        (self.bytes_up if direction == "up" else self.bytes_down)[msg.client_id] += len(blob)
        if self.captured is not None:
            self.captured.append((direction, msg.client_id, blob))
        return protocol.decode(blob, limits, expect=type(msg))

    def up(self, msg, limits: Limits):
        """Client -> server."""
        return self._carry("up", msg, limits)

    def down(self, msg, limits: Limits):
        """Server -> client."""
        return self._carry("down", msg, limits)

    def state(self) -> dict:
        return {"bytes_up": dict(self.bytes_up), "bytes_down": dict(self.bytes_down)}

    def load(self, state: dict) -> None:
        self.bytes_up = Counter({int(k): v for k, v in state["bytes_up"].items()})
        self.bytes_down = Counter({int(k): v for k, v in state["bytes_down"].items()})


@dataclass
class Federation:
    """Everything one run builds from its config; the roles see only their own part."""

    cfg: Config
    schedule: NoiseSchedule
    cut_level: int
    data: ImageSet
    splits: list[ClientSplit]
    clients: list[Client]
    server: Server
    wire: Wire
    round: int = 0
    seconds: Counter = field(default_factory=Counter)  # role/phase -> wall seconds

    @property
    def client_limits(self) -> Limits:
        return Limits(known_clients=frozenset(c.id for c in self.clients), image_shape=self.server.image_shape,
                      level=self.cut_level, max_bytes=self.cfg.max_message_bytes)


def build(cfg: Config, capture: bool = False, device: torch.device | None = None) -> Federation:
    """Load the data, split it over the clients and make the roles, all seeded by cfg.seed."""
    device = device or device_auto()
    d = cfg.data
    data = load_images(d.name, root=d.root, image_size=d.image_size, channels=d.channels,
                       max_records=d.max_records, seed=cfg.seed)
    splits = client_splits(data, d.clients, partition=d.partition, alpha=d.alpha,
                           classes_per_client=d.classes_per_client, test_fraction=d.test_fraction, seed=cfg.seed)
    schedule = NoiseSchedule(cfg.schedule.T, cfg.schedule.kind)
    t_c = schedule.cut_level(cfg.cut)
    condition = client_condition(cfg, data)
    clients = [Client.from_config(cfg, k, data.images[s.train], data.labels[s.train], schedule=schedule,
                                  condition=None if condition is None else condition[s.train],
                                  num_classes=data.num_classes, device=device)
               for k, s in enumerate(splits)]
    server = Server.from_config(cfg, schedule=schedule, image_shape=tuple(data.images.shape[1:]), device=device)
    return Federation(cfg, schedule, t_c, data, splits, clients, server, Wire(capture))


def client_condition(cfg: Config, data: ImageSet) -> torch.Tensor | None:
    """What each client's model conditions on, per record, as configured."""
    kind = cfg.client.condition
    if kind == "class":
        if data.num_classes < 2:
            raise ValueError(f"client.condition=class, but data set {data.name!r} has no class labels; "
                             f"use client.condition=none" + (" or attributes" if data.attributes is not None else ""))
        return data.labels
    if kind == "attributes":
        if data.attributes is None:
            raise ValueError(f"client.condition=attributes, but data set {data.name!r} has no attributes; "
                             f"use client.condition=class or none")
        return data.attributes
    return None


def views_to_send(fed: Federation, client: Client) -> int:
    """How many new views of each record a client sends this round."""
    h = fed.cfg.handoff
    if h.mode == "once":
        return h.views - client.views_made
    # fresh: enough new views that every record the server draws this round is a new noisy copy.
    total = sum(c.num_records for c in fed.clients)
    return max(1, math.ceil(fed.cfg.server.steps_per_round * fed.cfg.server.batch_size / total))


def exchange_handoffs(fed: Federation) -> None:
    """Clients send the handoffs this round needs; the server stores them."""
    if not fed.server.has_levels:
        return
    for client in fed.clients:
        n_views = views_to_send(fed, client)
        if n_views and fed.cfg.handoff.mode == "fresh":
            fed.server.forget(client.id)
        for msg in client.make_handoffs(n_views, fed.cfg.handoff.batch):
            fed.server.ingest(fed.wire.up(msg, fed.server.limits))


def train_round(fed: Federation) -> dict:
    """One round: handoffs, then every client's and the server's training steps."""
    t0 = time.perf_counter()
    exchange_handoffs(fed)
    fed.seconds["clients.handoffs"] += time.perf_counter() - t0
    losses = {}
    for client in fed.clients:
        t0 = time.perf_counter()
        losses[f"client{client.id}"] = client.train(fed.cfg.client.steps_per_round)
        fed.seconds[f"client{client.id}.train"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    losses["server"] = fed.server.train(fed.cfg.server.steps_per_round)
    fed.seconds["server.train"] += time.perf_counter() - t0
    fed.round += 1
    return {"round": fed.round, "loss": losses, "bytes_up": sum(fed.wire.bytes_up.values()),
            "bytes_down": sum(fed.wire.bytes_down.values())}


def save_checkpoint(fed: Federation, out: Path) -> None:
    """All role states and the run's progress; the folder is swapped in whole, so a crash keeps the last one."""
    tmp, final = out / f"{CHECKPOINT}.tmp", out / CHECKPOINT
    shutil.rmtree(tmp, ignore_errors=True)
    save_state(tmp / "server", *fed.server.state())
    for c in fed.clients:
        save_state(tmp / f"client-{c.id}", *c.state())
    (tmp / "progress.json").write_text(json.dumps(
        {"round": fed.round, "wire": fed.wire.state(), "seconds": dict(fed.seconds)}, indent=1))
    old = out / f"{CHECKPOINT}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(fed: Federation, out: Path) -> None:
    ckpt = out / CHECKPOINT
    if not (ckpt / "progress.json").is_file():
        raise FileNotFoundError(f"no checkpoint in {out}: nothing to resume; start the run without --resume")
    fed.server.load(*load_state(ckpt / "server"))
    for c in fed.clients:
        c.load(*load_state(ckpt / f"client-{c.id}"))
    progress = json.loads((ckpt / "progress.json").read_text())
    fed.round = progress["round"]
    fed.wire.load(progress["wire"])
    fed.seconds = Counter(progress["seconds"])


def _resolve_resume(cfg: Config, out: Path) -> Config:
    saved = load_config(str(out / "config.json"))
    mine, theirs = cfg.to_dict(), saved.to_dict()
    mine.pop("rounds"), theirs.pop("rounds")
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs[k])
        raise ValueError(f"--resume continues the run saved in {out}, but the config differs in {diff}; "
                         f"only rounds may change on resume (use a new --out for a new run)")
    return cfg


def open_run(cfg: Config, out: Path, *, resume: bool, capture: bool = False) -> tuple[Config, Federation]:
    """Start a run folder (never over an existing run) or reopen one at its last checkpoint."""
    if resume:
        cfg = _resolve_resume(cfg, out)
    elif (out / CHECKPOINT).exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    fed = build(cfg, capture=capture)
    if resume:
        load_checkpoint(fed, out)
    return cfg, fed


def train_rounds(fed: Federation, out: Path, round_fn, *, progress: bool, desc: str = "rounds") -> None:
    """Run round_fn until cfg.rounds, with a checkpoint and a log line after every round."""
    with open(out / "log.jsonl", "a") as log:
        bar = tqdm(range(fed.round, fed.cfg.rounds), desc=desc, disable=not progress, unit="round")
        for _ in bar:
            entry = round_fn(fed)
            save_checkpoint(fed, out)
            log.write(json.dumps(entry) + "\n")
            log.flush()
            bar.set_postfix({k: f"{v:.3f}" for k, v in entry["loss"].items() if v == v})


def run(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True,
        capture: bool = False) -> tuple[dict, Federation]:
    """Train for cfg.rounds rounds (checkpointing each), then sample and measure per client."""
    # The measurement side pulls in torchmetrics and dp-accounting; keep the core import light.
    from collafuse.measure.evaluate import evaluate
    from collafuse.measure.blocks import measure  # the disclosure, cost and DP blocks (docs/metrics.md)
    out, wall = Path(out), time.perf_counter()
    cfg, fed = open_run(cfg, out, resume=resume, capture=capture)
    train_rounds(fed, out, train_round, progress=progress)
    metrics = evaluate(fed, out, progress=progress)
    metrics.update(measure(fed))
    metrics["wall_seconds"] = time.perf_counter() - wall
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics, fed
