"""Classifier-free guidance on the client id: null-label training, guided sampling, export, and bad settings."""
import json

import pytest
import torch

from collafuse.config import load_config
from collafuse.core.protocol import SamplingHandoffs
from collafuse.measure.evaluate import split_sample
from test_recipe import federation
from test_run import invoke

GUIDED = ["server.label_dropout=0.25", "server.guidance=2.5"]


@pytest.fixture(scope="module")
def guided():
    fed = federation(*GUIDED)
    assert 0 < fed.server.train(4) < 10
    return fed


def test_label_dropout_trains_the_null_label_on_its_share_of_rows():
    fed = federation(*GUIDED)
    server, seen = fed.server, []
    assert server.null_label == 3 and server.model.unet.config.num_class_embeds == 4  # clients 0..2, then null
    forward = server.model.forward
    server.model.forward = lambda x, t, label: (seen.append(label.clone()), forward(x, t, label))[1]
    server.train(20)
    labels = torch.cat(seen)
    share = (labels == 3).float().mean().item()
    assert 0.18 < share < 0.32  # 0.25 of 20 x 32 rows
    assert set(labels.tolist()) == {0, 1, 2, 3}


def test_without_dropout_the_server_is_as_before():
    """No null label, no extra draw: a run that does not ask for guidance keeps its net and random stream."""
    plain, dropped = federation(), federation("server.label_dropout=0.25")
    assert plain.server.null_label is None and plain.server.model.unet.config.num_class_embeds == 3
    state = plain.server.gen.get_state()
    plain.server.train(1)
    g = torch.Generator()
    g.set_state(state)
    torch.randint(plain.server.num_handoffs(), (32,), generator=g)
    torch.randint(plain.cut_level + 1, plain.schedule.T + 1, (32,), generator=g)
    torch.randn((32, *plain.server.image_shape), generator=g)
    assert torch.equal(g.get_state(), plain.server.gen.get_state())  # three draws a step, none for dropout
    dropped.server.train(1)
    assert not torch.equal(dropped.server.gen.get_state(), plain.server.gen.get_state())


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_noise_is_uncond_plus_w_times_the_difference(guided, w):
    server, s, t_c = guided.server, guided.schedule, guided.cut_level
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(5, 1, 8, 8, generator=g), torch.randint(t_c + 1, s.T + 1, (5,), generator=g)
    owner = torch.tensor([0, 1, 2, 2, 0])
    with torch.no_grad():
        cond, uncond = server.ema.model(x, t, owner), server.ema.model(x, t, torch.full((5,), 3))
        want = server.objective.server_noise(uncond + w * (cond - uncond), s, t_c, x, t)
        got = server.eps_fn(owner, w)(x, t)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the null label is a different input, so w matters
    if w == 1.0:
        with torch.no_grad():
            assert torch.equal(got, server.objective.server_noise(cond, s, t_c, x, t))  # one call, no mixing


def test_sampling_uses_the_run_s_guidance_and_the_attacks_the_conditional_net(guided):
    server, client = guided.server, guided.clients[1]
    req = client.sampling_request(3, 4, "ddim", 7)
    sampled = server.sample_to_cut(req).handoffs
    server.guidance = 1.0
    try:
        plain = server.sample_to_cut(req).handoffs
    finally:
        server.guidance = 2.5
    assert not torch.allclose(sampled, plain, atol=1e-4)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), guided.cut_level + 5)
    with torch.no_grad():
        assert torch.equal(server.eps_fn(1)(x, t), server.eps_fn(1, 1.0)(x, t))  # eps_fn's default: no guidance


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_an_exported_guided_run_samples_as_the_run(guided, sampler, tmp_path):
    from collafuse.export import CollaFuseServerPipeline, CollaFuseSplitPipeline, pipeline_of
    pipeline_of(guided, "split", 0).save_pretrained(tmp_path / "split")
    pipe = CollaFuseSplitPipeline.from_pretrained(tmp_path / "split")
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.config.guidance_scale, pipe.config.null_label) == (2.5, 3)
    got = pipe(batch_size=3, seed=5, sampler=sampler, num_inference_steps=4, client_inference_steps=3,
               output_type="pt").images
    want = split_sample(guided, guided.clients[0], 3, server_steps=4, client_steps=3, sampler=sampler, seed=5)
    assert torch.equal(got, (want.clamp(-1, 1) / 2 + 0.5).clamp(0, 1))

    pipeline_of(guided, "server").save_pretrained(tmp_path / "server")
    server_pipe = CollaFuseServerPipeline.from_pretrained(tmp_path / "server")
    server_pipe.set_progress_bar_config(disable=True)
    req = guided.clients[2].sampling_request(2, 4, sampler, 9)
    handoffs = server_pipe(client_id=2, batch_size=2, num_inference_steps=4, sampler=sampler,
                           generator=torch.Generator().manual_seed(9)).images
    assert torch.equal(handoffs, guided.server.sample_to_cut(req).handoffs)
    with pytest.raises(ValueError, match="client_id 3 is not one of this server's clients 0..2"):
        server_pipe(client_id=3)  # the null label is no client's


def test_an_unguided_export_refuses_a_guidance_scale(tmp_path):
    from collafuse.export import CollaFuseServerPipeline, pipeline_of
    fed = federation()
    pipeline_of(fed, "server").save_pretrained(tmp_path)
    pipe = CollaFuseServerPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"guidance_scale 2 needs a server trained with label dropout"):
        pipe(client_id=0, guidance_scale=2)


@pytest.mark.parametrize("overrides, message", [
    (["server.guidance=2"], r"server.guidance = 2 needs a net trained with null labels: set server.label_dropout"),
    (["server.label_dropout=1"], r"server.label_dropout must be in \[0, 1\)"),
    (["server.label_dropout=-0.1"], r"server.label_dropout must be in \[0, 1\)"),
    (["server.label_dropout=true"], r"server.label_dropout must be in \[0, 1\)"),
    (["server.label_dropout=0.1", "server.guidance=-1"], r"server.guidance must be a number in \[0, 20\]"),
    (["server.label_dropout=0.1", "server.guidance=\"strong\""], r"server.guidance must be a number"),
    (["server.label_dropout=0.1", "server.client_cond=false"], r"needs server.client_cond = true"),
])
def test_bad_guidance_settings_are_refused_before_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("smoke", overrides)


QUICK = ["rounds=1", "server.steps_per_round=2", "client.steps_per_round=2", "sampling.n=8", "sampling.server_steps=3",
         "sampling.client_steps=2", "eval.classifier_epochs=1", "eval.disclosure=false", "data.max_records=200"]


def test_evaluate_and_sample_again_at_another_guidance(tmp_path):
    """The guidance scale is chosen after training: evaluate records it in config.json beside its metrics."""
    guided_run, plain_run = tmp_path / "guided", tmp_path / "plain"
    sets = [a for o in QUICK for a in ("--set", o)]
    assert invoke("run", "-c", "smoke", *sets, "--set", "server.label_dropout=0.2", "-o", str(guided_run)).exit_code == 0
    first = json.loads((guided_run / "metrics.json").read_text())
    result = invoke("evaluate", "--run", str(guided_run), "-q", "--guidance", "3")
    assert result.exit_code == 0, result.output
    assert json.loads((guided_run / "config.json").read_text())["server"]["guidance"] == 3.0
    again = json.loads((guided_run / "metrics.json").read_text())
    assert again["clients"]["0"]["fid"] != first["clients"]["0"]["fid"]  # other handoffs, other samples
    result = invoke("sample", "--run", str(guided_run), "--client", "1", "--n", "2", "--guidance", "0",
                    "--out", str(tmp_path / "s.png"))
    assert result.exit_code == 0, result.output

    assert invoke("run", "-c", "smoke", *sets, "-o", str(plain_run)).exit_code == 0
    for args in (["evaluate", "--run", str(plain_run)], ["sample", "--run", str(plain_run), "--client", "0"]):
        result = invoke(*args, "--guidance", "2")
        assert result.exit_code == 2 and "needs a net trained with null labels" in result.output
    assert json.loads((plain_run / "config.json").read_text())["server"]["guidance"] == 1.0  # nothing rewritten


# ---- the same on the client's own classes (client.label_dropout, client.guidance): private labels, private null

CLIENT_GUIDED = ["client.condition=class", "client.label_dropout=0.25", "client.guidance=2.5"]


def test_client_label_dropout_trains_its_null_class_on_its_share_of_rows():
    client = federation(*CLIENT_GUIDED).clients[0]
    assert client.null_class == 10 and client.model.unet.config.num_class_embeds == 11  # digits 0..9, then null
    classes = torch.stack([client.draw_batch()[2] for _ in range(20)])
    assert 0.18 < (classes == 10).float().mean().item() < 0.32  # 0.25 of 20 x 32 rows
    assert set(classes[classes != 10].tolist()) <= set(client.condition.tolist())


def test_without_client_dropout_the_client_draws_as_before():
    plain, dropped = (federation("client.condition=class", *extra).clients[0] for extra in ([], CLIENT_GUIDED[1:2]))
    assert plain.null_class is None and plain.model.unet.config.num_class_embeds == 10
    first, second = plain.draw_batch(), dropped.draw_batch()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # same records, levels, noise
    assert not torch.equal(plain.gen.get_state(), dropped.gen.get_state())  # dropout drew once more


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_client_guided_noise_is_uncond_plus_w_times_the_difference(w):
    client = federation(*CLIENT_GUIDED).clients[1]
    client.train(4)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(5, 1, 8, 8, generator=g), torch.randint(1, client.t_c + 1, (5,), generator=g)
    cls = client.condition[:5]
    with torch.no_grad():
        cond, uncond = client.ema.model(x, t, cls), client.ema.model(x, t, torch.full((5,), 10))
        want = client.objective.client_noise(uncond + w * (cond - uncond), client.schedule, x, t)
        torch.testing.assert_close(client.eps_fn(cls, w)(x, t), want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(cond, uncond, atol=1e-3)
        # eps_fn's default is the conditional net (what the disclosure attacks score); finish uses the run's w
        assert torch.equal(client.eps_fn(cls)(x, t), client.objective.client_noise(cond, client.schedule, x, t))
    msg = SamplingHandoffs(client_id=1, level=client.t_c, handoffs=torch.randn(3, 1, 8, 8, generator=g))
    client.guidance = w
    guided = client.finish(msg, 4, "ddpm", 9)
    client.guidance = 1.0
    assert torch.equal(guided, client.finish(msg, 4, "ddpm", 9)) == (w == 1.0)


def test_clients_finish_guided_samples_together_as_one_by_one():
    from collafuse.roles.cohort import finish_key, finish_together
    fed = federation("data.clients=3", *CLIENT_GUIDED)
    for c in fed.clients:
        c.train(3)
    g = torch.Generator().manual_seed(0)
    msgs = [SamplingHandoffs(client_id=c.id, level=c.t_c, handoffs=torch.randn(4, 1, 8, 8, generator=g))
            for c in fed.clients]
    alone = [c.finish(m, 4, "ddpm", 10 + c.id) for c, m in zip(fed.clients, msgs)]
    for a, b in zip(alone, finish_together(fed.clients, msgs, 4, "ddpm", [10, 11, 12])):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    fed.clients[2].guidance = 1.0  # another w is another call
    assert finish_key(fed.clients[0], 4) == finish_key(fed.clients[1], 4) != finish_key(fed.clients[2], 4)


@pytest.mark.parametrize("overrides, message", [
    (["client.condition=class", "client.guidance=2"],
     r"client.guidance = 2 needs a net trained with null labels: set client.label_dropout"),
    (["client.condition=class", "client.label_dropout=1"], r"client.label_dropout must be in \[0, 1\)"),
    (["client.label_dropout=0.1"], r"client.label_dropout needs client.condition = class \(got 'none'\)"),
    (["client.condition=attributes", "client.label_dropout=0.1"],
     r"client.label_dropout needs client.condition = class \(got 'attributes'\)"),
])
def test_bad_client_guidance_settings_are_refused_before_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("smoke", overrides)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_an_exported_client_guided_run_samples_as_the_client(sampler, tmp_path):
    from collafuse.core.sampling import eta_of, level_grid, sample_levels
    from collafuse.export import CollaFuseClientPipeline, CollaFuseSplitPipeline, pipeline_of
    fed = federation(*CLIENT_GUIDED, f"sampling.client_sampler={sampler}", "sampling.client_steps=3")
    client = fed.clients[0]
    client.train(3)
    pipeline_of(fed, "client", 0).save_pretrained(tmp_path / "client")
    pipe = CollaFuseClientPipeline.from_pretrained(tmp_path / "client")
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.config.guidance_scale, pipe.config.null_class) == (2.5, 10)
    y, labels = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0)), torch.tensor([1, 7, 3])
    got = pipe(y, class_labels=labels, generator=torch.Generator().manual_seed(5), output_type="pt").images
    want = sample_levels(client.eps_fn(labels, 2.5), y, level_grid(fed.cut_level, 0, 3), fed.schedule,
                         eta_of(sampler), torch.Generator().manual_seed(5))
    assert torch.equal(got, (want.clamp(-1, 1) / 2 + 0.5).clamp(0, 1))
    plain = pipe(y, class_labels=labels, guidance_scale=1, generator=torch.Generator().manual_seed(5),
                 output_type="pt").images
    assert not torch.allclose(got, plain, atol=1e-4)
    with pytest.raises(ValueError, match=r"class_labels must be one int or 3 ints in 0..9"):
        pipe(y, class_labels=10)  # the null class is no class of the client's

    pipeline_of(fed, "split", 0).save_pretrained(tmp_path / "split")
    split = CollaFuseSplitPipeline.from_pretrained(tmp_path / "split")
    assert (split.config.client_guidance_scale, split.config.client_null_class) == (2.5, 10)
    split.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, class_labels=[1, 2], seed=3, num_inference_steps=2, output_type="pt")
    assert not torch.allclose(split(**kw).images, split(**kw, client_guidance_scale=1).images, atol=1e-4)
    unguided = federation("client.condition=class")
    pipeline_of(unguided, "client", 0).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"client guidance 2 needs a client trained with label dropout"):
        CollaFuseClientPipeline.from_pretrained(tmp_path / "plain")(y, class_labels=1, guidance_scale=2)


def test_evaluate_again_at_another_client_guidance(tmp_path):
    sets = [a for o in QUICK for a in ("--set", o)]
    guided_run = tmp_path / "guided"
    assert invoke("run", "-c", "smoke", *sets, *[a for o in CLIENT_GUIDED[:2] for a in ("--set", o)],
                  "-o", str(guided_run)).exit_code == 0
    first = json.loads((guided_run / "metrics.json").read_text())
    result = invoke("evaluate", "--run", str(guided_run), "-q", "--client-guidance", "3")
    assert result.exit_code == 0, result.output
    assert json.loads((guided_run / "config.json").read_text())["client"]["guidance"] == 3.0
    assert json.loads((guided_run / "metrics.json").read_text())["clients"]["0"]["fid"] != first["clients"]["0"]["fid"]
    result = invoke("sample", "--run", str(guided_run), "--client", "1", "--n", "2", "--client-guidance", "2",
                    "--out", str(tmp_path / "s.png"))
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", "--run", str(guided_run), "--guidance", "2")  # the server trained no null label
    assert result.exit_code == 2 and "server.guidance = 2.0 needs a net trained with null labels" in result.output
