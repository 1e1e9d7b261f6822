"""One round engine for CollaFuse over any transport, written once for in-process and Flower runs.

The server side (`Engine`) decides who is asked for which views, runs the server's steps, asks for
samples, checkpoints, resumes and writes the metrics block. The client side (`serve_round`,
`serve_samples`) answers a request as the client's own policy allows. Between them only protocol
bytes travel, through a `Transport`: `InProcessTransport` (federation/inprocess.py) calls the client
side in the same process; the Flower transport (federation/flower/) carries the same bytes in
Messages. Every byte count is taken here, on the bytes the transport moved.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from collafuse.config import Config, load_config
from collafuse.core import protocol
from collafuse.core.models import device_auto
from collafuse.core.protocol import (ClientReport, HandoffBatch, Limits, ProtocolError, Refusal, RoundRequest,
                                     SamplingHandoffs, SamplingRequest)
from collafuse.core.sampling import level_grid
from collafuse.core.schedule import NoiseSchedule
from collafuse.core.state import load_state, save_state, swap_in
from collafuse.federation.ddp import train_data_parallel
from collafuse.roles.client import Client
from collafuse.roles.server import Server

CHECKPOINT = "checkpoint"
# The server's handoff shards, beside the checkpoint that names them: swap_in replaces the checkpoint folder
# every round, and the store must not be rewritten with it.
HANDOFFS = "handoffs"
ROUND, SAMPLE = "round", "sample"  # the two kinds of exchange


class Transport(Protocol):
    """Moves protocol bytes between the server and its clients; decides nothing."""

    def clients(self) -> list[int]:
        """The client ids that can be asked now."""

    def exchange(self, kind: str, requests: dict[int, bytes]) -> dict[int, list[bytes] | str]:
        """Send each client its request (kind ROUND or SAMPLE); its reply blobs, or why it has none."""


# ---------------------------------------------------------------- the client side

def client_limits(client: Client, cfg: Config) -> Limits:
    """What a client accepts from the server: messages for itself, images of its shape, samples at its cut."""
    return Limits(known_clients=frozenset({client.id}), image_shape=tuple(client.images.shape[1:]),
                  level=client.t_c, max_bytes=cfg.max_message_bytes)


def sampling_seed(cfg: Config, client_id: int) -> int:
    """The seed of a client's server-side samples; its own levels use the next one."""
    return cfg.seed * 7 + client_id


def read_round_request(client: Client, cfg: Config, blob: bytes) -> RoundRequest:
    """The RoundRequest in `blob`, checked against what the client accepts (ProtocolError otherwise)."""
    limits = dataclasses.replace(client_limits(client, cfg), level=None)  # the policy judges the level
    return protocol.decode(blob, limits, expect=RoundRequest)


def serve_round(client: Client, cfg: Config, blob: bytes, trained: tuple[float, float] | None = None) -> list[bytes]:
    """A client's answer to a RoundRequest, as its policy allows; a refusal carries nothing but the reason.

    `trained`: the round's steps were already taken together with other simulated clients (roles/cohort.py).
    """
    from collafuse.measure.cost import client_step_flops  # the client measures its own compute
    req = read_round_request(client, cfg, blob)
    s = cfg.sampling
    sampling = client.sampling_request(s.n, s.server_steps, s.sampler, seed=sampling_seed(cfg, client.id))
    reply = client.answer(req, handoff_batch=cfg.handoff.batch, sampling=sampling, trained=trained)
    if isinstance(reply[0], ClientReport):
        train_step, _ = client_step_flops(client, s.n)
        reply[0] = dataclasses.replace(reply[0], metrics={**reply[0].metrics,
                                                          "train_flops": train_step * client.steps_done})
    return [protocol.encode(m) for m in reply]


def serve_samples(client: Client, cfg: Config, blob: bytes, evaluation, folder: Path,
                  finished: tuple[torch.Tensor, float] | None = None) -> list[bytes]:
    """Finish the server's handoffs; the images and their grid stay in `folder`; numbers go back.

    `finished` (images, seconds): these handoffs were already finished together with other simulated clients
    (roles/cohort.py).
    """
    from collafuse.measure.cost import client_step_flops  # measurement is loaded only where samples are finished
    from collafuse.measure.images import save_grid
    msg = protocol.decode(blob, client_limits(client, cfg), expect=SamplingHandoffs)
    s = cfg.sampling
    if finished is None:
        t0 = time.perf_counter()
        images = client.finish(msg, s.client_steps, s.client_sampler, sampling_seed(cfg, client.id) + 1)
        finished = images, time.perf_counter() - t0
    images, seconds = finished
    folder.mkdir(parents=True, exist_ok=True)
    save_grid(images, folder / f"samples_client{client.id}.png")
    numbers = evaluation.measure(images) if evaluation is not None else {}
    _, sample_step = client_step_flops(client, len(images))
    numbers.update(n_train=client.num_records, sample_seconds=seconds, params=client.model.num_parameters(),
                   sample_flops=sample_step * (len(level_grid(client.t_c, 0, s.client_steps)) - 1))
    return [protocol.encode(ClientReport(client_id=client.id, metrics=numbers))]


# ---------------------------------------------------------------- the server side

def make_server(cfg: Config, device: torch.device | None = None) -> Server:
    """The server as the run config describes it (it never sees data, so the config is all it needs)."""
    return Server.from_config(cfg, schedule=NoiseSchedule(cfg.schedule.T, cfg.schedule.kind),
                              image_shape=cfg.image_shape,
                              device=device or device_auto())


def same_run(a: Config, b: Config) -> bool:
    """Whether two configs describe the same run (the rounds, the server's devices, batch_clients and either side's
    guidance may change on resume: the middle two change how the steps run, not what they compute; guidance only
    how the trained nets sample)."""
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d.pop("rounds"), d.pop("batch_clients"), d["server"].pop("devices"), d["server"].pop("guidance")
        d["client"].pop("guidance")
    return da == db


class Engine:
    """The server's run over a transport: rounds, refusals, dropouts, bytes, checkpoints and metrics."""

    def __init__(self, cfg: Config, out: str | Path, transport: Transport, *, resume: bool = False,
                 server: Server | None = None):
        self.cfg, self.out, self.transport = cfg, Path(out), transport
        self.server = server or make_server(cfg)
        self.server.keep_handoffs_in(self.out / HANDOFFS)
        self.run_id = uuid.uuid4().hex
        self.round = 0
        self.n_train: dict[int, int] = {}  # what each client declared; bounds its record ids
        self.next_view: Counter = Counter()  # fresh mode: the first view a client has not sent yet
        self.sampling: dict[int, SamplingRequest] = {}
        self.reports: dict[int, dict] = {}  # client id -> its latest numbers
        self.bytes_up, self.bytes_down, self.seconds = Counter(), Counter(), Counter()
        self.log: list[dict] = []
        if resume:
            self._load()
        elif (self.out / CHECKPOINT).exists():
            raise FileExistsError(f"{self.out} already holds a run; resume it (--resume / resume=true) or choose "
                                  f"another output folder")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    # -- one round

    def request(self, cid: int) -> RoundRequest:
        """What the server asks of client `cid` this round: its steps and the views it still needs."""
        h, first, n = self.cfg.handoff, 0, 0
        if self.server.has_levels:
            if h.mode == "once":  # the views the server really holds: a lost store is asked for again
                first = self.server.num_views(cid)
                n = max(0, h.views - first)
            else:  # fresh: enough new views that each record the server draws this round is a new copy
                # (one view until records arrived; the records really held, so no claim steers it)
                total = self.server.records_received()
                first = self.next_view[cid]
                n = max(1, math.ceil(self.cfg.server.steps_per_round * self.cfg.server.batch_size / total)) if total \
                    else 1
        return RoundRequest(client_id=cid, run=self.run_id, round=self.round, level=self.server.t_c, mode=h.mode,
                            first_view=first, n_views=n, steps=self.cfg.client_steps)

    def take_round_reply(self, cid: int, req: RoundRequest, blobs: list[bytes]) -> str | None:
        """Validate a whole reply, then keep it; returns a refusal's reason. Nothing is kept from a bad reply."""
        if not blobs:
            raise ProtocolError("reply: no messages")
        first = protocol.decode(blobs[0], self.server.limits)
        if isinstance(first, Refusal):
            if len(blobs) != 1:
                raise ProtocolError("reply: a Refusal must come alone")
            self._check_sender(cid, [first])
            return first.reason
        if not isinstance(first, ClientReport) or len(blobs) < 2:
            raise ProtocolError("reply: expected a ClientReport and a SamplingRequest (then handoffs) or a Refusal")
        sampling = protocol.decode(blobs[1], self.server.limits, expect=SamplingRequest)
        declared = self._declared_records(cid, first)
        # The store a client can fill is bounded up front: its declared records x the views asked for.
        limits = dataclasses.replace(self.server.limits, max_records=declared,
                                     max_views=req.first_view + req.n_views)
        batches = [protocol.decode(b, limits, expect=HandoffBatch) for b in blobs[2:]]
        self._check_sender(cid, [first, sampling, *batches])
        for b in batches:
            if b.views.numel() and int(b.views.min()) < req.first_view:
                raise ProtocolError(f"HandoffBatch.views: view {int(b.views.min())} was not asked for "
                                    f"(asked views {req.first_view}..{req.first_view + req.n_views - 1})")
        # Valid as a whole: keep it.
        if batches and self.cfg.handoff.mode == "fresh":
            self.server.forget(cid)
            self.next_view[cid] = req.first_view + req.n_views
        for b in batches:
            self.server.ingest(b)
        self.n_train[cid] = declared
        self.sampling[cid] = sampling
        numbers = dict(first.metrics)
        report = self.reports.setdefault(cid, {})
        numbers["train_seconds"] = report.get("train_seconds", 0.0) + numbers.get("train_seconds", 0.0)
        report.update(numbers)
        return None

    def _declared_records(self, cid: int, report: ClientReport) -> int:
        """A client's record count: declared in its first report, bounded, and the same ever after."""
        declared = report.metrics.get("n_train")
        cap = self.cfg.server.max_records_per_client
        if declared is None:
            raise ProtocolError("ClientReport.n_train: missing; a round report declares the client's record count")
        if declared > cap:
            raise ProtocolError(f"ClientReport.n_train: {declared} records exceed server.max_records_per_client "
                                f"= {cap}")
        if self.n_train.get(cid, declared) != declared:
            raise ProtocolError(f"ClientReport.n_train: {declared}, but client {cid} declared "
                                f"{self.n_train[cid]} records before")
        return declared

    @staticmethod
    def _check_sender(cid: int, msgs: list) -> None:
        others = sorted({m.client_id for m in msgs} - {cid})
        if others:
            raise ProtocolError(f"reply: client {cid} sent messages in the name of client(s) {others}")

    def run_round(self) -> dict:
        """Ask every reachable client, keep the valid replies, train the server on what it holds, checkpoint."""
        t0 = time.perf_counter()
        requests = {cid: self.request(cid) for cid in self.transport.clients()}
        blobs = {cid: protocol.encode(r) for cid, r in requests.items()}
        for cid, b in blobs.items():
            self.bytes_down[cid] += len(b)
        replies = self.transport.exchange(ROUND, blobs)
        results, dropped = self._collect(replies, requests,
                                         lambda cid, reply: self.take_round_reply(cid, requests[cid], reply))
        refused = {cid: reason for cid, reason in results.items() if reason is not None}
        replied = [cid for cid, reason in results.items() if reason is None]
        losses = {f"client{cid}": self.reports[cid].get("loss") for cid in replied}
        self.seconds["clients.round"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        loss = None
        if self.server.has_levels and self.server.num_handoffs():
            loss = self.train_server(self.cfg.server.steps_per_round)
        self.seconds["server.train"] += time.perf_counter() - t1
        self.round += 1
        entry = {"round": self.round, "replied": sorted(replied), "refused": {str(c): r for c, r in refused.items()},
                 "dropped": {str(c): r for c, r in dropped.items()}, "loss": {**losses, "server": loss},
                 "wall_seconds": time.perf_counter() - t0,
                 "bytes_up": sum(self.bytes_up.values()), "bytes_down": sum(self.bytes_down.values())}
        self.log.append(entry)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        t2 = time.perf_counter()
        self._save()
        self.seconds["checkpoint"] += time.perf_counter() - t2
        return entry

    def train_server(self, steps: int) -> float:
        """The server's steps of a round: in this process, or data-parallel over server.devices processes."""
        if self.cfg.server.devices == 1:
            return self.server.train(steps)
        losses = train_data_parallel(self.server, self.cfg, steps)
        return sum(losses) / steps

    def run_rounds(self, *, progress: bool = False, echo=None) -> None:
        """Rounds until cfg.rounds, each checkpointed; a progress bar (in-process) or a line per round (echo)."""
        bar = tqdm(range(self.round, self.cfg.rounds), desc="rounds", unit="round", disable=not progress)
        for _ in bar:
            entry = self.run_round()
            bar.set_postfix({k: f"{v:.3f}" for k, v in entry["loss"].items() if v is not None and v == v})
            if echo is not None:
                echo(f"round {entry['round']}/{self.cfg.rounds}: clients {entry['replied']}, refused "
                     f"{entry['refused']}, dropped {entry['dropped']}")
            for cid, reason in entry["refused"].items():
                tqdm.write(f"client {cid} refused round {entry['round']}: {reason}")

    # -- sampling

    def sample(self) -> dict:
        """Server levels for every client that asked, the client finishes and measures; returns dropouts."""
        t0 = time.perf_counter()
        reachable = set(self.transport.clients())
        asked = sorted(c for c in self.sampling if c in reachable)
        t1 = time.perf_counter()
        handoffs = self.server.sample_to_cut_many([self.sampling[cid] for cid in asked])  # many clients per call
        self.seconds["server.sample"] += time.perf_counter() - t1
        blobs = {cid: protocol.encode(msg) for cid, msg in zip(asked, handoffs)}
        for cid, blob in blobs.items():
            self.bytes_down[cid] += len(blob)
        _, dropped = self._collect(self.transport.exchange(SAMPLE, blobs), blobs, self.take_sample_reply)
        self.seconds["sampling"] += time.perf_counter() - t0
        return dropped

    def take_sample_reply(self, cid: int, blobs: list[bytes]) -> None:
        """Keep a client's numbers on its samples (one ClientReport)."""
        if len(blobs) != 1:
            raise ProtocolError(f"sampling reply: {len(blobs)} messages, expected one ClientReport")
        report = protocol.decode(blobs[0], self.server.limits, expect=ClientReport)
        self._check_sender(cid, [report])
        self.reports[cid].update(report.metrics, sampled=True)

    def _collect(self, replies: dict, asked, take) -> tuple[dict, dict[int, str]]:
        """Each asked client's reply through `take` (validate, then keep): the results, and why the others have none."""
        results, dropped = {}, {}
        for cid in asked:
            reply = replies.get(cid, "no reply")
            if isinstance(reply, str):
                dropped[cid] = reply
                continue
            self.bytes_up[cid] += sum(len(b) for b in reply)
            try:
                results[cid] = take(cid, reply)
            except ProtocolError as e:  # a bad reply is skipped for this round; nothing of it was kept
                dropped[cid] = f"rejected: {e}"
        return results, dropped

    # -- the metrics block

    def metrics(self, sampling_dropped: dict | None = None) -> dict:
        """metrics.json's common part: per-client quality and cost as the clients reported them, bytes, dp."""
        from collafuse.measure.evaluate import quality_verdict  # nulls and flags from the numbers clients reported
        cfg, s = self.cfg, self.cfg.sampling
        clients = {}
        for cid in sorted(self.reports):
            m = dict(self.reports[cid])
            if not m.pop("sampled", False):
                continue
            for key in ("views_made", "steps_done", "loss", "train_flops", "sample_flops"):  # in `cost`, or per round
                m.pop(key, None)
            clients[str(cid)] = {**m, **quality_verdict(m), "bytes_up": self.bytes_up[cid],
                                 "bytes_down": self.bytes_down[cid]}
        refusals = {e["round"]: e["refused"] for e in self.log if e["refused"]}
        return {
            "schema": 2, "run": self.run_id, "cut": cfg.cut, "cut_level": self.server.t_c, "T": cfg.schedule.T,
            "rounds": self.round, "handoff_mode": cfg.handoff.mode, "views": cfg.handoff.views,
            "quality": {"extractor": cfg.eval.extractor, "n_samples": s.n, "sampler": s.sampler,
                        "server_steps": s.server_steps, "client_sampler": s.client_sampler,
                        "client_steps": s.client_steps},
            "clients": clients,
            "server": {"train_seconds": self.seconds["server.train"], "sample_seconds": self.seconds["server.sample"],
                       "params": self.server.model.num_parameters(), "handoffs_held": self.server.num_handoffs()},
            "bytes_up": sum(self.bytes_up.values()), "bytes_down": sum(self.bytes_down.values()),
            "checkpoint_seconds": self.seconds["checkpoint"],  # writing the rounds' checkpoints
            "dp": self.dp_block(), "cost": self.cost_block(),
            "participation": {"log": self.log, "refusals": refusals,
                              "missing_clients": sorted(set(range(cfg.data.clients)) - {int(c) for c in clients}),
                              "sampling_dropped": {str(c): r for c, r in (sampling_dropped or {}).items()}},
        }

    def cost_block(self) -> dict:
        """FLOPs, steps, seconds and bytes per client (as each reported its own) and of the server."""
        from collafuse.measure.cost import cost_block, server_step_flops
        cfg = self.cfg
        train_step, sample_step = server_step_flops(self.server, cfg.sampling.n)
        sampled = sum(1 for r in self.reports.values() if r.get("sampled"))
        sample_steps = (len(level_grid(cfg.schedule.T, self.server.t_c, cfg.sampling.server_steps)) - 1) * sampled
        server = {"train_flops_per_step": train_step, "train_steps": self.server.steps_done,
                  "train_flops": train_step * self.server.steps_done, "sample_flops_per_step": sample_step,
                  "sample_steps": sample_steps, "sample_flops": sample_step * sample_steps,
                  "train_seconds": self.seconds["server.train"], "sample_seconds": self.seconds["server.sample"]}
        clients = {str(c): {"train_flops": r.get("train_flops", 0), "train_steps": r.get("steps_done", 0),
                            "sample_flops": r.get("sample_flops", 0), "train_seconds": r.get("train_seconds", 0.0),
                            "sample_seconds": r.get("sample_seconds", 0.0), "bytes_up": self.bytes_up[c],
                            "bytes_down": self.bytes_down[c]}
                   for c, r in sorted(self.reports.items())}
        return cost_block(clients, server)

    def dp_block(self) -> dict:
        """Per-record (epsilon, delta) as each client's own ledger counts it: every release over its lifetime."""
        keys = ("epsilon", "delta", "records_released", "views_released")
        per_client = {str(c): {k: r.get(k) for k in keys} for c, r in sorted(self.reports.items())}
        released = [v for v in per_client.values() if v["records_released"]]
        ab = float(self.server.schedule.alpha_bar[self.server.t_c])
        deltas = {v["delta"] for v in released}
        return {"mechanism": "gaussian", "alpha_bar_cut": ab, "sigma": math.sqrt(1.0 - ab),
                "neighbouring": "replace-one record: protects a record's content, not its presence",
                "source": "each client's release ledger: every view of a record over the client's lifetime",
                # None: unbounded (c = 0, the raw record left) for some client
                "epsilon": None if any(v["epsilon"] is None for v in released) else
                max((v["epsilon"] for v in released), default=0.0),
                "delta": deltas.pop() if len(deltas) == 1 else None,
                "views": max((round(v["views_released"] / v["records_released"]) for v in released), default=0),
                "clients": per_client}

    def write_metrics(self, metrics: dict) -> Path:
        path = self.out / "metrics.json"
        path.write_text(json.dumps(metrics, indent=1))
        return path

    # -- checkpoint

    def _save(self) -> None:
        """Server state, bookkeeping and what the transport keeps of the run (in-process: the clients' models)."""
        progress = {"run": self.run_id, "round": self.round, "n_train": self.n_train, "next_view": self.next_view,
                    "reports": self.reports, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                    "seconds": self.seconds, "log": self.log,
                    "sampling": {c: protocol.encode(r).hex() for c, r in self.sampling.items()}}

        def write(folder: Path) -> None:
            save_state(folder / "server", *self.server.state())
            if hasattr(self.transport, "state"):
                self.transport.state(folder)
            (folder / "progress.json").write_text(json.dumps(progress, indent=1))
        swap_in(self.out, CHECKPOINT, write)
        self.server.store.prune()  # shard files this checkpoint does not name: replaced, forgotten or torn

    def _load(self) -> None:
        ckpt = self.out / CHECKPOINT
        if not (ckpt / "progress.json").is_file():
            raise FileNotFoundError(f"no checkpoint in {self.out}: nothing to resume; start the run without resuming")
        saved = load_config(str(self.out / "config.json"))
        if not same_run(saved, self.cfg):
            diff = sorted(k for k, v in self.cfg.to_dict().items() if k != "rounds" and saved.to_dict()[k] != v)
            raise ValueError(f"resuming continues the run saved in {self.out}, but the config differs in {diff}; "
                             f"only rounds may change on resume (use a new output folder for a new run)")
        self.server.load(*load_state(ckpt / "server"))
        p = json.loads((ckpt / "progress.json").read_text())
        self.run_id, self.round, self.log = p["run"], p["round"], p["log"]
        self.n_train = {int(c): n for c, n in p["n_train"].items()}
        self.next_view = Counter({int(c): n for c, n in p["next_view"].items()})
        self.reports = {int(c): r for c, r in p["reports"].items()}
        self.bytes_up = Counter({int(c): n for c, n in p["bytes_up"].items()})
        self.bytes_down = Counter({int(c): n for c, n in p["bytes_down"].items()})
        self.seconds = Counter(p["seconds"])
        self.sampling = {int(c): protocol.decode(bytes.fromhex(b), self.server.limits, expect=SamplingRequest)
                         for c, b in p["sampling"].items()}
        if hasattr(self.transport, "load"):
            self.transport.load(ckpt)
