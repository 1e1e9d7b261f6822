"""The disclosure block of metrics.json, measured on a trained in-process Federation (design §5).

Disclosure takes the honest-but-curious server's side: it holds the handoffs it was sent, its own
model and public images of the same kind. Members are clients' training records (the server holds
their handoffs). Each client's held-out records are split, seeded, into two disjoint halves: the
public reference set (the attacker's images: the likelihood-ratio attack's alternatives, the MMSE
prior, the choice of the denoiser's level) and the evaluated non-members (noised to the cut with
fresh noise for this evaluation only, never sent, never counted as bytes). No reference image is
ever a member or an evaluated non-member. Membership figures are the ROC of members against the
evaluated non-members: AUC and TPR at 1% and 0.1% FPR; each family's strongest attack is its summary.
"""
from __future__ import annotations

import math

import torch

from collafuse.core.sampling import row_batches
from collafuse.measure import attacks
from collafuse.measure.attacks import chance_level, distribution_disclosure, membership_metrics, mia_scores
from collafuse.roles.cohort import sampling_key, stacked_eps_fn
from collafuse.roles.privacy import clip_records

SERVER_MIA_FRACTIONS = (0.02, 0.1, 0.3)  # of the server's levels above the cut
PIPELINE_MIA_FRACTIONS = (0.02, 0.1, 0.3, 0.6)  # of the whole chain
MAX_KVIEWS = 64
DENOISER_FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)  # of the server's levels above the cut; 0 = t_c + 1
LEVEL_CHOICE_IMAGES = 128  # reference images the attacker tries each denoiser level on


def measure(fed, *, extractor=None) -> dict:
    """The 'disclosure' block (None when eval.disclosure is off) for a trained in-process federation.

    The 'dp' and 'cost' blocks come from the round engine, as the clients reported them.
    """
    return {"disclosure": disclosure_block(fed, extractor) if fed.cfg.eval.disclosure else None}


# ---------------------------------------------------------------- disclosure

def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # JSON has no Infinity: None = exact recovery


def _extractor(fed):
    from collafuse.measure.evaluate import quality_features  # the classifier evaluate trained: same inputs, so a cache hit
    return quality_features(fed)[2]


def _attack_sets(fed, gen) -> list[dict]:
    """Per client: up to eval.disclosure_records members, reference images and non-members, and handoffs."""
    from collafuse.data.condition import client_condition
    cfg, sch, t_c = fed.cfg, fed.schedule, fed.cut_level
    cap = cfg.eval.disclosure_records
    condition = client_condition(cfg, fed.data)
    sets = []
    for c, split in zip(fed.clients, fed.splits):
        members = torch.randperm(c.num_records, generator=gen)[:cap]
        held_out = split.test[torch.randperm(len(split.test), generator=gen)]
        half = len(held_out) // 2
        reference, test = held_out[:half][:cap], held_out[half:][:cap]
        x_non = fed.data.images[test]
        # The client would clip held-out records exactly like its own; the attacker knows its clip norm.
        sent = (lambda x: x) if c.clip_norm is None else (lambda x: clip_records(x, c.clip_norm))
        entry = {"client": c, "x_mem": c.images[members], "x_non": x_non, "x_non_sent": sent(x_non),
                 "x_ref": fed.data.images[reference], "x_ref_sent": sent(fed.data.images[reference]),
                 "cond_mem": None if c.condition is None else c.condition[members],
                 "cond_non": None if condition is None else condition[test],
                 "x_mem_sent": c.private_records()[members], "views": []}
        if fed.server.has_levels:
            held = fed.server.held_handoffs(c.id)
            views = sorted({v for (_, v) in held})
            ids = members.tolist()
            entry["views"] = torch.stack([torch.stack([held[(r, v)] for r in ids]) for v in views])  # (K, N, C, H, W)
            entry["y_mem"] = entry["views"][0]  # the members' first handoffs
            entry["store"] = torch.stack(list(held.values()))  # every handoff the server holds from this client
            eval_noise = torch.randn(x_non.shape, generator=gen)
            entry["y_non"] = sch.noise(entry["x_non_sent"], torch.full((len(test),), t_c), eval_noise).float()
        sets.append(entry)
    return sets


def _levels(lo: int, hi: int, fractions) -> list[int]:
    return sorted({min(hi, lo + max(1, round(f * (hi - lo)))) for f in fractions})


def _owners(chunk: list[dict], rows: list[torch.Tensor]) -> torch.Tensor:
    """The client id of every row of a chunk's concatenated records."""
    return torch.cat([torch.full((len(r),), s["client"].id) for s, r in zip(chunk, rows)])


def _chunks(sets: list[dict], key: str, image_shape) -> list[list[dict]]:
    """Consecutive clients' attack sets grouped so that each group's `key` records fit one network call."""
    return [[sets[i] for i in idx] for idx in row_batches([len(s[key]) for s in sets], image_shape)]


def _pipeline_eps(fed, chunk: list[dict], kind: str):
    """Full-chain noise prediction of each client's whole pipeline, over a chunk's concatenated `x_{kind}` records:
    the server above the cut (one call for the chunk), each client's own model at or below it (with batch_clients,
    simulated clients of one architecture in one vmapped call, roles/cohort.py)."""
    server, t_c = fed.server, fed.cut_level
    sizes = [len(s[f"x_{kind}"]) for s in chunk]
    server_fn = server.eps_fn(_owners(chunk, [s[f"x_{kind}"] for s in chunk]).to(server.device))
    clients = [s["client"] for s in chunk]
    conds = [None if s[f"cond_{kind}"] is None else s[f"cond_{kind}"].to(s["client"].device) for s in chunk]
    if fed.cfg.batch_clients and len(chunk) > 1 and len({sampling_key(c) for c in clients}) == 1:
        together, device = stacked_eps_fn(clients, conds, sizes), clients[0].device

        def client_fn(x, t):
            return together(x.to(device), t.to(device)).to(x.device)
    else:
        fns = [c.eps_fn(cond) for c, cond in zip(clients, conds)]

        def client_fn(x, t):
            return torch.cat([f(xs.to(c.device), ts.to(c.device)).to(x.device)
                              for c, f, xs, ts in zip(clients, fns, x.split(sizes), t.split(sizes))])

    def fn(x, t):
        if int(t[0]) > t_c:
            return server_fn(x.to(server.device), t.to(server.device)).to(x.device)
        return client_fn(x, t)
    return fn


def _scores(sets: list[dict], key: str, image_shape, loss_of, device=None, **mia) -> torch.Tensor:
    """mia_scores of every client's `key` records, a chunk of clients per network call, each client with the
    noise stream it would get alone; loss_of(chunk) is the chunk's per-record loss function."""
    out = []
    for chunk in _chunks(sets, key, image_shape):
        x = torch.cat([s[key] for s in chunk]).to(device)
        out.append(mia_scores(x, loss_of(chunk), batch_size=len(x), groups=[len(s[key]) for s in chunk], **mia))
    return torch.cat(out)


def _kview(fed, sets, gen) -> dict:
    """K-view averaging: the views the server holds (once), and the views a fresh-mode run would have sent."""
    cfg, sch, t_c, ab = fed.cfg, fed.schedule, fed.cut_level, fed.schedule.alpha_bar
    x0 = torch.cat([s["x_mem"] for s in sets])
    held = torch.cat([s["views"] for s in sets], dim=1)
    total = sum(c.num_records for c in fed.clients)
    per_round = max(1, math.ceil(cfg.server.steps_per_round * cfg.server.batch_size / total))
    k_fresh = min(MAX_KVIEWS, per_round * cfg.rounds)
    sent = torch.cat([s["x_mem_sent"] for s in sets])
    level = torch.full((len(sent),), t_c)
    fresh = torch.stack([sch.noise(sent, level, torch.randn(sent.shape, generator=gen)).float()
                         for _ in range(k_fresh)])
    ks = lambda k: sorted({2 ** i for i in range(int(math.log2(k)) + 1)} | {k})
    return {"held": attacks.kview_psnr_curve(held, x0, t_c, ab, ks(held.shape[0])),
            "fresh": attacks.kview_psnr_curve(fresh, x0, t_c, ab, ks(k_fresh)),
            "views_held": int(held.shape[0]), "views_fresh": k_fresh,
            "note": "fresh: simulated views, as many as a fresh-mode run of this config sends per record"}


def _reconstruction(fed, sets, gen) -> dict:
    """Members' records from their handoffs: each attack's PSNR/SSIM and its gain over the mean image."""
    t_c, T, ab = fed.cut_level, fed.schedule.T, fed.schedule.alpha_bar
    x = torch.cat([s["x_mem"] for s in sets])
    y = torch.cat([s["y_mem"] for s in sets])
    reference = torch.cat([s["x_ref_sent"] for s in sets])
    prior = attacks.GaussianPrior(reference)
    estimates = {"mean_image": prior.mean_image(len(x)), "scaled": attacks.reconstruct(y, t_c, ab),
                 "mmse": prior.posterior_mean(y, t_c, ab)}
    # The server's own denoiser, at the level that reconstructs the public images best for each client.
    levels, server = _levels(t_c, T, DENOISER_FRACTIONS), fed.server
    pick = reference[torch.randperm(len(reference), generator=gen)[:LEVEL_CHOICE_IMAGES]]
    chosen = {}
    for idx in row_batches([len(pick)] * len(sets), pick.shape[1:]):  # several clients' denoisers per call
        chunk = [sets[i]["client"].id for i in idx]
        owners = torch.tensor(chunk)
        found = attacks.best_denoiser_level(
            pick, t_c, levels, ab, lambda k: _on(server.eps_fn(owners[k].to(server.device)), server.device),
            gen, copies=len(chunk))
        chosen.update({cid: level for cid, (level, _) in zip(chunk, found)})
    denoised = {}
    for level in sorted(set(chosen.values())):  # the clients that chose one level, a chunk of them per call
        for chunk in _chunks([s for s in sets if chosen[s["client"].id] == level], "y_mem", y.shape[1:]):
            views = [s["y_mem"] for s in chunk]
            eps = _on(server.eps_fn(_owners(chunk, views).to(server.device)), server.device)
            y_chunk = torch.cat(views)
            est = attacks.denoiser_estimate(y_chunk, t_c, level, ab, eps, torch.randn(y_chunk.shape, generator=gen))
            denoised.update({s["client"].id: e for s, e in zip(chunk, est.split([len(v) for v in views]))})
    picked = {str(cid): level for cid, level in chosen.items()}
    estimates["server_denoiser"] = torch.cat([denoised[s["client"].id] for s in sets])
    baseline = float(attacks.psnr(estimates["mean_image"], x).mean())
    results = {}
    for name, x_hat in estimates.items():
        value = _num(float(attacks.psnr(x_hat, x).mean()))
        results[name] = {"psnr": value, "ssim": float(attacks.ssim(x_hat, x).mean()),
                         "gain_db": None if value is None else value - baseline}
    best = max(results, key=lambda k: math.inf if results[k]["psnr"] is None else results[k]["psnr"])
    return {"attacks": results, "best": best, **results[best], "members": len(x), "reference": len(reference),
            "denoiser_levels": picked, "denoiser_levels_tried": levels,
            "note": "members only (the server holds no non-member handoff); mean_image: the prior's mean, what a "
                    "server knows without any handoff; mmse: linear MMSE with a Ledoit-Wolf Gaussian prior fitted "
                    "to the reference images; server_denoiser: re-noise to the level chosen on reference images, "
                    "Tweedie; psnr None = exact recovery (infinite)"}


def _on(eps_fn, device):
    """A role's eps_fn called with CPU tensors: moved to its device and back."""
    return lambda x, t: eps_fn(x.to(device), t.to(device)).cpu()


def _membership_summary(out: dict) -> dict:
    """The strongest membership attack of the block, by AUC."""
    found = {k: out[k] for k in ("mia_handoff_lr", "mia_server", "mia_pipeline") if out.get(k)}
    best = max(found, key=lambda k: found[k]["auc"])
    return {"best": best, **{k: found[best][k] for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")}}


def disclosure_block(fed, extractor=None) -> dict:
    """What the server can learn per record and per distribution, members vs non-members, at this cut."""
    cfg, sch, t_c, T = fed.cfg, fed.schedule, fed.cut_level, fed.schedule.T
    gen = torch.Generator().manual_seed(cfg.seed * 31 + 2)
    sets = _attack_sets(fed, gen)
    n_mem, n_non = sum(len(s["x_mem"]) for s in sets), sum(len(s["x_non"]) for s in sets)
    out = {"members": n_mem, "nonmembers": n_non, "reference": sum(len(s["x_ref"]) for s in sets),
           "server_sees": "handoffs" if fed.server.has_levels else "nothing",
           "cut_level": t_c, "alpha_bar_cut": float(sch.alpha_bar[t_c])}
    shape, mia = fed.data.images.shape[1:], {"draws": cfg.eval.mia_draws, "seed": cfg.seed}
    pipeline = {kind: _scores(sets, f"x_{kind}", shape, lambda chunk, kind=kind: attacks.denoising_loss(
        _pipeline_eps(fed, chunk, kind), sch.alpha_bar), levels=_levels(0, T, PIPELINE_MIA_FRACTIONS), **mia)
        for kind in ("mem", "non")}
    out["mia_pipeline"] = {**membership_metrics(pipeline["mem"], pipeline["non"]),
                           "levels": _levels(0, T, PIPELINE_MIA_FRACTIONS)}
    if not fed.server.has_levels:  # c = 1: nothing crossed the wire but sampling requests and reports
        out.update(distribution=None, reconstruction=None, reidentification=None, kview=None, mia_server=None,
                   mia_handoff_lr=None)
        out["membership"] = _membership_summary(out)
        return out
    extractor = extractor or _extractor(fed)
    y_mem = torch.cat([s["y_mem"] for s in sets])
    y_non = torch.cat([s["y_non"] for s in sets])
    x_mem, x_non = torch.cat([s["x_mem"] for s in sets]), torch.cat([s["x_non"] for s in sets])
    out["distribution"] = {
        "members": distribution_disclosure(y_mem, x_mem, extractor, seed=cfg.seed),
        "nonmembers": distribution_disclosure(y_non, x_non, extractor, seed=cfg.seed),
        "extractor": cfg.eval.extractor}
    out["reconstruction"] = _reconstruction(fed, sets, gen)
    pool = math.sqrt(float(sch.alpha_bar[t_c])) * torch.cat([x_mem, x_non])  # the ML match for Gaussian noise
    out["reidentification"] = {
        "members": attacks.reidentification_rate(y_mem, pool, torch.arange(n_mem)),
        "nonmembers": attacks.reidentification_rate(y_non, pool, torch.arange(n_mem, n_mem + n_non)),
        "pool": n_mem + n_non, "chance": chance_level(n_mem + n_non)}
    out["kview"] = _kview(fed, sets, gen)
    # Membership from the store alone: every handoff the server holds against the public reference images.
    store = torch.cat([s["store"] for s in sets])
    reference = torch.cat([s["x_ref_sent"] for s in sets])
    lr = [attacks.handoff_lr_scores(torch.cat([s[k] for s in sets]), store, reference, t_c, sch.alpha_bar)
          for k in ("x_mem_sent", "x_non_sent")]
    out["mia_handoff_lr"] = {**membership_metrics(*lr), "handoffs": len(store), "reference": len(reference),
                             "note": "no model: each candidate's best likelihood ratio over the stored handoffs "
                                     "against the reference images"}
    levels, server = _levels(t_c, T, SERVER_MIA_FRACTIONS), fed.server
    scores = {kind: _scores(sets, f"y_{kind}", shape, lambda chunk, kind=kind: attacks.denoising_loss(
        server.eps_fn(_owners(chunk, [s[f"y_{kind}"] for s in chunk]).to(server.device)),
        sch.alpha_bar.to(server.device), from_level=t_c), server.device, levels=levels, **mia)
        for kind in ("mem", "non")}
    out["mia_server"] = {**membership_metrics(scores["mem"], scores["non"]),
                         "levels": levels,
                         "note": "loss of the server model on handoffs; non-member handoffs made for evaluation only"}
    out["membership"] = _membership_summary(out)
    return out
