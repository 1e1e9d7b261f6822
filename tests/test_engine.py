"""The round engine in process: the client's policy refuses what it does not allow, a poisoning client is
rejected every round, the noise secret is not in the config. (Flower's side: tests/test_flower_app.py.)"""
import dataclasses
import json
import re

import pytest
import torch

from collafuse.config import load_config
from collafuse.core import protocol
from collafuse.core.protocol import HandoffBatch, Refusal
from collafuse.federation.engine import serve_round
from collafuse.federation.inprocess import run, start

FAST = ["rounds=2", "eval.disclosure=false", "eval.classifier_epochs=1"]


def sent_by_clients(fed) -> list:
    return [protocol.decode(blob) for direction, _, blob in fed.wire.captured if direction == "up"]


@pytest.mark.parametrize("overrides,reason", [
    (["client.policy.min_cut=0.4"], "cut level 20 of T=100 .*below this client's min_cut=0.4"),
    (["handoff.mode=fresh"], "mode 'fresh'"),
    (["handoff.views=3"], "max_views=1"),
    (["client.policy.epsilon=100"], "epsilon"),  # one view at c = 0.2 costs about 350
])
def test_a_request_outside_the_clients_policy_is_refused_and_nothing_leaves(tmp_path, overrides, reason):
    engine, fed, _ = start(load_config("smoke", FAST + overrides), tmp_path, capture=True)
    engine.run_rounds()
    sent = sent_by_clients(fed)
    assert sent and all(isinstance(m, Refusal) for m in sent)  # no handoff, no report, no sampling request
    assert all(c.steps_done == 0 for c in fed.clients)  # a refused round costs the client nothing
    assert fed.server.num_handoffs() == 0
    for entry in engine.log:
        assert entry["replied"] == [] and sorted(entry["refused"]) == ["0", "1", "2"]
        assert all(re.search(reason, r) for r in entry["refused"].values()), entry["refused"]
        assert entry["loss"]["server"] is None  # nothing to train on
    assert all(c.ledger.summary(1e-5)["entries"] == 0 for c in fed.clients)


def test_a_budget_the_release_fits_in_is_spent_and_then_refused(tmp_path):
    # One view at c = 0.2 costs about 350; a budget of 400 allows it once, not a second view.
    engine, fed, _ = start(load_config("smoke", FAST + ["client.policy.epsilon=400", "client.policy.max_views=5",
                                                        "handoff.views=2"]), tmp_path, capture=True)
    engine.run_round()
    assert all(isinstance(m, Refusal) for m in sent_by_clients(fed))  # two views at once: over budget
    cfg = load_config("smoke", FAST + ["client.policy.epsilon=400", "client.policy.max_views=5"])
    engine, fed, _ = start(cfg, tmp_path / "one-view", capture=True)
    engine.run_round()
    assert engine.log[0]["replied"] == [0, 1, 2]
    assert all(300 < c.released()["epsilon"] <= 400 for c in fed.clients)
    # The budget is spent: a further view (asked in any later round or run) is refused, nothing is sent.
    request = dataclasses.replace(engine.request(0), first_view=1, n_views=1)
    reply = fed.clients[0].answer(request, handoff_batch=512, sampling=None)
    assert len(reply) == 1 and isinstance(reply[0], Refusal) and "epsilon" in reply[0].reason


def test_a_poisoning_client_is_rejected_every_round_and_the_others_train_as_usual(tmp_path):
    clean, _ = run(load_config("smoke", FAST), tmp_path / "clean", progress=False)
    engine, fed, transport = start(load_config("smoke", FAST), tmp_path / "poisoned")
    fed.clients[0].images = fed.clients[0].images * 1e30  # finite, and far beyond what a handoff can be
    engine.run_rounds()
    for entry in engine.log:
        assert entry["replied"] == [1, 2] and "handoff_bound" in entry["dropped"]["0"]
    assert fed.server.num_handoffs(0) == 0 and fed.server.num_handoffs() == 192 + 126
    tensors, _ = fed.server.state()
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    from collafuse.measure.evaluate import client_evaluations
    transport.evaluations = client_evaluations(fed)
    engine.sample()
    poisoned = engine.metrics()
    assert sorted(poisoned["clients"]) == ["1", "2"]
    for cid in ("1", "2"):  # within the run-to-run spread of the smoke preset's FID (about +-30%)
        assert poisoned["clients"][cid]["fid"] == pytest.approx(clean["clients"][cid]["fid"], rel=0.3)


def test_the_noise_secret_is_the_clients_not_the_configs(tmp_path):
    """Two runs of one config: private secrets give other handoffs (nothing in config.json derives them)."""
    handoffs = []
    for name in ("a", "b"):
        engine, fed, _ = start(load_config("smoke", ["rounds=1", "client.noise_secret=private"]), tmp_path / name,
                               capture=True)
        engine.run_round()
        handoffs.append(torch.cat([m.handoffs for m in sent_by_clients(fed) if isinstance(m, HandoffBatch)]))
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["client"]["noise_secret"] == "private" and "secret" not in json.dumps(saved).replace(
            "noise_secret", "")
    assert handoffs[0].shape == handoffs[1].shape and not torch.allclose(handoffs[0], handoffs[1])
    with pytest.raises(ValueError, match="pinned-for-tests makes the noise guessable"):
        load_config("smoke", ["client.noise_secret=seed"])


def test_a_client_declares_its_records_once_and_within_bounds(tmp_path):
    """The record count bounds a client's store: missing, too large or changed later, the reply is rejected."""
    engine, fed, _ = start(load_config("smoke", ["rounds=1", "server.max_records_per_client=170"]), tmp_path)
    request = engine.request(0)
    blobs = [protocol.decode(b) for b in serve_round(fed.clients[0], fed.cfg, protocol.encode(request))]

    def reply(**metrics):
        report = dataclasses.replace(blobs[0], metrics={**blobs[0].metrics, **metrics})
        return [protocol.encode(m) for m in (report, *blobs[1:])]
    without = dataclasses.replace(blobs[0], metrics={k: v for k, v in blobs[0].metrics.items() if k != "n_train"})
    with pytest.raises(protocol.ProtocolError, match="ClientReport.n_train: missing"):
        engine.take_round_reply(0, request, [protocol.encode(m) for m in (without, *blobs[1:])])
    with pytest.raises(protocol.ProtocolError, match="n_train: 171 records exceed server.max_records_per_client"):
        engine.take_round_reply(0, request, reply(n_train=171))
    with pytest.raises(protocol.ProtocolError, match="record_ids: 161 out of range"):
        engine.take_round_reply(0, request, reply(n_train=161))  # fewer than it sends
    assert engine.server.num_handoffs() == 0
    engine.take_round_reply(0, request, reply())  # 162, as it holds
    with pytest.raises(protocol.ProtocolError, match="n_train: 170, but client 0 declared 162 records before"):
        engine.take_round_reply(0, request, reply(n_train=170))
