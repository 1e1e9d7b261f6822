"""The disclosure block of metrics.json, measured on a trained in-process Federation (design §5).

Disclosure takes the honest-but-curious server's side: it holds the handoffs it was sent and its
own model. Members are clients' training records (the server holds their handoffs); non-members
are clients' held-out records, which a client noises to the cut with fresh noise for this
evaluation only (never sent, never counted as bytes). MIA thresholds are set on a seeded half of
the non-members (calibration) and evaluated on the other half, never on the evaluated labels.
"""
from __future__ import annotations

import math

import torch
from sklearn.metrics import roc_auc_score

from collafuse.measure import attacks
from collafuse.measure.attacks import MIA_TARGET_FPR, chance_level, distribution_disclosure, mia_metrics, mia_scores
from collafuse.roles.privacy import clip_records

SERVER_MIA_FRACTIONS = (0.02, 0.1, 0.3)  # of the server's levels above the cut
PIPELINE_MIA_FRACTIONS = (0.02, 0.1, 0.3, 0.6)  # of the whole chain
MAX_KVIEWS = 64


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
    """Per client: up to eval.disclosure_records members and non-members, their records and handoffs."""
    from collafuse.data.condition import client_condition
    cfg, sch, t_c = fed.cfg, fed.schedule, fed.cut_level
    cap = cfg.eval.disclosure_records
    condition = client_condition(cfg, fed.data)
    sets = []
    for c, split in zip(fed.clients, fed.splits):
        members = torch.randperm(c.num_records, generator=gen)[:cap]
        test = split.test[torch.randperm(len(split.test), generator=gen)[:cap]]
        x_non = fed.data.images[test]
        # The client would clip held-out records exactly like its own.
        x_non_sent = x_non if c.clip_norm is None else clip_records(x_non, c.clip_norm)
        entry = {"client": c, "x_mem": c.images[members], "x_non": x_non,
                 "cond_mem": None if c.condition is None else c.condition[members],
                 "cond_non": None if condition is None else condition[test],
                 "x_mem_sent": c.private_records()[members], "views": []}
        if fed.server.has_levels:
            held = fed.server.held_handoffs(c.id)
            views = sorted({v for (_, v) in held})
            ids = members.tolist()
            entry["views"] = torch.stack([torch.stack([held[(r, v)] for r in ids]) for v in views])  # (K, N, C, H, W)
            eval_noise = torch.randn(x_non.shape, generator=gen)
            entry["y_non"] = sch.noise(x_non_sent, torch.full((len(test),), t_c), eval_noise).float()
        sets.append(entry)
    return sets


def _server_estimate(fed, cid: int, y: torch.Tensor, gen) -> torch.Tensor:
    """x0 from handoffs by the server's own denoiser: re-noise to t_c+1 (its lowest level), then Tweedie."""
    s, t1 = fed.server, fed.cut_level + 1
    e = torch.randn(y.shape, generator=gen)
    x = fed.schedule.renoise(y, fed.cut_level, torch.full((y.shape[0],), t1), e).float().to(s.device)
    return attacks.reconstruct(x, t1, fed.schedule.alpha_bar, eps_fn=s.eps_fn(cid)).cpu()


def _mia(member: torch.Tensor, nonmember: torch.Tensor, gen) -> dict:
    """Threshold on a seeded calibration half of the non-members; AUC and TPR on members vs the other half."""
    perm = torch.randperm(len(nonmember), generator=gen)
    half = len(nonmember) // 2
    calib, held = nonmember[perm[:half]], nonmember[perm[half:]]
    if len(calib) >= math.ceil(1 / MIA_TARGET_FPR):
        return mia_metrics(member, held, calibration_nonmember_scores=calib)
    labels = [1] * len(member) + [0] * len(held)
    return {"auc": float(roc_auc_score(labels, torch.cat([member, held]).tolist())), "tpr_at_1pct_fpr": None,
            "members": len(member), "nonmembers": len(held), "calibration_nonmembers": len(calib),
            "note": f"fewer than {math.ceil(1 / MIA_TARGET_FPR)} calibration non-members: no 1% FPR threshold; "
                    f"raise data.max_records or eval.disclosure_records"}


def _levels(lo: int, hi: int, fractions) -> list[int]:
    return sorted({min(hi, lo + max(1, round(f * (hi - lo)))) for f in fractions})


def _pipeline_eps(fed, c, cond):
    """Full-chain noise prediction of the whole pipeline: the server above the cut, the client at or below it."""
    server_fn, t_c = fed.server.eps_fn(c.id), fed.cut_level
    client_fn = c.eps_fn(None if cond is None else cond.to(c.device))

    def fn(x, t):
        if int(t[0]) > t_c:
            return server_fn(x.to(fed.server.device), t.to(fed.server.device)).to(x.device)
        return client_fn(x.to(c.device), t.to(c.device)).to(x.device)
    return fn


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


def disclosure_block(fed, extractor=None) -> dict:
    """What the server can learn per record and per distribution, members vs non-members, at this cut."""
    cfg, sch, t_c, T = fed.cfg, fed.schedule, fed.cut_level, fed.schedule.T
    gen = torch.Generator().manual_seed(cfg.seed * 31 + 2)
    sets = _attack_sets(fed, gen)
    n_mem, n_non = sum(len(s["x_mem"]) for s in sets), sum(len(s["x_non"]) for s in sets)
    out = {"members": n_mem, "nonmembers": n_non, "server_sees": "handoffs" if fed.server.has_levels else "nothing",
           "cut_level": t_c, "alpha_bar_cut": float(sch.alpha_bar[t_c])}
    pipeline = {"member": [], "non": []}
    for s in sets:
        c = s["client"]
        levels = _levels(0, T, PIPELINE_MIA_FRACTIONS)
        for kind in ("mem", "non"):
            loss = attacks.denoising_loss(_pipeline_eps(fed, c, s[f"cond_{kind}"]), sch.alpha_bar)
            x = s[f"x_{kind}"]
            pipeline["member" if kind == "mem" else "non"].append(
                mia_scores(x, loss, levels=levels, draws=cfg.eval.mia_draws, seed=cfg.seed, batch_size=len(x)))
    out["mia_pipeline"] = {**_mia(torch.cat(pipeline["member"]), torch.cat(pipeline["non"]), gen),
                           "levels": _levels(0, T, PIPELINE_MIA_FRACTIONS)}
    if not fed.server.has_levels:  # c = 1: nothing crossed the wire but sampling requests and reports
        out.update(distribution=None, reconstruction=None, reidentification=None, kview=None, mia_server=None)
        return out
    extractor = extractor or _extractor(fed)
    y_mem = torch.cat([s["views"][0] for s in sets])
    y_non = torch.cat([s["y_non"] for s in sets])
    x_mem, x_non = torch.cat([s["x_mem"] for s in sets]), torch.cat([s["x_non"] for s in sets])
    out["distribution"] = {
        "members": distribution_disclosure(y_mem, x_mem, extractor, seed=cfg.seed),
        "nonmembers": distribution_disclosure(y_non, x_non, extractor, seed=cfg.seed),
        "extractor": cfg.eval.extractor}
    recon = {}
    for kind, key, y, x in (("members", "mem", y_mem, x_mem), ("nonmembers", "non", y_non, x_non)):
        naive = attacks.reconstruct(y, t_c, sch.alpha_bar)
        denoised = torch.cat([_server_estimate(fed, st["client"].id, st["views"][0] if key == "mem" else st["y_non"],
                                               gen) for st in sets])
        q_naive, q_den = attacks.reconstruction_quality(naive, x), attacks.reconstruction_quality(denoised, x)
        mean = lambda v: _num(float(torch.tensor(v).mean()))
        r = {"psnr_scaled": mean(q_naive["psnr"]), "ssim_scaled": mean(q_naive["ssim"]),
             "psnr_denoiser": mean(q_den["psnr"]), "ssim_denoiser": mean(q_den["ssim"])}
        r["psnr"] = None if None in (r["psnr_scaled"], r["psnr_denoiser"]) else max(r["psnr_scaled"], r["psnr_denoiser"])
        r["ssim"] = max(r["ssim_scaled"], r["ssim_denoiser"])
        recon[kind] = r
    recon["note"] = ("scaled: y / sqrt(alpha_bar); denoiser: the server's model at level t_c+1 after re-noising "
                     "(Tweedie); psnr/ssim: the better of the two; psnr None = exact recovery (infinite)")
    out["reconstruction"] = recon
    pool = math.sqrt(float(sch.alpha_bar[t_c])) * torch.cat([x_mem, x_non])  # the ML match for Gaussian noise
    out["reidentification"] = {
        "members": attacks.reidentification_rate(y_mem, pool, torch.arange(n_mem)),
        "nonmembers": attacks.reidentification_rate(y_non, pool, torch.arange(n_mem, n_mem + n_non)),
        "pool": n_mem + n_non, "chance": chance_level(n_mem + n_non)}
    out["kview"] = _kview(fed, sets, gen)
    scores = {"member": [], "non": []}
    levels = _levels(t_c, T, SERVER_MIA_FRACTIONS)
    for s in sets:
        loss = attacks.denoising_loss(fed.server.eps_fn(s["client"].id), sch.alpha_bar.to(fed.server.device),
                                      from_level=t_c)
        for kind, y in (("member", s["views"][0]), ("non", s["y_non"])):
            scores[kind].append(mia_scores(y.to(fed.server.device), loss, levels=levels, draws=cfg.eval.mia_draws,
                                           seed=cfg.seed))
    out["mia_server"] = {**_mia(torch.cat(scores["member"]), torch.cat(scores["non"]), gen), "levels": levels,
                         "note": "loss of the server model on handoffs; non-member handoffs made for evaluation only"}
    return out
