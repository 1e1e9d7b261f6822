"""The disclosure, cost and DP blocks of metrics.json on tiny real runs (smoke preset, a few steps)."""
import math

import pytest
import torch

from collafuse.config import load_config
from collafuse.federation.inprocess import run
from collafuse.measure.blocks import _mia
from collafuse.measure.cost import client_step_flops
from collafuse.roles.privacy import handoff_epsilon

FAST = ["rounds=1", "server.steps_per_round=2", "client.steps_per_round=2", "sampling.n=8",
        "sampling.server_steps=2", "sampling.client_steps=2", "eval.classifier_epochs=1",
        "eval.disclosure_records=40", "data.max_records=400", "eval.mia_draws=1",
        "client.policy.min_cut=0"]  # the clients consent to every cut measured here, c = 0 included


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("measure")
    return {c: run(load_config("smoke", FAST + [f"cut={c}"]), root / f"c{c}", progress=False) for c in (0.0, 0.5, 1.0)}


def test_blocks_present_with_sane_values(runs):
    m, fed = runs[0.5]
    d = m["disclosure"]
    assert d["server_sees"] == "handoffs" and d["cut_level"] == 50
    assert d["members"] == 120 and d["nonmembers"] == 80  # members: 40 per client; non-members: capped by the held-out splits
    reid = d["reidentification"]
    assert reid["pool"] == d["members"] + d["nonmembers"] and reid["chance"] == pytest.approx(1 / reid["pool"])
    assert 0.0 <= reid["members"] <= 1.0 and 0.0 <= reid["nonmembers"] <= 1.0
    for key in ("mia_server", "mia_pipeline"):
        assert 0.0 <= d[key]["auc"] <= 1.0
    assert set(d["distribution"]) == {"members", "nonmembers", "extractor"}
    assert d["reconstruction"]["members"]["psnr"] == max(d["reconstruction"]["members"]["psnr_scaled"],
                                                          d["reconstruction"]["members"]["psnr_denoiser"])
    assert [p["k"] for p in d["kview"]["held"]] == [1]  # once, views=1: the server holds one view per record
    cost = m["cost"]  # each client counts its own compute and reports it; the server counts its own
    per_step = {c.id: client_step_flops(c, 8) for c in fed.clients}
    for cid, c in cost["clients"].items():
        assert c["train_flops"] == per_step[int(cid)][0] * c["train_steps"] > 0
        assert c["sample_flops"] == per_step[int(cid)][1] * 2 > 0
        assert c["train_steps"] == 2 and c["bytes_up"] == fed.wire.bytes_up[int(cid)] > 0
    s = cost["server"]
    assert s["train_flops"] == s["train_flops_per_step"] * 2 and s["sample_steps"] == 2 * 3
    assert cost["bytes_up"] == m["bytes_up"]
    dp = m["dp"]  # from the clients' ledgers: one view of each record, records bounded by their value range
    assert dp["views"] == 1 and dp["delta"] == 1e-5
    assert dp["epsilon"] == pytest.approx(handoff_epsilon(dp["alpha_bar_cut"], clip_norm=8.0, views=1, delta=1e-5))
    for cid, c in dp["clients"].items():
        assert c["records_released"] == c["views_released"] == m["clients"][cid]["n_train"]


def test_raw_data_at_c0_is_fully_reidentified(runs):
    d = runs[0.0][0]["disclosure"]
    assert d["reidentification"]["members"] == 1.0 and d["reidentification"]["nonmembers"] == 1.0
    assert d["reconstruction"]["members"]["psnr"] is None  # exact recovery: infinite PSNR
    assert runs[0.0][0]["dp"]["epsilon"] is None  # unbounded: the raw record leaves the client


def test_local_only_discloses_nothing_to_the_server(runs):
    m, fed = runs[1.0]
    d = m["disclosure"]
    assert d["server_sees"] == "nothing"
    assert d["reidentification"] is None and d["mia_server"] is None and d["kview"] is None
    assert 0.0 <= d["mia_pipeline"]["auc"] <= 1.0  # the clients' own models can still be attacked
    assert m["dp"]["views"] == 0 and m["dp"]["epsilon"] == 0.0
    assert m["cost"]["server"]["train_flops"] == 0 and fed.server.num_handoffs() == 0


def test_dp_follows_the_clients_clip_norm(tmp_path):
    m, fed = run(load_config("smoke", FAST + ["cut=0.5", "client.policy.clip_norm=2.0", "eval.disclosure=false"]),
                 tmp_path, progress=False)
    assert all(c.clip_norm == 2.0 for c in fed.clients)
    assert m["dp"]["epsilon"] == pytest.approx(handoff_epsilon(m["dp"]["alpha_bar_cut"], clip_norm=2.0, views=1,
                                                               delta=1e-5))


def test_mia_threshold_is_set_on_calibration_nonmembers_only():
    members = torch.linspace(0, 1, 50)
    nonmembers = torch.linspace(-1, 0.5, 300)
    base = _mia(members, nonmembers, torch.Generator().manual_seed(0))
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    shifted = nonmembers.clone()
    shifted[perm[150:]] += 1000.0  # the evaluated half: its values must not move the threshold
    moved = _mia(members, shifted, torch.Generator().manual_seed(0))
    assert base["calibration_nonmembers"] == moved["calibration_nonmembers"] == 150
    assert moved["threshold"] == base["threshold"]
    assert moved["fpr_at_threshold"] == 1.0 and moved["auc"] == 0.0


def test_mia_without_enough_calibration_reports_auc_only():
    out = _mia(torch.ones(10), torch.zeros(20), torch.Generator().manual_seed(0))
    assert out["auc"] == 1.0 and out["tpr_at_1pct_fpr"] is None and "calibration" in out["note"]


def test_disclosure_off_leaves_block_empty(tmp_path):
    m, _ = run(load_config("smoke", FAST + ["cut=0.5", "eval.disclosure=false"]), tmp_path, progress=False)
    assert m["disclosure"] is None and m["cost"]["server"]["train_steps"] == 2


def test_bad_disclosure_records_is_rejected():
    with pytest.raises(ValueError, match="eval.disclosure_records"):
        load_config("smoke", ["eval.disclosure_records=0"])
