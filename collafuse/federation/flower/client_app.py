"""Flower ClientApp: the client side of the round engine. Each message is one large piece of work; state lives
on the client's disk, and what protects the client (policy, secret, ledger) comes from its node, not the run."""
from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from collafuse.core import protocol
from collafuse.core.protocol import ClientReport
from collafuse.federation.flower.roles import client_round, client_samples, flower_config, place_from_configs

app = ClientApp()
# Several SuperNodes (or Ray actors) share a machine's cores: intra-op threads only contend for them.
torch.set_num_threads(1)


def reply(msg: Message, blobs: list[bytes]) -> Message:
    return Message(RecordDict({"wire": ConfigRecord({"blobs": blobs})}), reply_to=msg)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Say which client this node is (its node config's client id), and nothing else."""
    place = place_from_configs(context.node_config, context.run_config)
    return reply(msg, [protocol.encode(ClientReport(client_id=place.client_id, metrics={}))])


@app.train("round")
def train_round(msg: Message, context: Context) -> Message:
    """The server's RoundRequest, answered as this client's own policy allows."""
    blob = bytes(msg.content["wire"]["blobs"][0])
    return reply(msg, client_round(flower_config(context.run_config),
                                   place_from_configs(context.node_config, context.run_config), blob))


@app.query("sample")
def sample(msg: Message, context: Context) -> Message:
    """Finish the server's sampling handoffs; images stay here, numbers go back."""
    wire = msg.content["wire"]
    return reply(msg, client_samples(flower_config(context.run_config),
                                     place_from_configs(context.node_config, context.run_config),
                                     str(wire["run"]), bytes(wire["blobs"][0])))
