"""What an honest-but-curious server can learn about client records from the handoffs it sees.

Pure functions on tensors and callables. Notation: alpha_bar is a 1-D tensor of length T+1 with
alpha_bar[0] = 1; t_c the cut level; a handoff y = sqrt(alpha_bar[t_c]) x0 + sqrt(1 - alpha_bar[t_c]) e.
A denoiser is eps_fn(x_t, t) -> predicted full-chain noise, t a long tensor of shape (N,).
Images are (N, C, H, W) in [-1, 1].
"""

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.kid import KernelInceptionDistance

from collafuse.core.sampling import randn

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LEVEL_SCREEN_IMAGES = 32  # best_denoiser_level tries every level on this many images before it drops any
LEVEL_SCREEN_Z = 4.0  # ...and drops a level this many standard errors behind the leader
# loss_fn(records, t, noise) -> per-record denoising loss (N,); see denoising_loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-record PSNR in dB between image batches in [-1, 1] (data range 2)."""
    _check_pair(a, b)
    return peak_signal_noise_ratio(a, b, data_range=2.0, reduction="none", dim=(1, 2, 3))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-record SSIM (Gaussian window, sigma 1.5) between image batches in [-1, 1], computed on [0, 1]."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < 6:  # the 11-tap window is reflection-padded by 5 pixels
        raise ValueError(f"ssim needs images of at least 6x6 pixels, got {tuple(a.shape[-2:])}")
    # SSIM's luminance term assumes non-negative intensities: on [-1, 1], x and -x would score as similar
    return structural_similarity_index_measure(
        (a.float() + 1) / 2, (b.float() + 1) / 2, data_range=1.0, reduction="none"
    )


def reconstruct(
    handoffs: torch.Tensor, t_c: int, alpha_bar: torch.Tensor, eps_fn: EpsFn | None = None
) -> torch.Tensor:
    """Server's estimate of x0 from handoffs: Tweedie with its denoiser, else y / sqrt(ab); clamped to [-1, 1]."""
    ab = _alpha_bar_at(alpha_bar, t_c)
    y = handoffs
    if eps_fn is not None and t_c > 0:
        t = torch.full((y.shape[0],), t_c, dtype=torch.long, device=y.device)
        with torch.no_grad():
            y = y - math.sqrt(1.0 - ab) * eps_fn(y, t)
    return (y / math.sqrt(ab)).clamp(-1.0, 1.0)


class GaussianPrior:
    """A Gaussian fitted to public images (Ledoit-Wolf shrinkage): the linear MMSE attacker's prior.

    With x ~ N(mu, S) and y = sqrt(ab) x + sqrt(1 - ab) e, E[x | y] = mu + sqrt(ab) S (ab S + (1 - ab) I)^-1
    (y - sqrt(ab) mu): the best estimate linear in y, and the exact posterior mean for Gaussian data.
    """

    def __init__(self, images: torch.Tensor):
        from sklearn.covariance import LedoitWolf
        if images.ndim != 4 or len(images) < 2:
            raise ValueError(f"the prior needs >= 2 images (N, C, H, W), got shape {tuple(images.shape)}")
        flat = images.flatten(1).double()
        self.shape = tuple(images.shape[1:])
        self.mean = flat.mean(dim=0)
        cov = torch.from_numpy(LedoitWolf().fit(flat.numpy()).covariance_)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(cov)
        self.eigenvalues = self.eigenvalues.clamp(min=0.0)

    def mean_image(self, n: int) -> torch.Tensor:
        """The trivial attack: the prior's mean for every record (what a server learns from no handoff at all)."""
        return self.mean.float().view(1, *self.shape).expand(n, *self.shape).clone()

    def posterior_mean(self, handoffs: torch.Tensor, t_c: int, alpha_bar: torch.Tensor) -> torch.Tensor:
        """E[x | y] under the prior, clamped to [-1, 1]."""
        ab = _alpha_bar_at(alpha_bar, t_c)
        if tuple(handoffs.shape[1:]) != self.shape:
            raise ValueError(f"handoffs {tuple(handoffs.shape[1:])} differ from the prior's images {self.shape}")
        if ab == 1.0:  # c = 0: the handoff is the record
            return handoffs.float().clamp(-1.0, 1.0)
        u, lam = self.eigenvectors, self.eigenvalues
        gain = math.sqrt(ab) * lam / (ab * lam + (1.0 - ab))  # per principal direction of the prior
        centred = handoffs.flatten(1).double() - math.sqrt(ab) * self.mean
        x = self.mean + ((centred @ u) * gain) @ u.T
        return x.float().view(-1, *self.shape).clamp(-1.0, 1.0)


def denoiser_estimate(handoffs: torch.Tensor, t_c: int, level: int, alpha_bar: torch.Tensor, eps_fn: EpsFn,
                      noise: torch.Tensor) -> torch.Tensor:
    """x0 from handoffs by a denoiser of levels above the cut: re-noise to `level` with ab(level)/ab(t_c), Tweedie.

    The server may pick any of its levels: near the cut its full-chain prediction is scaled up ~10x and its
    errors with it; a few levels higher the estimate is better conditioned (see best_denoiser_level).
    """
    ab_c, ab = _alpha_bar_at(alpha_bar, t_c), _alpha_bar_at(alpha_bar, level)
    if level <= t_c:
        raise ValueError(f"the denoiser's level must be above the cut {t_c}, got {level}")
    rel = ab / ab_c
    x_t = math.sqrt(rel) * handoffs + math.sqrt(1.0 - rel) * noise
    return reconstruct(x_t, level, alpha_bar, eps_fn)


def best_denoiser_level(reference: torch.Tensor, t_c: int, levels: Sequence[int], alpha_bar: torch.Tensor,
                        eps_of: Callable[[torch.Tensor], EpsFn], gen: torch.Generator,
                        copies: int = 1) -> list[tuple[int, list[dict]]]:
    """The level whose denoiser estimate reconstructs public images best (mean PSNR), chosen without any member.

    The attacker makes handoffs of the reference images itself (the schedule is public) and tries each level.
    `copies` denoisers are judged at once on stacked copies of the handoffs: eps_of(copy) is the eps_fn for rows of
    the given copies (one copy index per row; e.g. the server's, labelled for the k-th copy's client).

    Racing, as a careful attacker would: every level is tried on the first LEVEL_SCREEN_IMAGES images; a level
    whose mean paired PSNR difference to that copy's leader lies more than LEVEL_SCREEN_Z standard errors below
    zero cannot win and is dropped; the others are tried on all images and the best of those is chosen. The noise
    of every level and image is drawn up front, so a level tried on all images scores exactly what it scores without
    racing (on a 100-client run the choice equalled the full search's for every client, at 53% of its work).
    One (level, tried) per copy; tried: each level's mean PSNR over the `images` it was tried on.
    """
    ab = _alpha_bar_at(alpha_bar, t_c)
    n = len(reference)
    y = math.sqrt(ab) * reference + math.sqrt(1.0 - ab) * torch.randn(reference.shape, generator=gen)
    y, reference = y.repeat(copies, 1, 1, 1), reference.repeat(copies, 1, 1, 1)
    noise = [torch.randn(y.shape, generator=gen) for _ in levels]
    copy_of, image_of = torch.arange(copies).repeat_interleave(n), torch.arange(n).repeat(copies)
    scores = torch.full((len(levels), copies, n), math.nan)

    def score(i: int, rows: torch.Tensor) -> None:
        if len(rows):
            x0_hat = denoiser_estimate(y[rows], t_c, levels[i], alpha_bar, eps_of(copy_of[rows]), noise[i][rows])
            scores[i, copy_of[rows], image_of[rows]] = psnr(x0_hat, reference[rows])

    screen = n if n < 2 * LEVEL_SCREEN_IMAGES else LEVEL_SCREEN_IMAGES  # few images: racing would save little
    for i in range(len(levels)):
        score(i, (image_of < screen).nonzero().squeeze(1))
    alive = torch.ones(len(levels), copies, dtype=torch.bool)
    if screen < n:
        first = scores[:, :, :screen]
        leader = first.mean(dim=2).argmax(dim=0)
        d = first - first[leader, torch.arange(copies)]  # paired: the same images and handoffs
        alive = d.mean(dim=2) + LEVEL_SCREEN_Z * d.std(dim=2) / math.sqrt(screen) >= 0
        alive[leader, torch.arange(copies)] = True
        for i in range(len(levels)):
            score(i, ((image_of >= screen) & alive[i, copy_of]).nonzero().squeeze(1))
    means = scores.nanmean(dim=2)
    chosen = means.masked_fill(~alive, -math.inf).argmax(dim=0)
    return [(int(levels[chosen[k]]),
             [{"level": int(level), "psnr": float(means[i, k]), "images": n if alive[i, k] else screen}
              for i, level in enumerate(levels)])
            for k in range(copies)]


def reconstruction_quality(x0_hat: torch.Tensor, x0: torch.Tensor) -> dict:
    """Per-record PSNR and SSIM of reconstructions against the true records, as float lists."""
    return {"psnr": psnr(x0_hat, x0).tolist(), "ssim": ssim(x0_hat, x0).tolist()}


def reidentification_rate(
    observed: torch.Tensor, candidates: torch.Tensor, true_index: torch.Tensor, *, chunk: int = 1024
) -> float:
    """Share of observed records whose L2-nearest candidate is their own source (top-1 re-identification).

    Give observed and candidates on the same scale: reconstructions vs images, or handoffs vs
    sqrt(alpha_bar[t_c]) * images (the maximum-likelihood match for Gaussian noise).
    """
    if observed.shape[1:] != candidates.shape[1:]:
        raise ValueError(
            f"observed records {tuple(observed.shape[1:])} and candidates {tuple(candidates.shape[1:])} differ in shape"
        )
    true_index = torch.as_tensor(true_index, dtype=torch.long)
    if true_index.shape != (observed.shape[0],):
        raise ValueError(f"true_index must have shape ({observed.shape[0]},), one per observed record")
    if true_index.min() < 0 or true_index.max() >= candidates.shape[0]:
        raise ValueError(f"true_index must index the candidate pool [0, {candidates.shape[0]})")
    pool = candidates.flatten(1).double()
    hits = 0
    for start in range(0, observed.shape[0], chunk):  # chunks bound the (chunk, pool) distance matrix
        obs = observed[start : start + chunk].flatten(1).double()
        nearest = torch.cdist(obs, pool).argmin(dim=1)
        hits += int((nearest == true_index[start : start + chunk].to(nearest.device)).sum())
    return hits / observed.shape[0]


def chance_level(pool_size: int) -> float:
    """Top-1 re-identification rate of a blind guess in a pool of pool_size candidates."""
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    return 1.0 / pool_size


def kview_attack(views: torch.Tensor, t_c: int, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Estimate x0 from K handoffs of each record (K, N, C, H, W): average, rescale, clamp to [-1, 1]."""
    if views.ndim != 5 or views.shape[0] < 1:
        raise ValueError(f"views must be (K, N, C, H, W) with K >= 1, got shape {tuple(views.shape)}")
    return reconstruct(views.mean(dim=0), t_c, alpha_bar)


def kview_psnr_curve(
    views: torch.Tensor, x0: torch.Tensor, t_c: int, alpha_bar: torch.Tensor, ks: Sequence[int] | None = None
) -> list[dict]:
    """Mean PSNR of the K-view attack using the first k views, for each k in ks (default 1..K)."""
    ks = list(range(1, views.shape[0] + 1)) if ks is None else list(ks)
    if any(k < 1 or k > views.shape[0] for k in ks):
        raise ValueError(f"every k in ks must be in [1, {views.shape[0]}] (the views held), got {ks}")
    return [{"k": k, "psnr": float(psnr(kview_attack(views[:k], t_c, alpha_bar), x0).mean())} for k in ks]


def denoising_loss(eps_fn: EpsFn, alpha_bar: torch.Tensor, *, from_level: int = 0) -> LossFn:
    """Per-record DDPM loss of a denoiser on records at level from_level (x0 for 0, handoffs for t_c).

    Records at level s are noised to t > s with the rescaled schedule alpha_bar[t] / alpha_bar[s] and
    fresh noise e'; the full-chain noise target is sqrt((1 - ab[t]) / (1 - ab'[t])) e' (design §3).
    For from_level = 0 this is the ordinary loss.
    """
    ab_from = _alpha_bar_at(alpha_bar, from_level)

    def loss(records: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if int(t.min()) <= from_level:
            raise ValueError(f"levels must be above the records' level {from_level}, got {t.min().item()}")
        ab = alpha_bar.to(records.device, torch.float64)[t]
        ab_rel = ab / ab_from
        shape = (-1,) + (1,) * (records.ndim - 1)
        x_t = ab_rel.sqrt().view(shape).float() * records + (1 - ab_rel).sqrt().view(shape).float() * noise
        target = ((1 - ab) / (1 - ab_rel)).sqrt().view(shape).float() * noise
        return (eps_fn(x_t, t) - target).pow(2).flatten(1).mean(dim=1)

    return loss


def mia_scores(
    records: torch.Tensor,
    loss_fn: LossFn,
    *,
    levels: Sequence[int],
    draws: int = 4,
    seed: int = 0,
    batch_size: int = 256,
    groups: Sequence[int] | None = None,
) -> torch.Tensor:
    """Membership score per record: minus the mean denoising loss over fixed levels and seeded noise draws.

    Higher = more likely a member. Scoring members and non-members with the same seed gives both
    the same noise stream. `groups`: sizes of consecutive groups of records (e.g. one per client) scored
    in one batch, each with the noise stream it would get alone.
    """
    if not levels or draws < 1:
        raise ValueError(f"need at least one level and draws >= 1, got levels={list(levels)}, draws={draws}")
    groups = [records.shape[0]] if groups is None else list(groups)
    if sum(groups) != records.shape[0]:
        raise ValueError(f"groups cover {sum(groups)} records, got {records.shape[0]}")
    streams = [torch.Generator(device="cpu").manual_seed(seed) for _ in groups]
    total = torch.zeros(records.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for level in levels:
            for _ in range(draws):
                noise = randn(tuple(records.shape), list(zip(streams, groups))).to(records.device, records.dtype)
                for start in range(0, records.shape[0], batch_size):
                    part = slice(start, start + batch_size)
                    t = torch.full((records[part].shape[0],), int(level), dtype=torch.long, device=records.device)
                    total[part] += loss_fn(records[part], t, noise[part]).double().cpu()
    return -(total / (len(levels) * draws))


MIA_FPRS = (0.01, 0.001)  # the low false-positive rates membership attacks are judged at (Carlini et al. 2022)


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float) -> float | None:
    """TPR at the strictest threshold whose false-positive rate on these non-members is at most fpr.

    None when there are fewer than 1/fpr non-members: no threshold can show that rate.
    """
    nonmembers = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    if nonmembers.size < math.ceil(1 / fpr - 1e-9):
        return None
    # "member" when score > threshold: at most floor(fpr * n) non-members lie strictly above it
    threshold = nonmembers[int(math.floor(fpr * nonmembers.size + 1e-9))]
    return float((np.asarray(member_scores, dtype=np.float64) > threshold).mean())


def membership_metrics(member_scores, nonmember_scores) -> dict:
    """AUC and TPR at 1% and 0.1% FPR of membership scores (higher = member), from the ROC of these sets."""
    members = np.asarray(member_scores, dtype=np.float64)
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64)
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("need at least one member and one non-member score to evaluate")
    labels = np.r_[np.ones(members.size), np.zeros(nonmembers.size)]
    out = {"auc": float(roc_auc_score(labels, np.r_[members, nonmembers]))}
    for fpr in MIA_FPRS:
        out[f"tpr_at_{fpr * 100:g}pct_fpr"] = tpr_at_fpr(members, nonmembers, fpr)
    missing = [fpr for fpr in MIA_FPRS if out[f"tpr_at_{fpr * 100:g}pct_fpr"] is None]
    out.update(members=int(members.size), nonmembers=int(nonmembers.size))
    if missing:
        out["note"] = (f"TPR at FPR {', '.join(f'{f:g}' for f in missing)} needs >= {math.ceil(1 / min(missing))} "
                       f"non-members; raise eval.disclosure_records (and data.max_records)")
    return out


def handoff_lr_scores(candidates: torch.Tensor, handoffs: torch.Tensor, reference: torch.Tensor, t_c: int,
                      alpha_bar: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
    """Membership score of candidate images from the stored handoffs alone: no model needed.

    score(x) = max over stored handoffs y of [min over reference images x'' of ||y - sqrt(ab) x''||^2
    - ||y - sqrt(ab) x||^2]: up to the factor 1 / (2 (1 - ab)), the Gaussian log-likelihood ratio of "y was
    made from x" against the best explanation of y by a non-member (the reference images, which must never
    be members). A member's own handoff wins it a large positive score; at pure noise no y singles anyone out.
    """
    ab = _alpha_bar_at(alpha_bar, t_c)
    if not candidates.shape[1:] == handoffs.shape[1:] == reference.shape[1:]:
        raise ValueError(f"candidates {tuple(candidates.shape[1:])}, handoffs {tuple(handoffs.shape[1:])} and "
                         f"reference {tuple(reference.shape[1:])} must be images of one shape")
    if len(reference) == 0 or len(handoffs) == 0:
        raise ValueError("need at least one stored handoff and one reference image")
    y = handoffs.flatten(1).double()
    scale = math.sqrt(ab)
    ref = scale * reference.flatten(1).double()
    # the best non-member explanation of each handoff (chunks bound the distance matrices)
    explained = torch.cat([torch.cdist(y[i:i + chunk], ref).square().min(dim=1).values
                           for i in range(0, len(y), chunk)])
    x = scale * candidates.flatten(1).double()
    scores = torch.empty(len(x), dtype=torch.float64)
    for i in range(0, len(x), chunk):
        best = torch.full((len(x[i:i + chunk]),), -math.inf, dtype=torch.float64)
        for j in range(0, len(y), chunk):
            ratio = explained[j:j + chunk][None, :] - torch.cdist(x[i:i + chunk], y[j:j + chunk]).square()
            best = torch.maximum(best, ratio.max(dim=1).values)
        scores[i:i + chunk] = best
    return scores


def distribution_disclosure(
    handoffs: torch.Tensor,
    images: torch.Tensor,
    extractor: nn.Module,
    *,
    subsets: int = 50,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """The paper's distribution-level numbers: KID (features by `extractor`) and MSE between handoffs and images.

    Handoffs and images are paired (record i made handoff i), as in the paper; KID of a set against
    itself (c = 0) is slightly negative, the unbiased estimator's value for shared samples.
    """
    _check_pair(handoffs, images)
    with warnings.catch_warnings():  # its "features kept in memory" notice on every construction
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=extractor, subsets=subsets, subset_size=min(subset_size, images.shape[0]))
    with torch.no_grad():
        kid.update(images, real=True)
        kid.update(handoffs, real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws its KID subsets from the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "mse": float((handoffs.float() - images.float()).pow(2).mean()),
    }


def _alpha_bar_at(alpha_bar: torch.Tensor, t_c: int) -> float:
    if alpha_bar.ndim != 1 or float(alpha_bar[0]) != 1.0:
        raise ValueError("alpha_bar must be 1-D of length T+1 with alpha_bar[0] = 1 (level 0 is the clean image)")
    if not 0 <= t_c < alpha_bar.shape[0]:
        raise ValueError(f"cut level t_c must be in [0, {alpha_bar.shape[0] - 1}], got {t_c}")
    ab = float(alpha_bar[t_c])
    if ab <= 0.0:
        raise ValueError(f"alpha_bar[{t_c}] = {ab}: no signal left to reconstruct; use a level below T")
    return ab


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"expected two (N, C, H, W) batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
