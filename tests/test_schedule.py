import pytest
import torch

from collafuse.core.schedule import NoiseSchedule


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [50, 100, 1000])
def test_alpha_bar_monotone_and_ends_near_zero(kind, T):
    ab = NoiseSchedule(T, kind).alpha_bar
    assert ab.shape == (T + 1,) and ab[0] == 1.0
    assert (ab[1:] < ab[:-1]).all()
    assert ab[-1] < 1e-2


def test_pinned_values():
    # Pinned so a change of the schedule maths is seen (diffusers-style small numbers).
    lin, cos = NoiseSchedule(100, "linear").alpha_bar, NoiseSchedule(100, "cosine").alpha_bar
    assert lin[20].item() == pytest.approx(0.66537, abs=1e-5)
    assert lin[100].item() == pytest.approx(2.039e-5, rel=1e-3)
    assert cos[20].item() == pytest.approx(0.89871, abs=1e-5)


def test_linear_schedule_matches_diffusers_at_T1000():
    from diffusers import DDPMScheduler
    ours = NoiseSchedule(1000, "linear").alpha_bar[1:].float()
    theirs = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("c,T,expected", [(0, 100, 0), (0.2, 100, 20), (1, 100, 100), (0.2, 1000, 200),
                                          (0.5, 7, 4)])
def test_cut_level(c, T, expected):
    assert NoiseSchedule(T).cut_level(c) == expected


@pytest.mark.parametrize("c", [-0.1, 1.01, float("nan"), "0.2"])
def test_cut_outside_unit_interval_is_refused(c):
    with pytest.raises(ValueError, match=r"cut ratio c must be in \[0, 1\]"):
        NoiseSchedule(100).cut_level(c)


@pytest.mark.parametrize("T", [1, 0, -5, 2.5])
def test_too_few_levels_is_refused(T):
    with pytest.raises(ValueError, match="T must be an integer >= 2"):
        NoiseSchedule(T)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown; choose one of linear, cosine"):
        NoiseSchedule(100, "quadratic")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_server_renoising_has_the_full_chain_marginal(kind):
    # Moment test: x_0 fixed, y = x_{t_c} from the client, the server re-noises y to level t
    # using only y. Mean and variance of x_t must be those of q(x_t | x_0).
    s = NoiseSchedule(100, kind)
    t_c, t, n = 20, 60, 200_000
    g = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-1, 1, 8).view(1, 1, 2, 4).expand(n, 1, 2, 4)
    y = s.noise(x0, torch.full((n,), t_c), torch.randn(x0.shape, generator=g))
    x_t = s.renoise(y, t_c, torch.full((n,), t), torch.randn(x0.shape, generator=g))
    ab = s.alpha_bar[t].item()
    assert torch.allclose(x_t.mean(0), ab ** 0.5 * x0[0], atol=0.01)
    assert torch.allclose(x_t.var(0), torch.full_like(x0[0], 1 - ab), atol=0.01)


def test_server_eps_scale_gives_an_unbiased_full_chain_target():
    # E[eps | x_t] = scale * E[e' | x_t]; check via the linear regression of both targets on x_t.
    s = NoiseSchedule(100)
    t_c, t, n = 20, 30, 400_000
    g = torch.Generator().manual_seed(1)
    x0 = torch.where(torch.rand(n, generator=g) < 0.5, -0.8, 0.8)
    e_c, e_p = torch.randn(n, generator=g), torch.randn(n, generator=g)
    y = s.alpha_bar[t_c].sqrt() * x0 + (1 - s.alpha_bar[t_c]).sqrt() * e_c
    x_t = s.renoise(y.view(n, 1, 1, 1), t_c, torch.full((n,), t), e_p.view(n, 1, 1, 1)).flatten().double()
    ab = s.alpha_bar[t]
    eps_full = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    scale = s.server_eps_scale(t_c, torch.tensor([t])).item()
    # Binned conditional means of both targets agree.
    bins = torch.bucketize(x_t, torch.linspace(-1.5, 1.5, 7).double())
    for b in range(1, 7):
        m = bins == b
        assert (eps_full[m].mean() - scale * e_p.double()[m].mean()).abs() < 0.03
