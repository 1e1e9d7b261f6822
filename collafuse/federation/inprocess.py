"""In-process federation: N clients and one server in one process, talking only through protocol bytes.

`build` makes the roles from a config; `InProcessTransport` hands the round engine's requests to the
clients' side of the engine in this process; `run` is the whole job (rounds, sampling, measurement).
One process is one trust domain (docs/threat-model.md): the clients' policies and ledgers are still
the clients' own, and every byte still crosses the protocol, but nothing stops this process from
reading any party's memory.
"""
from __future__ import annotations

import gc
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from collafuse.config import Config
from collafuse.core.models import device_auto
from collafuse.core.protocol import Limits, ProtocolError, SamplingHandoffs
from collafuse.core.sampling import row_batches
from collafuse.core.schedule import NoiseSchedule
from collafuse.core.state import load_state, save_state, swap_in
from collafuse.core import protocol
from collafuse.data import ClientSplit, ImageSet, client_splits, load_images
from collafuse.data.condition import client_condition
from collafuse.federation.engine import (CHECKPOINT, HANDOFFS, ROUND, Engine, client_limits, read_round_request,
                                         sampling_seed, serve_round, serve_samples)
from collafuse.roles.client import Client
from collafuse.roles.cohort import cohort_key, finish_key, finish_together, train_together
from collafuse.roles.noise import load_or_create_secret, new_secret, pinned_secret
from collafuse.roles.policy import ReleaseLedger
from collafuse.roles.server import Server

CLIENTS = "clients"  # <run>/clients/client-<k>/: each in-process client's secret and release ledger


class Wire:
    """What crossed between the parties: bytes per client each way, and (optionally) every message."""

    def __init__(self, capture: bool = False):
        self.bytes_up: Counter = Counter()  # client id -> bytes sent to the server
        self.bytes_down: Counter = Counter()  # client id -> bytes received from the server
        self.captured: list[tuple[str, int, bytes]] | None = [] if capture else None

    def carry(self, direction: str, client_id: int, blob: bytes) -> bytes:
        (self.bytes_up if direction == "up" else self.bytes_down)[client_id] += len(blob)
        if self.captured is not None:
            self.captured.append((direction, client_id, blob))
        return blob

    def _carry(self, direction: str, msg, limits: Limits):
        return protocol.decode(self.carry(direction, msg.client_id, protocol.encode(msg)), limits, expect=type(msg))

    def up(self, msg, limits: Limits):
        """Client -> server, for the exchanges outside the round engine (FedAvg's, `collafuse sample`)."""
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


def client_secret(cfg: Config, client_id: int, folder: Path | None) -> bytes:
    """The client's noise secret: made once and kept in its folder, or pinned (tests and benchmarks only)."""
    if cfg.client.noise_secret == "pinned-for-tests":
        return pinned_secret(cfg.seed, client_id)
    return load_or_create_secret(folder) if folder is not None else new_secret()


def build(cfg: Config, capture: bool = False, device: torch.device | None = None,
          state: Path | None = None) -> Federation:
    """Load the data, split it over the clients and make the roles, all seeded by cfg.seed.

    `state`: where each client keeps its secret and release ledger (<state>/client-<k>); None keeps the
    ledgers in memory, for a federation that will not release anything it must remember.
    """
    device = device or device_auto()
    d = cfg.data
    data = load_images(d.name, root=d.root, image_size=d.image_size, channels=d.channels,
                       max_records=d.max_records, seed=cfg.seed)
    splits = client_splits(data, d.clients, partition=d.partition, alpha=d.alpha,
                           classes_per_client=d.classes_per_client, test_fraction=d.test_fraction, seed=cfg.seed)
    schedule = NoiseSchedule(cfg.schedule.T, cfg.schedule.kind)
    t_c = schedule.cut_level(cfg.cut)
    condition = client_condition(cfg, data)
    clients = []
    for k, s in enumerate(splits):
        folder = None if state is None else state / f"client-{k}"
        clients.append(Client.from_config(
            cfg, k, data.images[s.train], data.labels[s.train], schedule=schedule,
            condition=None if condition is None else condition[s.train], num_classes=data.num_classes,
            device=device, secret=client_secret(cfg, k, folder), policy=cfg.client.policy,
            ledger=ReleaseLedger(None if folder is None else folder / "ledger.jsonl")))
    server = Server.from_config(cfg, schedule=schedule, image_shape=tuple(data.images.shape[1:]), device=device)
    return Federation(cfg, schedule, t_c, data, splits, clients, server, Wire(capture))


class InProcessTransport:
    """The round engine's transport in one process: each request's bytes go to the client's side, and back."""

    def __init__(self, fed: Federation, out: Path, progress: bool = False):
        self.fed, self.out, self.progress = fed, out, progress
        self.evaluations: dict | None = None  # client id -> ClientEvaluation, made before sampling

    def clients(self) -> list[int]:
        return [c.id for c in self.fed.clients]

    def exchange(self, kind: str, requests: dict[int, bytes]) -> dict[int, list[bytes]]:
        # Simulated clients of one architecture train (a round) or finish their samples (sampling) together first.
        together = self.fed.cfg.batch_clients
        done = (self.train_cohorts if kind == ROUND else self.finish_cohorts)(requests) if together else {}
        replies = {}
        for cid, blob in tqdm(requests.items(), desc=f"{kind}: clients", unit="client", leave=False,
                              disable=not self.progress):
            client, wire = self.fed.clients[cid], self.fed.wire
            wire.carry("down", cid, blob)
            t0 = time.perf_counter()
            if kind == ROUND:
                reply = serve_round(client, self.fed.cfg, blob, trained=done.get(cid))
            else:
                reply = serve_samples(client, self.fed.cfg, blob, (self.evaluations or {}).get(cid), self.out,
                                      finished=done.get(cid))
            # a client trained or sampled together with others adds its share of that work's time
            share = done[cid][1] if cid in done else 0.0
            phase = "train" if kind == ROUND else "sample"
            self.fed.seconds[f"client{cid}.{phase}"] += time.perf_counter() - t0 + share
            replies[cid] = [wire.carry("up", cid, b) for b in reply]
        return replies

    def train_cohorts(self, requests: dict[int, bytes]) -> dict[int, tuple[float, float]]:
        """The round's steps of every client that will accept its request, together where clients share a
        cohort_key; client id -> (mean loss, seconds). A client that refuses trains nothing, as in serve_round;
        one alone in its cohort trains there."""
        cohorts: dict[tuple, tuple[int, list[Client]]] = {}
        for cid, blob in requests.items():
            client = self.fed.clients[cid]
            req = read_round_request(client, self.fed.cfg, blob)
            key = cohort_key(client, req.steps)
            if key is not None and client.accepts(req):
                cohorts.setdefault(key, (req.steps, []))[1].append(client)
        trained = {}
        groups = [(steps, cohort) for steps, cohort in cohorts.values() if len(cohort) > 1]
        # Each step advances its clients by 1/steps: the count is shown whole, the rate in clients/s.
        with tqdm(total=sum(len(m) for _, m in groups), desc="train: clients together", unit="client",
                  leave=False, disable=not self.progress or not groups,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, "
                             "{rate_fmt}]") as bar:
            for steps, cohort in groups:
                # Together, every member's activations live at once: chunks of the cohort bound that memory.
                for idx in row_batches([c.batch_size for c in cohort], self.fed.cfg.image_shape):
                    members = [cohort[i] for i in idx]
                    results = train_together(members, steps, on_step=lambda: bar.update(len(members) / steps))
                    trained.update({client.id: result for client, result in zip(members, results)})
        return trained

    def finish_cohorts(self, requests: dict[int, bytes]) -> dict[int, tuple[torch.Tensor, float]]:
        """Every client's samples from its SamplingHandoffs, together where clients share a finish_key; client id
        -> (images, seconds). A message its client would reject is left to serve_samples, which says why."""
        s, cohorts = self.fed.cfg.sampling, {}
        for cid, blob in requests.items():
            client = self.fed.clients[cid]
            try:
                msg = protocol.decode(blob, client_limits(client, self.fed.cfg), expect=SamplingHandoffs)
            except ProtocolError:
                continue
            cohorts.setdefault(finish_key(client, len(msg.handoffs)), []).append((client, msg))
        finished = {}
        for cohort in cohorts.values():
            if len(cohort) < 2:
                continue
            # as in training, chunks of the cohort bound the activations that live at once
            for idx in row_batches([len(msg.handoffs) for _, msg in cohort], self.fed.cfg.image_shape):
                members = [cohort[i] for i in idx]
                t0 = time.perf_counter()
                images = finish_together([c for c, _ in members], [m for _, m in members], s.client_steps,
                                         s.client_sampler, [sampling_seed(self.fed.cfg, c.id) + 1 for c, _ in members])
                share = (time.perf_counter() - t0) / len(members)
                finished.update({c.id: (x, share) for (c, _), x in zip(members, images)})
        return finished

    def state(self, folder: Path) -> None:
        """The clients' models and progress go into the run's checkpoint (one trust domain)."""
        for c in self.fed.clients:
            save_state(folder / f"client-{c.id}", *c.state(), pack=True)  # many clients: 2.7x faster packed
        (folder / "wire.json").write_text(json.dumps({"wire": self.fed.wire.state(),
                                                      "seconds": dict(self.fed.seconds)}))

    def load(self, folder: Path) -> None:
        for c in self.fed.clients:
            c.load(*load_state(folder / f"client-{c.id}"))
        saved = json.loads((folder / "wire.json").read_text())
        self.fed.wire.load(saved["wire"])
        self.fed.seconds = Counter(saved["seconds"])


def load_checkpoint(fed: Federation, out: Path) -> None:
    """Every role as the run's last checkpoint left it (for `collafuse sample` on a trained run)."""
    ckpt = out / CHECKPOINT
    if not (ckpt / "progress.json").is_file():
        raise FileNotFoundError(f"no checkpoint in {out}: nothing to sample from; train the run first")
    fed.server.keep_handoffs_in(out / HANDOFFS)
    fed.server.load(*load_state(ckpt / "server"))
    InProcessTransport(fed, out).load(ckpt)
    fed.round = json.loads((ckpt / "progress.json").read_text())["round"]


def start(cfg: Config, out: str | Path, *, resume: bool = False, capture: bool = False,
          device: torch.device | None = None, progress: bool = False) -> tuple[Engine, Federation, InProcessTransport]:
    """Build the federation and the round engine over it (resumed from the run folder's checkpoint if asked)."""
    out = Path(out)
    if not resume and (out / CHECKPOINT).exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    fed = build(cfg, capture=capture, device=device, state=out / CLIENTS)
    transport = InProcessTransport(fed, out, progress)
    engine = Engine(cfg, out, transport, resume=resume, server=fed.server)
    fed.round = engine.round
    return engine, fed, transport


def run(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True, capture: bool = False,
        train: bool = True) -> tuple[dict, Federation]:
    """Train for cfg.rounds rounds (checkpointing each), then sample and measure per client.

    train=False (with resume): only the sampling and measuring, of the roles as the checkpoint holds them.
    """
    # The measurement side pulls in torchmetrics and dp-accounting; keep the core import light.
    from collafuse.measure.blocks import measure  # the disclosure and cost blocks (docs/metrics.md)
    from collafuse.measure.evaluate import client_evaluations
    out, wall = Path(out), time.perf_counter()
    # The modules loaded and the roles built live all run: the cyclic garbage collector need not scan them again and
    # again (it did, on every full collection: ~1 s of a 100-client smoke run). Unfrozen at the end, so a process
    # that runs many federations (the tests) still collects what they leave behind.
    gc.freeze()
    try:
        engine, fed, transport = start(cfg, out, resume=resume, capture=capture, progress=progress)
        gc.freeze()
        if train:
            engine.run_rounds(progress=progress)
        fed.round = engine.round
        transport.evaluations = client_evaluations(fed)
        dropped = engine.sample()
        fed.seconds.update({k: engine.seconds[k] for k in ("server.train", "server.sample")})
        metrics = engine.metrics(dropped)
        metrics["quality"]["domain_labels"] = next(iter(transport.evaluations.values())).domain_kind
        metrics.update(measure(fed))
    finally:
        gc.unfreeze()
    metrics["wall_seconds"] = time.perf_counter() - wall
    engine.write_metrics(metrics)
    return metrics, fed


def evaluate_run(out: str | Path, *, progress: bool = True, sets: list[str] = ()) -> tuple[dict, Federation]:
    """Sample and measure a run folder's checkpoint again, without training; rewrites its metrics.json.

    `sets` ("server.guidance=2", "client.guidance=1.5") samples with other guidance scales than the run's
    (config.json then records them, beside the metrics they produced); the run must have trained with that
    side's label_dropout > 0. Anything else that would change the run is refused as on resume.
    """
    from collafuse.config import load_config
    out = Path(out)
    progress_file = out / CHECKPOINT / "progress.json"
    if not progress_file.is_file():
        raise FileNotFoundError(f"{out} has no checkpoint to evaluate; train the run first: "
                                f"`collafuse run --out {out}`")
    if "run" not in json.loads(progress_file.read_text()):  # only the round engine's checkpoints name their run
        raise ValueError(f"{out} holds a FedAvg baseline, which is measured as it finishes: delete its "
                         f"metrics.json and run its sweep again with --resume")
    cfg = load_config(str(out / "config.json"), list(sets))
    return run(cfg, out, resume=True, progress=progress, train=False)


def open_run(cfg: Config, out: Path, *, resume: bool) -> tuple[Config, Federation]:
    """A run folder for a baseline outside the round engine (FedAvg): new, or reopened at its checkpoint."""
    from collafuse.federation.engine import same_run
    from collafuse.config import load_config
    if resume:
        if not same_run(load_config(str(out / "config.json")), cfg):
            raise ValueError(f"--resume continues the run saved in {out}, but the config differs; only rounds may "
                             f"change on resume (use a new --out for a new run)")
    elif (out / CHECKPOINT).exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    fed = build(cfg, state=out / CLIENTS)
    if resume:
        load_checkpoint(fed, out)
    return cfg, fed


def save_checkpoint(fed: Federation, out: Path) -> None:
    """The baseline's roles and progress, swapped in whole."""
    def write(folder: Path) -> None:
        save_state(folder / "server", *fed.server.state())
        InProcessTransport(fed, out).state(folder)
        (folder / "progress.json").write_text(json.dumps({"round": fed.round}))
    swap_in(out, CHECKPOINT, write)
