"""`collafuse flower ...` commands (mounted by the main CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from collafuse.flower.certs import make_certificates, registration_help

flower_app = typer.Typer(no_args_is_help=True)


@flower_app.callback()
def flower() -> None:
    """Run collafuse on Flower: certificates and node keys."""  # a callback keeps `certs` a subcommand


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
