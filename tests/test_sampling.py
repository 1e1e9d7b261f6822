import pytest
import torch

from collafuse.core.models import Denoiser, ModelConfig
from collafuse.core.sampling import eta_of, level_grid, sample_levels, step
from collafuse.core.schedule import NoiseSchedule

T = 50


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Denoiser(ModelConfig(channels=(8, 16), attention=False), image_size=8, channels=1).eval()


def eps_fn_of(model):
    return lambda x, t: model(x, t)


def test_level_grid():
    assert level_grid(50, 10, 4) == [50, 40, 30, 20, 10]
    assert level_grid(10, 0, 3) == [10, 7, 3, 0]
    assert level_grid(5, 0, 100) == [5, 4, 3, 2, 1, 0]  # more steps than levels: every level once
    assert level_grid(7, 7, 3) == [7]  # an empty range runs no step


def test_level_grid_errors():
    with pytest.raises(ValueError, match="runs downwards"):
        level_grid(3, 5, 2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        level_grid(5, 0, 0)
    with pytest.raises(ValueError, match="sampler 'euler' is unknown"):
        eta_of("euler")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("c", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("server_steps,client_steps", [(7, 3), (40, 10), (2, 1)])
def test_split_sampling_equals_the_unsplit_chain(model, sampler, c, server_steps, client_steps):
    s = NoiseSchedule(T)
    t_c = s.cut_level(c)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    server_levels, client_levels = level_grid(T, t_c, server_steps), level_grid(t_c, 0, client_steps)
    eta = eta_of(sampler)

    g = torch.Generator().manual_seed(11)  # one random stream for both sides
    handoff = sample_levels(eps_fn_of(model), x_T, server_levels, s, eta, g)
    split = sample_levels(eps_fn_of(model), handoff, client_levels, s, eta, g)

    g = torch.Generator().manual_seed(11)
    whole = sample_levels(eps_fn_of(model), x_T, server_levels + client_levels[1:], s, eta, g)
    if sampler == "ddpm":
        assert torch.equal(split, whole)
    else:
        assert (split - whole).abs().max() < 1e-5
    assert server_levels[-1] == t_c == client_levels[0]  # the handoff sits exactly at the cut


def test_no_clipping_at_the_handoff(model):
    s = NoiseSchedule(T)
    x = 3 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = sample_levels(eps_fn_of(model), x, level_grid(T, 40, 2), s, 0.0)
    assert y.abs().max() > 1.0


def test_ddpm_step_matches_diffusers(model):
    # Our generalised step with eta=1 and unit steps is DDPM's ancestral step (diffusers' timestep k
    # is our level k+1).
    from diffusers import DDPMScheduler
    s = NoiseSchedule(T)
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T,
                        clip_sample=False)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for level in (T, 25, 2, 1):
        eps = model(x, torch.full((4,), level))
        ours = step(s, x, eps, level, level - 1, 1.0, torch.Generator().manual_seed(5))
        theirs = ref.step(eps, level - 1, x, generator=torch.Generator().manual_seed(5)).prev_sample
        assert (ours - theirs).abs().max() < 1e-5, level


def test_ddim_step_matches_diffusers(model):
    from diffusers import DDIMScheduler
    s = NoiseSchedule(T)
    ref = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T,
                        clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(5)  # diffusers timesteps 40, 30, 20, 10, 0 = our levels 41, 31, 21, 11, 1
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    eps = model(x, torch.full((2,), 41))
    ours = step(s, x, eps, 41, 31, 0.0)
    theirs = ref.step(eps, 40, x, eta=0.0).prev_sample
    assert (ours - theirs).abs().max() < 1e-5


def test_pinned_small_run(model):
    s = NoiseSchedule(T)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    out = sample_levels(eps_fn_of(model), x, level_grid(T, 0, 5), s, 1.0, torch.Generator().manual_seed(4))
    assert out.shape == (2, 1, 8, 8)
    # An untrained model's x0 estimate at level T is huge (no clipping anywhere): pinned as is.
    assert out.sum().item() == pytest.approx(-5522.79, rel=1e-3)
    assert out.abs().mean().item() == pytest.approx(349.445, rel=1e-3)
