import math

import pytest
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

from collafuse.measure.attacks import (
    GaussianPrior,
    best_denoiser_level,
    chance_level,
    denoiser_estimate,
    denoising_loss,
    distribution_disclosure,
    handoff_lr_scores,
    kview_attack,
    kview_psnr_curve,
    membership_metrics,
    mia_scores,
    psnr,
    reconstruct,
    reconstruction_quality,
    reidentification_rate,
    ssim,
    tpr_at_fpr,
)

T = 100
# linear betas rescaled from the T=1000 range, so alpha_bar[T] ~ 4e-5
ALPHA_BAR = torch.cat(
    [torch.ones(1, dtype=torch.float64), torch.cumprod(1 - torch.linspace(1e-3, 0.2, T, dtype=torch.float64), 0)]
)


@pytest.fixture(scope="module")
def digits():
    """All 1,797 sklearn digits as (N, 1, 8, 8) in [-1, 1], in a seeded random order."""
    x = torch.tensor(load_digits().data / 8.0 - 1.0, dtype=torch.float32).view(-1, 1, 8, 8)
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]


def handoffs(x0, t_c, seed):
    ab = float(ALPHA_BAR[t_c])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise


class TinyDenoiser(nn.Module):
    """MLP eps-model on 8x8 digits, the level as an extra input: small enough to memorise 32 images."""

    def __init__(self, seed):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(65, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 64))

    def forward(self, x_t, t):
        return self.net(torch.cat([x_t.flatten(1), (t.float() / T)[:, None]], 1)).view_as(x_t)


@pytest.fixture(scope="module")
def mia_split(digits):
    """32 members and 200 non-members: disjoint, same distribution."""
    return digits[:32], digits[32:232]


@pytest.fixture(scope="module")
def overfit_model(mia_split):
    members = mia_split[0]
    model = TinyDenoiser(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn, gen = denoising_loss(model, ALPHA_BAR), torch.Generator().manual_seed(1)
    for _ in range(1500):  # ~1.7 s: the loss on members falls far below the loss on fresh digits
        t = torch.randint(1, T + 1, (members.shape[0],), generator=gen)
        loss = loss_fn(members, t, torch.randn(members.shape, generator=gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def mia(model, split):
    loss_fn = denoising_loss(model, ALPHA_BAR)
    return membership_metrics(*(mia_scores(x, loss_fn, levels=[5, 10, 20, 40], draws=4, seed=3) for x in split))


# --- per-record quality measures


def test_psnr_and_ssim_by_hand():
    a = torch.zeros(2, 1, 8, 8)
    assert psnr(a, a + 0.2).tolist() == pytest.approx([20.0, 20.0])  # 10 log10(2^2 / 0.04)
    x = torch.linspace(-1, 1, 64).view(1, 1, 8, 8).repeat(3, 1, 1, 1)
    assert ssim(x, x).tolist() == pytest.approx([1.0] * 3)
    assert (ssim(x, -x) < 0).all()  # on [-1, 1] without the shift to [0, 1] this was +0.95
    assert ssim(x, x * 0.5).tolist() == pytest.approx([0.7738] * 3, abs=1e-4)


def test_reconstruct_scaled_and_oracle_tweedie(digits):
    x0, t_c = digits[:64], 40
    ab = float(ALPHA_BAR[t_c])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    y = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise
    # a client that sent its noise (or a perfect denoiser) gives x0 away exactly
    assert torch.allclose(reconstruct(y, t_c, ALPHA_BAR, lambda x_t, t: noise), x0, atol=1e-5)
    scaled = reconstruct(y, t_c, ALPHA_BAR)
    assert scaled.abs().max() <= 1.0
    quality = reconstruction_quality(scaled, x0)
    assert len(quality["psnr"]) == 64 and len(quality["ssim"]) == 64
    assert torch.tensor(quality["psnr"]).mean().item() == pytest.approx(6.14, abs=0.01)
    assert torch.equal(reconstruct(x0, 0, ALPHA_BAR), x0)  # c = 0: the handoff is the image


def test_server_denoiser_improves_reconstruction(overfit_model, mia_split):
    members, t_c = mia_split[0], 20
    y = handoffs(members, t_c, seed=5)
    scaled = psnr(reconstruct(y, t_c, ALPHA_BAR), members).mean().item()
    tweedie = psnr(reconstruct(y, t_c, ALPHA_BAR, overfit_model), members).mean().item()
    assert tweedie > scaled + 2.0  # measured 17.5 vs 12.0 dB


# --- re-identification


def test_reidentification_chance_at_pure_noise_and_certain_at_raw_data(digits):
    members, pool = digits[:200], digits[:400]  # observed members among 200 members + 200 non-members
    truth = torch.arange(200)
    assert chance_level(400) == 0.0025
    y = handoffs(members, T, seed=1)  # alpha_bar ~ 4e-5: pure noise
    at_noise = reidentification_rate(y, math.sqrt(float(ALPHA_BAR[T])) * pool, truth)
    assert at_noise <= 5 * chance_level(400)  # measured 0.005 (1 hit in 200)
    assert reidentification_rate(members, pool, truth) == 1.0  # c = 0: y = x0


def test_reidentification_falls_with_the_cut(digits):
    members, pool, truth = digits[:200], digits[:400], torch.arange(200)
    rates = [
        reidentification_rate(handoffs(members, t_c, seed=1), math.sqrt(float(ALPHA_BAR[t_c])) * pool, truth)
        for t_c in (10, 20, 40, 60)
    ]
    assert rates == pytest.approx([1.0, 0.8, 0.115, 0.005])  # alpha_bar 0.90, 0.67, 0.19, 0.02
    # reconstructions vs images ranks the same as handoffs vs scaled images, up to the [-1, 1] clamp
    rate_rec = reidentification_rate(reconstruct(handoffs(members, 10, seed=1), 10, ALPHA_BAR), pool, truth)
    assert rate_rec == 1.0


# --- K-view averaging


def test_kview_psnr_grows_for_fresh_views_and_not_for_one_view(digits):
    members, t_c = digits[:200], 20
    fresh = torch.stack([handoffs(members, t_c, seed=100 + view) for view in range(16)])  # `fresh`: new noise each view
    once = fresh[:1].expand(16, *fresh.shape[1:])  # `once`: the server holds one view per record
    fresh_curve = [p["psnr"] for p in kview_psnr_curve(fresh, members, t_c, ALPHA_BAR, ks=[1, 2, 4, 8, 16])]
    once_curve = [p["psnr"] for p in kview_psnr_curve(once, members, t_c, ALPHA_BAR, ks=[1, 2, 4, 8, 16])]
    assert all(a < b for a, b in zip(fresh_curve, fresh_curve[1:]))
    assert fresh_curve[-1] - fresh_curve[0] == pytest.approx(10 * math.log10(16), abs=1.5)  # measured 11.7 -> 22.8 dB
    assert once_curve == pytest.approx([once_curve[0]] * 5, abs=1e-9)
    assert once_curve[0] == pytest.approx(fresh_curve[0])
    assert torch.equal(kview_attack(fresh[:1], t_c, ALPHA_BAR), reconstruct(fresh[0], t_c, ALPHA_BAR))
    # `once` with views=4: every epoch resends the same 4 views, so nothing is gained past 4
    once4 = fresh[:4].repeat(4, 1, 1, 1, 1)
    once4_curve = [p["psnr"] for p in kview_psnr_curve(once4, members, t_c, ALPHA_BAR, ks=[4, 8, 16])]
    assert once4_curve == pytest.approx([fresh_curve[2]] * 3, abs=1e-4)


# --- membership inference


def test_mia_detects_an_overfit_model(overfit_model, mia_split):
    result = mia(overfit_model, mia_split)
    assert result["auc"] > 0.9  # measured 0.99
    assert result["tpr_at_1pct_fpr"] > 0.5  # measured 0.94
    assert result["members"] == 32 and result["nonmembers"] == 200
    assert result["tpr_at_0.1pct_fpr"] is None and "1000 non-members" in result["note"]  # 200 cannot show 0.1%


def test_mia_near_chance_on_an_untrained_model(mia_split):
    result = mia(TinyDenoiser(seed=0).eval(), mia_split)
    assert abs(result["auc"] - 0.5) < 0.15  # measured 0.465; std of AUC with 32 vs 200 ~ 0.055
    assert result["tpr_at_1pct_fpr"] < 0.1


def test_tpr_at_fpr_by_hand():
    nonmembers = torch.arange(100, dtype=torch.float64)  # scores 0..99: one of them (99) above 98
    members = torch.tensor([98.5, 99.5, 200.0, 50.0])
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.75  # threshold 98: at most 1 non-member above it
    assert tpr_at_fpr(members, nonmembers, 0.001) is None  # 100 non-members cannot show a 0.1% FPR
    assert tpr_at_fpr(members, torch.arange(1000.0), 0.001) == 0.0  # threshold 998: no member above it
    result = membership_metrics(members, nonmembers)
    assert result["auc"] == pytest.approx((99 + 100 + 100 + 50.5) / 400)  # pairs won, a tie counting half
    with pytest.raises(ValueError, match="at least one member"):
        membership_metrics(torch.ones(0), torch.ones(3))


def test_handoff_likelihood_ratio_knows_members_at_raw_data_and_nobody_at_pure_noise(digits):
    members, nonmembers, reference = digits[:300], digits[300:600], digits[600:1200]
    auc = {}
    for t_c in (0, 20, T):
        store = handoffs(members, t_c, seed=1)  # no model: the server's store alone
        scores = [handoff_lr_scores(x, store, reference, t_c, ALPHA_BAR) for x in (members, nonmembers)]
        auc[t_c] = membership_metrics(*scores)["auc"]
    # measured 0.973 (raw records: each member has its exact copy), 0.849 (alpha_bar 0.67), 0.532 (pure noise)
    assert auc[0] > 0.95 and 0.75 < auc[20] < auc[0] and abs(auc[T] - 0.5) < 0.06
    chunked = handoff_lr_scores(members[:50], handoffs(members, 20, seed=1), reference, 20, ALPHA_BAR, chunk=7)
    assert torch.allclose(chunked, handoff_lr_scores(members[:50], handoffs(members, 20, seed=1), reference, 20,
                                                     ALPHA_BAR))


def test_linear_mmse_is_the_posterior_mean_and_beats_the_trivial_attacks(digits):
    reference, members, t_c = digits[:1000], digits[1000:1200], 40
    prior = GaussianPrior(reference)
    y = handoffs(members, t_c, seed=2)
    ab = float(ALPHA_BAR[t_c])
    # the formula, done directly: mu + sqrt(ab) S (ab S + (1 - ab) I)^-1 (y - sqrt(ab) mu)
    cov = prior.eigenvectors @ torch.diag(prior.eigenvalues) @ prior.eigenvectors.T
    gain = math.sqrt(ab) * cov @ torch.linalg.inv(ab * cov + (1 - ab) * torch.eye(64, dtype=torch.float64))
    direct = prior.mean + (y.flatten(1).double() - math.sqrt(ab) * prior.mean) @ gain.T
    assert torch.allclose(prior.posterior_mean(y, t_c, ALPHA_BAR), direct.float().view_as(y).clamp(-1, 1), atol=1e-5)
    quality = {name: psnr(x_hat, members).mean().item() for name, x_hat in (
        ("mean_image", prior.mean_image(len(members))), ("scaled", reconstruct(y, t_c, ALPHA_BAR)),
        ("mmse", prior.posterior_mean(y, t_c, ALPHA_BAR)))}
    # measured 11.5 dB (mean image), 6.2 dB (scaled: below the mean image), 12.7 dB (MMSE); at t_c = 20: 16.1 dB
    assert quality["scaled"] < quality["mean_image"] < quality["mmse"] - 1.0
    assert torch.equal(prior.posterior_mean(members, 0, ALPHA_BAR), members)  # c = 0: the handoff is the record


def test_denoiser_level_is_chosen_on_public_images(digits):
    reference, members, t_c = digits[:500], digits[500:600], 20
    # the Gaussian prior's exact full-chain noise prediction, but badly off right above the cut (as a server's
    # scaled-up prediction is there): the best level is the lowest well-conditioned one
    prior = GaussianPrior(reference)

    def eps_fn(x_t, t):
        ab = float(ALPHA_BAR[int(t[0])])
        x0 = prior.posterior_mean(x_t, int(t[0]), ALPHA_BAR)
        exact = (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        return exact + (3.0 if int(t[0]) <= 22 else 0.0)
    [(level, tried)] = best_denoiser_level(reference, t_c, [21, 25, 30, 40], ALPHA_BAR, lambda copy: eps_fn,
                                           torch.Generator().manual_seed(0))
    assert [r["level"] for r in tried] == [21, 25, 30, 40]
    assert level == 25  # measured PSNR falls with the level above 25: each level adds noise the estimate cannot undo
    # Racing: the levels far behind after 32 images were tried no further; the chosen one was tried on all 500.
    assert [r["images"] for r in tried] == [32, 500, 32, 32]
    assert level == max((r for r in tried if r["images"] == 500), key=lambda r: r["psnr"])["level"]
    y = handoffs(members, t_c, seed=3)
    est = denoiser_estimate(y, t_c, level, ALPHA_BAR, eps_fn, torch.randn(y.shape, generator=torch.Generator().manual_seed(4)))
    assert psnr(est, members).mean() > psnr(reconstruct(y, t_c, ALPHA_BAR), members).mean()
    with pytest.raises(ValueError, match="above the cut"):
        denoiser_estimate(y, t_c, t_c, ALPHA_BAR, eps_fn, y)


def test_denoiser_level_racing_chooses_as_the_full_search_does(digits, monkeypatch):
    """Two denoisers judged at once, each off below its own level; eps_of gets each row's copy. Racing drops levels
    after 32 images and still chooses, and scores the levels it keeps, exactly as trying every level on all 200."""
    import collafuse.measure.attacks as attacks
    reference, t_c, levels = digits[:200], 20, [21, 25, 30, 40]
    prior, off_below = GaussianPrior(digits[200:700]), torch.tensor([22, 27])

    def eps_of(copy):
        def eps_fn(x_t, t):
            level = int(t[0])
            ab = float(ALPHA_BAR[level])
            exact = (x_t - math.sqrt(ab) * prior.posterior_mean(x_t, level, ALPHA_BAR)) / math.sqrt(1 - ab)
            return exact + 3.0 * (level <= off_below[copy]).float().view(-1, 1, 1, 1)
        return eps_fn
    raced = best_denoiser_level(reference, t_c, levels, ALPHA_BAR, eps_of, torch.Generator().manual_seed(0), copies=2)
    monkeypatch.setattr(attacks, "LEVEL_SCREEN_IMAGES", 1000)  # every level on every image
    full = best_denoiser_level(reference, t_c, levels, ALPHA_BAR, eps_of, torch.Generator().manual_seed(0), copies=2)
    assert [level for level, _ in raced] == [level for level, _ in full] == [25, 30]
    assert [[r["images"] for r in tried] for _, tried in raced] == [[32, 200, 32, 32], [32, 32, 200, 200]]
    assert all(r["images"] == 200 for _, tried in full for r in tried)
    for (_, r_tried), (_, f_tried) in zip(raced, full):
        kept = [(r["psnr"], f["psnr"]) for r, f in zip(r_tried, f_tried) if r["images"] == 200]
        assert kept and all(a == pytest.approx(b, abs=1e-6) for a, b in kept)


def test_mia_scores_are_seeded_and_need_levels(mia_split):
    model = TinyDenoiser(seed=1)
    loss_fn = denoising_loss(model, ALPHA_BAR)
    first = mia_scores(mia_split[0], loss_fn, levels=[10], draws=2, seed=4)
    assert torch.equal(first, mia_scores(mia_split[0], loss_fn, levels=[10], draws=2, seed=4))
    batched = mia_scores(mia_split[0], loss_fn, levels=[10], draws=2, seed=4, batch_size=5)
    assert torch.allclose(first, batched, atol=1e-6)  # batching changes float rounding only
    assert not torch.equal(first, mia_scores(mia_split[0], loss_fn, levels=[10], draws=2, seed=5))
    # Groups scored in one batch get the noise each would get alone (many clients per network call).
    a, b = mia_split[0][:7], mia_split[0][7:]
    alone = torch.cat([mia_scores(x, loss_fn, levels=[10, 20], draws=2, seed=4) for x in (a, b)])
    together = mia_scores(mia_split[0], loss_fn, levels=[10, 20], draws=2, seed=4, groups=[7, len(b)])
    assert torch.allclose(alone, together, atol=1e-6) and not torch.allclose(alone, first, atol=1e-3)
    with pytest.raises(ValueError, match="groups cover 8 records"):
        mia_scores(mia_split[0], loss_fn, levels=[10], groups=[7, 1])
    with pytest.raises(ValueError, match="level"):
        mia_scores(mia_split[0], loss_fn, levels=[], draws=2)
    with pytest.raises(ValueError, match="draws"):
        mia_scores(mia_split[0], loss_fn, levels=[10], draws=0)


def test_denoising_loss_from_level_zero_is_the_ddpm_loss(digits):
    x0, t = digits[:4], torch.tensor([1, 10, 50, 100])
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ab = ALPHA_BAR[t].float().view(-1, 1, 1, 1)
    model = TinyDenoiser(seed=2)
    expected = (model(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t) - noise).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(denoising_loss(model, ALPHA_BAR)(x0, t, noise), expected, atol=1e-6)


def test_handoff_loss_target_is_minimised_by_the_full_chain_denoiser():
    # Gaussian records x0 ~ N(0, s^2): the optimal full-chain denoiser is linear,
    # E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab). The rescaled loss on handoffs must prefer it.
    s2, t_c, t = 0.25, 20, 30
    gen = torch.Generator().manual_seed(0)
    x0 = math.sqrt(s2) * torch.randn(20000, 1, 2, 2, generator=gen)
    y = handoffs(x0, t_c, seed=1)
    ab = float(ALPHA_BAR[t])
    optimal = lambda x_t, level: math.sqrt(1 - ab) * x_t / (ab * s2 + 1 - ab)  # noqa: E731
    levels, noise = torch.full((20000,), t), torch.randn(y.shape, generator=gen)

    def loss_at(k):  # loss of the denoiser scaled by k: quadratic in k, L(k) = k^2 A - 2 k B + C
        scaled = denoising_loss(lambda x_t, lv: k * optimal(x_t, lv), ALPHA_BAR, from_level=t_c)
        return scaled(y, levels, noise).mean().item()

    l_minus, l_zero, l_plus = loss_at(-1.0), loss_at(0.0), loss_at(1.0)
    best_k = ((l_minus - l_plus) / 4) / ((l_plus + l_minus) / 2 - l_zero)
    assert best_k == pytest.approx(1.0, abs=0.02)  # a target of plain e' would put it at ~0.81
    loss_fn = denoising_loss(optimal, ALPHA_BAR, from_level=t_c)
    with pytest.raises(ValueError, match="above the records' level"):
        loss_fn(y[:2], torch.tensor([t_c, t]), noise[:2])


# --- distribution-level disclosure


def test_distribution_disclosure_grows_with_the_cut(digits):
    images = digits[:300]
    blocks = [
        distribution_disclosure(handoffs(images, t_c, seed=1), images, nn.Flatten(), subsets=20) for t_c in (0, 20, 100)
    ]
    # c = 0: handoffs are the images; the unbiased KID of a set against itself sits just below 0
    assert blocks[0]["mse"] == 0.0 and -0.02 < blocks[0]["kid"] <= 0.0
    assert [b["kid"] for b in blocks] == pytest.approx([-0.0144, 0.1131, 1.9050], abs=1e-3)
    assert blocks[0]["kid"] < blocks[1]["kid"] < blocks[2]["kid"]
    assert blocks[0]["mse"] < blocks[1]["mse"] < blocks[2]["mse"]
    again = distribution_disclosure(handoffs(images, 20, seed=1), images, nn.Flatten(), subsets=20)
    assert again == blocks[1]  # seeded subsets: the same numbers twice
    assert set(again) == {"kid", "kid_std", "mse"}


# --- error paths


def test_errors(digits):
    x = digits[:4]
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:2])
    with pytest.raises(ValueError, match="6x6"):
        ssim(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="cut level"):
        reconstruct(x, T + 1, ALPHA_BAR)
    with pytest.raises(ValueError, match="alpha_bar"):
        reconstruct(x, 1, ALPHA_BAR[1:])
    with pytest.raises(ValueError, match="true_index"):
        reidentification_rate(x, x, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="true_index"):
        reidentification_rate(x, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="differ in shape"):
        reidentification_rate(x, x.flatten(1), torch.arange(4))
    with pytest.raises(ValueError, match="pool_size"):
        chance_level(0)
    with pytest.raises(ValueError, match=r"\(K, N, C, H, W\)"):
        kview_attack(x, 10, ALPHA_BAR)
    with pytest.raises(ValueError, match="views held"):
        kview_psnr_curve(x[None], x, 10, ALPHA_BAR, ks=[2])
    with pytest.raises(ValueError, match="one shape"):
        handoff_lr_scores(x, x.flatten(1), x, 10, ALPHA_BAR)
    with pytest.raises(ValueError, match="one reference image"):
        handoff_lr_scores(x, x, x[:0], 10, ALPHA_BAR)
    with pytest.raises(ValueError, match=">= 2 images"):
        GaussianPrior(x[:1])
    with pytest.raises(ValueError, match="differ from the prior"):
        GaussianPrior(x).posterior_mean(torch.zeros(2, 1, 4, 4), 10, ALPHA_BAR)
