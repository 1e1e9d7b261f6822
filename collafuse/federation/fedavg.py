"""The FedAvg baseline: every client trains a full-chain diffusion model; Flower's own FedAvg averages them.

Each round runs the Flower message flow in process: the global weights and their EMA go down as an
ArrayRecord in a train Message, each client trains locally (the c = 1 code path, with the server's model
size: one full model), updating the EMA as it goes, and replies with its ArrayRecord and MetricRecord
"num-examples"; `flwr.serverapp.strategy.FedAvg`.aggregate_train does the weighted average of both.
Samples come from the averaged EMA, as CollaFuse's roles sample from theirs. Bytes are the serialized
ArrayRecords each way.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common import serde
from flwr.serverapp.strategy import FedAvg

from collafuse.config import Config
from collafuse.federation.inprocess import Federation, open_run, save_checkpoint

SERVER_NODE = 0


def fedavg_config(cfg: Config) -> Config:
    """The same run as cfg, with every client running the whole chain on a full (server-sized) model."""
    return dataclasses.replace(cfg, cut=1.0, client=dataclasses.replace(cfg.client, model=cfg.server.model))


def _weights(client) -> ArrayRecord:
    """What a FedAvg client holds and shares: the model and, when on, its EMA ("ema/" keys)."""
    return ArrayRecord({**client.model.state_dict(), **client.ema.state()})


def _load(client, state: dict) -> None:
    client.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("ema/")})
    client.ema.load(state, client.ema.updates)


def record_bytes(arrays: ArrayRecord) -> int:
    """Size of an ArrayRecord as Flower serializes it on the wire (its protobuf)."""
    return serde.array_record_to_proto(arrays).ByteSize()


def _instruction(arrays: ArrayRecord, node_id: int, server_round: int) -> Message:
    # Built with explicit Metadata: outside a running ServerApp there is no task identity to fill it in.
    meta = Metadata(run_id=0, message_id=f"train-{server_round}-{node_id}", src_node_id=SERVER_NODE,
                    dst_node_id=node_id, reply_to_message_id="", group_id=str(server_round), created_at=time.time(),
                    ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                   metadata=meta)


def client_update(client, instruction: Message, steps: int) -> Message:
    """A client's side of one FedAvg round: load the global weights, train locally, reply with weights and count."""
    _load(client, instruction.content["arrays"].to_torch_state_dict())
    loss = client.train(steps)
    reply = RecordDict({"arrays": _weights(client),
                        "metrics": MetricRecord({"num-examples": client.num_records, "loss": loss})})
    return Message(reply, reply_to=instruction)


def fedavg_round(fed: Federation, strategy: FedAvg, server_round: int) -> dict:
    """One FedAvg round over all clients; every client ends holding the aggregated weights."""
    t0 = time.perf_counter()
    global_arrays = _weights(fed.clients[0])  # all clients hold the global model
    size_down = record_bytes(global_arrays)
    replies = []
    for client in fed.clients:
        fed.wire.bytes_down[client.id] += size_down
        t1 = time.perf_counter()
        reply = client_update(client, _instruction(global_arrays, client.id + 1, server_round),
                              fed.cfg.client_steps)
        fed.seconds[f"client{client.id}.train"] += time.perf_counter() - t1
        fed.wire.bytes_up[client.id] += record_bytes(reply.content["arrays"])
        replies.append(reply)
    t1 = time.perf_counter()
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    state = arrays.to_torch_state_dict()
    for client in fed.clients:
        _load(client, state)
    fed.seconds["server.aggregate"] += time.perf_counter() - t1
    fed.round += 1
    return {"round": fed.round, "loss": {"fedavg": float(metrics["loss"])}, "seconds": time.perf_counter() - t0,
            "bytes_up": sum(fed.wire.bytes_up.values()), "bytes_down": sum(fed.wire.bytes_down.values())}


def fedavg_cost(fed: Federation) -> dict:
    """The cost block of a FedAvg run: every client trains and samples the whole chain; the server averages."""
    from collafuse.core.sampling import level_grid
    from collafuse.measure.cost import client_step_flops, cost_block
    n, steps = fed.cfg.sampling.n, len(level_grid(fed.schedule.T, 0, fed.cfg.sampling.client_steps)) - 1
    clients = {}
    for c in fed.clients:
        train_step, sample_step = client_step_flops(c, n)
        clients[str(c.id)] = {"train_flops": train_step * c.steps_done, "train_steps": c.steps_done,
                              "sample_flops": sample_step * steps,
                              "train_seconds": fed.seconds[f"client{c.id}.train"],
                              "sample_seconds": fed.seconds[f"client{c.id}.sample"],
                              "bytes_up": fed.wire.bytes_up[c.id], "bytes_down": fed.wire.bytes_down[c.id]}
    return cost_block(clients, {"train_flops": 0, "sample_flops": 0, "aggregate_seconds": fed.seconds["server.aggregate"]})


def run_fedavg(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True) -> tuple[dict, Federation]:
    """The FedAvg baseline of cfg (same data, splits, rounds, client steps), measured like a CollaFuse run."""
    from collafuse.measure.evaluate import evaluate
    from collafuse.measure.blocks import measure
    out, wall = Path(out), time.perf_counter()
    cfg, fed = open_run(fedavg_config(cfg), out, resume=resume)
    if not resume:  # one global initial model, as Flower's ServerApp would send in round 1
        state = _weights(fed.clients[0]).to_torch_state_dict()
        for c in fed.clients[1:]:
            _load(c, state)
    strategy = FedAvg(min_train_nodes=len(fed.clients), min_available_nodes=len(fed.clients))
    with open(out / "log.jsonl", "a") as log:
        for _ in tqdm(range(fed.round, cfg.rounds), desc="fedavg rounds", unit="round", disable=not progress):
            entry = fedavg_round(fed, strategy, fed.round + 1)
            save_checkpoint(fed, out)
            log.write(json.dumps(entry) + "\n")
    metrics = evaluate(fed, out, progress=progress)
    metrics.update(measure(fed), cost=fedavg_cost(fed))
    metrics["baseline"] = "fedavg"
    # The server sees model weights, not handoffs: the handoff mechanism's DP does not apply, and
    # attacks on shared weights (gradient inversion) are out of scope here; the pipeline MIA still holds.
    metrics["dp"] = None
    if metrics["disclosure"] is not None:
        metrics["disclosure"]["server_sees"] = "model weights"
    metrics["wall_seconds"] = time.perf_counter() - wall
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics, fed
