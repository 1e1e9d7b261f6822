"""Simulated clients trained together (roles/cohort.py) end where one-by-one training ends, up to float rounding."""
import json

import pytest
import torch

from collafuse.config import load_config
from collafuse.core.protocol import SamplingHandoffs
from collafuse.federation import inprocess
from collafuse.federation.inprocess import build, run
from collafuse.roles.cohort import cohort_key, finish_key, finish_together, stacked_eps_fn, train_together

PROBE = torch.Generator().manual_seed(5)
X, T, LABELS = torch.randn(16, 1, 8, 8, generator=PROBE), torch.randint(1, 20, (16,), generator=PROBE), \
    torch.randint(0, 10, (16,), generator=PROBE)


def outputs(client, model):
    with torch.no_grad():
        return model(X, T, None if client.condition is None else LABELS)


@pytest.mark.parametrize("overrides", [[], ["client.condition=class", "client.model.attention=true",
                                            "client.prediction=v", "client.loss_weighting=min-snr",
                                            "client.lr_warmup_steps=3"]])
def test_together_equals_one_by_one(overrides):
    cfg = load_config("smoke", ["data.clients=4", *overrides])
    alone, together = build(cfg), build(cfg)
    for _ in range(2):  # the second call starts from the first's optimiser moments and EMA
        expected = [c.train(5) for c in alone.clients]
        got = train_together(together.clients, 5)
        assert [loss for loss, _ in got] == pytest.approx(expected, rel=1e-5)
        assert all(seconds > 0 for _, seconds in got)
    for a, b in zip(alone.clients, together.clients):
        # The functions agree; single weights may not: a bias in front of a GroupNorm has a zero gradient up to
        # rounding, which Adam scales to full-size steps in either run.
        for model_a, model_b in ((a.model, b.model), (a.ema.model, b.ema.model)):
            torch.testing.assert_close(outputs(b, model_b), outputs(a, model_a), rtol=1e-4, atol=5e-5)
        assert torch.equal(a.gen.get_state(), b.gen.get_state())
        assert (a.steps_done, a.ema.updates) == (b.steps_done, b.ema.updates) == (10, 10)
        state_a, state_b = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
        assert state_a.keys() == state_b.keys() and all(state_b[i]["step"] == 10 for i in state_b)
    # and each client's own weights went back to it: they differ between clients
    first, second = together.clients[:2]
    assert not torch.allclose(outputs(first, first.model), outputs(second, second.model))
    # Each client's moments are its own slice of the stacked ones: one client training alone on from there moves
    # its own, not another's, and ends where it ends one by one.
    before = [v.clone() for st in second.opt.state.values() for k, v in st.items() if k != "step"]
    assert first.train(3) == pytest.approx(alone.clients[0].train(3), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, [v for st in second.opt.state.values()
                                                           for k, v in st.items() if k != "step"]))
    state_a, state_b = alone.clients[0].opt.state_dict()["state"], first.opt.state_dict()["state"]
    assert all(state_b[i]["step"] == 13 for i in state_b)
    torch.testing.assert_close(state_b[0]["exp_avg_sq"], state_a[0]["exp_avg_sq"], rtol=1e-3, atol=1e-9)


def test_clients_group_norms_are_one_native_call_equal_to_each_own(monkeypatch):
    """Inside the vmap over stacked clients, every client's GroupNorm runs as one call, not by vmap's rule."""
    from torch import nn
    from torch.func import functional_call, stack_module_state, vmap
    from collafuse.roles import cohort
    g = torch.Generator().manual_seed(0)
    norms = [nn.GroupNorm(4, 8) for _ in range(3)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.randn(8, generator=g))
            norm.bias.copy_(torch.randn(8, generator=g))
    params, buffers = stack_module_state(norms)
    x = torch.randn(3, 5, 8, 4, 4, generator=g)
    taken = []
    native = cohort._stacked_group_norm
    monkeypatch.setattr(cohort, "_stacked_group_norm", lambda *a: taken.append(native(*a)) or taken[-1])
    with cohort._Batchable():
        out = vmap(lambda p, b, x: functional_call(norms[0], (p, b), (x,)))(params, buffers, x)
        transposed = vmap(lambda p, b, x: functional_call(norms[0], (p, b), (x.transpose(-1, -2),)))(
            params, buffers, x)
    assert len(taken) == 2 and all(t is not None for t in taken)
    with torch.no_grad():
        for i, norm in enumerate(norms):
            torch.testing.assert_close(out[i], norm(x[i]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(transposed[i], norm(x[i].transpose(-1, -2)), rtol=1e-5, atol=1e-6)
    assert cohort._stacked_group_norm(x[0], 4, norms[0].weight, norms[0].bias, 1e-5) is None  # outside vmap


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("overrides", [[], ["client.condition=class", "client.prediction=v"]])
def test_clients_finish_their_samples_together_as_one_by_one(sampler, overrides):
    fed = build(load_config("smoke", ["data.clients=3", *overrides]))
    for c in fed.clients:
        c.train(3)  # each client's EMA weights are its own
    g = torch.Generator().manual_seed(0)
    msgs = [SamplingHandoffs(client_id=c.id, level=c.t_c, handoffs=torch.randn(6, 1, 8, 8, generator=g))
            for c in fed.clients]
    alone = [c.finish(m, 4, sampler, 10 + c.id) for c, m in zip(fed.clients, msgs)]
    together = finish_together(fed.clients, msgs, 4, sampler, [10 + c.id for c in fed.clients])
    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1])
    with pytest.raises(ValueError, match="one finish_key"):  # another number of samples: another call
        finish_together(fed.clients[:2], [msgs[0], SamplingHandoffs(0, fed.cut_level, msgs[1].handoffs[:3])], 4,
                        sampler, [1, 2])
    assert finish_key(fed.clients[0], 6) == finish_key(fed.clients[1], 6) != finish_key(fed.clients[1], 5)


def test_the_pipeline_attack_evaluates_clients_together_as_one_by_one():
    """The disclosure block's pipeline attack with batch_clients: unequal record counts, padded, same outputs."""
    import dataclasses
    from collafuse.measure.blocks import _pipeline_eps
    together = build(load_config("smoke", ["data.clients=3", "client.condition=class", "batch_clients=true"]))
    for c in together.clients:
        c.train(3)
    alone = dataclasses.replace(together, cfg=dataclasses.replace(together.cfg, batch_clients=False))
    g = torch.Generator().manual_seed(1)
    chunk = [{"client": c, "x_mem": torch.randn(n, 1, 8, 8, generator=g),
              "cond_mem": torch.randint(0, 10, (n,), generator=g)} for c, n in zip(together.clients, (5, 3, 4))]
    x = torch.cat([s["x_mem"] for s in chunk])
    for level in (together.cut_level, 1):  # at and below the cut: the clients' own models
        t = torch.full((len(x),), level)
        torch.testing.assert_close(_pipeline_eps(together, chunk, "mem")(x, t), _pipeline_eps(alone, chunk, "mem")(x, t),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one sampling_key"):
        stacked_eps_fn([together.clients[0], build(load_config("smoke")).clients[0]], [None, None], [2, 2])


def test_clients_that_cannot_share_a_step_are_refused():
    fed = build(load_config("smoke", ["data.clients=3"]))
    fed.clients[2].train(1)  # one step ahead: another learning rate, another Adam step
    assert cohort_key(fed.clients[0], 5) == cohort_key(fed.clients[1], 5) != cohort_key(fed.clients[2], 5)
    with pytest.raises(ValueError, match="one cohort_key"):
        train_together(fed.clients, 5)
    assert cohort_key(fed.clients[0], 0) is None
    assert cohort_key(build(load_config("smoke", ["cut=0"])).clients[0], 5) is None  # no levels to train


def test_a_run_with_clients_together_reports_what_one_by_one_reports(tmp_path, monkeypatch):
    finished = []

    def spy(clients, *args):  # the run's sampling goes through finish_together when clients are batched
        finished.append([c.id for c in clients])
        return finish_together(clients, *args)
    monkeypatch.setattr(inprocess, "finish_together", spy)
    metrics = {}
    for together in (True, False):
        out = tmp_path / str(together)
        run(load_config("smoke", ["rounds=1", f"batch_clients={str(together).lower()}", "eval.disclosure=false"]),
            out, progress=False)
        metrics[together] = json.loads((out / "metrics.json").read_text())
    assert finished == [[0, 1, 2]]  # once, all three clients: none with batch_clients off
    log_t, log_o = (metrics[k]["participation"]["log"][0]["loss"] for k in (True, False))
    assert log_t == pytest.approx(log_o, rel=1e-4)
    for cid, one in metrics[False]["clients"].items():
        assert metrics[True]["clients"][cid]["kid_mean"] == pytest.approx(one["kid_mean"], rel=1e-3, abs=1e-4)


@pytest.fixture
def cohorts(monkeypatch) -> list[list[int]]:
    """The client ids of every train_together call of the in-process transport, in order."""
    calls = []

    def spy(clients, steps, on_step=None):
        calls.append([c.id for c in clients])
        return train_together(clients, steps, on_step)
    monkeypatch.setattr(inprocess, "train_together", spy)
    return calls


def test_a_client_that_refuses_trains_nothing_when_the_others_train_together(tmp_path, cohorts):
    # Client 1's owner allows no cut below 0.4; the run's cut is 0.2: it refuses, untrained, and says why.
    engine, fed, _ = inprocess.start(load_config("smoke", ["rounds=1", "batch_clients=true"]), tmp_path)
    fed.clients[1].policy = type(fed.clients[1].policy)(min_cut=0.4)
    entry = engine.run_round()
    assert entry["replied"] == [0, 2] and "min_cut=0.4" in entry["refused"]["1"]
    assert cohorts == [[0, 2]] and [c.steps_done for c in fed.clients] == [10, 0, 10]
    assert fed.seconds["client0.train"] >= engine.reports[0]["train_seconds"] > 0  # its share is counted


def test_batch_clients_must_be_a_boolean():
    with pytest.raises(ValueError, match="batch_clients must be true or false, got 'yes'"):
        load_config("smoke", ["batch_clients=yes"])


def test_a_large_cohort_trains_in_chunks_that_bound_its_memory(tmp_path, monkeypatch, cohorts):
    from collafuse.core import sampling
    monkeypatch.setattr(sampling, "BATCH_PIXELS", 64 * 8 * 8)  # two smoke batches (32 images of 8x8) per step
    engine, fed, _ = inprocess.start(load_config("smoke", ["rounds=1", "batch_clients=true"]), tmp_path / "chunks")
    chunked = engine.run_round()
    assert cohorts == [[0, 1], [2]]
    alone, _, _ = inprocess.start(load_config("smoke", ["rounds=1"]), tmp_path / "alone")
    assert chunked["loss"] == pytest.approx(alone.run_round()["loss"], rel=1e-4)
