"""End to end through the CLI: the smoke preset, pinned numbers, resume, sampling and error messages."""
import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from collafuse.cli import app

cli = CliRunner()


def invoke(*args):
    return cli.invoke(app, [*args, "--quiet"] if args[0] == "run" else list(args))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    result = invoke("run", "-c", "smoke", "-o", str(out))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_smoke_run_writes_a_self_explaining_folder(smoke_run):
    out, output = smoke_run
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.json", "log.jsonl", "checkpoint",
                                               "samples_client0.png", "samples_client1.png", "samples_client2.png"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["cut"] == 0.2 and cfg["data"]["name"] == "digits"  # the fully resolved config
    assert "client 0: FID" in output and "bytes up" in output


def test_smoke_run_pinned_numbers(smoke_run):
    out, _ = smoke_run
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["round"] for e in log] == [1, 2]
    loss = log[0]["loss"]
    assert loss["server"] == pytest.approx(PINNED["server_loss_round1"], rel=1e-3)
    assert loss["client0"] == pytest.approx(PINNED["client0_loss_round1"], rel=1e-3)
    m = json.loads((out / "metrics.json").read_text())
    assert m["cut_level"] == 20 and m["T"] == 100 and m["rounds"] == 2
    # Up: the clients' reports carry their timings, whose digits vary by a few bytes from run to run.
    assert abs(m["bytes_up"] - PINNED["bytes_up"]) <= 32 and m["bytes_down"] == PINNED["bytes_down"]
    for cid, client in m["clients"].items():
        assert client["n_train"] == PINNED["n_train"][int(cid)]
        assert client["fid"] == pytest.approx(PINNED["fid"][int(cid)], rel=0.05)
        assert 0.0 <= client["own_class_share"] <= 1.0


# Seeded smoke run on 1 thread (tests/conftest.py); thread counts move only the last digits. The handoff noise
# is the PRF of the smoke preset's pinned test secret; bytes down include each round's RoundRequest (280 bytes).
PINNED = {"server_loss_round1": 0.510273, "client0_loss_round1": 0.994063, "bytes_up": 136688,
          "bytes_down": 26928, "n_train": [162, 192, 126], "fid": [1.0277, 1.6709, 1.9660]}


def test_resume_equals_an_uninterrupted_run(smoke_run, tmp_path):
    full, _ = smoke_run
    part = tmp_path / "part"
    assert invoke("run", "-c", "smoke", "--set", "rounds=1", "-o", str(part)).exit_code == 0
    result = invoke("run", "--resume", "--set", "rounds=2", "-o", str(part))
    assert result.exit_code == 0, result.output
    for name in ["server", "client-0", "client-1", "client-2"]:
        a = load_file(str(full / "checkpoint" / f"{name}.safetensors"))
        b = load_file(str(part / "checkpoint" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, part))
    for cid in ma["clients"]:
        for key in ("fid", "kid_mean", "own_class_share", "bytes_down", "epsilon", "views_released"):
            assert ma["clients"][cid][key] == mb["clients"][cid][key], (cid, key)
        # The same messages; only the digits of the timings in the reports differ by a few bytes.
        assert abs(ma["clients"][cid]["bytes_up"] - mb["clients"][cid]["bytes_up"]) <= 16
    log = [json.loads(line)["round"] for line in (part / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2]


def test_sample_command(smoke_run, tmp_path):
    out, _ = smoke_run
    result = invoke("sample", "--run", str(out), "--client", "1", "--n", "4", "--steps", "3",
                    "--out", str(tmp_path / "s.png"))
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    assert info["n"] == 4 and (tmp_path / "s.png").stat().st_size > 0 and info["bytes_down"] > 4 * 64 * 4
    bad = invoke("sample", "--run", str(out), "--client", "9", "--n", "4")
    assert bad.exit_code == 2 and "--client 9 does not exist; this run has clients 0..2" in bad.output


@pytest.mark.parametrize("args,message", [
    (["run", "-c", "nope"], "unknown preset 'nope'"),
    (["run", "-c", "smoke", "--set", "cut=2"], "cut must be in [0, 1]"),
    (["run", "-c", "smoke", "--set", "bogus=1"], "unknown config key 'bogus'"),
    (["run", "--resume"], "--resume needs --out"),
    (["run", "--resume", "-o", "/nonexistent/run"], "does not exist"),
    (["sample", "--run", "/nonexistent/run", "--client", "0"], "does not exist"),
    (["ledger", "--client-state", "/nonexistent/state"], "must be a client's state folder"),
    (["run", "-c", "smoke", "--set", "client.policy.max_views=0"], "client.policy: privacy policy max_views = 0"),
    (["run", "-c", "smoke", "--set", "client.noise_secret=weak"], "pinned-for-tests makes the noise guessable"),
])
def test_cli_errors_are_clear(args, message):
    result = invoke(*args)
    assert result.exit_code == 2 and message in result.output


def test_existing_run_is_not_overwritten(smoke_run):
    out, _ = smoke_run
    before = (out / "metrics.json").read_text()
    result = invoke("run", "-c", "smoke", "-o", str(out))
    assert result.exit_code == 2 and "already holds a run; pass --resume" in result.output
    assert (out / "metrics.json").read_text() == before


def test_resume_with_a_changed_config_is_refused(smoke_run):
    out, _ = smoke_run
    result = invoke("run", "-c", "smoke", "--set", "cut=0.5", "--resume", "-o", str(out))
    assert result.exit_code == 2 and "config differs in ['cut']" in result.output
