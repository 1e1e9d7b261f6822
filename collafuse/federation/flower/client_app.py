"""Flower ClientApp: the Client role. Each message is one large piece of work; state lives on the client's disk."""
from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from collafuse.federation.flower.roles import client_round, client_sample, flower_config, place_from_configs

app = ClientApp()
# Several SuperNodes (or Ray actors) share a machine's cores: intra-op threads only contend for them.
torch.set_num_threads(1)


def reply(msg: Message, blobs: list[bytes]) -> Message:
    return Message(RecordDict({"wire": ConfigRecord({"blobs": blobs})}), reply_to=msg)


@app.train("round")
def train_round(msg: Message, context: Context) -> Message:
    """Local steps on levels <= t_c, then the handoffs the server asked for."""
    wire = msg.content["wire"]
    blobs = client_round(flower_config(context.run_config), place_from_configs(context.node_config, context.run_config),
                         str(wire["session"]), int(wire["first-view"]), int(wire["fresh-views"]))
    return reply(msg, blobs)


@app.query("sample")
def sample(msg: Message, context: Context) -> Message:
    """Finish the server's sampling handoffs; images stay here, numbers go back."""
    wire = msg.content["wire"]
    blob = client_sample(flower_config(context.run_config), place_from_configs(context.node_config, context.run_config),
                         str(wire["session"]), bytes(wire["blobs"][0]))
    return reply(msg, [blob])
