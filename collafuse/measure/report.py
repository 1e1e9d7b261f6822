"""A report folder from run folders: report.md with tables, PNG plots and per-client sample grids."""
from __future__ import annotations

import json
import shutil
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
    kind = m.get("baseline") or ("fresh" if m.get("handoff_mode") == "fresh" else "collafuse")
    return {"name": folder.name, "folder": folder, "kind": kind, "metrics": m}


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
    return {
        "name": run["name"], "kind": run["kind"], "cut": m["cut"], "cut_level": m["cut_level"],
        "kid": kid, "kid_sum": sum(kid.values()), "kid_mean": sum(kid.values()) / len(kid),
        "fid_mean": sum(c["fid"] for c in clients.values()) / len(clients),
        "epsilon": _get(m, "dp", "epsilon"), "delta": _get(m, "dp", "delta"), "dp_views": _get(m, "dp", "views"),
        "reid_members": _get(d, "reidentification", "members"), "reid_nonmembers": _get(d, "reidentification", "nonmembers"),
        "reid_chance": _get(d, "reidentification", "chance"),
        "psnr_members": _get(d, "reconstruction", "members", "psnr"),
        "mia_server": _get(d, "mia_server", "auc"), "mia_pipeline": _get(d, "mia_pipeline", "auc"),
        "mia_server_tpr": _get(d, "mia_server", "tpr_at_1pct_fpr"),
        "kid_handoff": _get(d, "distribution", "members", "kid"),
        "client_flops": (_get(cost, "client_mean", "train_flops") or 0) + (_get(cost, "client_mean", "sample_flops") or 0),
        "server_flops": (_get(cost, "server", "train_flops") or 0) + (_get(cost, "server", "sample_flops") or 0),
        "bytes_up": m["bytes_up"], "bytes_down": m["bytes_down"], "wall": m.get("wall_seconds"),
    }


def _fmt(v, spec=".3f") -> str:
    if v is None:
        return "–"
    return format(v, spec)


def _table(rows: list[dict]) -> str:
    head = ("| run | c | t_c | KID mean | KID sum | FID mean | ε (δ) | re-id members / non (chance) | recon PSNR dB "
            "| MIA AUC server | MIA AUC pipeline | client GFLOPs | server GFLOPs | MB up | MB down | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        eps = "∞ (raw data)" if r["epsilon"] is None and r["dp_views"] else _fmt(r["epsilon"], ".3g")
        if r["kind"] == "fedavg":
            eps = "n/a (weights shared)"
        elif r["delta"] is not None and r["epsilon"] is not None:
            eps += f" ({r['delta']:.0e})"
        psnr = "exact" if r["psnr_members"] is None and r["reid_members"] is not None else _fmt(r["psnr_members"], ".1f")
        reid = "–" if r["reid_members"] is None else (f"{r['reid_members']:.2f} / {r['reid_nonmembers']:.2f} "
                                                      f"({r['reid_chance']:.4f})")
        lines.append(f"| {r['name']} | {r['cut']:.2f} | {r['cut_level']} | {_fmt(r['kid_mean'], '.4f')} "
                     f"| {_fmt(r['kid_sum'], '.4f')} | {_fmt(r['fid_mean'], '.2f')} | {eps} | {reid} "
                     f"| {psnr} "
                     f"| {_fmt(r['mia_server'])} | {_fmt(r['mia_pipeline'])} | {r['client_flops'] / 1e9:.2f} "
                     f"| {r['server_flops'] / 1e9:.2f} | {r['bytes_up'] / 1e6:.3f} | {r['bytes_down'] / 1e6:.3f} "
                     f"| {_fmt(r['wall'], '.0f')} |")
    return "\n".join(lines)


def _client_table(rows: list[dict]) -> str:
    cids = sorted({cid for r in rows for cid in r["kid"]}, key=int)
    lines = ["| run | " + " | ".join(f"client {c}" for c in cids) + " |", "|---|" + "---|" * len(cids)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(r["kid"].get(c), ".4f") for c in cids) + " |")
    return "\n".join(lines)


def _baseline_marks(ax, rows, key, color="k"):
    for r in rows:
        if r["kind"] != "collafuse" and r[key] is not None:
            ax.scatter([r["cut"]], [r[key]], marker="*" if r["kind"] == "fedavg" else "s", s=80, color=color,
                       zorder=3, label=r["name"])


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
        ax.plot(cuts, [r["kid"].get(cid) for r in cf], marker="o", label=f"client {cid}")
    _baseline_marks(ax, rows, "kid_mean")
    ax.set(xlabel="cut ratio c", ylabel="KID vs held-out (lower is better)", title="Quality per client vs cut")
    ax.legend(fontsize=7)
    save(fig, "quality_vs_cut.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, label in (("reid_members", "members"), ("reid_nonmembers", "non-members"), ("reid_chance", "chance")):
        axes[0].plot(cuts, [r[key] for r in cf], marker="o", label=label)
    axes[0].set(xlabel="cut ratio c", ylabel="top-1 re-identification rate", title="Re-identification")
    axes[1].plot(cuts, [r["psnr_members"] for r in cf], marker="o")
    axes[1].set(xlabel="cut ratio c", ylabel="PSNR dB (members)", title="Reconstruction from handoffs")
    for key, label in (("mia_server", "server model"), ("mia_pipeline", "whole pipeline")):
        axes[2].plot(cuts, [r[key] for r in cf], marker="o", label=label)
    _baseline_marks(axes[2], rows, "mia_pipeline")
    axes[2].axhline(0.5, color="gray", ls=":")
    axes[2].set(xlabel="cut ratio c", ylabel="MIA AUC", title="Membership inference")
    for a in (axes[0], axes[2]):
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

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        x = r["reid_members"] if r["reid_members"] is not None else 0.0  # nothing crossed the wire: nothing to match
        ax.scatter([x], [r["kid_mean"]], marker="o" if r["kind"] == "collafuse" else "*", s=60)
        ax.annotate(r["name"], (x, r["kid_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="re-identification rate of members (disclosure)", ylabel="mean KID (lower is better)",
           title="Privacy / quality frontier")
    save(fig, "frontier.png")
    return files


def write_report(folders: list[str | Path], out: str | Path) -> Path:
    """Write out/report.md, the plots and the sample grids for the given run folders; returns report.md's path."""
    if not folders:
        raise ValueError("no run folders given; pass the folders of finished runs, e.g. runs/sweep/cut-0.20")
    runs = [load_run(f) for f in folders]
    rows = [summary(r) for r in runs]
    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    plots = _plots(rows, out)
    q = runs[0]["metrics"]["quality"]
    cfg = json.loads((runs[0]["folder"] / "config.json").read_text())
    md = [f"# CollaFuse sweep report\n",
          f"Data `{cfg['data']['name']}`, {cfg['data']['clients']} clients ({cfg['data']['partition']}), "
          f"T = {cfg['schedule']['T']}, {cfg['rounds']} rounds, seed {cfg['seed']}. Quality: FID/KID with the "
          f"`{q['extractor']}` feature extractor, {q['n_samples']} samples per client ({q['sampler']}) against "
          f"each client's held-out images. Disclosure: top-1 re-identification in a pool of members and "
          f"non-members, reconstruction PSNR from the handoffs, MIA AUC with thresholds on calibration "
          f"non-members only. ε: per record at δ, replace-one, by dp-accounting. FLOPs: FlopCounterMode per "
          f"step times steps (model FLOPs only).\n",
          "## Summary\n", _table(rows), "\n", "## KID per client\n", _client_table(rows), "\n", "## Plots\n"]
    md += [f"![{p}]({p})\n" for p in plots]
    md.append("## Samples per client\n")
    for r in runs:
        grids = sorted(r["folder"].glob("samples_client*.png"))
        cells = []
        for g in grids:
            name = f"{r['name']}_{g.name}"
            shutil.copyfile(g, out / "samples" / name)
            cells.append(f"![{name}](samples/{name})")
        md.append(f"**{r['name']}**: " + " ".join(cells) + "\n")
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"
