"""Certificates and the local Flower process manager, with real flwr 1.42 processes (TLS + SuperNode auth)."""

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from collafuse.federation.flower.certs import make_certificates
from collafuse.federation.flower.cli import flower_app
from collafuse.federation.flower.processes import FlowerProcessError, LocalFederation, format_config

PAYLOAD_BYTES = 1_000_000

# A throw-away Flower app: the server sends `bytes` in a ConfigRecord, the client answers with a digest and
# its node config. The bogus dependency proves Flower never installs dependencies at run time (no network).
ECHO_PYPROJECT = """\
[project]
name = "echoapp"
version = "0.1.0"
dependencies = ["collafuse-no-such-package==0.0.0"]

[tool.flwr.app]
publisher = "collafuse"

[tool.flwr.app.components]
serverapp = "echoapp.server_app:app"
clientapp = "echoapp.client_app:app"

[tool.flwr.app.config]
out-path = ""
fail = false
"""
ECHO_SERVER = f"""\
import hashlib, json, time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config["fail"]:
        raise ValueError("failure requested by the test")
    payload = hashlib.sha256(b"seed").digest() * ({PAYLOAD_BYTES} // 32)
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({{"ins": ConfigRecord({{"payload": payload}})}}), dst_node_id=n,
                    message_type="train.echo") for n in nodes]
    replies = [m for m in grid.send_and_receive(msgs, timeout=60) if not m.has_error()]
    out = {{str(m.metadata.src_node_id): dict(m.content["res"]) for m in replies}}
    with open(context.run_config["out-path"], "w") as f:
        json.dump({{"sent-sha256": hashlib.sha256(payload).hexdigest(), "replies": out}}, f)
"""
ECHO_CLIENT = """\
import hashlib
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train("echo")
def echo(msg: Message, context: Context) -> Message:
    payload = msg.content["ins"]["payload"]
    res = ConfigRecord({"sha256": hashlib.sha256(payload).hexdigest(), "n-bytes": len(payload),
                        "client-id": context.node_config["client-id"], "data-path": context.node_config["data-path"]})
    return Message(RecordDict({"res": res}), reply_to=msg)
"""


def write_echo_app(root: Path) -> Path:
    app = root / "echoapp"
    (app / "echoapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(ECHO_PYPROJECT)
    (app / "echoapp" / "__init__.py").write_text("")
    (app / "echoapp" / "server_app.py").write_text(ECHO_SERVER)
    (app / "echoapp" / "client_app.py").write_text(ECHO_CLIENT)
    return app


def live_processes_with(marker: Path) -> list[int]:
    """Pids of live processes whose environment mentions `marker` (every Flower process inherits FLWR_HOME)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(marker).encode() in environ and state != "Z":
            found.append(int(entry))
    return found


def test_certificates_chain_sans_and_node_keys(tmp_path):
    certs = make_certificates(tmp_path / "c", hosts=("localhost", "127.0.0.1", "link.lan"), n_nodes=2)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "link.lan"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private, public in zip(certs.node_private_keys, certs.node_public_keys):
        key = load_ssh_private_key(private.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert load_ssh_public_key(public.read_bytes()) == key.public_key()
    for secret in (certs.ca_key, certs.server_key, *certs.node_private_keys):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len({p.read_bytes() for p in certs.node_public_keys}) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_nodes": -1}, "n_nodes"), ({"n_nodes": 1, "hosts": ()}, "hosts"),
     ({"n_nodes": 1, "valid_days": 0}, "valid_days")],
)
def test_certificates_reject_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_certificates(tmp_path, **kwargs)


def test_cli_certs_prints_how_to_register_every_node(tmp_path):
    result = CliRunner().invoke(flower_app, ["certs", "--out", str(tmp_path), "--nodes", "3", "--host", "link.lan"])
    assert result.exit_code == 0, result.output
    for k in range(3):
        assert f"flwr supernode register {tmp_path}/nodes/node-{k}.pub collafuse" in result.output
    assert "--enable-supernode-auth" in result.output and "--disable-runtime-dependency-installation" in result.output


def test_format_config_renders_flower_key_value_pairs():
    rendered = format_config({"data-path": "/d/client 0", "client-id": 3, "lr": 0.5, "dp": True})
    assert rendered == "data-path='/d/client 0' client-id=3 lr=0.5 dp=true"


@pytest.mark.parametrize(
    "values, match",
    [({"p": "it's"}, "quote"), ({"bad key": 1}, "invalid"), ({"k": [1]}, "type list")],
)
def test_format_config_rejects_what_flower_cannot_parse(values, match):
    with pytest.raises(ValueError, match=match):
        format_config(values)


def test_local_federation_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="insecure=True"):
        LocalFederation(tmp_path)
    certs = make_certificates(tmp_path / "c", n_nodes=1)
    with pytest.raises(ValueError, match="pass one of them"):
        LocalFederation(tmp_path, certs=certs, insecure=True)
    fed = LocalFederation(tmp_path, certs=certs)  # nothing is started in this test
    with pytest.raises(ValueError, match="start_superlink"):
        fed.start_supernode({"client-id": 0}, private_key=certs.node_private_keys[0])
    with pytest.raises(FileNotFoundError, match="collafuse flower certs"):
        fed.register_node(tmp_path / "missing.pub")
    with pytest.raises(ValueError, match="private_key"):
        fed.start_supernode({"client-id": 0})
    with pytest.raises(FileNotFoundError, match="pyproject.toml"):
        fed.run_app(tmp_path)
    with pytest.raises(ValueError, match="simulation=True"):
        fed.run_app(write_echo_app(tmp_path), federation_config={"num-supernodes": 10})
    with pytest.raises(ValueError, match="start_superlink"):
        fed.run_app(tmp_path / "echoapp")
    with pytest.raises(ValueError, match="start no SuperNodes"):
        LocalFederation(tmp_path, insecure=True, simulation=True).start_supernode({"client-id": 0})


def test_tls_federation_refuses_stranger_survives_restart_runs_app_and_stops_everything(tmp_path):
    certs = make_certificates(tmp_path / "certs", n_nodes=2)
    app = write_echo_app(tmp_path)
    data_path = tmp_path / "client 0"  # a space, to prove node-config quoting
    with LocalFederation(tmp_path / "fed", certs=certs) as fed:
        fed.start_superlink()
        with pytest.raises(ValueError, match="already started"):
            fed.start_superlink()
        node_id = fed.register_node(certs.node_public_keys[0])
        node = fed.start_supernode({"client-id": 0, "data-path": str(data_path)},
                                   private_key=certs.node_private_keys[0])
        assert fed.wait_for_supernode(node) == node_id

        stranger = fed.start_supernode({"client-id": 1, "data-path": "x"}, private_key=certs.node_private_keys[1],
                                       wait=False)
        with pytest.raises(FlowerProcessError, match="did not connect"):
            fed.wait_for_supernode(stranger, timeout=0.0)
        with pytest.raises(FlowerProcessError, match="Failed to activate SuperNode"):
            fed.wait_for_supernode(stranger)
        assert stranger.popen.returncode == 1
        assert "ApiError:2004" in fed.superlink.log_path.read_text()
        assert node.is_running()

        fed.restart_superlink()  # same port and database: the registered node reconnects by itself
        run = fed.run_app(app, run_config={"out-path": str(tmp_path / "out.json")}, timeout=120)
        out = json.loads((tmp_path / "out.json").read_text())
        assert out["replies"] == {
            str(node_id): {"sha256": out["sent-sha256"], "n-bytes": PAYLOAD_BYTES, "client-id": 0,
                           "data-path": str(data_path)}
        }
        sent = hashlib.sha256(b"seed").digest() * (PAYLOAD_BYTES // 32)
        assert out["sent-sha256"] == hashlib.sha256(sent).hexdigest()
        assert run.completed and run.outbound_bytes + run.inbound_bytes > PAYLOAD_BYTES

        with pytest.raises(FlowerProcessError, match="finished:failed.*failure requested by the test"):
            fed.run_app(app, run_config={"fail": True}, timeout=120)
        with pytest.raises(FlowerProcessError, match="did not start a run"):
            fed.run_app(app, run_config={"no-such-key": 1}, timeout=120)
        assert live_processes_with(tmp_path)  # the SuperLink, its SuperExec, the SuperNode...
    assert live_processes_with(tmp_path) == []


def test_superlink_that_cannot_start_reports_its_log(tmp_path):
    certs = make_certificates(tmp_path / "certs", n_nodes=0)
    certs.server_key.write_text("not a key")
    with LocalFederation(tmp_path / "fed", certs=certs) as fed:
        with pytest.raises(FlowerProcessError, match="SuperLink exited with code .* Log tail"):
            fed.start_superlink()
    assert live_processes_with(tmp_path) == []
