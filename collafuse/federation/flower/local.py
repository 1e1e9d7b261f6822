"""Run the collafuse Flower app on this machine: a TLS + auth deployment (one SuperNode per client) or a simulation."""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from collafuse.config import Config
from collafuse.federation.flower.certs import Certificates, make_certificates
from collafuse.federation.flower.processes import FlowerProcess, FlowerRun, LocalFederation
from collafuse.federation.flower.roles import prepare_data

APP_DIR = Path(__file__).resolve().parents[3]  # the folder whose pyproject.toml declares the Flower app


def app_dir(path: str | Path | None = None) -> Path:
    """The Flower app folder (default: the collafuse checkout), checked to declare [tool.flwr.app]."""
    folder = Path(path or APP_DIR).resolve()
    pyproject = folder / "pyproject.toml"
    if not pyproject.is_file() or "flwr" not in tomllib.loads(pyproject.read_text()).get("tool", {}):
        raise FileNotFoundError(f"{pyproject} does not declare [tool.flwr.app]; pass --app-dir with the collafuse "
                                f"source checkout (an installed wheel carries no app pyproject.toml)")
    return folder


def app_run_config(preset: str, overrides: list[str], out_dir: Path, *, rounds: int = 0, resume: bool = False,
                   round_timeout: float = 300.0, data_root: Path | None = None,
                   client_root: Path | None = None, client_keys: Path | None = None) -> dict:
    """The `--run-config` of one run; paths absolute because the ServerApp's working folder is the SuperLink's."""
    config = {"preset": preset, "set": " ".join(overrides), "rounds": rounds, "out-dir": str(Path(out_dir).resolve()),
              "resume": resume, "round-timeout": float(round_timeout)}
    if data_root is not None:
        config.update({"data-root": str(Path(data_root).resolve()), "client-root": str(Path(client_root).resolve())})
    if client_keys is not None:  # identities bound to the nodes' authentication keys
        config["client-keys"] = str(Path(client_keys).resolve())
    return config


def start_clients(fed: LocalFederation, n: int, data_root: Path, client_root: Path,
                  certs: Certificates | None) -> list[FlowerProcess]:
    """Register (with certs) and start one SuperNode per client; its node config names only its own folders."""
    if certs is not None:
        for key in certs.node_public_keys[:n]:
            fed.register_node(key)
    nodes = [fed.start_supernode({"client-id": k, "data-path": str(Path(data_root, f"client-{k}").resolve()),
                                  "state-path": str(Path(client_root, f"client-{k}").resolve())},
                                 private_key=certs and certs.node_private_keys[k], wait=False) for k in range(n)]
    for node in nodes:  # started together, waited for in turn: connecting overlaps
        fed.wait_for_supernode(node)
    return nodes


@dataclass
class LocalResult:
    run: FlowerRun
    metrics: dict
    out: Path


def run_local(cfg: Config, preset: str, overrides: list[str], out: str | Path, *, simulation: bool = False,
              insecure: bool = False, round_timeout: float = 300.0, timeout: float = 1800.0,
              app: str | Path | None = None, progress=None) -> LocalResult:
    """Prepare per-client data, start a local federation (TLS + auth unless insecure), run the app, stop it all."""
    out = Path(out).resolve()
    folder = app_dir(app)
    data_root, client_root, server_out = out / "data", out / "clients", out / "server"
    prepare_data(cfg, data_root)
    n = cfg.data.clients
    certs = None if insecure or simulation else make_certificates(out / "certs", n_nodes=n)
    run_config = app_run_config(preset, overrides, server_out, round_timeout=round_timeout,
                                data_root=data_root if simulation else None, client_root=client_root,
                                client_keys=certs and certs.client_keys)
    with LocalFederation(out / "flower", certs=certs, insecure=certs is None, simulation=simulation) as fed:
        fed.start_superlink()
        if simulation:
            run = fed.run_app(folder, run_config=run_config, timeout=timeout, progress=progress,
                              federation_config={"num-supernodes": n, "client-resources-num-cpus": 1})
        else:
            start_clients(fed, n, data_root, client_root, certs)
            run = fed.run_app(folder, run_config=run_config, timeout=timeout, progress=progress)
    return LocalResult(run, json.loads((server_out / "metrics.json").read_text()), out)
