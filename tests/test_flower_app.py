"""The collafuse Flower app: the glue without Flower (fast), then real deployment and simulation runs (slow)."""

import json
import re
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from collafuse.cli import app as cli_app

from collafuse.core import protocol
from collafuse.config import load_config
from collafuse.core.protocol import HandoffBatch, Refusal
from collafuse.federation.engine import ROUND, Engine
from collafuse.federation.flower.certs import key_fingerprint, load_client_keys, make_certificates
from collafuse.federation.flower.cli import flower_app
from collafuse.federation.flower.local import app_dir, app_run_config, start_clients
from collafuse.federation.flower.processes import LocalFederation, _descendants
from collafuse.federation.flower.roles import (ClientPlace, bind_node, client_round, client_samples, open_client,
                                               place_from_configs, prepare_data)
from collafuse.federation.inprocess import run
from collafuse.roles.policy import ReleaseLedger
from test_run import PINNED

REPO = Path(__file__).resolve().parents[1]
CLIENT_KEYS = {"fid", "kid_mean", "kid_std", "kid_subset_size", "n_samples", "n_reference", "own_class_share",
               "fid_noise", "kid_noise", "fid_ceiling", "kid_ceiling", "fid_score", "kid_score",
               "own_class_share_noise", "own_class_share_ceiling", "failed", "quality_note",
               "n_train", "n_test", "records_released", "views_released", "epsilon", "delta", "bytes_up",
               "bytes_down", "train_seconds", "sample_seconds", "params"}


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    """The smoke preset's three client folders (the same splits as the in-process run)."""
    root = tmp_path_factory.mktemp("flower-data")
    cfg = load_config("smoke")
    prepare_data(cfg, root)
    return cfg, root


def places(root: Path, state: Path, n: int = 3, **node_config) -> dict[int, ClientPlace]:
    own = tuple(sorted(node_config.items()))
    return {k: ClientPlace(k, root / f"client-{k}", state / f"client-{k}", own) for k in range(n)}


class GlueTransport:
    """The ClientApp's path without Flower: each request's bytes go to client_round / client_samples."""

    def __init__(self, cfg, places: dict[int, ClientPlace], skip=()):
        self.cfg, self.places, self.skip, self.run = cfg, places, set(skip), ""
        self.captured: list[tuple[int, bytes]] = []  # everything the clients sent

    def clients(self):
        return [k for k in self.places if k not in self.skip]

    def exchange(self, kind, requests):
        replies = {}
        for cid, blob in requests.items():
            place = self.places[cid]
            replies[cid] = client_round(self.cfg, place, blob) if kind == ROUND else \
                client_samples(self.cfg, place, self.run, blob)
            self.captured += [(cid, b) for b in replies[cid]]
        return replies


def glue_run(cfg, out: Path, nodes: dict[int, ClientPlace], *, resume=False, skip=(), sample=True):
    transport = GlueTransport(cfg, nodes, skip)
    engine = Engine(cfg, out, transport, resume=resume)
    transport.run = engine.run_id
    engine.run_rounds()
    return engine, transport, engine.metrics(engine.sample() if sample else None)


def test_glue_trains_samples_and_reports_like_the_in_process_run(smoke_data, tmp_path):
    cfg, root = smoke_data
    nodes = places(root, tmp_path / "clients", **{"pinned-secret-for-tests": True})
    engine, _, flower = glue_run(cfg, tmp_path / "server", nodes)
    reference, _ = run(cfg, tmp_path / "inproc", progress=False)  # the same roles and engine in one process
    assert sorted(flower["clients"]) == sorted(reference["clients"]) == ["0", "1", "2"]
    for cid, ours in flower["clients"].items():
        theirs = reference["clients"][cid]
        assert set(ours) == set(theirs) == CLIENT_KEYS  # the same metrics block, written once by the engine
        # Same messages: the same bytes each way (up to the digits of the reports' timings); the same ledger.
        for key in ("n_train", "n_test", "params", "n_samples", "bytes_down", "records_released",
                    "views_released", "epsilon",
                    "fid_noise", "kid_noise", "fid_ceiling", "kid_ceiling"):  # the same floor and ceiling images
            assert ours[key] == theirs[key], (cid, key)
        assert abs(ours["bytes_up"] - theirs["bytes_up"]) <= 3 * 8
        assert ours["bytes_down"] == 8416 + 2 * 280  # 32 handoffs of 1x8x8 float32 + header; 2 RoundRequests
    assert flower["dp"] == reference["dp"]
    # Same initial models, data and streams, the same order of operations: the same losses.
    for ours, theirs in zip(flower["participation"]["log"], reference["participation"]["log"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
    first = flower["participation"]["log"][0]["loss"]
    assert first["client0"] == pytest.approx(PINNED["client0_loss_round1"], abs=1e-5)
    assert engine.server.num_handoffs() == 480
    for k, place in nodes.items():
        run_dir = place.run_dir(engine.run_id)
        assert sorted(p.name for p in run_dir.iterdir()) == [
            "client.json", "client.safetensors", "config.json", f"samples_client{k}.png"]
        assert sorted(p.name for p in place.state_root.iterdir()) == ["ledger.jsonl", "runs"]  # pinned: no secret
    assert not list((tmp_path / "server").glob("*.png"))  # the server holds no images


def test_a_private_secret_is_made_once_per_client_and_kept(smoke_data, tmp_path):
    cfg, root = smoke_data
    nodes = places(root, tmp_path / "clients")
    glue_run(cfg, tmp_path / "a", nodes, sample=False)
    secrets = {k: (p.state_root / "secret.key").read_bytes() for k, p in nodes.items()}
    assert all(len(s) == 32 and stat.S_IMODE((nodes[k].state_root / "secret.key").stat().st_mode) == 0o600
               for k, s in secrets.items())
    assert len(set(secrets.values())) == 3
    glue_run(cfg, tmp_path / "b", nodes, sample=False)  # a new run (new out-dir, new run id): the same secret
    assert secrets == {k: (p.state_root / "secret.key").read_bytes() for k, p in nodes.items()}


@pytest.mark.parametrize("overrides,reason", [
    (["cut=0", "client.policy.min_cut=0"], "cut level 0 .*below .*min_cut=0.2"),
    (["handoff.mode=fresh", "client.policy.modes=[\"fresh\"]", "client.policy.max_views=1000"], "mode 'fresh'"),
    (["handoff.views=4", "client.policy.max_views=4"], "max_views=1"),
])
def test_the_run_config_cannot_choose_a_clients_privacy(smoke_data, tmp_path, overrides, reason):
    """A curious server writes the run config: asking for raw images, fresh views or more views is refused."""
    _, root = smoke_data
    cfg = load_config("smoke", overrides)  # the operator even writes a client.policy: Flower clients ignore it
    nodes = places(root, tmp_path / "clients")
    engine, transport, metrics = glue_run(cfg, tmp_path / "server", nodes, sample=False)
    sent = [protocol.decode(b) for _, b in transport.captured]
    assert sent and all(isinstance(m, Refusal) for m in sent)  # nothing but refusals left the clients
    assert engine.server.num_handoffs() == 0
    for entry in metrics["participation"]["log"]:
        assert sorted(entry["refused"]) == ["0", "1", "2"] and entry["replied"] == []
        assert all(re.search(reason, r) for r in entry["refused"].values()), entry["refused"]
    assert all(ReleaseLedger(p.state_root / "ledger.jsonl").summary(1e-5)["records"] == 0 for p in nodes.values())


def test_a_clients_own_policy_comes_from_its_node(smoke_data, tmp_path):
    cfg, root = smoke_data
    nodes = places(root, tmp_path / "clients", **{"min-cut": 0.4})
    nodes[1] = places(root, tmp_path / "clients")[1]  # client 1 keeps the default policy
    (nodes[2].state_root).mkdir(parents=True)
    (nodes[2].state_root / "policy.toml").write_text("min_cut = 0.1\n")  # node keys win over the policy file
    engine, transport, metrics = glue_run(cfg, tmp_path / "server", nodes, sample=False)
    entry = metrics["participation"]["log"][0]
    assert entry["replied"] == [1] and sorted(entry["refused"]) == ["0", "2"]
    assert engine.server.num_handoffs(0) == engine.server.num_handoffs(2) == 0 < engine.server.num_handoffs(1)
    assert not any(isinstance(protocol.decode(b), HandoffBatch) for cid, b in transport.captured if cid != 1)


def test_two_runs_of_one_client_release_no_view_beyond_its_policy(smoke_data, tmp_path):
    cfg, root = smoke_data
    nodes = places(root, tmp_path / "clients")
    first, t1, _ = glue_run(cfg, tmp_path / "run-a", nodes, sample=False)
    sent_a = {(cid, r, v): y for cid, b in t1.captured if isinstance(m := protocol.decode(b), HandoffBatch)
              for r, v, y in zip(m.record_ids.tolist(), m.views.tolist(), m.handoffs)}
    # A second run (new out-dir, new run id) asks for view 0 again: re-made bit for bit, nothing new is released.
    second, t2, _ = glue_run(cfg, tmp_path / "run-b", nodes, sample=False)
    assert second.run_id != first.run_id
    sent_b = {(cid, r, v): y for cid, b in t2.captured if isinstance(m := protocol.decode(b), HandoffBatch)
              for r, v, y in zip(m.record_ids.tolist(), m.views.tolist(), m.handoffs)}
    assert sent_a.keys() == sent_b.keys() and all(torch.equal(sent_a[k], sent_b[k]) for k in sent_a)
    # A third run asks for a second view of every record: beyond max_views=1, refused; nothing leaves.
    _, t3, metrics = glue_run(load_config("smoke", ["handoff.views=2"]), tmp_path / "run-c", nodes, sample=False)
    assert all(isinstance(protocol.decode(b), Refusal) for _, b in t3.captured)
    assert all("max_views=1" in r for r in metrics["participation"]["log"][0]["refused"].values())
    for k, place in nodes.items():  # the ledger shows every release once: one line, each record one view
        ledger = ReleaseLedger(place.state_root / "ledger.jsonl")
        summary = ledger.summary(1e-5)
        assert summary["entries"] == 1 and summary["max_views"] == 1
        assert summary["records"] == summary["record_views"] == first.n_train[k]
    result = CliRunner().invoke(cli_app, ["ledger", "--client-state", str(nodes[0].state_root)])
    assert result.exit_code == 0 and json.loads(result.output)["record_views"] == first.n_train[0]


def test_server_restart_resumes_and_lost_handoffs_are_remade_identically(smoke_data, tmp_path):
    cfg, root = smoke_data
    nodes = places(root, tmp_path / "clients")
    transport = GlueTransport(cfg, nodes, skip={2})  # client 2 is away in round 1
    engine = Engine(cfg, tmp_path / "server", transport)
    engine.run_round()
    assert engine.log[0]["replied"] == [0, 1] and engine.server.num_handoffs(2) == 0
    run_id, held = engine.run_id, engine.server.held_handoffs(0)

    with pytest.raises(FileExistsError, match="resume"):
        Engine(cfg, tmp_path / "server", transport)
    with pytest.raises(ValueError, match="only rounds may change"):
        Engine(load_config("smoke", ["cut=0.5"]), tmp_path / "server", transport, resume=True)
    transport.skip = set()
    resumed = Engine(cfg, tmp_path / "server", transport, resume=True)  # a restarted SuperLink's new ServerApp
    assert (resumed.run_id, resumed.round) == (run_id, 1)
    resumed.run_round()  # client 2 rejoins and sends its view now
    assert resumed.log[-1]["replied"] == [0, 1, 2] and resumed.server.num_handoffs(2) == 126

    # A server that lost client 0's handoffs asks for view 0 again: same private noise, bit-identical handoffs.
    resumed.server.forget(0)
    request = resumed.request(0)
    assert request.first_view == 0 and request.n_views == 1
    report, _, *batches = [protocol.decode(b) for b in client_round(cfg, nodes[0], protocol.encode(request))]
    again = {(r, v): y for b in batches for r, v, y in zip(b.record_ids.tolist(), b.views.tolist(), b.handoffs)}
    assert all(torch.equal(again[k], y) for k, y in held.items()) and len(again) == len(held)
    assert report.metrics["views_released"] == len(held)  # re-sending released nothing new


def test_replies_that_must_not_be_accepted(smoke_data, tmp_path):
    cfg, root = smoke_data
    nodes = places(root, tmp_path / "clients")
    engine = Engine(cfg, tmp_path / "server", GlueTransport(cfg, nodes))
    request = engine.request(0)
    blobs = client_round(cfg, nodes[0], protocol.encode(request))
    held = engine.server.num_handoffs()
    with pytest.raises(protocol.ProtocolError, match=r"client 1 sent messages in the name of client\(s\) \[0\]"):
        engine.take_round_reply(1, engine.request(1), blobs)
    with pytest.raises(protocol.ProtocolError, match="expected a ClientReport"):
        engine.take_round_reply(0, request, blobs[1:])
    with pytest.raises(protocol.ProtocolError, match="no messages"):
        engine.take_round_reply(0, request, [])
    other = client_round(cfg, nodes[2], protocol.encode(engine.request(2)))  # 126 records: ids in 0's range
    with pytest.raises(protocol.ProtocolError, match=r"client 0 sent messages in the name of client\(s\) \[2\]"):
        engine.take_round_reply(0, request, blobs[:2] + other[2:])
    assert engine.server.num_handoffs() == held == 0  # nothing of a rejected reply is kept
    engine.take_round_reply(0, request, blobs)
    assert engine.server.num_handoffs() == 162


def test_a_node_speaks_only_for_the_client_its_key_is_mapped_to(tmp_path):
    certs = make_certificates(tmp_path / "certs", n_nodes=2)
    keys = load_client_keys(certs.client_keys)
    pubs = [p.read_bytes() for p in certs.node_public_keys]
    fps = [key_fingerprint(p) for p in pubs]
    assert keys == {fps[0]: 0, fps[1]: 1} and len(set(fps)) == 2
    # The same key in another encoding (as a SuperLink may store it) has the same fingerprint.
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_ssh_public_key(pubs[1])
    for encoding, fmt in ((serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
                          (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)):
        assert key_fingerprint(key.public_bytes(encoding, fmt)) == fps[1]
    with pytest.raises(ValueError, match="not a public key"):
        key_fingerprint(b"garbage")
    client_of = {}
    # A node with a valid key for client 1 that claims client 0 is refused; the real client 0 then binds.
    with pytest.raises(protocol.ProtocolError, match="claims client 0, but its key speaks for client 1"):
        bind_node(11, 0, fps[1], keys, client_of)
    with pytest.raises(protocol.ProtocolError, match="not in the server's client-keys map"):
        bind_node(12, 0, "ab" * 32, keys, client_of)
    with pytest.raises(protocol.ProtocolError, match="not in the server's client-keys map"):
        bind_node(13, 0, None, keys, client_of)  # a node without a key (an insecure one) in a keyed run
    client_of[10] = bind_node(10, 0, fps[0], keys, client_of)
    assert client_of == {10: 0}
    # Without a key map (simulation, --insecure) the first claim binds, and a second claimant is refused.
    with pytest.raises(protocol.ProtocolError, match="claims client 0, which node 10 holds"):
        bind_node(14, 0, None, None, client_of)
    assert bind_node(10, 0, None, None, client_of) == 0
    certs.client_keys.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected"):
        load_client_keys(certs.client_keys)
    with pytest.raises(FileNotFoundError, match="collafuse flower certs"):
        load_client_keys(tmp_path / "none.json")


def test_client_configuration_errors_name_the_fix(smoke_data, tmp_path):
    cfg, root = smoke_data
    with pytest.raises(ValueError, match="no data-path"):
        place_from_configs({"client-id": 0}, {})
    with pytest.raises(ValueError, match="data-root and client-root"):
        place_from_configs({"partition-id": 3, "num-partitions": 10}, {"data-root": ""})
    with pytest.raises(ValueError, match="names no client"):
        place_from_configs({}, {})
    assert place_from_configs({"partition-id": 2}, {"data-root": "/d", "client-root": "/c"}) == \
        ClientPlace(2, Path("/d/client-2"), Path("/c/client-2"))
    assert place_from_configs({"client-id": 1, "data-path": "/d/x"}, {}).state_root == Path("/d/x/state")
    assert place_from_configs({"client-id": 1, "data-path": "/d/x", "min-cut": 0.4, "lr": 3}, {}).node_config == \
        (("min-cut", 0.4),)  # only the client's own privacy keys are kept
    with pytest.raises(FileNotFoundError, match="collafuse flower prepare-data"):
        open_client(cfg, ClientPlace(0, tmp_path / "nothing", tmp_path / "s"), "abc")
    with pytest.raises(ValueError, match="holds client 1's data, but this node is client 0"):
        open_client(cfg, ClientPlace(0, root / "client-1", tmp_path / "s"), "abc")
    with pytest.raises(ValueError, match="not a valid folder name"):
        open_client(cfg, ClientPlace(0, root / "client-0", tmp_path / "s"), "../x")
    with pytest.raises(ValueError, match="the node config: privacy policy max_views = 0 is invalid"):
        open_client(cfg, ClientPlace(0, root / "client-0", tmp_path / "s", (("max-views", 0),)), "abc")
    open_client(cfg, ClientPlace(0, root / "client-0", tmp_path / "s"), "abc")
    with pytest.raises(ValueError, match="another config"):
        open_client(load_config("smoke", ["client.lr=0.01"]), ClientPlace(0, root / "client-0", tmp_path / "s"), "abc")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Engine(cfg, tmp_path / "empty", GlueTransport(cfg, {}), resume=True)


def test_cli_prepare_data_writes_one_folder_per_client(tmp_path):
    result = CliRunner().invoke(flower_app, ["prepare-data", "--config", "smoke", "--set", "data.clients=2",
                                             "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-0", "client-1"]
    assert sorted(p.name for p in (tmp_path / "client-1").iterdir()) == [
        "data.safetensors", "evaluation.json", "evaluator.safetensors"]
    bad = CliRunner().invoke(flower_app, ["prepare-data", "--config", "nope", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown preset 'nope'" in bad.output


def test_app_dir_is_the_checkout_with_the_flower_app(tmp_path):
    assert app_dir() == REPO
    with pytest.raises(FileNotFoundError, match=r"\[tool.flwr.app\]"):
        app_dir(tmp_path)


def live_processes_with(marker: Path) -> list[int]:
    """Pids of live (non-zombie) processes whose environment mentions `marker`."""
    from test_flower_infra import live_processes_with as live
    return live(marker)


def kill_when_its_clientapp_runs(node, stop: threading.Event) -> None:
    """Crash a SuperNode (SIGKILL, whole tree) as soon as it runs a ClientApp: a client lost mid-round."""
    while not stop.is_set():
        cmdlines = []
        for pid in _descendants(node.pid):
            try:
                cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                pass
        if any(b"flwr-clientapp" in c for c in cmdlines):
            node.kill()
            return
        time.sleep(0.1)


@pytest.mark.slow
def test_deployment_tls_auth_three_clients_then_resume_with_one_killed_mid_round(smoke_data, tmp_path):
    cfg, root = smoke_data
    certs = make_certificates(tmp_path / "certs", n_nodes=4)
    # A fourth node holds a valid, registered key that speaks for client 1, and claims client 0.
    keys = json.loads(certs.client_keys.read_text())
    keys = {fp: (1 if k == 3 else k) for fp, k in keys.items()}
    certs.client_keys.write_text(json.dumps(keys))
    clients, out = tmp_path / "clients", tmp_path / "server"
    with LocalFederation(tmp_path / "fed", certs=certs) as fed:
        fed.start_superlink()
        nodes = start_clients(fed, 3, root, clients, certs)
        fed.register_node(certs.node_public_keys[3])
        rogue = fed.start_supernode({"client-id": 0, "data-path": str(root / "client-0"),
                                     "state-path": str(tmp_path / "rogue")}, private_key=certs.node_private_keys[3])
        config = lambda folder, **kw: app_run_config("smoke", kw.pop("overrides", []), folder,
                                                     client_keys=certs.client_keys, **kw)
        # Generous limits: on 2 busy cores a round of 4 SuperNodes, each starting a ClientApp process that imports
        # torch and diffusers, took 45-80 s (measured); a limit only ends a stuck run sooner.
        run = fed.run_app(REPO, run_config=config(out, round_timeout=240), timeout=480)
        metrics = json.loads((out / "metrics.json").read_text())
        assert sorted(metrics["clients"]) == ["0", "1", "2"] and metrics["rounds"] == 2
        # The impersonator is refused before anything is stored; the real client 0 works.
        assert sorted(metrics["flower"]["nodes"].values()) == [0, 1, 2]
        assert str(fed.wait_for_supernode(rogue)) not in metrics["flower"]["nodes"]
        assert "claims client 0, but its key speaks for client 1" in run.output
        assert not (tmp_path / "rogue" / "ledger.jsonl").exists()  # it stays up: refused at every round's hello
        assert all(set(m) == CLIENT_KEYS for m in metrics["clients"].values())
        assert metrics["dp"]["epsilon"] > 0 and metrics["cost"] is not None
        for k in range(3):  # each client's images on that client's disk, and nowhere else
            own = clients / f"client-{k}" / "runs" / metrics["run"]
            assert (own / f"samples_client{k}.png").is_file()
        assert sorted(p.relative_to(clients).parts[0] for p in tmp_path.rglob("samples*")) == \
            ["client-0", "client-1", "client-2"]
        assert run.outbound_bytes + run.inbound_bytes > metrics["bytes_up"] + metrics["bytes_down"]

        # A curious operator starts a new run that asks for the raw images (cut 0, and a client.policy saying
        # so): every client refuses, and nothing more enters any client's ledger.
        curious = tmp_path / "curious"
        fed.run_app(REPO, run_config=config(curious, overrides=["cut=0", "client.policy.min_cut=0"], rounds=1,
                                            round_timeout=120), timeout=300)
        refused = json.loads((curious / "metrics.json").read_text())
        assert sorted(refused["participation"]["log"][0]["refused"]) == ["0", "1", "2"]
        assert refused["server"]["handoffs_held"] == 0
        for k in range(3):
            assert ReleaseLedger(clients / f"client-{k}" / "ledger.jsonl").summary(1e-5)["entries"] == 1

        # A third round on the restarted run; client 2 crashes while it works on it. The others finish.
        stop = threading.Event()
        killer = threading.Thread(target=kill_when_its_clientapp_runs, args=(nodes[2], stop), daemon=True)
        killer.start()
        try:
            fed.run_app(REPO, run_config=config(out, rounds=3, resume=True, round_timeout=90), timeout=400)
        finally:
            stop.set()
        assert not nodes[2].is_running()
        metrics = json.loads((out / "metrics.json").read_text())
        log = metrics["participation"]["log"]
        assert [e["replied"] for e in log] == [[0, 1, 2], [0, 1, 2], [0, 1]] and len(log[2]["dropped"]) == 1
        assert sorted(metrics["clients"]) == ["0", "1"] and metrics["participation"]["missing_clients"] == [2]
        assert metrics["server"]["handoffs_held"] == 480  # nothing the server held from client 2 is lost

    assert live_processes_with(tmp_path) == []


def poison(data_folder: Path) -> None:
    """Make a client's records 1e30 (finite): every handoff it sends is far beyond what the mechanism makes."""
    path = data_folder / "data.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file({**tensors, "train_images": tensors["train_images"] * 1e30}, str(path), metadata=meta)


@pytest.mark.slow
def test_deployment_where_one_supernode_poisons_every_round(tmp_path):
    cfg = load_config("smoke", ["rounds=2"])
    data_root, client_root = tmp_path / "data", tmp_path / "clients"
    prepare_data(cfg, data_root)
    poison(data_root / "client-2")
    with LocalFederation(tmp_path / "fed", insecure=True) as fed:
        fed.start_superlink()
        start_clients(fed, 3, data_root, client_root, None)
        run = fed.run_app(REPO, run_config=app_run_config("smoke", [], tmp_path / "server", round_timeout=240),
                          timeout=400)
    assert run.completed
    metrics = json.loads((tmp_path / "server" / "metrics.json").read_text())
    assert [e["replied"] for e in metrics["participation"]["log"]] == [[0, 1], [0, 1]]
    assert all("handoff_bound" in e["dropped"]["2"] for e in metrics["participation"]["log"])
    assert sorted(metrics["clients"]) == ["0", "1"] and metrics["server"]["handoffs_held"] == 162 + 192
    server = load_file(str(tmp_path / "server" / "checkpoint" / "server.safetensors"))
    assert all(torch.isfinite(t).all() for t in server.values() if t.is_floating_point())
    assert live_processes_with(tmp_path) == []


@pytest.mark.slow
def test_simulation_with_ten_clients_one_of_them_poisoning(tmp_path):
    """Ten clients on Flower's simulation engine; client 9's records are 1e30: its handoffs are out of range."""
    cfg = load_config("smoke", ["data.clients=10"])
    data_root, client_root = tmp_path / "data", tmp_path / "clients"
    prepare_data(cfg, data_root)
    poison(data_root / "client-9")
    with LocalFederation(tmp_path / "flower", insecure=True, simulation=True) as fed:
        fed.start_superlink()
        run = fed.run_app(REPO, run_config=app_run_config("smoke", ["data.clients=10"], tmp_path / "server",
                                                          round_timeout=120, data_root=data_root,
                                                          client_root=client_root),
                          federation_config={"num-supernodes": 10, "client-resources-num-cpus": 1}, timeout=480)
    assert run.completed
    metrics = json.loads((tmp_path / "server" / "metrics.json").read_text())
    for entry in metrics["participation"]["log"]:  # every round completes for the nine others
        assert entry["replied"] == list(range(9)) and "handoff_bound" in entry["dropped"]["9"]
    assert sorted(metrics["clients"], key=int) == [str(k) for k in range(9)]
    assert metrics["participation"]["missing_clients"] == [9]
    assert all(set(m) == CLIENT_KEYS for m in metrics["clients"].values())
    server = load_file(str(tmp_path / "server" / "checkpoint" / "server.safetensors"))
    assert all(torch.isfinite(t).all() for k, t in server.items() if t.is_floating_point())
    assert metrics["server"]["handoffs_held"] == sum(metrics["clients"][str(k)]["n_train"] for k in range(9))
    for k in range(9):
        assert len(list((client_root / f"client-{k}").rglob(f"samples_client{k}.png"))) == 1
    assert live_processes_with(tmp_path) == []
