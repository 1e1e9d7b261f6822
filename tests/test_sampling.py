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


@pytest.fixture(scope="module")
def trained():
    """Smoke federations at four cuts, the client trained a few steps (its EMA weights are not its initial ones)."""
    from collafuse.config import load_config
    from collafuse.federation.inprocess import build
    feds = {}
    for c in (0.0, 0.2, 0.5, 1.0):
        fed = build(load_config("smoke", [f"cut={c}", "data.max_records=200"]), device=torch.device("cpu"))
        fed.clients[0].train(3)
        feds[c] = fed
    return feds


def _piecewise_chain(fed, client, x_T, server_levels, client_levels, eta, server_gen, client_gen, client_eta=None):
    """The whole chain in one loop with the piecewise model: the server's above the cut, the client's at or below.

    The DDPM noise of a level above the cut comes from the server's stream, below it from the client's:
    each side draws its own, the split changes nothing else. client_eta (default: eta) is the client side's.
    """
    s, t_c = fed.schedule, fed.cut_level
    server_fn, client_fn = fed.server.eps_fn(client.id), client.eps_fn(None)
    x = x_T
    with torch.no_grad():
        for t, lower in zip(server_levels[:-1] + client_levels[:-1], server_levels[1:] + client_levels[1:]):
            level = torch.full((x.shape[0],), t)
            fn, gen, e = (server_fn, server_gen, eta) if t > t_c else (client_fn, client_gen, client_eta)
            x = step(s, x, fn(x, level), t, lower, eta if e is None else e, gen)
    return x.clamp(-1, 1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("c", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("server_steps,client_steps", [(7, 3), (2, 1)])
def test_split_sampling_through_the_wire_equals_one_piecewise_chain(trained, sampler, c, server_steps,
                                                                   client_steps):
    """Server.sample_to_cut, the encoded handoffs on the wire, Client.finish: the same as one chain."""
    from collafuse.measure.evaluate import split_sample
    fed = trained[c]
    client = fed.clients[0]
    split = split_sample(fed, client, 4, server_steps=server_steps, client_steps=client_steps, sampler=sampler,
                         seed=5)
    server_levels = level_grid(fed.schedule.T, fed.cut_level, server_steps)
    client_levels = level_grid(fed.cut_level, 0, client_steps)
    server_gen = torch.Generator().manual_seed(5)  # split_sample: the request's seed, then seed + 1 for the client
    x_T = torch.randn((4, *fed.cfg.image_shape), generator=server_gen)
    whole = _piecewise_chain(fed, client, x_T, server_levels, client_levels, eta_of(sampler), server_gen,
                             torch.Generator().manual_seed(6))
    assert torch.equal(split, whole)


@pytest.mark.parametrize("sampler,client_sampler", [("ddim", "ddpm"), ("ddpm", "ddim")])
def test_each_side_samples_with_its_own_sampler(trained, sampler, client_sampler):
    """sampling.client_sampler: the server's levels with one sampler, the client's with the other, still one chain."""
    from collafuse.measure.evaluate import split_sample
    fed = trained[0.5]
    client = fed.clients[0]
    split = split_sample(fed, client, 4, server_steps=4, client_steps=6, sampler=sampler,
                         client_sampler=client_sampler, seed=5)
    server_gen = torch.Generator().manual_seed(5)
    x_T = torch.randn((4, *fed.cfg.image_shape), generator=server_gen)
    whole = _piecewise_chain(fed, client, x_T, level_grid(fed.schedule.T, fed.cut_level, 4),
                             level_grid(fed.cut_level, 0, 6), eta_of(sampler), server_gen,
                             torch.Generator().manual_seed(6), client_eta=eta_of(client_sampler))
    assert torch.equal(split, whole)
    same = split_sample(fed, client, 4, server_steps=4, client_steps=6, sampler=sampler, seed=5)
    assert not torch.equal(split, same)  # the client's sampler changed its levels


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


def test_row_batches_fit_the_pixel_budget():
    from collafuse.core.sampling import BATCH_PIXELS, row_batches
    per_call = BATCH_PIXELS // 256  # 16 px images
    assert row_batches([per_call // 2, per_call // 2, 1, per_call + 5, 3], (1, 16, 16)) == [[0, 1], [2], [3], [4]]
    assert row_batches([], (1, 16, 16)) == []


def test_cpu_calls_split_large_inputs_into_the_same_function(monkeypatch):
    from collafuse.core import sampling
    from collafuse.core.models import Denoiser, ModelConfig
    net = Denoiser(ModelConfig(channels=(8, 16), attention=False), 8, 1, num_labels=3).eval()
    calls = []
    counted = lambda x, t, c: calls.append(len(x)) or net(x, t, c)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(10, 1, 8, 8, generator=g), torch.randint(1, 50, (10,), generator=g), torch.arange(10) % 3
    monkeypatch.setattr(sampling, "CPU_CALL_PIXELS", 4 * 64)  # at most 4 rows of 8x8 a call
    with torch.no_grad():
        split = sampling.in_cpu_calls(counted)(x, t, c)
        assert calls == [4, 4, 2] and torch.allclose(split, net(x, t, c), atol=1e-6)
        calls.clear()
        sampling.in_cpu_calls(lambda x, t, c: calls.append(c) or x)(x, t)  # no condition: None to every call
        assert calls == [None, None, None]


def test_server_samples_many_clients_in_one_batch_as_each_alone(trained, monkeypatch):
    from collafuse.core import sampling
    from collafuse.core.protocol import SamplingRequest
    fed = trained[0.5]
    reqs = [SamplingRequest(client_id=c, n=n, steps=steps, sampler=sampler, seed=seed)
            for c, n, steps, sampler, seed in [(0, 5, 7, "ddpm", 11), (1, 3, 7, "ddpm", 12), (2, 4, 4, "ddim", 13),
                                               (0, 2, 7, "ddpm", 14)]]
    alone = [fed.server.sample_to_cut(r).handoffs for r in reqs]
    for budget in (sampling.BATCH_PIXELS, 7 * 64):  # everything in one call per (steps, sampler); at most 7 rows
        monkeypatch.setattr(sampling, "BATCH_PIXELS", budget)
        together = fed.server.sample_to_cut_many(reqs)
        assert [m.client_id for m in together] == [r.client_id for r in reqs]
        for a, m in zip(alone, together):
            assert m.level == fed.cut_level and torch.allclose(a, m.handoffs, atol=1e-5)
    assert not torch.allclose(alone[0][:2], alone[3])  # each request keeps its own seed


def test_the_exported_split_pipeline_keeps_each_side_s_sampler(trained, tmp_path):
    """A run with a DDPM client side exports a split pipeline whose client side samples with DDPM by default."""
    import dataclasses
    from collafuse.export import CollaFuseSplitPipeline, pipeline_of
    from collafuse.measure.evaluate import split_sample
    fed = trained[0.5]
    mixed = dataclasses.replace(fed.cfg.sampling, sampler="ddim", client_sampler="ddpm")
    run = dataclasses.replace(fed, cfg=dataclasses.replace(fed.cfg, sampling=mixed))
    pipeline_of(run, "split", 0).save_pretrained(tmp_path)
    pipe = CollaFuseSplitPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.config.sampler, pipe.config.client_sampler) == ("ddim", "ddpm")
    got = pipe(batch_size=4, seed=5, num_inference_steps=4, client_inference_steps=6, output_type="pt").images
    want = split_sample(fed, fed.clients[0], 4, server_steps=4, client_steps=6, sampler="ddim",
                        client_sampler="ddpm", seed=5)
    assert torch.equal(got, (want / 2 + 0.5).clamp(0, 1))
    # a sampler named in the call runs both sides, as before client_sampler existed
    both = pipe(batch_size=4, seed=5, num_inference_steps=4, client_inference_steps=6, sampler="ddim",
                output_type="pt").images
    want = split_sample(fed, fed.clients[0], 4, server_steps=4, client_steps=6, sampler="ddim", seed=5)
    assert torch.equal(both, (want / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("key", ["sampler", "client_sampler"])
def test_an_unknown_sampler_is_refused_before_training(key):
    from collafuse.config import load_config
    with pytest.raises(ValueError) as err:
        load_config("smoke", [f"sampling.{key}=euler"])
    assert str(err.value) == f"sampling.{key} must be one of ddpm, ddim, got 'euler'"


def test_a_run_config_from_before_client_sampler_samples_its_client_as_it_did(tmp_path):
    """An older run's config.json has one sampler for both sides: its client keeps it (not today's default)."""
    import json
    from collafuse.config import load_config
    old = load_config("smoke").to_dict()
    del old["sampling"]["client_sampler"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_config(str(tmp_path / "config.json")).sampling.client_sampler == "ddim"
    assert load_config("default").sampling.client_sampler == "ddpm"  # new runs: DDPM on both sides
