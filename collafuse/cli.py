"""`collafuse` command line: thin over the runner, the sampler and the reports."""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="CollaFuse: collaborative diffusion split at a cut between a shared server and private clients.")


def _threads(n: Optional[int]) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


THREADS = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice, every core). "
                       "1 when other work shares the cores: threads that wait for a busy core slow every step.")
GUIDANCE = typer.Option(None, "--guidance", help="The server's classifier-free guidance scale for these samples "
                        "(default: the run's server.guidance); the run must have trained with server.label_dropout.")
CLIENT_GUIDANCE = typer.Option(None, "--client-guidance", help="The clients' classifier-free guidance scale on "
                               "their own classes (default: the run's client.guidance); the run must have trained "
                               "with client.label_dropout.")


def _guidance_sets(guidance: float | None, client_guidance: float | None) -> list[str]:
    """The --set overrides that sample a trained run with other guidance scales."""
    return ([] if guidance is None else [f"server.guidance={guidance}"]) + \
        ([] if client_guidance is None else [f"client.guidance={client_guidance}"])


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def run(config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset (smoke, default) or a .toml/.json file."),
        set_: list[str] = typer.Option([], "--set", "-s", help="Override a key, e.g. --set cut=0.4 --set server.lr=5e-4."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/<preset>)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        server_devices: Optional[int] = typer.Option(
            None, "--server-devices", help="Train the server data-parallel on N processes (one GPU each on "
            "CUDA, else CPU; gloo/nccl): same as --set server.devices=N. server.batch_size is the global batch."),
        threads: Optional[int] = THREADS):
    """Train clients and server in one process, then sample and measure every client."""
    _threads(threads)
    from collafuse.config import load_config
    from collafuse.federation.inprocess import run as run_federation
    try:
        if resume and config is None:
            if out is None:
                raise ValueError("--resume needs --out: the folder of the run to continue")
            config = str(out / "config.json")  # continue exactly the saved configuration
        if server_devices is not None:
            set_ = [*set_, f"server.devices={server_devices}"]
        cfg = load_config(config, set_)
        out = out or Path("runs") / Path(config or "default").stem
        metrics, _ = run_federation(cfg, out, resume=resume, progress=not quiet)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)
    _echo_run(out, metrics)


def _echo_run(out: Path, metrics: dict) -> None:
    from collafuse.measure.evaluate import quality_line
    typer.echo(f"run folder: {out}")
    for cid, m in metrics["clients"].items():
        typer.echo(quality_line(cid, m))
    typer.echo(f"bytes up {metrics['bytes_up']:,}  down {metrics['bytes_down']:,}  "
               f"wall {metrics['wall_seconds']:.0f} s")
    for entry in metrics["participation"]["log"]:
        for cid, reason in entry["refused"].items():
            typer.echo(f"round {entry['round']}: client {cid} refused: {reason}")


@app.command()
def evaluate(run_dir: Path = typer.Option(..., "--run", help="A trained (or checkpointed) run folder."),
             quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
             guidance: Optional[float] = GUIDANCE,
             client_guidance: Optional[float] = CLIENT_GUIDANCE,
             threads: Optional[int] = THREADS):
    """Sample and measure a trained run again from its checkpoint, without training; rewrites metrics.json."""
    _threads(threads)
    from collafuse.federation.inprocess import evaluate_run
    try:
        metrics, _ = evaluate_run(run_dir, progress=not quiet, sets=_guidance_sets(guidance, client_guidance))
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    _echo_run(run_dir, metrics)


@app.command()
def sample(run_dir: Path = typer.Option(..., "--run", help="A finished or checkpointed run folder."),
           client: int = typer.Option(..., "--client", help="Which client finishes the samples."),
           n: int = typer.Option(16, "--n", help="Number of samples."),
           steps: Optional[int] = typer.Option(None, "--steps", help="Server-side steps (default: the run's)."),
           client_steps: Optional[int] = typer.Option(None, "--client-steps", help="Client-side steps."),
           seed: int = typer.Option(0, "--seed"),
           out: Optional[Path] = typer.Option(None, "--out", help="PNG path (default <run>/sample_client<K>.png)."),
           guidance: Optional[float] = GUIDANCE,
           client_guidance: Optional[float] = CLIENT_GUIDANCE,
           threads: Optional[int] = THREADS):
    """Sample through the split chain for one client of a trained run and save a grid."""
    _threads(threads)
    from collafuse.config import load_config
    from collafuse.measure.evaluate import split_sample
    from collafuse.measure.images import save_grid
    from collafuse.federation.inprocess import build, load_checkpoint
    try:
        cfg = load_config(str(run_dir / "config.json"), _guidance_sets(guidance, client_guidance))
        fed = build(cfg)
        load_checkpoint(fed, run_dir)
        if not 0 <= client < len(fed.clients):
            raise ValueError(f"--client {client} does not exist; this run has clients 0..{len(fed.clients) - 1}")
        images = split_sample(fed, fed.clients[client], n, server_steps=steps or cfg.sampling.server_steps,
                              client_steps=client_steps or cfg.sampling.client_steps, sampler=cfg.sampling.sampler,
                              client_sampler=cfg.sampling.client_sampler, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    path = out or run_dir / f"sample_client{client}.png"
    save_grid(images, path)
    typer.echo(json.dumps({"path": str(path), "n": n, "bytes_up": fed.wire.bytes_up[client],
                           "bytes_down": fed.wire.bytes_down[client]}))


@app.command()
def export(run_dir: Path = typer.Option(..., "--run", help="A trained run folder (with checkpoint/)."),
           part: str = typer.Option(..., "--part", help="server, client or split (both: only for a run that "
                                    "legitimately holds both, e.g. in-process research runs)."),
           client: Optional[int] = typer.Option(None, "--client", help="Which client (for client and split)."),
           out: Path = typer.Option(..., "--out", help="New folder for the diffusers pipeline and model card."),
           threads: Optional[int] = THREADS):
    """Write one party's model as a diffusers pipeline folder (weights, scheduler, model card README.md)."""
    _threads(threads)
    from collafuse.export import export_run
    try:
        folder = export_run(run_dir, part, out, client)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    typer.echo(json.dumps({"path": str(folder), "part": part, "client": client, "bytes": size}))


@app.command()
def sweep(cuts: str = typer.Option("0,0.2,0.4,0.6,0.8,1", "--cuts", help="Comma-separated cut ratios in [0, 1]."),
          config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset (smoke, default) or a .toml/.json file."),
          set_: list[str] = typer.Option([], "--set", "-s", help="Override a key for every run, e.g. --set rounds=4."),
          baselines: str = typer.Option("", "--baselines", help="Extra runs: fresh, fedavg, local-4x, local-server, "
                                        "local-server-4x (budget rules: docs/metrics.md)."),
          seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2: every run "
                                              "once per seed; tables give mean ± sd (default: the config's seed)."),
          jobs: int = typer.Option(1, "--jobs", "-j", help="Runs at a time, each in its own process."),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Sweep folder (default runs/sweep-<preset>)."),
          resume: bool = typer.Option(False, "--resume", help="Continue unfinished runs; finished ones are always skipped."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
          threads: Optional[int] = THREADS):
    """One run per seed, cut and baseline on the same data and budget rules, then the report."""
    _threads(threads)
    from collafuse.config import load_config
    from collafuse.measure.sweep import parse_baselines, parse_cuts, parse_seeds
    from collafuse.measure.sweep import sweep as run_sweep
    try:
        if jobs < 1:
            raise ValueError(f"--jobs {jobs}: give 1 or more runs at a time")
        cut_list, names = parse_cuts(cuts), parse_baselines(baselines)
        seed_list = parse_seeds(seeds) if seeds is not None else None
        cfg = load_config(config, set_)
        out = out or Path("runs") / f"sweep-{Path(config or 'default').stem}"
        run_sweep(cfg, cut_list, names, out, seeds=seed_list, resume=resume, progress=not quiet, jobs=jobs,
                  threads=threads)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)
    typer.echo(f"report: {out / 'report' / 'report.md'}")


@app.command()
def report(run_dirs: list[Path] = typer.Argument(None, help="Finished run folders (each with metrics.json)."),
           out: Path = typer.Option(Path("report"), "--out", "-o", help="Report folder.")):
    """Rebuild a report (report.md, tables, plots, sample grids) from run folders."""
    from collafuse.measure.report import write_report
    try:
        path = write_report(run_dirs or [], out)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"report: {path}")


@app.command()
def ledger(client_state: Path = typer.Option(..., "--client-state", help="A client's state folder (Flower: its "
                                             "state-path; in-process: <run>/clients/client-<k>)."),
           delta: Optional[float] = typer.Option(None, "--delta", help="delta of the printed epsilon (default: "
                                                 "the client's policy.toml, else 1e-5).")):
    """Print what a client has released over its lifetime: views per record and the epsilon spent."""
    from collafuse.roles.policy import PrivacyPolicy, ReleaseLedger
    try:
        path = client_state / "ledger.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --client-state must be a client's state folder "
                                    f"(it holds secret.key and ledger.jsonl once the client has released anything)")
        policy_file = client_state / "policy.toml"
        policy = PrivacyPolicy.from_file(policy_file) if policy_file.is_file() else PrivacyPolicy()
        summary = ReleaseLedger(path).summary(delta or policy.delta)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(json.dumps(summary, indent=1))


@app.command("fetch-weights")
def fetch_weights(name: str = typer.Argument(..., help="Which weights: inception.")):
    """Fetch and cache feature-extractor weights (needs network once; runs never download)."""
    from collafuse.measure.inception import fetch_inception
    try:
        if name != "inception":
            raise ValueError(f"unknown weights {name!r}; the only fetchable weights are: inception")
        path = fetch_inception()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    typer.echo(f"inception weights: {path}")


from collafuse.federation.flower.cli import flower_app  # noqa: E402 (mounted last, beside the other commands)
app.add_typer(flower_app, name="flower")


def main() -> None:
    """The `collafuse` command."""
    try:
        app()
    finally:
        # Exiting, Python runs one last garbage collection over every object of torch, diffusers and torchmetrics
        # (~1 s, measured); the process ends anyway, so spare it the scan.
        gc.freeze()


if __name__ == "__main__":
    main()
