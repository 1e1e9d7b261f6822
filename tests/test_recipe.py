"""The training recipe of each side: min-SNR weighting, v-prediction, lr warm-up and decay, every schedule."""
import math

import pytest
import torch
import torch.nn.functional as F

from collafuse.config import load_config
from collafuse.core.recipe import LRSchedule, Objective
from collafuse.core.sampling import eta_of, level_grid
from collafuse.core.state import load_state, save_state
from collafuse.federation.inprocess import build
from collafuse.measure.evaluate import split_sample
from test_sampling import _piecewise_chain

RECIPE = ["server.prediction=v", "client.prediction=v", "server.loss_weighting=min-snr",
          "client.loss_weighting=min-snr", "server.lr_warmup_steps=3", "client.lr_warmup_steps=3",
          "server.lr_decay=cosine", "client.lr_decay=cosine"]


def federation(*overrides):
    """A smoke federation whose server holds one view of every record (it can train)."""
    fed = build(load_config("smoke", ["data.max_records=200", *overrides]), device=torch.device("cpu"))
    for client in fed.clients:
        for batch in client.make_handoffs([0], 512):
            fed.server.ingest(batch)
    return fed


def test_min_snr_weights_by_hand():
    a = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)  # SNR 9, 1, 1/9
    for objective, expected in [(Objective("epsilon", "min-snr"), [5 / 9, 1, 1]),  # min(SNR, 5)/SNR
                                (Objective("v", "min-snr"), [5 / 10, 1 / 2, 1 / 10]),  # min(SNR, 5)/(SNR + 1)
                                (Objective("epsilon", "min-snr", 2.0), [2 / 9, 1, 1])]:
        assert torch.allclose(objective.weight(a), torch.tensor(expected, dtype=torch.float64))
    out, e = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert torch.equal(Objective().loss(out, a, torch.randn(3, 1, 4, 4), e), F.mse_loss(out, e))  # uniform: today's


def _one_step_by_hand(role, draws, weight_of):
    """The loss of role.train(1) with per-level weights weight_of(t), recomputed from a copy of its random stream."""
    g = torch.Generator()
    g.set_state(role.gen.get_state())
    x0, t, e, x_t, cond = draws(g)
    with torch.no_grad():
        per_record = (role.model(x_t, t, cond) - e).pow(2).flatten(1).mean(1)
    return (weight_of(t) * per_record).mean().item()


def _min_snr(a, gamma=5.0):
    snr = a / (1 - a)
    return (snr.clamp(max=gamma) / snr).float()


def test_each_side_weighs_by_its_own_snr():
    fed = federation("server.prediction=epsilon", "client.prediction=epsilon")  # min-snr: the default weighting
    ab, t_c, server, client = fed.schedule.alpha_bar, fed.cut_level, fed.server, fed.clients[0]

    def client_draws(g):
        idx = torch.randint(client.num_records, (client.batch_size,), generator=g)
        t = torch.randint(1, t_c + 1, (client.batch_size,), generator=g)
        e = torch.randn((client.batch_size, *client.images.shape[1:]), generator=g)
        x0 = client.images[idx]
        return x0, t, e, fed.schedule.noise(x0, t, e), None

    def server_draws(g):
        idx = torch.randint(server.num_handoffs(), (server.batch_size,), generator=g)
        t = torch.randint(t_c + 1, fed.schedule.T + 1, (server.batch_size,), generator=g)
        e = torch.randn((server.batch_size, *server.image_shape), generator=g)
        y, owners = server.store.batch(idx)
        return y, t, e, fed.schedule.renoise(y, t_c, t, e), owners

    own = _one_step_by_hand(client, client_draws, lambda t: _min_snr(ab[t]))
    assert client.train(1) == pytest.approx(own, rel=1e-5)
    own = _one_step_by_hand(server, server_draws, lambda t: _min_snr(ab[t] / ab[t_c]))  # ᾱ' = ᾱ(t)/ᾱ(t_c)
    chain = _one_step_by_hand(server, server_draws, lambda t: _min_snr(ab[t]))  # the full chain's SNR: wrong here
    assert server.train(1) == pytest.approx(own, rel=1e-5)
    assert abs(chain - own) > 1e-3 * own


def test_a_v_model_gives_the_full_chain_noise():
    """Oracle nets that output the exact v (or e'): eps_fn gives the client's ε and the server's full-chain ε."""
    fed = federation("server.prediction=v", "client.prediction=v")
    s, t_c, client, server = fed.schedule, fed.cut_level, fed.clients[0], fed.server
    g = torch.Generator().manual_seed(0)
    x0, e = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.randn(6, 1, 8, 8, generator=g)
    t = torch.randint(1, t_c + 1, (6,), generator=g)
    a = s.alpha_bar[t]
    v = a.sqrt().view(-1, 1, 1, 1).float() * e - (1 - a).sqrt().view(-1, 1, 1, 1).float() * x0
    assert torch.allclose(client.objective.target(a, x0, e), v, atol=1e-6)  # the v it is trained to predict
    client.ema.model = lambda x, level, cond: v
    assert torch.allclose(client.eps_fn(None)(s.noise(x0, t, e), t), e, atol=1e-5)

    y, t = s.noise(x0, torch.full((6,), t_c), e), torch.randint(t_c + 1, s.T + 1, (6,), generator=g)
    e_server = torch.randn(6, 1, 8, 8, generator=g)
    x_t, a = s.renoise(y, t_c, t, e_server), s.server_alpha_bar(t_c, t)
    server.ema.model = lambda x, level, label: server.objective.target(a, y, e_server)
    from_v = server.eps_fn(0)(x_t, t)
    server.objective = Objective()  # an ε-net that outputs the exact e': the existing server_eps_scale path
    server.ema.model = lambda x, level, label: e_server
    assert torch.allclose(from_v, server.eps_fn(0)(x_t, t), atol=1e-5)


@pytest.fixture(scope="module", params=["linear", "cosine"])
def trained(request):
    """Both sides with the whole recipe (v, min-SNR, warm-up, cosine decay), trained a few steps."""
    fed = federation(f"schedule.kind={request.param}", *RECIPE)
    losses = [fed.server.train(4), fed.clients[0].train(4)]
    assert all(0 < loss < 10 for loss in losses)
    return fed


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_split_sampling_with_v_on_both_sides_equals_one_piecewise_chain(trained, sampler):
    fed, client = trained, trained.clients[0]
    split = split_sample(fed, client, 4, server_steps=5, client_steps=3, sampler=sampler, seed=5)
    server_gen = torch.Generator().manual_seed(5)
    x_T = torch.randn((4, *fed.cfg.image_shape), generator=server_gen)
    whole = _piecewise_chain(fed, client, x_T, level_grid(fed.schedule.T, fed.cut_level, 5),
                             level_grid(fed.cut_level, 0, 3), eta_of(sampler), server_gen,
                             torch.Generator().manual_seed(6))
    assert torch.equal(split, whole) and split.isfinite().all()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_an_exported_v_run_samples_as_the_run(trained, sampler, tmp_path):
    """Saved and loaded, the split pipeline of a v run turns both nets' v into noise exactly as the roles do."""
    from collafuse.export import CollaFuseSplitPipeline, pipeline_of
    pipeline_of(trained, "split", 0).save_pretrained(tmp_path)
    pipe = CollaFuseSplitPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.config.server_prediction, pipe.config.client_prediction) == ("v", "v")
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # the client's v is on the chain itself
    got = pipe(batch_size=4, seed=5, sampler=sampler, num_inference_steps=5, client_inference_steps=3,
               output_type="pt").images
    want = split_sample(trained, trained.clients[0], 4, server_steps=5, client_steps=3, sampler=sampler, seed=5)
    assert torch.equal(got, (want.clamp(-1, 1) / 2 + 0.5).clamp(0, 1))


def test_warm_up_then_cosine_decay():
    lr = LRSchedule(warmup_steps=10, decay="cosine", total_steps=110)
    assert [lr.factor(k) for k in (0, 4, 9, 10)] == [0.1, 0.5, 1.0, 1.0]
    assert lr.factor(60) == pytest.approx(0.5) and lr.factor(35) == pytest.approx(0.5 + 0.5 ** 0.5 / 2)
    assert lr.factor(109) == pytest.approx(0.0, abs=1e-3) and lr.factor(110) == lr.factor(500) == 0.0
    assert LRSchedule(4).factor(1) == 0.5 and LRSchedule(4).factor(100) == 1.0  # warm-up, then constant
    assert all(LRSchedule().factor(k) == 1.0 for k in range(5))  # the default: today's constant lr


def test_roles_follow_the_schedule_over_the_run():
    fed = federation(*RECIPE)  # smoke: 2 rounds x 15 server steps, x 10 client steps
    assert fed.server.lr_schedule == LRSchedule(3, "cosine", 30)
    assert fed.clients[0].lr_schedule == LRSchedule(3, "cosine", 20)
    fed.server.train(2)
    assert fed.server.opt.param_groups[0]["lr"] == pytest.approx(fed.cfg.server.lr * 2 / 3)
    fed.server.train(13)  # step 14: 11 of the 27 steps after the warm-up
    cosine = (1 + math.cos(math.pi * 11 / 27)) / 2
    assert fed.server.opt.param_groups[0]["lr"] == pytest.approx(fed.cfg.server.lr * cosine)


@pytest.mark.parametrize("role,pack", [("server", False), ("client", False), ("client", True)])
def test_resume_mid_run_continues_the_schedule(tmp_path, role, pack):
    """Train 4 + 4 steps, or 4, save (packed as in-process clients are, or not), load into a fresh role and 4 more:
    the same lr, weights and optimiser state."""
    def fresh():
        fed = federation(*RECIPE)
        return fed.server if role == "server" else fed.clients[0]

    whole, part, resumed = fresh(), fresh(), fresh()
    whole.train(4), whole.train(4)
    part.train(4)
    save_state(tmp_path / role, *part.state(), pack=pack)
    resumed.load(*load_state(tmp_path / role))
    resumed.train(4)
    (a, meta_a), (b, meta_b) = whole.state(), resumed.state()
    assert 0 < meta_a["optimizer"]["param_groups"][0]["lr"] < whole.lr  # mid-decay
    assert meta_a == meta_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override,message", [
    ("server.loss_weighting=huber", "server.loss_weighting 'huber' is unknown; choose one of uniform, min-snr"),
    ("client.prediction=x0", "client.prediction 'x0' is unknown; choose one of epsilon, v"),
    ("server.lr_decay=linear", "server.lr_decay 'linear' is unknown; choose one of constant, cosine"),
    ("client.lr_warmup_steps=-1", "client.lr_warmup_steps must be an integer >= 0, got -1"),
    ("client.lr_warmup_steps=1.5", "client.lr_warmup_steps must be an integer >= 0, got 1.5"),
    ("server.min_snr_gamma=0", "server.min_snr_gamma must be a number > 0, got 0"),
    ("client.min_snr_gamma=-2.5", "client.min_snr_gamma must be a number > 0, got -2.5"),
])
def test_bad_recipe_values_are_refused(override, message):
    with pytest.raises(ValueError) as err:
        load_config("smoke", [override])
    assert str(err.value) == message


def test_the_recipe_is_set_per_side():
    default = load_config("default")  # the measured recipe (benchmarks/README.md) on both sides
    assert default.server.objective() == default.client.objective() == Objective("v", "min-snr", 5.0)
    cfg = load_config("smoke", ["server.prediction=epsilon", "server.loss_weighting=uniform",
                                "server.lr_warmup_steps=3", "server.lr_decay=cosine", "client.min_snr_gamma=2"])
    assert cfg.server.objective() == Objective()  # plain DDPM
    assert cfg.server.lr_schedule(30) == LRSchedule(3, "cosine", 30)
    assert cfg.client.objective() == Objective("v", "min-snr", 2)
    assert cfg.client.lr_schedule(20) == LRSchedule(total_steps=20)


def test_each_ablation_recipe_is_what_its_name_says_whatever_the_defaults():
    """benchmarks/recipes.py: a recipe that named only its change once inherited the new default's min-SNR."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes.py"
    spec = importlib.util.spec_from_file_location("collafuse_benchmarks_recipes", path)
    recipes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipes)
    want = {"base": ("epsilon", "uniform", 0), "min-snr": ("epsilon", "min-snr", 0), "v": ("v", "uniform", 0),
            "lr-schedule": ("epsilon", "uniform", 25), "all": ("v", "min-snr", 25), "v+min-snr": ("v", "min-snr", 0),
            "server-heavy": ("v", "min-snr", 0), "client-heavy": ("v", "min-snr", 0), "cosine": ("v", "min-snr", 0),
            "v+min-snr+guidance": ("v", "min-snr", 0)}
    assert set(recipes.RECIPES) == set(want)
    for name, (prediction, weighting, warmup) in want.items():
        cfg = load_config("default", recipes.RECIPES[name])
        for side in (cfg.server, cfg.client):
            assert (side.prediction, side.loss_weighting) == (prediction, weighting), name
            assert side.lr_decay == ("cosine" if warmup else "constant"), name
            # the preset guides its clients: only the guidance recipe may inherit that
            assert (side.label_dropout, side.guidance) == ((0.1, 2) if side is cfg.client and "guidance" in name
                                                           else (0, 1)), name
        assert cfg.server.lr_warmup_steps == warmup, name
        assert cfg.sampling.client_steps == (100 if "guidance" in name else 200), name  # the same sampling cost
    assert load_config("default", recipes.RECIPES["cosine"]).schedule.kind == "cosine"
