"""`collafuse export` and the diffusers pipelines: `collafuse sample`'s samples, one party's weights, a model card."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from collafuse.cli import app
from collafuse.config import load_config
from collafuse.core.protocol import SamplingRequest
from collafuse.core.sampling import eta_of, level_grid, sample_levels
from collafuse.core.state import load_state
from collafuse.export import model_card, pipeline_of
from collafuse.federation.inprocess import build, load_checkpoint
from collafuse.measure.evaluate import split_sample

cli = CliRunner()
N, SEED, CLIENT = 5, 3, 1


def invoke(*args):
    return cli.invoke(app, list(args))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A one-round smoke run and its three exports: server, client 1, split for client 1."""
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    result = invoke("run", "-c", "smoke", "--set", "rounds=1", "-o", str(run), "--quiet")
    assert result.exit_code == 0, result.output
    for part in ("server", "client", "split"):
        args = [] if part == "server" else ["--client", str(CLIENT)]
        result = invoke("export", "--run", str(run), "--part", part, *args, "--out", str(root / part))
        assert result.exit_code == 0, result.output
        assert json.loads(result.output.strip().splitlines()[-1])["bytes"] > 0
    return run, root


@pytest.fixture(scope="module")
def trained(exported):
    """The run's federation at its checkpoint, as `collafuse sample` loads it."""
    run, _ = exported
    fed = build(load_config(str(run / "config.json")), device=torch.device("cpu"))
    load_checkpoint(fed, run)
    return fed


# Runs in a fresh interpreter with nothing of the run but the export folders: the split pipeline by its class,
# the client by diffusers' own custom-pipeline loader, the server by its class; both samplers.
LOAD_AND_SAMPLE = """
import sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
from collafuse.export import CollaFuseServerPipeline, CollaFuseSplitPipeline
root, n, seed, client = sys.argv[1], *map(int, sys.argv[2:])
split = CollaFuseSplitPipeline.from_pretrained(f"{root}/split")
server = CollaFuseServerPipeline.from_pretrained(f"{root}/server")
own = DiffusionPipeline.from_pretrained(f"{root}/client", custom_pipeline="pipeline", trust_remote_code=True)
out = {}
for p in (split, server, own):
    p.set_progress_bar_config(disable=True)
for sampler in ("ddim", "ddpm"):
    out[f"split_{sampler}"] = split(batch_size=n, seed=seed, sampler=sampler, output_type="pt").images
    y = server(client_id=client, batch_size=n, sampler=sampler, generator=torch.Generator().manual_seed(seed)).images
    out[f"handoffs_{sampler}"] = y
    out[f"parts_{sampler}"] = own(y, sampler=sampler, generator=torch.Generator().manual_seed(seed + 1),
                                  output_type="pt").images
save_file(out, f"{root}/samples.safetensors")
"""


def test_exports_load_in_a_fresh_process_and_sample_exactly_as_collafuse_sample(exported, trained):
    _, root = exported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "hf-modules"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD_AND_SAMPLE, str(root), str(N), str(SEED), str(CLIENT)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_file(str(root / "samples.safetensors"))
    fed, client = trained, trained.clients[CLIENT]
    steps = fed.cfg.sampling
    for sampler in ("ddim", "ddpm"):
        images = split_sample(fed, client, N, server_steps=steps.server_steps, client_steps=steps.client_steps,
                              sampler=sampler, seed=SEED)
        handoffs = fed.server.sample_to_cut(SamplingRequest(client_id=CLIENT, n=N, steps=steps.server_steps,
                                                            sampler=sampler, seed=SEED)).handoffs
        as_pt = (images / 2 + 0.5).clamp(0, 1)  # diffusers' "pt" images are in [0, 1]
        assert torch.equal(got[f"handoffs_{sampler}"], handoffs)
        assert torch.equal(got[f"split_{sampler}"], as_pt)
        assert torch.equal(got[f"parts_{sampler}"], as_pt)


def _weights(folder):
    return {f"{p.parent.name}/{k}": v for p in folder.rglob("*.safetensors") for k, v in load_file(str(p)).items()}


def _role(run, name):
    """A role's model and sampling (EMA) weights in the run's checkpoint."""
    return {k: v for k, v in load_state(run / "checkpoint" / name)[0].items() if k.startswith(("model/", "ema/"))}


def _shared(export, role):
    return [k for k, v in export.items() for w in role.values() if v.shape == w.shape and torch.equal(v, w)]


def test_each_export_holds_only_its_party_s_weights(exported):
    run, root = exported
    server, clients = _role(run, "server"), [_role(run, f"client-{k}") for k in range(3)]
    for part, components in (("server", {"unet", "scheduler"}), ("client", {"unet", "scheduler"}),
                             ("split", {"server_unet", "client_unet", "scheduler"})):
        index = json.loads((root / part / "model_index.json").read_text())
        assert {k for k, v in index.items() if isinstance(v, list)} == components
        assert {p.name for p in (root / part).iterdir() if p.is_dir()} == components
    own, shared = _weights(root / "client"), _weights(root / "server")
    assert set(own) == {f"unet/{k[9:]}" for k in clients[CLIENT] if k.startswith("ema/unet.")}  # sampling weights
    assert all(torch.equal(v, clients[CLIENT]["ema/unet." + k[5:]]) for k, v in own.items())
    assert _shared(own, server) == []
    assert all(_shared(shared, c) == [] for c in clients)
    assert all(torch.equal(v, server["ema/unet." + k[5:]]) for k, v in shared.items())


def _front_matter(text):
    head, _, body = text.partition("\n---\n")
    assert head.startswith("---\n")
    return yaml.safe_load(head[4:]), body


def test_model_card_front_matter_parses_and_its_numbers_are_the_run_s(exported):
    run, root = exported
    metrics = json.loads((run / "metrics.json").read_text())
    card, body = _front_matter((root / "client" / "README.md").read_text())
    assert card["library_name"] == "diffusers" and card["license"] == "other"
    assert card["pipeline_tag"] == "unconditional-image-generation" and "collafuse-client" in card["tags"]
    c, mine = card["collafuse"], metrics["clients"][str(CLIENT)]
    assert (c["cut"], c["cut_level"], c["T"], c["data"]["name"]) == (0.2, metrics["cut_level"], metrics["T"], "digits")
    assert list(c["quality"]) == [str(CLIENT)]  # a client's card shows its own quality only
    assert all(c["quality"][str(CLIENT)][k] == mine[k] for k in ("fid", "kid_mean", "kid_std", "own_class_share"))
    assert c["dp"]["clients"] == {str(CLIENT): metrics["dp"]["clients"][str(CLIENT)]}
    assert c["dp"]["epsilon"] == metrics["dp"]["epsilon"] and c["disclosure"] == metrics["disclosure"]
    assert f"| {CLIENT} | {mine['fid']:.4g} | {mine['kid_mean']:.4g} |" in body
    assert f"| reidentification.members | {metrics['disclosure']['reidentification']['members']:.4g} |" in body
    server_card, _ = _front_matter((root / "server" / "README.md").read_text())
    assert list(server_card["collafuse"]["quality"]) == ["0", "1", "2"]


def test_model_card_prints_whatever_the_disclosure_block_holds(exported):
    run, _ = exported
    cfg = load_config(str(run / "config.json"))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["disclosure"]["attribute_inference"] = {"auc": 0.625, "note": "a | b"}  # a key added later
    card, body = _front_matter(model_card(cfg, 20, "client", 0, metrics))
    assert card["collafuse"]["disclosure"]["attribute_inference"]["auc"] == 0.625
    assert "| attribute_inference.auc | 0.625 |" in body and "| attribute_inference.note | a / b |" in body
    card, body = _front_matter(model_card(cfg, 20, "server", None, None))
    assert card["collafuse"]["quality"] == {} and card["collafuse"]["disclosure"] is None
    assert "Not measured" in body


def test_class_conditioned_client_pipeline_needs_and_uses_its_classes():
    fed = build(load_config("smoke", ["client.condition=class"]), device=torch.device("cpu"))
    client = fed.clients[0]
    pipe = pipeline_of(fed, "client", 0)
    pipe.set_progress_bar_config(disable=True)
    y = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    got = pipe(y, class_labels=7, generator=torch.Generator().manual_seed(5), output_type="pt").images
    want = sample_levels(client.eps_fn(torch.full((3,), 7)), y, level_grid(fed.cut_level, 0, fed.cfg.sampling.client_steps),
                         fed.schedule, eta_of(fed.cfg.sampling.sampler), torch.Generator().manual_seed(5))
    assert torch.equal(got, (want.clamp(-1, 1) / 2 + 0.5).clamp(0, 1))
    pil = pipe(y, class_labels=[1, 2, 3], output_type="pil").images
    assert len(pil) == 3 and pil[0].size == (8, 8) and pil[0].mode == "L"
    assert pipe(y, class_labels=1, output_type="np").images.shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="conditioned on its private classes 0..9: pass class_labels"):
        pipe(y)
    with pytest.raises(ValueError, match="class_labels must be one int or 3 ints in 0..9"):
        pipe(y, class_labels=[1, 10, 2])
    with pytest.raises(ValueError, match="handoffs must have shape \\(n, 1, 8, 8\\)"):
        pipe(y[:, :, :4], class_labels=1)
    server = pipeline_of(fed, "server")
    with pytest.raises(ValueError, match="not an image|output_type 'pil' is not offered here"):
        server(client_id=0, output_type="pil")
    with pytest.raises(ValueError, match="client_id 3 is not one of this server's clients 0..2"):
        server(client_id=3)


def test_export_errors_name_the_fix(exported, tmp_path):
    run, root = exported
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "config.json").write_text((run / "config.json").read_text())
    cases = [
        (["--run", str(run), "--part", "weights"], "unknown part 'weights'; choose server"),
        (["--run", str(run), "--part", "client", "--client", "3"], "--client K with K in 0..2 (this run's clients), got 3"),
        (["--run", str(run), "--part", "client"], "--part client needs --client K"),
        (["--run", str(run), "--part", "server", "--client", "0"], "drop --client"),
        (["--run", str(tmp_path / "untrained"), "--part", "server"], "no checkpoint in"),
        (["--run", str(tmp_path), "--part", "server"], "has no config.json: --run must be a run folder"),
        (["--run", str(run), "--part", "server"], "is not empty; export into a new folder"),
    ]
    for args, message in cases:
        out = root / "server" if "not empty" in message else tmp_path / "out"
        result = invoke("export", *args, "--out", str(out))
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()
