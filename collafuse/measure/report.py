"""A report folder from run folders: report.md with tables, PNG plots and per-client sample grids."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def load_run(folder: str | Path) -> dict:
    """A run folder's config and metrics, with its name and kind (collafuse, fresh or fedavg)."""
    folder = Path(folder)
    path = folder / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no metrics.json: the run is not finished; finish it with "
                                f"`collafuse run --resume --out {folder}` or leave it out")
    m = json.loads(path.read_text())
    budget_path = folder / "budget.json"  # written by a sweep: the rule that sized this run
    budget = json.loads(budget_path.read_text()) if budget_path.is_file() else None
    kind = (budget or {}).get("kind") or m.get("baseline") or ("fresh" if m.get("handoff_mode") == "fresh"
                                                              else "collafuse")
    seed = json.loads((folder / "config.json").read_text())["seed"] if (folder / "config.json").is_file() else None
    return {"name": folder.name, "folder": folder, "kind": kind, "metrics": m, "budget": budget, "seed": seed}


def _get(d, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


def summary(run: dict) -> dict:
    """The numbers of one run that the tables and plots use (None where a block does not apply)."""
    m = run["metrics"]
    clients = m["clients"]
    kid = {cid: c["kid_mean"] for cid, c in clients.items()}
    d, cost = m.get("disclosure"), m.get("cost") or {}
    members = _get(d, "membership") or {}
    return {
        "name": run["name"], "kind": run["kind"], "seed": run.get("seed"), "budget": _get(run, "budget", "rule"),
        "cut": m["cut"], "cut_level": m["cut_level"],
        "kid": kid, "kid_sum": _sum(kid.values()), "kid_mean": _mean(kid.values()),
        "fid_mean": _mean(c["fid"] for c in clients.values()),
        "kid_score_mean": _mean(c.get("kid_score") for c in clients.values()),  # absent in runs before the floor
        "failed": [cid for cid, c in clients.items() if c.get("failed")],
        "epsilon": _get(m, "dp", "epsilon"), "delta": _get(m, "dp", "delta"), "dp_views": _get(m, "dp", "views"),
        "reid_members": _get(d, "reidentification", "members"), "reid_nonmembers": _get(d, "reidentification", "nonmembers"),
        "reid_chance": _get(d, "reidentification", "chance"),
        "recon_best": _get(d, "reconstruction", "best"), "psnr_best": _get(d, "reconstruction", "psnr"),
        "recon_gain": _get(d, "reconstruction", "gain_db"),
        "psnr_mean_image": _get(d, "reconstruction", "attacks", "mean_image", "psnr"),
        "mia_best": members.get("best"), "mia_best_auc": members.get("auc"),
        "mia_best_tpr1": members.get("tpr_at_1pct_fpr"), "mia_best_tpr01": members.get("tpr_at_0.1pct_fpr"),
        "mia_lr": _get(d, "mia_handoff_lr", "auc"),
        "mia_server": _get(d, "mia_server", "auc"), "mia_pipeline": _get(d, "mia_pipeline", "auc"),
        "kid_handoff": _get(d, "distribution", "members", "kid"),
        "client_flops": (_get(cost, "client_mean", "train_flops") or 0) + (_get(cost, "client_mean", "sample_flops") or 0),
        "server_flops": (_get(cost, "server", "train_flops") or 0) + (_get(cost, "server", "sample_flops") or 0),
        "bytes_up": m["bytes_up"], "bytes_down": m["bytes_down"], "wall": m.get("wall_seconds"),
    }


def _sum(values) -> float | None:
    """The sum over clients with a number (null: too few held-out images to measure); None if none has one."""
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


NUMBERS = ("kid_mean", "kid_sum", "fid_mean", "kid_score_mean", "epsilon", "reid_members", "reid_nonmembers",
           "psnr_best", "recon_gain", "psnr_mean_image", "mia_best_auc", "mia_best_tpr1", "mia_best_tpr01", "mia_lr",
           "mia_server", "mia_pipeline", "kid_handoff", "client_flops", "server_flops", "bytes_up", "bytes_down",
           "wall")


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per run name over its seeds: each number's mean, and its sample sd as <key>_sd (None for 1 seed)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    out = []
    for name, rs in groups.items():
        a = dict(rs[0], seeds=[r["seed"] for r in rs], failed=sorted({c for r in rs for c in r["failed"]}, key=int))
        for key in NUMBERS:
            values = [r[key] for r in rs if r[key] is not None]
            a[key] = statistics.fmean(values) if values else None
            a[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        # exact recovery (PSNR infinite) in any seed is exact recovery
        if any(r["psnr_best"] is None and r["reid_members"] is not None for r in rs):
            a["psnr_best"] = a["recon_gain"] = None
        a["kid"] = {cid: _mean(r["kid"].get(cid) for r in rs) for cid in rs[0]["kid"]}
        for key in ("mia_best", "recon_best"):  # the attack that was strongest in most seeds
            names = [r[key] for r in rs if r[key]]
            a[key] = max(set(names), key=names.count) if names else None
        out.append(a)
    return out


def _pm(r: dict, key: str, spec: str) -> str:
    """mean ± sd (sd only with several seeds)."""
    sd = r.get(f"{key}_sd")
    return _fmt(r[key], spec) + ("" if sd is None or r[key] is None else f" ± {format(sd, spec)}")


def _fmt(v, spec=".3f") -> str:
    if v is None:
        return "–"
    return format(v, spec)


def _table(rows: list[dict]) -> str:
    head = ("| run | c | t_c | seeds | KID mean | FID mean | KID score | ε (δ) | membership AUC (strongest) "
            "| TPR at 1% / 0.1% FPR | re-id members / non (chance) | recon PSNR dB (gain over mean image; strongest) "
            "| client GFLOPs | server GFLOPs | MB up | MB down | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        eps = "∞ (raw data)" if r["epsilon"] is None and r["dp_views"] else _pm(r, "epsilon", ".3g")
        if r["kind"] == "fedavg":
            eps = "n/a (weights shared)"
        elif r["delta"] is not None and r["epsilon"] is not None:
            eps += f" ({r['delta']:.0e})"
        if r["psnr_best"] is None and r["reid_members"] is not None:
            recon = "exact"
        elif r["psnr_best"] is None:
            recon = "–"
        else:
            recon = f"{_pm(r, 'psnr_best', '.1f')} ({_pm(r, 'recon_gain', '+.1f')}; {r['recon_best']})"
        reid = "–" if r["reid_members"] is None else (f"{r['reid_members']:.2f} / {r['reid_nonmembers']:.2f} "
                                                      f"({r['reid_chance']:.4f})")
        mia = "–" if r["mia_best_auc"] is None else f"{_pm(r, 'mia_best_auc', '.3f')} ({r['mia_best']})"
        tpr = f"{_fmt(r['mia_best_tpr1'], '.3f')} / {_fmt(r['mia_best_tpr01'], '.3f')}"
        lines.append(f"| {r['name']} | {r['cut']:.2f} | {r['cut_level']} | {len(r.get('seeds') or [r['seed']])} "
                     f"| {_pm(r, 'kid_mean', '.4f')} | {_pm(r, 'fid_mean', '.2f')} | {_pm(r, 'kid_score_mean', '.2f')} "
                     f"| {eps} | {mia} | {tpr} | {reid} | {recon} | {r['client_flops'] / 1e9:.0f} "
                     f"| {r['server_flops'] / 1e9:.0f} | {r['bytes_up'] / 1e6:.3f} | {r['bytes_down'] / 1e6:.3f} "
                     f"| {_fmt(r['wall'], '.0f')} |")
    return "\n".join(lines)


def _attack_table(rows: list[dict]) -> str:
    """Every membership attack's AUC beside the others: the summary shows only the strongest."""
    lines = ["| run | handoff likelihood ratio (no model) | server model loss | whole-pipeline loss "
             "| recon PSNR of the mean image |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {_pm(r, 'mia_lr', '.3f')} | {_pm(r, 'mia_server', '.3f')} "
                     f"| {_pm(r, 'mia_pipeline', '.3f')} | {_pm(r, 'psnr_mean_image', '.1f')} |")
    return "\n".join(lines)


def _budget_table(rows: list[dict]) -> str:
    lines = ["| run | budget rule |", "|---|---|"]
    lines += [f"| {r['name']} | {r['budget'] or 'as configured'} |" for r in rows]
    return "\n".join(lines)


def _client_table(rows: list[dict]) -> str:
    cids = sorted({cid for r in rows for cid in r["kid"]}, key=int)
    lines = ["| run | " + " | ".join(f"client {c}" for c in cids) + " | KID score, mean (failed clients) |",
             "|---|" + "---|" * (len(cids) + 1)]
    for r in rows:
        failed = f" ({', '.join(r['failed'])})" if r["failed"] else ""
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(r["kid"].get(c), ".4f") for c in cids)
                     + f" | {_fmt(r['kid_score_mean'], '.2f')}{failed} |")
    return "\n".join(lines)


def _baseline_marks(ax, rows, key, color="k"):
    for r in rows:
        if r["kind"] != "collafuse" and r[key] is not None:
            ax.scatter([r["cut"]], [r[key]], marker="*" if r["kind"] == "fedavg" else "s", s=80, color=color,
                       zorder=3, label=r["name"])


def _errorbar(ax, rows, x, key, **kw):
    nan = float("nan")  # a run where the number does not apply (None) leaves a gap
    ax.errorbar([r[x] for r in rows], [nan if r[key] is None else r[key] for r in rows],
                yerr=[r.get(f"{key}_sd") or 0 for r in rows], marker="o", capsize=3, **kw)


def _plots(rows: list[dict], out: Path) -> list[str]:
    cf = sorted([r for r in rows if r["kind"] == "collafuse"], key=lambda r: r["cut"])
    cuts = [r["cut"] for r in cf]
    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for cid in sorted({c for r in rows for c in r["kid"]}, key=int):
        ax.plot(cuts, [r["kid"].get(cid) for r in cf], marker=".", lw=0.8, alpha=0.6, label=f"client {cid}")
    _errorbar(ax, cf, "cut", "kid_mean", color="k", label="mean ± sd over seeds")
    _baseline_marks(ax, rows, "kid_mean")
    ax.set(xlabel="cut ratio c", ylabel="KID vs held-out (lower is better)", title="Quality per client vs cut")
    ax.legend(fontsize=7)
    save(fig, "quality_vs_cut.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, label in (("reid_members", "members"), ("reid_nonmembers", "non-members"), ("reid_chance", "chance")):
        axes[0].plot(cuts, [r[key] for r in cf], marker="o", label=label)
    axes[0].set(xlabel="cut ratio c", ylabel="top-1 re-identification rate", title="Re-identification")
    _errorbar(axes[1], cf, "cut", "psnr_best", label="strongest attack")
    _errorbar(axes[1], cf, "cut", "psnr_mean_image", ls=":", color="gray", label="mean image (no handoff)")
    axes[1].set(xlabel="cut ratio c", ylabel="PSNR dB (members)", title="Reconstruction from handoffs")
    for key, label in (("mia_lr", "handoff likelihood ratio"), ("mia_server", "server model"),
                       ("mia_pipeline", "whole pipeline")):
        _errorbar(axes[2], cf, "cut", key, label=label)
    _baseline_marks(axes[2], rows, "mia_pipeline")
    axes[2].axhline(0.5, color="gray", ls=":")
    axes[2].set(xlabel="cut ratio c", ylabel="MIA AUC", title="Membership inference")
    for a in axes:
        a.legend(fontsize=7)
    save(fig, "disclosure_vs_cut.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(cuts, [r["client_flops"] for r in cf], marker="o", label="client (mean)")
    axes[0].plot(cuts, [r["server_flops"] for r in cf], marker="o", label="server")
    _baseline_marks(axes[0], rows, "client_flops")
    axes[0].set(xlabel="cut ratio c", ylabel="FLOPs (train + sample)", title="Compute", yscale="symlog")
    axes[1].plot(cuts, [r["bytes_up"] for r in cf], marker="o", label="up (clients to server)")
    axes[1].plot(cuts, [r["bytes_down"] for r in cf], marker="o", label="down")
    _baseline_marks(axes[1], rows, "bytes_up")
    axes[1].set(xlabel="cut ratio c", ylabel="bytes", title="Wire", yscale="symlog")
    for a in axes:
        a.legend(fontsize=7)
    save(fig, "cost_vs_cut.png")

    measured = [row for row in rows if row["kid_mean"] is not None]  # a run none of whose clients was measured
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in measured:
        x = r["reid_members"] if r["reid_members"] is not None else 0.0  # nothing crossed the wire: nothing to match
        axes[0].scatter([x], [r["kid_mean"]], marker="o" if r["kind"] == "collafuse" else "*", s=60)
        axes[0].annotate(r["name"], (x, r["kid_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set(xlabel="re-identification rate of members (disclosure)", ylabel="mean KID (lower is better)",
                title="Privacy / quality frontier")
    # Quality per client compute: local-only at several budgets (per model size) against CollaFuse at several cuts.
    local = [r for r in measured if r["kind"] == "local" or (r["kind"] == "collafuse" and r["cut"] == 1)]
    server_sized = [r for r in local if "server-sized" in (r["budget"] or "")]
    series = (([r for r in measured if r["kind"] == "collafuse" and r["cut"] < 1], "CollaFuse (by cut)"),
              ([r for r in local if r not in server_sized], "local-only, the client's model (by budget)"),
              (server_sized, "local-only, the server-sized model (by budget)"))
    for pts, label in series:
        pts = sorted(pts, key=lambda r: r["client_flops"])
        if pts:
            axes[1].errorbar([r["client_flops"] / 1e9 for r in pts], [r["kid_mean"] for r in pts],
                             yerr=[r.get("kid_mean_sd") or 0 for r in pts], marker="o", capsize=3, label=label)
            for r in pts:
                axes[1].annotate(r["name"], (r["client_flops"] / 1e9, r["kid_mean"]), fontsize=7, xytext=(3, 3),
                                 textcoords="offset points")
    for r in [r for r in measured if r["kind"] in ("fedavg", "fresh")]:
        axes[1].scatter([r["client_flops"] / 1e9], [r["kid_mean"]], marker="*", s=80, color="k")
        axes[1].annotate(r["name"], (r["client_flops"] / 1e9, r["kid_mean"]), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    axes[1].set(xlabel="client GFLOPs (training + sampling, mean per client)", ylabel="mean KID (lower is better)",
                title="Quality per client compute", xscale="log")
    axes[1].legend(fontsize=7)
    save(fig, "frontier.png")
    return files


def write_report(folders: list[str | Path], out: str | Path) -> Path:
    """Write out/report.md, the plots and the sample grids for the given run folders; returns report.md's path."""
    if not folders:
        raise ValueError("no run folders given; pass the folders of finished runs, e.g. runs/sweep/cut-0.20")
    runs = [load_run(f) for f in folders]
    rows = aggregate([summary(r) for r in runs])
    seeds = sorted({r["seed"] for r in runs if r["seed"] is not None})
    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    plots = _plots(rows, out)
    q = runs[0]["metrics"]["quality"]
    cfg = json.loads((runs[0]["folder"] / "config.json").read_text())
    md = ["# CollaFuse sweep report\n",
          f"Data `{cfg['data']['name']}`, {cfg['data']['clients']} clients ({cfg['data']['partition']}), "
          f"T = {cfg['schedule']['T']}, {cfg['rounds']} rounds, seeds {', '.join(map(str, seeds))}: every "
          f"number is the mean ± sd over seeds. Quality: FID/KID with the "
          f"`{q['extractor']}` feature extractor, {q['n_samples']} samples per client ({q['sampler']}) against "
          f"each client's held-out images. Disclosure (members: the clients' training records; non-members and "
          f"the attacker's public reference images: disjoint halves of their held-out records): membership AUC "
          f"and TPR at low FPR of the strongest of three attacks (a likelihood ratio on the stored handoffs that "
          f"needs no model, the server model's loss, the whole pipeline's loss); top-1 re-identification in a "
          f"pool of members and non-members; reconstruction PSNR of the strongest attack (scaled handoff, "
          f"linear MMSE with a Gaussian prior from the reference images, the server's denoiser at its best "
          f"level) and its gain over outputting the mean image. ε: per record at δ, replace-one, by "
          f"dp-accounting: it bounds what the handoffs reveal about a record's *content*, not whether the "
          f"record is in the data (a record's presence is not what replace-one DP protects; see the membership "
          f"columns). FLOPs: FlopCounterMode per step times steps (model FLOPs only).\n",
          "## Summary\n", _table(rows), "\n", "## Every attack\n", _attack_table(rows), "\n",
          "## Budgets\n", _budget_table(rows), "\n", "## KID per client\n",
          "KID score: 0 = as far from the held-out images as pure noise, 1 = as near as the client's own real "
          "images; a failed client's samples are indistinguishable from noise (docs/metrics.md). A dash: too few "
          "held-out images to measure.\n", _client_table(rows), "\n", "## Plots\n"]
    md += [f"![{p}]({p})\n" for p in plots]
    md.append("## Samples per client\n")
    for r in [r for r in runs if r["seed"] == (seeds[0] if seeds else None)]:  # the first seed's grids
        grids = sorted(r["folder"].glob("samples_client*.png"))
        cells = []
        for g in grids:
            name = f"{r['name']}_{g.name}"
            shutil.copyfile(g, out / "samples" / name)
            cells.append(f"![{name}](samples/{name})")
        md.append(f"**{r['name']}** (seed {r['seed']}): " + " ".join(cells) + "\n")
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"
