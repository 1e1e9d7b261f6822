"""Training-recipe ablation on the default preset: each change alone and all together, seeds, one cut.

    .venv/bin/python benchmarks/recipes.py --cut 0.4 --seeds 0,1 --rounds 3      # ~50 min on 2 cores
    .venv/bin/python benchmarks/recipes.py --recipes base,all --cut 0.2
    .venv/bin/python benchmarks/recipes.py --recipes cosine --cut 0.706   # handoffs as noisy as linear's at 0.4

Every recipe trains the default preset (MNIST 16 px, 5 Dirichlet clients) for --rounds rounds of the
preset's server and client steps (the same steps, so the same wall budget up to the recipe's own cost; the
server-heavy and client-heavy recipes share about the same wall between the sides differently), two runs
at a time on one thread each, and is measured as `collafuse run` measures (64 samples a client, the preset's
sampler and steps, FID/KID on the domain features against each client's held-out images). Disclosure is not
measured here: the recipe changes what is learnt, not what is sent. Prints a markdown table: per recipe
the mean over seeds (± sample sd) of each run's mean client KID and FID, its worst client's own-class
share, and the mean wall time of a run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from collafuse.config import load_config
from collafuse.measure.sweep import parse_seeds, sweep

BOTH = ("server", "client")
# Every recipe starts from plain DDPM spelt out in full, so that none inherits a Config default: when the
# defaults became v + min-SNR, a recipe that named only its own change silently ran with min-SNR too.
PLAIN = [*(f"{r}.prediction=epsilon" for r in BOTH), *(f"{r}.loss_weighting=uniform" for r in BOTH),
         *(f"{r}.lr_warmup_steps=0" for r in BOTH), *(f"{r}.lr_decay=constant" for r in BOTH),
         *(f"{r}.label_dropout=0" for r in BOTH), *(f"{r}.guidance=1" for r in BOTH), "sampling.client_steps=200"]
V = [f"{r}.prediction=v" for r in BOTH]
MIN_SNR = [f"{r}.loss_weighting=min-snr" for r in BOTH]
LR_SCHEDULE = ["server.lr_warmup_steps=25", "client.lr_warmup_steps=10", *(f"{r}.lr_decay=cosine" for r in BOTH)]
RECIPES = {
    "base": PLAIN,  # DDPM: epsilon, uniform levels, constant lr
    "min-snr": PLAIN + MIN_SNR,
    "v": PLAIN + V,
    "lr-schedule": PLAIN + LR_SCHEDULE,
    "all": PLAIN + V + MIN_SNR + LR_SCHEDULE,
    "v+min-snr": PLAIN + V + MIN_SNR,  # the Config default since 2026-11-28
    # Classifier-free guidance on the client's own classes (the preset conditions the clients on them): the
    # default preset's since 2026-12-07. Its 100 guided sampling steps cost what the others' 200 unguided do.
    "v+min-snr+guidance": PLAIN + V + MIN_SNR + ["client.label_dropout=0.1", "client.guidance=2",
                                                 "sampling.client_steps=100"],
    # How the steps are shared between the sides, at about the default's wall per round (a server step costs
    # ~2.5x a client step on one thread: 150 x 2.5 + 5 clients x 60 = 675 client-step units a round).
    "server-heavy": PLAIN + V + MIN_SNR + ["server.steps_per_round=225", "client.steps_per_round=30"],  # 713 units
    "client-heavy": PLAIN + V + MIN_SNR + ["server.steps_per_round=75", "client.steps_per_round=105"],  # 713 units
    # Nichol & Dhariwal's cosine schedule. Run it at the cut where its handoffs keep the signal fraction of the
    # linear schedule's (--cut 0.706: ᾱ = 0.196 as linear's at 0.4; --cut 0.392 for linear's 0.2), so the
    # server sees equally noisy handoffs: the schedule then changes how the levels are shared, not the disclosure.
    "cosine": PLAIN + V + MIN_SNR + ["schedule.kind=cosine"],
}


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--cut", type=float, default=0.4)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/benchmark-recipes"))
    a = p.parse_args()
    rows = []
    for name in a.recipes.split(","):
        cfg = load_config("default", [f"cut={a.cut}", f"rounds={a.rounds}", "eval.disclosure=false", *RECIPES[name]])
        t0 = time.perf_counter()
        folders = sweep(cfg, [a.cut], [], a.out / f"cut-{a.cut:.2f}" / name, seeds=parse_seeds(a.seeds),
                        resume=True, progress=False, jobs=a.jobs, threads=1)
        runs = [json.loads((f / "metrics.json").read_text()) for f in folders]
        kid = [statistics.mean(c["kid_mean"] for c in m["clients"].values()) for m in runs]
        fid = [statistics.mean(c["fid"] for c in m["clients"].values()) for m in runs]
        share = [min(c["own_class_share"] for c in m["clients"].values()) for m in runs]
        rows.append((name, len(runs), mean_sd(kid), mean_sd(fid), mean_sd(share),
                     statistics.mean(m["wall_seconds"] for m in runs)))
        print(json.dumps({"recipe": name, "kid": kid, "fid": fid, "own_class_share_min": share,
                          "sweep_seconds": time.perf_counter() - t0}), flush=True)
    print(f"default preset, c = {a.cut}, {a.rounds} rounds, seeds {a.seeds}")
    print("| recipe | seeds | mean KID | mean FID | worst client's own-class share | wall per run (s) |")
    print("|---|---|---|---|---|---|")
    for name, n, kid, fid, share, wall in rows:
        print(f"| {name} | {n} | {kid} | {fid} | {share} | {wall:.0f} |")


if __name__ == "__main__":
    main()
