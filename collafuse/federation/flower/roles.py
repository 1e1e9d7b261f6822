"""Framework-free glue for the Flower apps: a Client from its own data folder, the Server's round bookkeeping.

Nothing here imports flwr: the ServerApp and ClientApp only move the protocol bytes these functions make
and take. Client state (model, optimiser, private noise seed, progress) lives under the client's own state
folder, per session (one server lineage), so every short-lived ClientApp process continues where the last one
stopped. The server's checkpoint (role state + bookkeeping) is swapped in whole after every round.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shlex
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from collafuse.core import protocol
from collafuse.roles.client import Client
from collafuse.config import Config, load_config
from collafuse.core.models import device_auto
from collafuse.core.protocol import ClientReport, HandoffBatch, Limits, SamplingHandoffs, SamplingRequest
from collafuse.core.schedule import NoiseSchedule
from collafuse.roles.server import Server
from collafuse.core.state import load_state, save_state

DATA_FILE = "data.safetensors"  # a client's train/test images and labels
EVALUATOR_FILE = "evaluator.safetensors"  # the measuring instrument (domain classifier), same for every client
EVAL_FILE = "evaluation.json"  # how this client's samples are measured
CHECKPOINT = "checkpoint"
NOISE_SEED_BITS = 40  # Client mixes the seed as seed * 1_000_003 + view: keeps torch's 64-bit seed range


def flower_config(run_config: dict) -> Config:
    """The collafuse Config named by a Flower run config: preset, `set` overrides and rounds (0 = preset's)."""
    overrides = shlex.split(str(run_config.get("set", "")))
    if int(run_config.get("rounds", 0)):
        overrides.append(f"rounds={int(run_config['rounds'])}")
    return load_config(str(run_config.get("preset", "smoke")), overrides)


def cut_level(cfg: Config) -> int:
    return NoiseSchedule(cfg.schedule.T, cfg.schedule.kind).cut_level(cfg.cut)


def image_shape(cfg: Config) -> tuple[int, int, int]:
    return cfg.data.channels, cfg.data.image_size, cfg.data.image_size


def _same_run(a: Config, b: Config) -> bool:
    da, db = a.to_dict(), b.to_dict()
    da.pop("rounds"), db.pop("rounds")
    return da == db


# ---------------------------------------------------------------- data preparation (one folder per client)

def prepare_data(cfg: Config, out: str | Path) -> list[Path]:
    """Write out/client-<k>/ for every client: its own split (data.safetensors) and the shared evaluator."""
    from collafuse.measure.evaluate import domain_labels, own_classes, own_targets
    from collafuse.measure.quality import train_domain_classifier
    from collafuse.federation.inprocess import build, client_condition
    out = Path(out)
    fed = build(cfg, device=torch.device("cpu"))
    data = fed.data
    domain = domain_labels(fed)
    classifier = None
    if domain is not None:  # the same instrument the in-process evaluate() trains, so numbers compare
        _, train_idx, labels, num_labels = domain
        classifier = train_domain_classifier(data.images[train_idx], labels, num_classes=num_labels, seed=cfg.seed,
                                             epochs=cfg.eval.classifier_epochs)
    condition = client_condition(cfg, data)
    folders = []
    for client, split in zip(fed.clients, fed.splits):
        folder = out / f"client-{client.id}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"train_images": data.images[split.train], "train_labels": data.labels[split.train],
                   "test_images": data.images[split.test], "test_labels": data.labels[split.test]}
        if condition is not None:
            tensors["train_condition"] = condition[split.train]
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / DATA_FILE),
                  metadata={"client_id": str(client.id), "num_classes": str(data.num_classes),
                            "config": json.dumps(cfg.to_dict())})
        if classifier is not None:
            save_file(classifier.state_dict(), str(folder / EVALUATOR_FILE),
                      metadata={"config": json.dumps(classifier.config)})
        own = own_targets(fed, client, domain)
        (folder / EVAL_FILE).write_text(json.dumps({
            "domain_labels": domain[0] if domain else None, "own_targets": own,
            "classes": own_classes(client.labels, data.num_classes) if domain and domain[0] == "class" else None}))
        folders.append(folder)
    return folders


@dataclass
class ClientData:
    """What one client holds on its own disk."""

    images: torch.Tensor
    labels: torch.Tensor
    test_images: torch.Tensor
    condition: torch.Tensor | None
    num_classes: int


def load_client_data(cfg: Config, client_id: int, data_path: str | Path) -> ClientData:
    """Read a client's data.safetensors, checking it belongs to this client and this config."""
    path = Path(data_path) / DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the node config's data-path must hold this client's "
                                f"{DATA_FILE}; write it with `collafuse flower prepare-data --out DIR`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("client_id") != str(client_id):
        raise ValueError(f"{path} holds client {meta.get('client_id')}'s data, but this node is client {client_id}; "
                         f"fix client-id or data-path in the node config")
    t = load_file(str(path))
    if tuple(t["train_images"].shape[1:]) != image_shape(cfg):
        raise ValueError(f"{path}: images of shape {tuple(t['train_images'].shape[1:])}, but the run config wants "
                         f"{image_shape(cfg)}; prepare the data with the run's preset and --set overrides")
    return ClientData(t["train_images"], t["train_labels"], t["test_images"], t.get("train_condition"),
                      int(meta.get("num_classes", 0)))


# ---------------------------------------------------------------- the client side

@dataclass(frozen=True)
class ClientPlace:
    """Who a node is and where its files are: from the node config (deployment) or partition id (simulation)."""

    client_id: int
    data_path: Path
    state_root: Path

    def session_dir(self, session: str) -> Path:
        if not session or "/" in session or session.startswith("."):
            raise ValueError(f"session {session!r} is not a valid folder name; the ServerApp sends a uuid hex")
        return self.state_root / session


def place_from_configs(node_config: dict, run_config: dict) -> ClientPlace:
    """Deployment: client-id, data-path (state-path optional). Simulation: partition-id + run config roots."""
    if "client-id" in node_config:
        if "data-path" not in node_config:
            raise ValueError("node config has client-id but no data-path; start the SuperNode with "
                             "--node-config \"client-id=K data-path='/path/to/client-K'\"")
        data = Path(str(node_config["data-path"]))
        return ClientPlace(int(node_config["client-id"]), data, Path(str(node_config.get("state-path", data / "state"))))
    if "partition-id" in node_config:
        k = int(node_config["partition-id"])
        if not run_config.get("data-root") or not run_config.get("client-root"):
            raise ValueError("simulation needs the run config keys data-root and client-root (absolute paths): "
                             "--run-config \"data-root='/abs/data' client-root='/abs/clients'\"")
        return ClientPlace(k, Path(str(run_config["data-root"])) / f"client-{k}",
                           Path(str(run_config["client-root"])) / f"client-{k}")
    raise ValueError("node config names no client: set client-id and data-path in --node-config")


def _noise_seed(folder: Path) -> int:
    """The client's private noise seed: drawn once from the OS, kept only on its disk (mode 0600)."""
    path = folder / "secret.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "secret.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"noise_seed": secrets.randbits(NOISE_SEED_BITS)}, f)
        os.replace(tmp, path)
    return int(json.loads(path.read_text())["noise_seed"])


def open_client(cfg: Config, place: ClientPlace, session: str) -> tuple[Client, dict]:
    """The client as it was after its last message (or new), and its progress counters."""
    folder = place.session_dir(session)
    saved_cfg = folder / "config.json"
    if saved_cfg.is_file() and not _same_run(load_config(str(saved_cfg)), cfg):
        raise ValueError(f"{folder} holds a client of a run with another config; only rounds may change within a "
                         f"session: start a new out-dir on the server (new session) or delete {folder}")
    data = load_client_data(cfg, place.client_id, place.data_path)
    # Same arguments as runner.build: the roles are built identically in-process and on Flower.
    client = Client.from_config(cfg, place.client_id, data.images, data.labels,
                                schedule=NoiseSchedule(cfg.schedule.T, cfg.schedule.kind), condition=data.condition,
                                num_classes=data.num_classes or None, device=device_auto(),
                                noise_seed=_noise_seed(folder))
    progress = {"train_seconds": 0.0, "sample_seconds": 0.0}
    if (folder / "client.json").is_file():
        tensors, meta = load_state(folder / "client")
        client.load(tensors, meta)
        progress.update(meta.get("progress", {}))
    else:
        saved_cfg.write_text(json.dumps(cfg.to_dict(), indent=1))
    return client, progress


def save_client(client: Client, progress: dict, place: ClientPlace, session: str) -> None:
    tensors, meta = client.state()
    save_state(place.session_dir(session) / "client", tensors, {**meta, "progress": progress})


def client_round(cfg: Config, place: ClientPlace, session: str, first_view: int, fresh_views: int) -> list[bytes]:
    """One training message: local steps, then the handoffs the server asked for; state saved before replying.

    Reply blobs: ClientReport (loss, seconds, records), SamplingRequest (for the final sampling), HandoffBatch...
    `first_view` >= 0 restarts the handoff views there (the server lost or never got them); -1: continue.
    """
    client, progress = open_client(cfg, place, session)
    t0 = time.perf_counter()
    loss = client.train(cfg.client.steps_per_round)
    progress["train_seconds"] += time.perf_counter() - t0
    batches: list[HandoffBatch] = []
    if client.t_c < client.schedule.T:  # c = 1: no server levels, no handoffs
        if cfg.handoff.mode == "once":
            if first_view >= 0:  # a re-made view uses the same private noise: the server learns nothing new
                client.views_made = first_view
            n_views = max(0, cfg.handoff.views - client.views_made)
        else:
            n_views = fresh_views
        batches = client.make_handoffs(n_views, cfg.handoff.batch)
    save_client(client, progress, place, session)
    numbers = {"n_train": client.num_records, "views_made": client.views_made, "steps_done": client.steps_done,
               "train_seconds": progress["train_seconds"]}
    if math.isfinite(loss):
        numbers["loss"] = loss
    s = cfg.sampling
    request = client.sampling_request(s.n, s.server_steps, s.sampler, seed=cfg.seed * 7 + client.id)
    return [protocol.encode(m) for m in (ClientReport(client.id, numbers), request, *batches)]


def client_limits(cfg: Config, client_id: int) -> Limits:
    return Limits(known_clients=frozenset({client_id}), image_shape=image_shape(cfg), level=cut_level(cfg),
                  max_bytes=cfg.max_message_bytes)


def client_sample(cfg: Config, place: ClientPlace, session: str, blob: bytes) -> bytes:
    """Finish the server's handoffs, keep the images on this client's disk, reply a ClientReport of numbers."""
    from collafuse.measure.images import save_grid
    msg = protocol.decode(blob, client_limits(cfg, place.client_id), expect=SamplingHandoffs)
    client, progress = open_client(cfg, place, session)
    s, folder = cfg.sampling, place.session_dir(session)
    t0 = time.perf_counter()
    images = client.finish(msg, s.client_steps, s.sampler, cfg.seed * 7 + client.id + 1)  # seeds as evaluate.py
    progress["sample_seconds"] += time.perf_counter() - t0
    save_file({"images": images.contiguous()}, str(folder / "samples.safetensors"))
    save_grid(images, folder / f"samples_client{client.id}.png")
    numbers = client_quality(cfg, place, images)
    numbers.update(n_train=client.num_records, train_seconds=progress["train_seconds"],
                   sample_seconds=progress["sample_seconds"], params=client.model.num_parameters())
    save_client(client, progress, place, session)
    (folder / "report.json").write_text(json.dumps(numbers, indent=1))
    return protocol.encode(ClientReport(client.id, numbers))


def client_quality(cfg: Config, place: ClientPlace, images: torch.Tensor) -> dict:
    """FID/KID (and own-class share) against the client's held-out images, as evaluate.py measures them."""
    from collafuse.measure.quality import DomainClassifier, evaluate_quality, feature_extractor
    data = load_client_data(cfg, place.client_id, place.data_path)
    info_path = place.data_path / EVAL_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"domain_labels": None, "own_targets": None}
    classifier = None
    if (place.data_path / EVALUATOR_FILE).is_file():
        path = str(place.data_path / EVALUATOR_FILE)
        with safe_open(path, "pt") as f:
            arch = json.loads(f.metadata()["config"])
        arch.pop("arch")
        arch["image_size"] = tuple(arch["image_size"])
        classifier = DomainClassifier(**arch)
        classifier.load_state_dict(load_file(path))
        classifier.eval()
    elif cfg.eval.extractor == "domain":
        raise FileNotFoundError(f"{place.data_path / EVALUATOR_FILE} not found: eval.extractor=domain needs the "
                                f"evaluator written by `collafuse flower prepare-data`, or run with "
                                f"--set eval.extractor=inception")
    own = info["own_targets"] if classifier is not None else None
    quality = evaluate_quality(images, data.test_images, extractor=feature_extractor(cfg.eval.extractor,
                               classifier=classifier), classifier=classifier if own is not None else None,
                               client_classes=own)
    numbers = {k: float(v) for k, v in quality.items() if isinstance(v, (int, float))}
    if info["domain_labels"] == "client" and "own_class_share" in numbers:
        numbers["own_client_share"] = numbers.pop("own_class_share")  # classes here are clients
    numbers["n_test"] = len(data.test_images)
    return numbers


# ---------------------------------------------------------------- the server side

def make_server(cfg: Config) -> Server:
    """The Server exactly as runner.build makes it, from the config alone (the server never sees data)."""
    return Server.from_config(cfg, schedule=NoiseSchedule(cfg.schedule.T, cfg.schedule.kind),
                              image_shape=image_shape(cfg), device=device_auto())


class ServerSide:
    """The server's run: who is who, rounds, dropouts, bytes and checkpoints. Transport-agnostic."""

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False):
        self.cfg, self.out = cfg, Path(out)
        self.server = make_server(cfg)
        self.session = uuid.uuid4().hex
        self.round = 0
        self.client_of: dict[int, int] = {}  # node id -> client id (sticky: node ids belong to registered keys)
        self.n_train: dict[int, int] = {}
        self.requests: dict[int, SamplingRequest] = {}
        self.bytes_up, self.bytes_down = Counter(), Counter()
        self.seconds = Counter()
        self.client_numbers: dict[int, dict] = {}
        self.log: list[dict] = []
        if resume:
            self._load()
        elif (self.out / CHECKPOINT).exists():
            raise FileExistsError(f"{self.out} already holds a run; pass resume=true to continue it or choose "
                                  f"another out-dir")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def _client_ids(self) -> set[int]:
        return set(self.client_of.values())

    def round_request(self, node: int) -> dict:
        """The config a node gets with a training message: session, where its views start, fresh views."""
        cid = self.client_of.get(node)
        first_view = -1
        if cid is not None and self.cfg.handoff.mode == "once":
            first_view = len({v for _, v in self.server.held_handoffs(cid)})  # views the server really holds
        total = sum(self.n_train.values()) or 1
        fresh = max(1, math.ceil(self.cfg.server.steps_per_round * self.cfg.server.batch_size / total))
        return {"session": self.session, "first-view": first_view, "fresh-views": fresh}

    def _identify(self, node: int, blobs: list[bytes], expect: list[type]) -> list:
        """Decode a node's reply (nothing is stored unless every blob is valid); check who sent it."""
        if len(blobs) < len(expect):
            raise protocol.ProtocolError(f"reply: {len(blobs)} blobs, expected at least {len(expect)}")
        msgs = [protocol.decode(b, self.server.limits, expect=expect[i] if i < len(expect) else HandoffBatch)
                for i, b in enumerate(blobs)]
        cids = {m.client_id for m in msgs}
        if len(cids) != 1:
            raise protocol.ProtocolError(f"reply: one node sent messages of several clients {sorted(cids)}")
        cid = cids.pop()
        owner = {c: n for n, c in self.client_of.items()}.get(cid)
        if node in self.client_of and self.client_of[node] != cid or owner not in (None, node):
            raise protocol.ProtocolError(f"reply: node {node} claims client {cid}, which belongs to another node")
        self.client_of[node] = cid
        self.bytes_up[cid] += sum(len(b) for b in blobs)
        return msgs

    def take_round_reply(self, node: int, blobs: list[bytes]) -> int:
        """Store a node's training reply; returns its client id."""
        report, request, *batches = self._identify(node, blobs, [ClientReport, SamplingRequest])
        cid = report.client_id
        if batches and self.cfg.handoff.mode == "fresh":
            self.server.forget(cid)
        for batch in batches:
            self.server.ingest(batch)
        self.n_train[cid] = int(report.metrics.get("n_train", 0))
        self.requests[cid] = request
        self.client_numbers[cid] = dict(report.metrics)
        return cid

    def end_round(self, replied: list[int], dropped: dict[int, str], wall: float) -> dict:
        """Train the server on what it holds, checkpoint, log; a round with no handoffs at all skips training."""
        t0 = time.perf_counter()
        loss = None
        if self.server.has_levels and self.server.num_handoffs():
            loss = self.server.train(self.cfg.server.steps_per_round)
        self.seconds["server.train"] += time.perf_counter() - t0
        self.round += 1
        entry = {"round": self.round, "replied": sorted(replied), "dropped": {str(n): r for n, r in dropped.items()},
                 "loss": {**{f"client{c}": self.client_numbers[c].get("loss") for c in sorted(replied)},
                          "server": loss},
                 "wall_seconds": wall + time.perf_counter() - t0,
                 "bytes_up": sum(self.bytes_up.values()), "bytes_down": sum(self.bytes_down.values())}
        self.log.append(entry)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        self._save()
        return entry

    def sampling_handoffs(self, node: int) -> bytes | None:
        """SamplingHandoffs for a node's client (None if it never sent a request)."""
        cid = self.client_of.get(node)
        if cid not in self.requests:
            return None
        t0 = time.perf_counter()
        blob = protocol.encode(self.server.sample_to_cut(self.requests[cid]))
        self.seconds["server.sample"] += time.perf_counter() - t0
        self.bytes_down[cid] += len(blob)
        return blob

    def take_sample_reply(self, node: int, blobs: list[bytes]) -> int:
        """Store a node's sampling reply (one ClientReport of numbers); returns its client id."""
        if len(blobs) != 1:
            raise protocol.ProtocolError(f"sampling reply: {len(blobs)} blobs, expected one ClientReport")
        (report,) = self._identify(node, blobs, [ClientReport])
        self.client_numbers[report.client_id] = {"sampled": True, **report.metrics}
        return report.client_id

    def metrics(self, extra: dict | None = None) -> dict:
        """metrics.json: the in-process `clients` block structure, for the clients that finished sampling."""
        cfg, s = self.cfg, self.cfg.sampling
        quality_keys = None
        clients = {}
        for cid in sorted(self.client_numbers):
            m = dict(self.client_numbers[cid])
            if not m.pop("sampled", False):
                continue
            tail = {k: m.pop(k) for k in ("n_train", "n_test", "train_seconds", "sample_seconds", "params")}
            quality_keys = quality_keys or list(m)
            clients[str(cid)] = {**m, "n_train": int(tail["n_train"]), "n_test": int(tail["n_test"]),
                                 "classes": None,  # the client's classes are its private labels: they stay there
                                 "bytes_up": self.bytes_up[cid], "bytes_down": self.bytes_down[cid],
                                 "train_seconds": tail["train_seconds"], "sample_seconds": tail["sample_seconds"],
                                 "params": int(tail["params"])}
        return {
            "schema": 1, "cut": cfg.cut, "cut_level": self.server.t_c, "T": cfg.schedule.T, "rounds": self.round,
            "handoff_mode": cfg.handoff.mode, "views": cfg.handoff.views,
            "quality": {"extractor": cfg.eval.extractor, "n_samples": s.n, "sampler": s.sampler,
                        "server_steps": s.server_steps, "client_steps": s.client_steps},
            "clients": clients,
            "server": {"train_seconds": self.seconds["server.train"], "sample_seconds": self.seconds["server.sample"],
                       "params": self.server.model.num_parameters(), "handoffs_held": self.server.num_handoffs()},
            "bytes_up": sum(self.bytes_up.values()), "bytes_down": sum(self.bytes_down.values()),
            "flower": {"session": self.session, "log": self.log,
                       "missing_clients": sorted(set(range(cfg.data.clients)) - {int(c) for c in clients}),
                       **(extra or {})},
        }

    def write_metrics(self, extra: dict | None = None) -> Path:
        path = self.out / "metrics.json"
        path.write_text(json.dumps(self.metrics(extra), indent=1))
        return path

    def _save(self) -> None:
        tmp, final, old = (self.out / f"{CHECKPOINT}{s}" for s in (".tmp", "", ".old"))
        shutil.rmtree(tmp, ignore_errors=True)
        save_state(tmp / "server", *self.server.state())
        (tmp / "progress.json").write_text(json.dumps({
            "session": self.session, "round": self.round, "client_of": {str(n): c for n, c in self.client_of.items()},
            "n_train": self.n_train, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "seconds": self.seconds, "log": self.log,
            "requests": {c: protocol.encode(r).hex() for c, r in self.requests.items()}}, indent=1))
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _load(self) -> None:
        ckpt = self.out / CHECKPOINT
        if not (ckpt / "progress.json").is_file():
            raise FileNotFoundError(f"no checkpoint in {self.out}: nothing to resume; run with resume=false")
        saved = load_config(str(self.out / "config.json"))
        if not _same_run(saved, self.cfg):
            raise ValueError(f"resume continues the run in {self.out}, but the run config differs from the saved "
                             f"one; only rounds may change on resume (use a new out-dir for a new run)")
        self.server.load(*load_state(ckpt / "server"))
        p = json.loads((ckpt / "progress.json").read_text())
        self.session, self.round, self.log = p["session"], p["round"], p["log"]
        self.client_of = {int(n): c for n, c in p["client_of"].items()}
        self.n_train = {int(c): n for c, n in p["n_train"].items()}
        self.bytes_up = Counter({int(c): n for c, n in p["bytes_up"].items()})
        self.bytes_down = Counter({int(c): n for c, n in p["bytes_down"].items()})
        self.seconds = Counter(p["seconds"])
        self.requests = {int(c): protocol.decode(bytes.fromhex(b), self.server.limits, expect=SamplingRequest)
                         for c, b in p["requests"].items()}
