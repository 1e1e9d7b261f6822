"""The disclosure, cost and DP blocks of metrics.json, measured on a trained Federation (design §5 and §7).

Disclosure takes the honest-but-curious server's side: it holds the handoffs it was sent and its
own model. Members are clients' training records (the server holds their handoffs); non-members
are clients' held-out records, which a client noises to the cut with fresh noise for this
evaluation only (never sent, never counted as bytes). MIA thresholds are set on a seeded half of
the non-members (calibration) and evaluated on the other half, never on the evaluated labels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from collafuse.measure import attacks
from collafuse.measure.attacks import MIA_TARGET_FPR, chance_level, distribution_disclosure, mia_metrics, mia_scores
from collafuse.measure.cost import denoiser_flops, train_step_flops
from collafuse.roles.privacy import clip_records
from collafuse.core.sampling import level_grid

SERVER_MIA_FRACTIONS = (0.02, 0.1, 0.3)  # of the server's levels above the cut
PIPELINE_MIA_FRACTIONS = (0.02, 0.1, 0.3, 0.6)  # of the whole chain
MAX_KVIEWS = 64


def measure(fed, *, extractor=None) -> dict:
    """The 'disclosure' (None when eval.disclosure is off) and 'cost' blocks for a trained federation.

    The 'dp' block comes from the round engine: each client's ledger counts what its records released.
    """
    return {"disclosure": disclosure_block(fed, extractor) if fed.cfg.eval.disclosure else None,
            "cost": cost_block(fed)}


# ---------------------------------------------------------------- cost

def _train_loss(model, batch: int, shape, levels: tuple[int, int], schedule, cond, gen, device):
    """A loss closure shaped like one training step of a role (random data: FLOPs do not depend on values)."""
    x0 = torch.randn((batch, *shape), generator=gen).clamp(-1, 1)
    t = torch.randint(levels[0], levels[1] + 1, (batch,), generator=gen)
    eps = torch.randn((batch, *shape), generator=gen)
    x_t = schedule.noise(x0, t, eps).to(device)
    return lambda: F.mse_loss(model(x_t, t.to(device), cond), eps.to(device))


def _client_cond(client, n: int, gen):
    if client.condition is None:
        return None
    return client.condition[torch.randint(client.num_records, (n,), generator=gen)].to(client.device)


def cost_block(fed) -> dict:
    """FLOPs per role and phase (one step counted by FlopCounterMode, times the steps done), seconds and bytes."""
    cfg, sch, t_c, T = fed.cfg, fed.schedule, fed.cut_level, fed.schedule.T
    gen = torch.Generator().manual_seed(cfg.seed * 31 + 1)
    shape, n = tuple(fed.data.images.shape[1:]), cfg.sampling.n
    clients = {}
    for c in fed.clients:
        train_step = sample_step = 0
        if t_c > 0:
            cond = _client_cond(c, c.batch_size, gen)
            train_step = train_step_flops(c.model, _train_loss(c.model, c.batch_size, shape, (1, t_c), sch, cond,
                                                               gen, c.device))
            x = torch.randn((n, *shape), generator=gen).to(c.device)
            sample_step = denoiser_flops(c.eps_fn(_client_cond(c, n, gen)), x,
                                         torch.full((n,), t_c, dtype=torch.long, device=c.device))
        sample_steps = len(level_grid(t_c, 0, cfg.sampling.client_steps)) - 1
        clients[str(c.id)] = {
            "train_flops_per_step": train_step, "train_steps": c.steps_done, "train_flops": train_step * c.steps_done,
            "sample_flops_per_step": sample_step, "sample_steps": sample_steps, "sample_flops": sample_step * sample_steps,
            "train_seconds": fed.seconds[f"client{c.id}.train"], "sample_seconds": fed.seconds[f"client{c.id}.sample"],
            "bytes_up": fed.wire.bytes_up[c.id], "bytes_down": fed.wire.bytes_down[c.id]}
    s = fed.server
    train_step = sample_step = 0
    if s.has_levels:
        label = torch.zeros(s.batch_size, dtype=torch.long, device=s.device) if s.client_cond else None
        train_step = train_step_flops(s.model, _train_loss(s.model, s.batch_size, shape, (t_c + 1, T), sch, label,
                                                           gen, s.device))
        x = torch.randn((n, *shape), generator=gen).to(s.device)
        sample_step = denoiser_flops(s.eps_fn(0), x, torch.full((n,), T, dtype=torch.long, device=s.device))
    sample_steps = (len(level_grid(T, t_c, cfg.sampling.server_steps)) - 1) * len(fed.clients)
    server = {"train_flops_per_step": train_step, "train_steps": s.steps_done, "train_flops": train_step * s.steps_done,
              "sample_flops_per_step": sample_step, "sample_steps": sample_steps,
              "sample_flops": sample_step * sample_steps,
              "train_seconds": fed.seconds["server.train"], "sample_seconds": fed.seconds["server.sample"]}
    totals = {k: sum(v[k] for v in clients.values()) for k in ("train_flops", "sample_flops", "bytes_up", "bytes_down")}
    return {"method": "torch FlopCounterMode on one step per role and phase, times the steps done; model FLOPs "
                      "(2 per multiply-add), elementwise work not counted",
            "clients": clients, "client_total": totals, "client_mean": {k: v / len(clients) for k, v in totals.items()},
            "server": server,
            "bytes_up": sum(fed.wire.bytes_up.values()), "bytes_down": sum(fed.wire.bytes_down.values())}


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
