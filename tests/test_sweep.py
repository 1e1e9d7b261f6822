"""Sweeps, reports and the FedAvg baseline through Flower's own strategy, on tiny real runs."""
import copy
import json

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from typer.testing import CliRunner

from collafuse.cli import app
from collafuse.config import load_config
from collafuse.federation.fedavg import fedavg_config, fedavg_round, record_bytes
from collafuse.measure.report import write_report
from collafuse.federation.inprocess import build
from collafuse.measure.sweep import parse_baselines, parse_cuts, plan, sweep

FAST = ["rounds=1", "server.steps_per_round=2", "client.steps_per_round=2", "sampling.n=8",
        "sampling.server_steps=2", "sampling.client_steps=2", "eval.classifier_epochs=1",
        "eval.disclosure_records=40", "data.max_records=400", "eval.mia_draws=1"]


def test_fedavg_is_flowers_weighted_average():
    cfg = fedavg_config(load_config("smoke", FAST + ["data.clients=2", "client.steps_per_round=1"]))
    fed = build(cfg, device=torch.device("cpu"))
    fed.clients[1].model.load_state_dict(fed.clients[0].model.state_dict())
    fed.clients[1].ema.model.load_state_dict(fed.clients[0].ema.model.state_dict())
    before = copy.deepcopy(fed.clients)  # same weights, optimiser and generator: train them by hand
    for c in before:
        c.train(1)
    n = [c.num_records for c in before]
    assert n[0] != n[1]  # a weighted average differs from a plain one
    held = [{**c.model.state_dict(), **c.ema.state()} for c in before]  # the weights and their EMA
    expected = {k: (n[0] * held[0][k] + n[1] * held[1][k]) / sum(n) for k in held[0]}
    assert any(k.startswith("ema/") for k in expected) and not torch.equal(expected["ema/unet.conv_in.weight"],
                                                                           expected["unet.conv_in.weight"])
    size = record_bytes(ArrayRecord(held[0]))
    fedavg_round(fed, FedAvg(min_train_nodes=2, min_available_nodes=2), 1)
    for c in fed.clients:
        for k, v in {**c.model.state_dict(), **c.ema.state()}.items():
            torch.testing.assert_close(v, expected[k].to(v.dtype), rtol=1e-5, atol=1e-6)
    # the model and its EMA cross the wire, each way
    assert fed.wire.bytes_down[0] == fed.wire.bytes_up[0] == size > 8 * sum(
        p.numel() for p in fed.clients[0].model.parameters())


def test_sweep_two_cuts_writes_report_and_resume_skips_finished_runs(tmp_path):
    cfg = load_config("smoke", FAST)
    folders = sweep(cfg, [0.5, 1.0], ["fresh", "fedavg"], tmp_path, progress=False)
    assert [f.name for f in folders] == ["cut-0.50", "cut-1.00", "fresh-0.20", "fedavg"]
    assert {f.parent.name for f in folders} == {"seed-0"}
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| run | c | t_c | seeds | KID mean" in report and "| fedavg |" in report and "| cut-0.50 |" in report
    assert "| fedavg | FedAvg, the server-sized model with EMA" in report  # each run states its budget rule
    for png in ("quality_vs_cut.png", "disclosure_vs_cut.png", "cost_vs_cut.png", "frontier.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    assert (tmp_path / "report" / "samples" / "cut-0.50_samples_client0.png").is_file()
    seed0 = tmp_path / "seed-0"
    fedavg = json.loads((seed0 / "fedavg" / "metrics.json").read_text())
    assert fedavg["baseline"] == "fedavg" and fedavg["dp"] is None and fedavg["cut"] == 1.0
    assert fedavg["cost"]["client_total"]["bytes_up"] > 0  # the model weights crossed the wire
    assert json.loads((seed0 / "fresh-0.20" / "metrics.json").read_text())["handoff_mode"] == "fresh"
    # c = 1 runs the whole chain on the client: it gets the split runs' total sampling steps.
    assert json.loads((seed0 / "cut-1.00" / "config.json").read_text())["sampling"]["client_steps"] == 4

    stamp = {f: (f / "metrics.json").stat().st_mtime_ns for f in folders}
    sweep(cfg, [0.5, 1.0], ["fresh", "fedavg"], tmp_path, progress=False)
    assert {f: (f / "metrics.json").stat().st_mtime_ns for f in folders} == stamp  # nothing re-ran

    (folders[0] / "metrics.json").unlink()  # a run that checkpointed but never finished
    with pytest.raises(FileExistsError, match="--resume"):
        sweep(cfg, [0.5, 1.0], [], tmp_path, progress=False)
    sweep(cfg, [0.5, 1.0], [], tmp_path, resume=True, progress=False)
    assert (folders[0] / "metrics.json").is_file()
    assert (folders[1] / "metrics.json").stat().st_mtime_ns == stamp[folders[1]]

    with pytest.raises(ValueError, match="different config"):
        sweep(load_config("smoke", FAST + ["client.lr=0.002"]), [1.0], [], tmp_path, progress=False)

    result = CliRunner().invoke(app, ["report", str(folders[0]), str(folders[3]), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 0 and (tmp_path / "r2" / "report.md").is_file()


@pytest.mark.parametrize("text, message", [("1.5", "outside"), ("a,0.2", "not a number"), ("0.2,0.2", "twice")])
def test_bad_cuts(text, message):
    with pytest.raises(ValueError, match=message):
        parse_cuts(text)


def test_cuts_and_baselines_parse():
    assert parse_cuts("0,0.2,1") == [0.0, 0.2, 1.0]
    assert parse_baselines("fresh, fedavg") == ["fresh", "fedavg"] and parse_baselines("") == []
    with pytest.raises(ValueError, match="unknown baseline"):
        parse_baselines("fresh,local")
    with pytest.raises(ValueError, match="--cuts is empty"):
        plan(load_config("smoke"), [], [])


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="no run folders"):
        write_report([], tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        write_report([tmp_path], tmp_path / "r")


def test_cli_errors_name_the_problem():
    runner = CliRunner()
    for args, message in ((["sweep", "--cuts", "1.5"], "outside [0, 1]"), (["sweep", "--baselines", "x"], "unknown"),
                          (["report"], "no run folders"), (["fetch-weights", "vgg"], "unknown weights")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_seeds_and_local_baselines_in_parallel_report_mean_and_sd(tmp_path):
    cfg = load_config("smoke", FAST + ["client.steps_per_round=auto", "client.full_chain_steps=4",
                                       "eval.disclosure=false"])
    runs = plan(cfg, [0.5, 1.0], ["local-4x", "local-server", "fedavg"])
    steps = {r.name: r.budget["client_steps"] for r in runs}
    b = runs[0].budget
    # B = 4 client-model steps per round; the server-sized model buys as many steps as its step costs allow
    assert steps["cut-0.50"] == 2 and steps["cut-1.00"] == 4 and steps["local-4x"] == 16
    assert steps["local-server"] == round(4 * b["client_step_flops"] / b["server_step_flops"])
    # FedAvg: the server-sized model on 3 clients, as many training FLOPs as CollaFuse's server + clients at c = 0.2
    assert steps["fedavg"] == round((2 * b["server_step_flops"] + 3 * 1 * b["client_step_flops"])
                                    / (3 * b["server_step_flops"]))
    folders = sweep(cfg, [1.0], ["local-server"], tmp_path, seeds=[0, 1], jobs=2, threads=1, progress=False)
    assert [str(f.relative_to(tmp_path)) for f in folders] == [
        "seed-0/cut-1.00", "seed-0/local-server", "seed-1/cut-1.00", "seed-1/local-server"]
    kid = []
    for s in (0, 1):
        clients = json.loads((tmp_path / f"seed-{s}" / "cut-1.00" / "metrics.json").read_text())["clients"]
        kid.append(sum(c["kid_mean"] for c in clients.values()) / len(clients))
    assert kid[0] != kid[1]  # the seeds really differ
    report = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| cut-1.00 | 1.00 | 100 | 2 |"))
    mean, sd = sum(kid) / 2, abs(kid[0] - kid[1]) / 2 ** 0.5  # the sample sd of two values
    assert f"| {mean:.4f} ± {sd:.4f} |" in row
    assert "local-only, the server-sized model, 1 x B training FLOPs" in report
    budget = json.loads((tmp_path / "seed-1" / "local-server" / "budget.json").read_text())
    assert budget["kind"] == "local" and budget["client_steps"] == steps["local-server"]
