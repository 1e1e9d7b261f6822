"""A sweep: one run folder per cut ratio and per baseline, on the same data, splits and budget, then the report."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from collafuse.config import Config, validate
from collafuse.federation.inprocess import CHECKPOINT

BASELINES = ("fresh", "fedavg")
FRESH_MAX_VIEWS = 10**6  # the paper's fresh mode sends a new view of every record each round, without end
PAPER_CUTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass
class RunSpec:
    name: str  # the run folder's name inside the sweep folder
    cfg: Config
    kind: str  # "collafuse" | "fresh" | "fedavg"


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


def plan(cfg: Config, cuts: list[float], baselines: list[str]) -> list[RunSpec]:
    """The runs of a sweep: CollaFuse at every cut, fresh mode at cfg.cut, FedAvg; all from the same config.

    Every run's clients allow the cut it measures (down to 0, where the raw records leave); the fresh-mode
    run's clients allow fresh views without limit. Outside a sweep the clients' own policy stands.
    """
    if not cuts:
        raise ValueError("--cuts is empty; give at least one cut ratio, e.g. --cuts 0,0.2,1")
    low = min(cfg.client.policy.min_cut, *cuts)
    runs = [RunSpec(f"cut-{c:.2f}", equal_steps(consenting(dataclasses.replace(cfg, cut=c), min_cut=low)),
                    "collafuse") for c in cuts]
    if "fresh" in baselines:
        fresh = consenting(dataclasses.replace(cfg, handoff=dataclasses.replace(cfg.handoff, mode="fresh")),
                           min_cut=low, modes=("once", "fresh"), max_views=FRESH_MAX_VIEWS)
        runs.append(RunSpec(f"fresh-{cfg.cut:.2f}", equal_steps(fresh), "fresh"))
    if "fedavg" in baselines:
        runs.append(RunSpec("fedavg", equal_steps(dataclasses.replace(cfg, cut=1.0)), "fedavg"))
    for r in runs:
        validate(r.cfg)
    return runs


def run_state(folder: Path) -> str:
    """'done' (metrics.json), 'partial' (a checkpoint, no metrics) or 'new'."""
    if (folder / "metrics.json").is_file():
        return "done"
    return "partial" if (folder / CHECKPOINT).exists() else "new"


def sweep(cfg: Config, cuts: list[float], baselines: list[str], out: str | Path, *, resume: bool = False,
          progress: bool = True) -> list[Path]:
    """Run every planned run not yet finished (continuing unfinished ones with resume), then write the report."""
    from collafuse.federation.fedavg import run_fedavg
    from collafuse.measure.report import write_report
    from collafuse.federation.inprocess import run
    out = Path(out)
    runs = plan(cfg, cuts, baselines)
    partial = [r.name for r in runs if run_state(out / r.name) == "partial"]
    if partial and not resume:
        raise FileExistsError(f"{out} holds unfinished runs {partial}; pass --resume to continue them "
                              f"or choose another --out")
    folders = []
    bar = tqdm(runs, desc="sweep", disable=not progress, unit="run")
    for r in bar:
        folder = out / r.name
        folders.append(folder)
        state = run_state(folder)
        bar.set_postfix_str(f"{r.name} ({'skip' if state == 'done' else state})")
        if state == "done":
            _check_same(r, folder)
            continue
        runner = run_fedavg if r.kind == "fedavg" else run
        runner(r.cfg, folder, resume=state == "partial", progress=progress)
    write_report(folders, out / "report")
    return folders


def _check_same(r: RunSpec, folder: Path) -> None:
    """A finished run is reused only if it ran exactly this sweep's config."""
    import json
    from collafuse.federation.fedavg import fedavg_config
    planned = json.loads(json.dumps((fedavg_config(r.cfg) if r.kind == "fedavg" else r.cfg).to_dict()))
    saved = json.loads((folder / "config.json").read_text())
    diff = sorted(k for k in planned if planned[k] != saved.get(k))
    if diff:
        raise ValueError(f"{folder} holds a finished run with a different config ({diff}); "
                         f"use another --out for a sweep with this config")
