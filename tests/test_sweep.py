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
    before = copy.deepcopy(fed.clients)  # same weights, optimiser and generator: train them by hand
    for c in before:
        c.train(1)
    n = [c.num_records for c in before]
    assert n[0] != n[1]  # a weighted average differs from a plain one
    expected = {k: (n[0] * before[0].model.state_dict()[k] + n[1] * before[1].model.state_dict()[k]) / sum(n)
                for k in before[0].model.state_dict()}
    size = record_bytes(ArrayRecord(fed.clients[0].model.state_dict()))
    fedavg_round(fed, FedAvg(min_train_nodes=2, min_available_nodes=2), 1)
    for c in fed.clients:
        for k, v in c.model.state_dict().items():
            torch.testing.assert_close(v, expected[k].to(v.dtype), rtol=1e-5, atol=1e-6)
    assert fed.wire.bytes_down[0] == fed.wire.bytes_up[0] == size > 4 * sum(
        p.numel() for p in fed.clients[0].model.parameters())


def test_sweep_two_cuts_writes_report_and_resume_skips_finished_runs(tmp_path):
    cfg = load_config("smoke", FAST)
    folders = sweep(cfg, [0.5, 1.0], ["fresh", "fedavg"], tmp_path, progress=False)
    assert [f.name for f in folders] == ["cut-0.50", "cut-1.00", "fresh-0.20", "fedavg"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| run | c | t_c | KID mean" in report and "| fedavg |" in report and "| cut-0.50 |" in report
    for png in ("quality_vs_cut.png", "disclosure_vs_cut.png", "cost_vs_cut.png", "frontier.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    assert (tmp_path / "report" / "samples" / "cut-0.50_samples_client0.png").is_file()
    fedavg = json.loads((tmp_path / "fedavg" / "metrics.json").read_text())
    assert fedavg["baseline"] == "fedavg" and fedavg["dp"] is None and fedavg["cut"] == 1.0
    assert fedavg["cost"]["client_total"]["bytes_up"] > 0  # the model weights crossed the wire
    assert json.loads((tmp_path / "fresh-0.20" / "metrics.json").read_text())["handoff_mode"] == "fresh"
    # c = 1 runs the whole chain on the client: it gets the split runs' total sampling steps.
    assert json.loads((tmp_path / "cut-1.00" / "config.json").read_text())["sampling"]["client_steps"] == 4

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
        sweep(load_config("smoke", FAST + ["seed=1"]), [1.0], [], tmp_path, progress=False)

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
