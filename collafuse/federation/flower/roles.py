"""Framework-free glue for the Flower apps: a client's data folder, its policy, secret, ledger and state.

Nothing here imports flwr: the ClientApp hands each message's bytes to `client_round`/`client_samples`,
which open the client from its own disk and answer through the round engine's client side
(federation/engine.py), exactly as an in-process client answers. What protects the client comes from
the client's machine only: its policy (node config or `<state-path>/policy.toml`), its 256-bit noise
secret (`<state-path>/secret.key`, 0600) and its release ledger (`<state-path>/ledger.jsonl`), all kept
for its lifetime, across runs. The run config, which the server operator writes, only describes the
models and the run; its `client.policy` and `client.noise_secret` are ignored here.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from collafuse.config import Config, load_config
from collafuse.core import protocol
from collafuse.core.models import device_auto
from collafuse.core.protocol import RoundRequest
from collafuse.core.schedule import NoiseSchedule
from collafuse.core.state import load_state, save_state
from collafuse.federation.engine import same_run, serve_round, serve_samples
from collafuse.roles.client import Client
from collafuse.roles.noise import load_or_create_secret, pinned_secret
from collafuse.roles.policy import PrivacyPolicy, ReleaseLedger

DATA_FILE = "data.safetensors"  # a client's train/test images and labels
POLICY_FILE = "policy.toml"  # the client's policy in its state folder (node config keys take precedence)
POLICY_KEYS = ("min-cut", "modes", "max-views", "epsilon", "delta", "clip-norm")  # node config spellings
PINNED = "pinned-secret-for-tests"  # node config flag: guessable noise, for reproducible tests only


def flower_config(run_config: dict) -> Config:
    """The collafuse Config named by a Flower run config: preset, `set` overrides and rounds (0 = preset's)."""
    overrides = shlex.split(str(run_config.get("set", "")))
    if int(run_config.get("rounds", 0)):
        overrides.append(f"rounds={int(run_config['rounds'])}")
    return load_config(str(run_config.get("preset", "smoke")), overrides)


def bind_node(node: int, claimed: int, fingerprint: str | None, client_keys: dict[str, int] | None,
              client_of: dict[int, int]) -> int:
    """The client a node may speak for, or ProtocolError naming why not (nothing of it is stored then).

    With `client_keys` (the deployment's key map) a node speaks only for the client its authentication
    key is mapped to, whatever it claims. Without (simulation, --insecure), the first claim binds, for the
    run: a trust-on-first-use that an authenticated deployment does not need.
    """
    if client_keys is not None:
        if fingerprint is None or fingerprint not in client_keys:
            raise protocol.ProtocolError(f"node {node}: its key is not in the server's client-keys map")
        if client_keys[fingerprint] != claimed:
            raise protocol.ProtocolError(f"node {node}: claims client {claimed}, but its key speaks for client "
                                         f"{client_keys[fingerprint]}")
    holder = {c: n for n, c in client_of.items()}.get(claimed)
    if holder not in (None, node):
        raise protocol.ProtocolError(f"node {node}: claims client {claimed}, which node {holder} holds")
    return claimed


# ---------------------------------------------------------------- data preparation (one folder per client)

def prepare_data(cfg: Config, out: str | Path) -> list[Path]:
    """Write out/client-<k>/ for every client: its own split (data.safetensors) and the shared evaluator."""
    from collafuse.data.condition import client_condition
    from collafuse.federation.inprocess import build
    from collafuse.measure.evaluate import EVAL_FILE, EVALUATOR_FILE, domain_labels, own_classes, own_targets
    from collafuse.measure.quality import train_domain_classifier
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
    if tuple(t["train_images"].shape[1:]) != cfg.image_shape:
        raise ValueError(f"{path}: images of shape {tuple(t['train_images'].shape[1:])}, but the run config wants "
                         f"{cfg.image_shape}; prepare the data with the run's preset and --set overrides")
    return ClientData(t["train_images"], t["train_labels"], t["test_images"], t.get("train_condition"),
                      int(meta.get("num_classes", 0)))


# ---------------------------------------------------------------- the client side

@dataclass(frozen=True)
class ClientPlace:
    """Who a node is and where its files are: from the node config (deployment) or partition id (simulation)."""

    client_id: int
    data_path: Path
    state_root: Path  # the client's lifetime folder: secret, ledger, policy, and one folder per run
    node_config: tuple = ()  # the node config's (key, value) pairs: where the client's own policy is set

    def run_dir(self, run: str) -> Path:
        if not run or not run.isalnum():
            raise ValueError(f"run {run!r} is not a valid folder name; the ServerApp sends a uuid hex")
        return self.state_root / "runs" / run

    def policy(self) -> PrivacyPolicy:
        """The client's policy: <state>/policy.toml (or node config policy-file), then node config keys."""
        node = dict(self.node_config)
        path = Path(str(node["policy-file"])) if "policy-file" in node else self.state_root / POLICY_FILE
        values = PrivacyPolicy.from_file(path).__dict__.copy() if path.is_file() else {}
        source = f"{path} and the node config" if path.is_file() else "the node config"
        for key in POLICY_KEYS:
            if key in node:
                value = node[key]
                values[key.replace("-", "_")] = [m.strip() for m in str(value).split(",")] if key == "modes" \
                    else value
        return PrivacyPolicy.from_mapping(values, source)

    def secret(self, cfg: Config) -> bytes:
        if dict(self.node_config).get(PINNED) is True:
            return pinned_secret(cfg.seed, self.client_id)
        return load_or_create_secret(self.state_root)


def place_from_configs(node_config: dict, run_config: dict) -> ClientPlace:
    """Deployment: client-id, data-path (state-path optional). Simulation: partition-id + run config roots."""
    own = tuple(sorted((k, v) for k, v in node_config.items() if k in (*POLICY_KEYS, "policy-file", PINNED)))
    if "client-id" in node_config:
        if "data-path" not in node_config:
            raise ValueError("node config has client-id but no data-path; start the SuperNode with "
                             "--node-config \"client-id=K data-path='/path/to/client-K'\"")
        data = Path(str(node_config["data-path"]))
        return ClientPlace(int(node_config["client-id"]), data,
                           Path(str(node_config.get("state-path", data / "state"))), own)
    if "partition-id" in node_config:
        k = int(node_config["partition-id"])
        if not run_config.get("data-root") or not run_config.get("client-root"):
            raise ValueError("simulation needs the run config keys data-root and client-root (absolute paths): "
                             "--run-config \"data-root='/abs/data' client-root='/abs/clients'\"")
        return ClientPlace(k, Path(str(run_config["data-root"])) / f"client-{k}",
                           Path(str(run_config["client-root"])) / f"client-{k}", own)
    raise ValueError("node config names no client: set client-id and data-path in --node-config")


def open_client(cfg: Config, place: ClientPlace, run: str) -> tuple[Client, "ClientData"]:
    """The client as it was after its last message of this run (or new), under its own policy and ledger; its data."""
    folder = place.run_dir(run)
    saved_cfg = folder / "config.json"
    if saved_cfg.is_file() and not same_run(load_config(str(saved_cfg)), cfg):
        raise ValueError(f"{folder} holds a client of a run with another config; only rounds may change within a "
                         f"run: start a new out-dir on the server (a new run) or delete {folder}")
    data = load_client_data(cfg, place.client_id, place.data_path)
    # Same arguments as inprocess.build: the roles are built identically in-process and on Flower.
    client = Client.from_config(cfg, place.client_id, data.images, data.labels,
                                schedule=NoiseSchedule(cfg.schedule.T, cfg.schedule.kind), condition=data.condition,
                                num_classes=data.num_classes or None, device=device_auto(),
                                secret=place.secret(cfg), policy=place.policy(),
                                ledger=ReleaseLedger(place.state_root / "ledger.jsonl"))
    if (folder / "client.json").is_file():
        client.load(*load_state(folder / "client"))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        saved_cfg.write_text(json.dumps(cfg.to_dict(), indent=1))
    return client, data


def client_round(cfg: Config, place: ClientPlace, blob: bytes) -> list[bytes]:
    """One training message: the round engine's client side, then the client's state saved before replying."""
    run = protocol.decode(blob, expect=RoundRequest).run  # which run's model state to continue
    client, _ = open_client(cfg, place, run)
    reply = serve_round(client, cfg, blob)
    save_state(place.run_dir(run) / "client", *client.state())
    return reply


def client_samples(cfg: Config, place: ClientPlace, run: str, blob: bytes) -> list[bytes]:
    """Finish the server's handoffs; images stay in this client's run folder; numbers go back."""
    from collafuse.measure.evaluate import ClientEvaluation
    client, data = open_client(cfg, place, run)
    evaluation = ClientEvaluation.from_folder(cfg.eval.extractor, place.data_path, data.test_images, data.images)
    return serve_samples(client, cfg, blob, evaluation, place.run_dir(run))
