"""`collafuse flower ...` commands (mounted by the main CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from collafuse.federation.flower.certs import make_certificates, registration_help

flower_app = typer.Typer(no_args_is_help=True)


@flower_app.callback()
def flower() -> None:
    """Run collafuse on Flower: certificates, per-client data and local federations."""  # a callback keeps `certs` a subcommand


@flower_app.command("certs")
def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder to write ca.crt, server.pem/.key and nodes/.")],
    nodes: Annotated[int, typer.Option("--nodes", min=0, help="Number of SuperNode key pairs (one per client).")],
    host: Annotated[
        list[str], typer.Option("--host", help="Name or IP clients use to reach the SuperLink; repeatable.")
    ] = ["localhost", "127.0.0.1"],  # noqa: B006 (typer needs a literal default)
    superlink_address: Annotated[
        str, typer.Option("--superlink-address", help="host:port shown in the printed commands.")
    ] = "<superlink-host>:8000",
) -> None:
    """Create a local CA, the SuperLink's TLS certificate and one authentication key pair per SuperNode."""
    paths = make_certificates(out, hosts=tuple(host), n_nodes=nodes)
    typer.echo(f"CA certificate:      {paths.ca_cert}")
    typer.echo(f"SuperLink cert/key:  {paths.server_cert}  {paths.server_key}")
    if nodes:
        typer.echo(f"SuperNode keys:      {paths.node_private_keys[0].parent}/node-<k>.key|.pub")
    typer.echo("")
    typer.echo(registration_help(paths, superlink_address=superlink_address))


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


CONFIG = typer.Option("--config", "-c", help="Preset name (the app's run config takes preset names).")
SET = typer.Option("--set", "-s", help="Override a key, e.g. --set data.clients=10; repeatable.")


@flower_app.command("prepare-data")
def prepare_data_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write client-<k>/ into.")],
    config: Annotated[str, CONFIG] = "smoke",
    set_: Annotated[list[str], SET] = [],  # noqa: B006 (typer needs a literal default)
) -> None:
    """Write each client's own split (and the shared evaluator) to OUT/client-<k>/, for its node config data-path."""
    from collafuse.config import load_config
    from collafuse.federation.flower.roles import prepare_data
    try:
        folders = prepare_data(load_config(config, set_), out)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    for k, folder in enumerate(folders):
        typer.echo(f"client {k}: {folder}   (node config: client-id={k} data-path='{folder.resolve()}')")


@flower_app.command("run-local")
def run_local_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for data, certs, client state, server results.")],
    config: Annotated[str, CONFIG] = "smoke",
    set_: Annotated[list[str], SET] = [],  # noqa: B006
    simulation: Annotated[bool, typer.Option("--simulation", help="Flower simulation (Ray) instead of "
                                             "one SuperNode process per client.")] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="Deployment without TLS and SuperNode "
                                           "authentication (local experiments only).")] = False,
    round_timeout: Annotated[float, typer.Option("--round-timeout", help="Seconds a round waits for replies.")] = 300.0,
    app_dir: Annotated[Path | None, typer.Option("--app-dir", help="The Flower app folder (default: this "
                                                 "collafuse checkout).")] = None,
) -> None:
    """Prepare data, start a local SuperLink + one SuperNode per client (TLS + auth), run, collect, stop all."""
    from collafuse.config import load_config
    from collafuse.federation.flower.local import run_local
    from collafuse.federation.flower.processes import FlowerProcessError
    try:
        typer.echo("preparing data and starting the federation (SuperLink, SuperNodes) ...")
        result = run_local(load_config(config, set_), config, set_, out, simulation=simulation, insecure=insecure,
                           round_timeout=round_timeout, app=app_dir, progress=typer.echo)
    except (ValueError, FileNotFoundError, FileExistsError, FlowerProcessError) as e:
        _fail(e)
    from collafuse.measure.evaluate import quality_line
    m = result.metrics
    for cid, c in m["clients"].items():
        typer.echo(f"{quality_line(cid, c)}  images in {result.out / 'clients' / f'client-{cid}'}")
    if m["participation"]["missing_clients"]:
        typer.echo(f"clients without results (refused or dropped out): {m['participation']['missing_clients']}")
    typer.echo(f"metrics: {result.out / 'server' / 'metrics.json'}   run {result.run.run_id}: {result.run.status}, "
               f"{result.run.wall_s:.0f} s")
    typer.echo(f"protocol bytes up {m['bytes_up']:,}  down {m['bytes_down']:,}; Flower's traffic counter "
               f"{result.run.inbound_bytes + result.run.outbound_bytes:,} bytes (gRPC, TLS and Flower's own messages)")
