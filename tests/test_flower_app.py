"""The collafuse Flower app: the glue without Flower (fast), then real deployment and simulation runs (slow)."""

import json
import stat
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from collafuse.core import protocol
from collafuse.config import load_config
from collafuse.measure.evaluate import evaluate
from collafuse.federation.flower.certs import make_certificates
from collafuse.federation.flower.cli import flower_app
from collafuse.federation.flower.local import app_dir, app_run_config, run_local, start_clients
from collafuse.federation.flower.processes import LocalFederation, _descendants
from collafuse.federation.flower.roles import (ClientPlace, ServerSide, client_round, client_sample, open_client,
                                    place_from_configs, prepare_data)
from collafuse.federation.inprocess import build, train_round

REPO = Path(__file__).resolve().parents[1]
CLIENT_KEYS = ["fid", "kid_mean", "kid_std", "kid_subset_size", "n_samples", "n_reference", "own_class_share",
               "n_train", "n_test", "classes", "bytes_up", "bytes_down", "train_seconds", "sample_seconds", "params"]


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    """The smoke preset's three client folders (the same splits as the in-process run)."""
    root = tmp_path_factory.mktemp("flower-data")
    cfg = load_config("smoke")
    prepare_data(cfg, root)
    return cfg, root


def places(root: Path, state: Path, n: int = 3) -> dict[int, ClientPlace]:
    return {1000 + k: ClientPlace(k, root / f"client-{k}", state / f"client-{k}") for k in range(n)}


def run_rounds(side: ServerSide, nodes: dict[int, ClientPlace], cfg, rounds: int, skip=()) -> None:
    for _ in range(rounds):
        replied = []
        for node, place in nodes.items():
            if place.client_id in skip:
                continue
            req = side.round_request(node)
            replied.append(side.take_round_reply(
                node, client_round(cfg, place, req["session"], req["first-view"], req["fresh-views"])))
        side.end_round(replied, {}, 0.0)


def test_glue_trains_samples_and_reports_like_the_in_process_run(smoke_data, tmp_path):
    cfg, root = smoke_data
    side = ServerSide(cfg, tmp_path / "server")
    nodes = places(root, tmp_path / "clients")
    run_rounds(side, nodes, cfg, cfg.rounds)
    for node, place in nodes.items():
        side.take_sample_reply(node, [client_sample(cfg, place, side.session, side.sampling_handoffs(node))])
    flower = side.metrics()

    fed = build(cfg)  # the reference: the same roles in one process
    for _ in range(cfg.rounds):
        train_round(fed)
    reference = evaluate(fed, tmp_path / "inproc", progress=False)
    assert list(reference["clients"]["0"]) == CLIENT_KEYS
    assert sorted(flower["clients"]) == sorted(reference["clients"]) == ["0", "1", "2"]
    for cid, ours in flower["clients"].items():
        theirs = reference["clients"][cid]
        assert list(ours) == CLIENT_KEYS and ours["classes"] is None  # private labels stay with the client
        assert {k: ours[k] for k in ("n_train", "n_test", "params", "n_samples")} == \
               {k: theirs[k] for k in ("n_train", "n_test", "params", "n_samples")}
        # The same handoffs; on top, each round's reply carries a small ClientReport and the SamplingRequest.
        assert 0 < ours["bytes_up"] - theirs["bytes_up"] < 1500
        assert ours["bytes_down"] == theirs["bytes_down"] == 8416  # 32 handoffs of 1x8x8 float32 + header
    # Same initial models, same data, same client streams: the clients' losses match in-process to float precision.
    assert flower["flower"]["log"][0]["loss"]["client0"] == pytest.approx(0.994063, abs=1e-5)
    assert side.server.num_handoffs() == fed.server.num_handoffs() == 480
    for k, place in enumerate(nodes.values()):
        session = place.session_dir(side.session)
        assert sorted(p.name for p in session.iterdir()) == [
            "client.json", "client.safetensors", "config.json", "report.json", "samples.safetensors",
            f"samples_client{k}.png", "secret.json"]
        assert load_file(str(session / "samples.safetensors"))["images"].shape == (32, 1, 8, 8)
        assert stat.S_IMODE((session / "secret.json").stat().st_mode) == 0o600
    assert not list((tmp_path / "server").glob("*.png"))  # the server holds no images


def test_server_restart_resumes_and_lost_handoffs_are_remade_identically(smoke_data, tmp_path):
    cfg, root = smoke_data
    nodes = places(root, tmp_path / "clients")
    side = ServerSide(cfg, tmp_path / "server")
    run_rounds(side, nodes, cfg, 1, skip={2})  # client 2 drops out of round 1
    assert side.log[0]["replied"] == [0, 1] and side.server.num_handoffs(2) == 0
    session, held = side.session, side.server.held_handoffs(0)

    with pytest.raises(FileExistsError, match="resume=true"):
        ServerSide(cfg, tmp_path / "server")
    with pytest.raises(ValueError, match="only rounds may change"):
        ServerSide(load_config("smoke", ["cut=0.5"]), tmp_path / "server", resume=True)
    resumed = ServerSide(cfg, tmp_path / "server", resume=True)  # a restarted SuperLink's new ServerApp
    assert (resumed.session, resumed.round, resumed.client_of) == (session, 1, side.client_of)
    run_rounds(resumed, nodes, cfg, 1)  # client 2 rejoins and sends its view now
    assert resumed.log[-1]["replied"] == [0, 1, 2] and resumed.server.num_handoffs(2) == 126

    # A server that lost client 0's handoffs asks for view 0 again: same private noise, bit-identical handoffs.
    req = {**resumed.round_request(1000), "first-view": 0}
    report, _, *batches = [protocol.decode(b) for b in client_round(cfg, nodes[1000], session, 0, 1)]
    assert req["first-view"] == 0 and report.metrics["views_made"] == 1
    again = {(r, v): y for b in batches for r, v, y in zip(b.record_ids.tolist(), b.views.tolist(), b.handoffs)}
    assert all((again[k] == y).all() for k, y in held.items()) and len(again) == len(held)


def test_replies_that_must_not_be_accepted(smoke_data, tmp_path):
    cfg, root = smoke_data
    nodes = places(root, tmp_path / "clients")
    side = ServerSide(cfg, tmp_path / "server")
    req = side.round_request(1000)
    blobs = client_round(cfg, nodes[1000], side.session, req["first-view"], req["fresh-views"])
    side.take_round_reply(1000, blobs)
    with pytest.raises(protocol.ProtocolError, match="claims client 0, which belongs to another node"):
        side.take_round_reply(1001, blobs)
    with pytest.raises(protocol.ProtocolError, match="expected ClientReport, got SamplingRequest"):
        side.take_round_reply(1000, blobs[1:])
    with pytest.raises(protocol.ProtocolError, match="expected one ClientReport"):
        side.take_sample_reply(1000, blobs)
    with pytest.raises(protocol.ProtocolError, match="several clients"):
        other = client_round(cfg, nodes[1001], side.session, -1, 1)
        side.take_round_reply(1000, blobs[:2] + other[2:])


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
    with pytest.raises(FileNotFoundError, match="collafuse flower prepare-data"):
        open_client(cfg, ClientPlace(0, tmp_path / "nothing", tmp_path / "s"), "abc")
    with pytest.raises(ValueError, match="holds client 1's data, but this node is client 0"):
        open_client(cfg, ClientPlace(0, root / "client-1", tmp_path / "s"), "abc")
    with pytest.raises(ValueError, match="not a valid folder name"):
        open_client(cfg, ClientPlace(0, root / "client-0", tmp_path / "s"), "../x")
    open_client(cfg, ClientPlace(0, root / "client-0", tmp_path / "s"), "abc")
    with pytest.raises(ValueError, match="another config"):
        open_client(load_config("smoke", ["client.lr=0.01"]), ClientPlace(0, root / "client-0", tmp_path / "s"), "abc")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        ServerSide(cfg, tmp_path / "empty", resume=True)


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
    certs = make_certificates(tmp_path / "certs", n_nodes=3)
    clients, out = tmp_path / "clients", tmp_path / "server"
    with LocalFederation(tmp_path / "fed", certs=certs) as fed:
        fed.start_superlink()
        nodes = start_clients(fed, 3, root, clients, certs)
        run = fed.run_app(REPO, run_config=app_run_config("smoke", [], out, round_timeout=120), timeout=170)
        metrics = json.loads((out / "metrics.json").read_text())
        assert sorted(metrics["clients"]) == ["0", "1", "2"] and metrics["rounds"] == 2
        assert all(list(m) == CLIENT_KEYS for m in metrics["clients"].values())
        session = metrics["flower"]["session"]
        for k in range(3):  # each client's images on that client's disk, and nowhere else
            own = clients / f"client-{k}" / session
            assert (own / f"samples_client{k}.png").is_file() and (own / "samples.safetensors").is_file()
        assert sorted(p.relative_to(clients).parts[0] for p in tmp_path.rglob("samples*")) == \
            ["client-0", "client-0", "client-1", "client-1", "client-2", "client-2"]
        assert run.outbound_bytes + run.inbound_bytes > metrics["bytes_up"] + metrics["bytes_down"]

        # A third round on the restarted run; client 2 crashes while it works on it. The others finish.
        stop = threading.Event()
        killer = threading.Thread(target=kill_when_its_clientapp_runs, args=(nodes[2], stop), daemon=True)
        killer.start()
        try:
            fed.run_app(REPO, run_config=app_run_config("smoke", [], out, rounds=3, resume=True, round_timeout=40),
                        timeout=170)
        finally:
            stop.set()
        assert not nodes[2].is_running()
        metrics = json.loads((out / "metrics.json").read_text())
        log = metrics["flower"]["log"]
        assert [e["replied"] for e in log] == [[0, 1, 2], [0, 1, 2], [0, 1]] and len(log[2]["dropped"]) == 1
        assert sorted(metrics["clients"]) == ["0", "1"] and metrics["flower"]["missing_clients"] == [2]
        assert metrics["server"]["handoffs_held"] == 480  # nothing the server held from client 2 is lost
    assert live_processes_with(tmp_path) == []


@pytest.mark.slow
def test_simulation_with_ten_clients(tmp_path):
    result = run_local(load_config("smoke", ["data.clients=10"]), "smoke", ["data.clients=10"], tmp_path,
                       simulation=True, round_timeout=120, timeout=200)
    assert result.run.completed
    assert sorted(result.metrics["clients"], key=int) == [str(k) for k in range(10)]
    assert all(list(m) == CLIENT_KEYS for m in result.metrics["clients"].values())
    for k in range(10):
        assert len(list((tmp_path / "clients" / f"client-{k}").rglob(f"samples_client{k}.png"))) == 1
    assert live_processes_with(tmp_path) == []
