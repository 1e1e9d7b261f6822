"""A sweep: one run folder per seed, cut ratio and baseline, on the same data and splits, then the report.

Every baseline states its budget rule (written to its folder's budget.json and shown in the report):
  cut-c            CollaFuse at cut c; the client trains cfg.client_steps per round ("auto": c x full-chain steps)
  cut-1.00         local-only with the client's model: the full-chain client budget B (training FLOPs)
  local-4x         local-only, the client's model, 4 B
  local-server     local-only with the server-sized model, as many steps as B buys
  local-server-4x  the same at 4 B
  fedavg           every client trains the server-sized model; EMA on; together as many training FLOPs as
                   CollaFuse's server and clients at cfg.cut
  fresh            CollaFuse at cfg.cut with a new view of every record each round (the paper's prototype)
"""
from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from collafuse.config import Config, validate
from collafuse.federation.inprocess import CHECKPOINT

BASELINES = ("fresh", "fedavg", "local-4x", "local-server", "local-server-4x")
FRESH_MAX_VIEWS = 10**6  # the paper's fresh mode sends a new view of every record each round, without end
PAPER_CUTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
BUDGET_FILE = "budget.json"


@dataclass
class RunSpec:
    name: str  # the run folder's name inside the seed's folder
    cfg: Config
    kind: str  # "collafuse" | "fresh" | "fedavg" | "local"
    budget: dict  # the rule that sized this run, and its numbers


def parse_cuts(text: str) -> list[float]:
    """'0,0.2,1' -> [0.0, 0.2, 1.0]; every cut in [0, 1], no duplicates."""
    cuts = []
    for part in text.split(","):
        try:
            c = float(part)
        except ValueError:
            raise ValueError(f"--cuts {text!r}: {part.strip()!r} is not a number; give cut ratios like 0,0.2,0.4")
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"--cuts {text!r}: cut {c} is outside [0, 1] (0 = centralised, 1 = local-only)")
        if c in cuts:
            raise ValueError(f"--cuts {text!r}: cut {c} is given twice")
        cuts.append(c)
    return cuts


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; distinct non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give distinct integers like 0,1,2") from None
    if any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give distinct non-negative integers like 0,1,2")
    return seeds


def parse_baselines(text: str | None) -> list[str]:
    """'fresh,fedavg' -> ['fresh', 'fedavg']; '' or None -> []."""
    names = [b.strip() for b in (text or "").split(",") if b.strip()]
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    return names


def equal_steps(cfg: Config) -> Config:
    """At c = 0 or 1 one role runs the whole chain: give it all server_steps + client_steps, as a split run has."""
    s = cfg.sampling
    total = s.server_steps + s.client_steps
    if cfg.cut == 0.0:
        s = dataclasses.replace(s, server_steps=total)
    elif cfg.cut == 1.0:
        s = dataclasses.replace(s, client_steps=total)
    return dataclasses.replace(cfg, sampling=s)


def consenting(cfg: Config, **policy) -> Config:
    """cfg with its in-process clients' policy relaxed as given: a sweep's clients agree to what it measures."""
    return dataclasses.replace(cfg, client=dataclasses.replace(
        cfg.client, policy=dataclasses.replace(cfg.client.policy, **policy)))


def _local(cfg: Config, model, steps: int) -> Config:
    """Local-only (c = 1) with the given client model and steps per round."""
    client = dataclasses.replace(cfg.client, model=model, steps_per_round=steps)
    return equal_steps(dataclasses.replace(cfg, cut=1.0, client=client))


def budgets(cfg: Config) -> dict:
    """Training FLOPs per step of each model, and the full-chain client budget B every local baseline is sized by."""
    from collafuse.measure.cost import model_train_step_flops
    f_client = model_train_step_flops(cfg.client.model, cfg.image_shape, cfg.client.batch_size)
    f_server = model_train_step_flops(cfg.server.model, cfg.image_shape, cfg.server.batch_size)
    full_chain = dataclasses.replace(cfg, cut=1.0).client_steps
    collafuse = cfg.rounds * (cfg.server.steps_per_round * f_server + cfg.data.clients * cfg.client_steps * f_client)
    return {"client_step_flops": f_client, "server_step_flops": f_server, "full_chain_steps": full_chain,
            "B": cfg.rounds * full_chain * f_client, "collafuse_train_flops": collafuse}


def plan(cfg: Config, cuts: list[float], baselines: list[str]) -> list[RunSpec]:
    """The runs of a sweep for one seed: CollaFuse at every cut, then the baselines, all from the same config.

    Every run's clients allow the cut it measures (down to 0, where the raw records leave); the fresh-mode
    run's clients allow fresh views without limit. Outside a sweep the clients' own policy stands.
    """
    if not cuts:
        raise ValueError("--cuts is empty; give at least one cut ratio, e.g. --cuts 0,0.2,1")
    low = min(cfg.client.policy.min_cut, *cuts)
    b = budgets(cfg)
    runs = []
    for c in cuts:
        run_cfg = equal_steps(consenting(dataclasses.replace(cfg, cut=c), min_cut=low))
        rule = ("local-only, the client's model: the full-chain client budget B" if c == 1.0 else
                f"CollaFuse at c = {c:g}: the client trains {run_cfg.client_steps} steps per round"
                + (" (auto: c x full-chain steps)" if cfg.client.steps_per_round == "auto" else ""))
        runs.append(RunSpec(f"cut-{c:.2f}", run_cfg, "collafuse", {"rule": rule, "client_steps": run_cfg.client_steps}))
    if "fresh" in baselines:
        fresh = consenting(dataclasses.replace(cfg, handoff=dataclasses.replace(cfg.handoff, mode="fresh")),
                           min_cut=low, modes=("once", "fresh"), max_views=FRESH_MAX_VIEWS)
        runs.append(RunSpec(f"fresh-{cfg.cut:.2f}", equal_steps(fresh), "fresh",
                            {"rule": f"CollaFuse at c = {cfg.cut:g}, a new view of every record each round",
                             "client_steps": cfg.client_steps}))
    for name, model, factor in (("local-4x", cfg.client.model, 4), ("local-server", cfg.server.model, 1),
                                ("local-server-4x", cfg.server.model, 4)):
        if name in baselines:
            per_step = b["client_step_flops"] if model is cfg.client.model else b["server_step_flops"]
            steps = max(1, round(factor * b["B"] / (cfg.rounds * per_step)))
            size = "client's" if model is cfg.client.model else "server-sized"
            runs.append(RunSpec(name, _local(cfg, model, steps), "local",
                                {"rule": f"local-only, the {size} model, {factor} x B training FLOPs",
                                 "client_steps": steps, "factor": factor}))
    if "fedavg" in baselines:
        steps = max(1, round(b["collafuse_train_flops"] / (cfg.rounds * cfg.data.clients * b["server_step_flops"])))
        client = dataclasses.replace(cfg.client, steps_per_round=steps)
        runs.append(RunSpec("fedavg", equal_steps(dataclasses.replace(cfg, cut=1.0, client=client)), "fedavg",
                            {"rule": f"FedAvg, the server-sized model with EMA on every client: together as many "
                                     f"training FLOPs as CollaFuse's server and clients at c = {cfg.cut:g}",
                             "client_steps": steps,
                             "optimiser_steps": cfg.rounds * cfg.data.clients * steps,
                             "collafuse_optimiser_steps": cfg.rounds * (cfg.server.steps_per_round
                                                                        + cfg.data.clients * cfg.client_steps)}))
    for r in runs:
        validate(r.cfg)
        r.budget.update({k: b[k] for k in ("B", "client_step_flops", "server_step_flops", "collafuse_train_flops")})
    return runs


def run_state(folder: Path) -> str:
    """'done' (metrics.json), 'partial' (a checkpoint, no metrics) or 'new'."""
    if (folder / "metrics.json").is_file():
        return "done"
    return "partial" if (folder / CHECKPOINT).exists() else "new"


def _train_flops(r: RunSpec) -> float:
    """A run's planned training FLOPs, to start the longest runs first."""
    b, cfg = r.budget, r.cfg
    server_sized = r.kind == "fedavg" or cfg.client.model == cfg.server.model  # fedavg_config swaps the model in
    client = b["server_step_flops"] if server_sized else b["client_step_flops"]
    server = cfg.server.steps_per_round * b["server_step_flops"] if cfg.cut < 1 else 0
    return cfg.rounds * (server + cfg.data.clients * cfg.client_steps * client)


def _execute(r: RunSpec, folder: Path, state: str, threads: int | None, progress: bool) -> Path:
    """One run of a sweep (in this process or a worker): write its budget rule, run it to metrics.json."""
    import torch
    from collafuse.federation.fedavg import run_fedavg
    from collafuse.federation.inprocess import run
    if threads:
        torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BUDGET_FILE).write_text(json.dumps({"kind": r.kind, **r.budget}, indent=1))
    runner = run_fedavg if r.kind == "fedavg" else run
    runner(r.cfg, folder, resume=state == "partial", progress=progress)
    return folder


def sweep(cfg: Config, cuts: list[float], baselines: list[str], out: str | Path, *, seeds: list[int] | None = None,
          resume: bool = False, progress: bool = True, jobs: int = 1, threads: int | None = None) -> list[Path]:
    """Every planned run of every seed not yet finished (continuing unfinished ones with resume), then the report.

    Runs go `jobs` at a time in worker processes (each with `threads` torch threads); finished runs are reused.
    """
    from collafuse.measure.report import write_report
    out = Path(out)
    seeds = [cfg.seed] if seeds is None else seeds
    runs = [(out / f"seed-{s}" / r.name, r) for s in seeds for r in plan(dataclasses.replace(cfg, seed=s), cuts,
                                                                         baselines)]
    partial = [str(f.relative_to(out)) for f, _ in runs if run_state(f) == "partial"]
    if partial and not resume:
        raise FileExistsError(f"{out} holds unfinished runs {partial}; pass --resume to continue them "
                              f"or choose another --out")
    todo = []
    for folder, r in runs:
        if run_state(folder) == "done":
            _check_same(r, folder)
        else:
            todo.append((folder, r))
    todo.sort(key=lambda item: -_train_flops(item[1]))  # longest first: the workers finish together
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="sweep", disable=not progress, unit="run")
    if jobs <= 1:
        for folder, r in todo:
            bar.set_postfix_str(str(folder.relative_to(out)))
            _execute(r, folder, run_state(folder), threads, progress)
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_execute, r, folder, run_state(folder), threads, False) for folder, r in todo]
            for future in as_completed(futures):
                bar.set_postfix_str(str(future.result().relative_to(out)))
                bar.update()
    bar.close()
    folders = [f for f, _ in runs]
    write_report(folders, out / "report")
    return folders


def _check_same(r: RunSpec, folder: Path) -> None:
    """A finished run is reused only if it ran exactly this sweep's config (keys added since: their defaults)."""
    from collafuse.config import load_config
    from collafuse.federation.fedavg import fedavg_config
    planned = json.loads(json.dumps((fedavg_config(r.cfg) if r.kind == "fedavg" else r.cfg).to_dict()))
    saved = json.loads(json.dumps(load_config(str(folder / "config.json")).to_dict()))
    diff = sorted(k for k in planned if planned[k] != saved.get(k))
    if diff:
        raise ValueError(f"{folder} holds a finished run with a different config ({diff}); "
                         f"use another --out for a sweep with this config")
