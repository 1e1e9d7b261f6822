"""The disclosure, cost and DP blocks of metrics.json on tiny real runs (smoke preset, a few steps)."""
import pytest

from collafuse.config import load_config
from collafuse.federation.inprocess import run
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
    # members: 40 per client; each client's held-out records split in two: reference images and non-members
    held_out = sum(len(s.test) for s in fed.splits)
    assert d["members"] == 120 and d["reference"] + d["nonmembers"] == held_out == 80
    assert d["reference"] == sum(len(s.test) // 2 for s in fed.splits)
    reid = d["reidentification"]
    assert reid["pool"] == d["members"] + d["nonmembers"] and reid["chance"] == pytest.approx(1 / reid["pool"])
    assert set(d["distribution"]) == {"members", "nonmembers", "extractor"}
    # each family's summary is its strongest attack
    attacks = {k: d[k]["auc"] for k in ("mia_handoff_lr", "mia_server", "mia_pipeline")}
    assert d["membership"]["best"] == max(attacks, key=attacks.get)
    assert d["membership"]["auc"] == max(attacks.values())
    assert d["mia_handoff_lr"]["handoffs"] == fed.server.num_handoffs() == sum(c.num_records for c in fed.clients)
    recon = d["reconstruction"]
    assert set(recon["attacks"]) == {"mean_image", "scaled", "mmse", "server_denoiser"}
    assert recon["psnr"] == max(a["psnr"] for a in recon["attacks"].values())
    assert recon["attacks"]["mean_image"]["gain_db"] == 0.0
    for a in recon["attacks"].values():
        assert a["gain_db"] == pytest.approx(a["psnr"] - recon["attacks"]["mean_image"]["psnr"])
    assert all(50 < level <= 100 for level in recon["denoiser_levels"].values())  # a server level, above t_c
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
    assert d["reconstruction"]["psnr"] is None and d["reconstruction"]["best"] == "scaled"  # exact: infinite PSNR
    # the raw records are in the store: measured 0.79 against 39 reference images (0.97 against 600: test_attacks)
    assert d["mia_handoff_lr"]["auc"] > 0.7
    assert runs[0.0][0]["dp"]["epsilon"] is None  # unbounded: the raw record leaves the client


def test_local_only_discloses_nothing_to_the_server(runs):
    m, fed = runs[1.0]
    d = m["disclosure"]
    assert d["server_sees"] == "nothing"
    assert d["reidentification"] is None and d["mia_server"] is None and d["kview"] is None
    assert d["mia_handoff_lr"] is None and d["reconstruction"] is None
    assert d["membership"]["best"] == "mia_pipeline"  # the clients' own models can still be attacked
    assert m["dp"]["views"] == 0 and m["dp"]["epsilon"] == 0.0
    assert m["cost"]["server"]["train_flops"] == 0 and fed.server.num_handoffs() == 0


def test_dp_follows_the_clients_clip_norm(tmp_path):
    m, fed = run(load_config("smoke", FAST + ["cut=0.5", "client.policy.clip_norm=2.0", "eval.disclosure=false"]),
                 tmp_path, progress=False)
    assert all(c.clip_norm == 2.0 for c in fed.clients)
    assert m["dp"]["epsilon"] == pytest.approx(handoff_epsilon(m["dp"]["alpha_bar_cut"], clip_norm=2.0, views=1,
                                                               delta=1e-5))


def test_disclosure_off_leaves_block_empty(tmp_path):
    m, _ = run(load_config("smoke", FAST + ["cut=0.5", "eval.disclosure=false"]), tmp_path, progress=False)
    assert m["disclosure"] is None and m["cost"]["server"]["train_steps"] == 2


def test_bad_disclosure_records_is_rejected():
    with pytest.raises(ValueError, match="eval.disclosure_records"):
        load_config("smoke", ["eval.disclosure_records=0"])
