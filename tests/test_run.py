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
    import gc
    out, output = smoke_run
    assert gc.get_freeze_count() == 0  # the run froze its long-lived objects only while it ran
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.json", "log.jsonl", "checkpoint",
                                               "samples_client0.png", "samples_client1.png", "samples_client2.png"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["cut"] == 0.2 and cfg["data"]["name"] == "digits"  # the fully resolved config
    assert "client 2: FID" in output and "bytes up" in output
    assert "client 0: samples are indistinguishable from noise (KID score 0.00" in output  # said, not hidden


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
        # samples of 32 in the client's own classes: the classifier's verdicts, so exact
        assert client["own_class_share"] == PINNED["own_class_share"][int(cid)]
        assert client["kid_score"] == pytest.approx(PINNED["kid_score"][int(cid)], abs=0.02)
        # two tiny rounds (min-SNR weighs the noisiest levels down) leave clients 0 and 1 scoring like noise by KID
        assert client["failed"] is PINNED["failed"][int(cid)]


# Seeded smoke run on 1 thread (tests/conftest.py), v-prediction and min-SNR on both sides (the defaults); thread
# counts move only the last digits. The handoff noise is the PRF of the smoke preset's pinned test secret; bytes
# down include each round's RoundRequest (280 bytes); bytes up include each client's sampling report with its
# quality floor and ceiling.
PINNED = {"server_loss_round1": 0.137963, "client0_loss_round1": 0.421382, "bytes_up": 137512,
          "bytes_down": 26928, "n_train": [162, 192, 126], "fid": [2.5683, 2.1070, 2.4094],
          "own_class_share": [28 / 32, 12 / 32, 24 / 32], "kid_score": [0.0, 0.0, 0.223],
          "failed": [True, True, False]}


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


# A tiny run whose client 1 holds out one image (6 + 1 of 40 digits, Dirichlet over 4 clients).
TINY = ["rounds=1", "server.steps_per_round=2", "client.steps_per_round=2", "sampling.n=8", "sampling.server_steps=2",
        "sampling.client_steps=2", "eval.classifier_epochs=1", "eval.disclosure=false", "data.max_records=40",
        "data.clients=4"]


def test_a_client_too_small_to_measure_and_evaluate_again(tmp_path):
    out = tmp_path / "tiny"
    with pytest.warns(UserWarning, match="client 1 holds out 1 of its 7 records"):
        result = invoke("run", "-c", "smoke", *(a for o in TINY for a in ("--set", o)), "-o", str(out))
    assert result.exit_code == 0, result.output
    first = json.loads((out / "metrics.json").read_text())
    one = first["clients"]["1"]
    assert one["n_test"] == 1 and one["fid"] is None and one["kid_mean"] is None and one["kid_score"] is None
    # Two training steps make noise: with no FID/KID, the classifier's share against pure noise's says so.
    assert one["failed"] is True and one["own_class_share"] == 0.0
    assert one["own_class_share_noise"] == 0.125  # the classifier puts 1 of 8 noise images in client 1's classes
    note = "1 held-out image: FID/KID need >= 2; raise data.max_records or data.test_fraction"
    assert one["quality_note"] == ("samples are indistinguishable from noise (own class share 0.00, pure noise "
                                   f"0.12); {note}")
    assert f"client 1: {one['quality_note']}" in result.output.splitlines()
    assert all(first["clients"][c]["fid_score"] is not None for c in "023")
    # Only the evaluation again, from the checkpoint: the same samples, so the same numbers.
    with pytest.warns(UserWarning, match="client 1 holds out 1 of its 7 records"):
        again = invoke("evaluate", "--run", str(out), "-q")
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[1:5] == result.output.splitlines()[1:5]  # the clients' lines
    second = json.loads((out / "metrics.json").read_text())
    for cid, m in first["clients"].items():
        for key in ("fid", "kid_mean", "kid_noise", "kid_ceiling", "kid_score", "fid_score", "own_class_share",
                    "own_class_share_noise", "failed", "quality_note", "train_seconds"):
            assert second["clients"][cid][key] == m[key], (cid, key)
    assert [json.loads(line)["round"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]
    report = invoke("report", str(out), "--out", str(tmp_path / "report"))  # a null KID is a gap, not an error
    assert report.exit_code == 0, report.output
    row = next(line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
               if line.startswith("| tiny | ") and line.endswith("(0, 1, 2, 3) |"))
    assert row.split(" | ")[2] == "–"  # client 1's KID


def test_evaluate_names_what_it_cannot_evaluate(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "progress.json").write_text('{"round": 1}')  # what a FedAvg baseline leaves
    result = invoke("evaluate", "--run", str(tmp_path))
    assert result.exit_code == 2 and "holds a FedAvg baseline, which is measured as it finishes" in result.output


@pytest.mark.parametrize("args,message", [
    (["run", "-c", "nope"], "unknown preset 'nope'"),
    (["run", "-c", "smoke", "--set", "cut=2"], "cut must be in [0, 1]"),
    (["run", "-c", "smoke", "--set", "bogus=1"], "unknown config key 'bogus'"),
    (["run", "--resume"], "--resume needs --out"),
    (["run", "--resume", "-o", "/nonexistent/run"], "does not exist"),
    (["sample", "--run", "/nonexistent/run", "--client", "0"], "does not exist"),
    (["evaluate", "--run", "/nonexistent/run"], "has no checkpoint to evaluate; train the run first"),
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
