"""The two roles and the in-process federation, without the measurement side."""
import pytest
import torch

from collafuse.core import protocol
from collafuse.config import load_config
from collafuse.core.protocol import ClientReport, HandoffBatch, ProtocolError, SamplingRequest
from collafuse.federation.inprocess import build, start
from collafuse.measure.evaluate import split_sample


def smoke(*overrides):
    return load_config("smoke", ["rounds=1", *overrides])


def engine(tmp_path, *overrides, capture=False):
    """The round engine over the in-process transport, and the federation it drives."""
    e, f, _ = start(smoke(*overrides), tmp_path, capture=capture, device=torch.device("cpu"))
    return e, f


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    # A real (private) noise secret: the leak test looks for it in everything that left the client.
    e, f = engine(tmp_path_factory.mktemp("leak"), "client.noise_secret=private", capture=True)
    e.run_round()
    e.run_round()
    # The sampling exchange: every kind of message a client ever sends.
    split_sample(f, f.clients[0], 4, server_steps=3, client_steps=2, sampler="ddpm", seed=0)
    f.wire.up(ClientReport(client_id=0, metrics={"fid": 1.0}), f.server.limits)
    return f


def client_messages(f):
    return [protocol.decode(blob) for direction, _, blob in f.wire.captured if direction == "up"]


def test_leak_no_message_carries_x0_noise_secret_or_labels(fed, tmp_path_factory):
    sent = client_messages(fed)
    assert {type(m) for m in sent} == {HandoffBatch, SamplingRequest, ClientReport}
    # The 256-bit secret is on the client's disk (0600) and in no message, log, metrics or checkpoint file.
    run = fed.clients[0].ledger.path.parents[2]
    for c in fed.clients:
        secret = (run / "clients" / f"client-{c.id}" / "secret.key").read_bytes()
        assert secret == c._secret and len(secret) == 32
        assert all(secret not in blob and secret.hex().encode() not in blob for _, _, blob in fed.wire.captured)
        for path in run.rglob("*"):
            if path.is_file() and path.name != "secret.key":
                data = path.read_bytes()
                assert secret not in data and secret.hex().encode() not in data, path
    for m in sent:  # requests and reports carry only scalars: no tensor at all
        if not isinstance(m, HandoffBatch):
            assert not any(isinstance(v, torch.Tensor) for v in vars(m).values())
    msgs = [m for m in sent if isinstance(m, HandoffBatch)]
    assert msgs
    ab = fed.schedule.alpha_bar[fed.cut_level].item()
    for m in msgs:
        client = fed.clients[m.client_id]
        x0 = client.images[m.record_ids]
        noise = torch.stack([client.view_noise(v)[r] for r, v in zip(m.record_ids.tolist(), m.views.tolist())])
        # Exactly the handoff of the record, and nothing else in the message.
        assert torch.allclose(m.handoffs, ab ** 0.5 * x0 + (1 - ab) ** 0.5 * noise, atol=1e-6)
        sent = [m.handoffs, m.record_ids.float(), m.views.float()]
        for secret in (x0, noise):
            for t in sent:
                if t.numel() == secret.numel():
                    assert not torch.allclose(t.reshape(secret.shape), secret, atol=1e-3)
        # The handoff alone does not give x0 back (the error is the noise term).
        assert ((m.handoffs / ab ** 0.5 - x0).abs().mean()) > 0.1
        # Canary: had the noise been sent too, x0 would come back exactly.
        recovered = (m.handoffs - (1 - ab) ** 0.5 * noise) / ab ** 0.5
        assert (recovered - x0).abs().max() < 1e-5
    # Labels never travel: no field of any message is a label vector.
    fields = {f for m in msgs for f in vars(m)}
    assert fields == {"client_id", "level", "record_ids", "views", "handoffs"}
    for m in msgs:
        labels = fed.clients[m.client_id].labels[m.record_ids]
        assert not torch.equal(m.views, labels) or labels.unique().numel() == 1


def test_once_mode_sends_each_record_views_times_over_the_run(tmp_path):
    e, f = engine(tmp_path, "handoff.views=3", "client.policy.max_views=3")
    for _ in range(3):
        e.run_round()
    for c in f.clients:
        counts = f.server.received[c.id]  # by record id; zeros past the last record
        assert counts[:c.num_records].tolist() == [3] * c.num_records and not counts[c.num_records:].any()
    assert f.server.num_handoffs() == 3 * sum(c.num_records for c in f.clients)
    handoffs_after, received = sum(f.wire.bytes_up.values()), {c: n.clone() for c, n in f.server.received.items()}
    e.run_round()
    # Nothing more is sent but each client's report and sampling request (no handoff: ~600 bytes each).
    assert all(torch.equal(f.server.received[c], n) for c, n in received.items())
    assert sum(f.wire.bytes_up.values()) - handoffs_after < 3 * 1000


def test_fresh_mode_sends_new_views_every_round(tmp_path):
    e, f = engine(tmp_path, "handoff.mode=fresh", "client.policy.modes=[\"once\",\"fresh\"]",
                  "client.policy.max_views=100")
    e.run_round()
    first = f.server.num_handoffs()
    e.run_round()  # 15 steps x 32 draws over 480 records: one new view of each record per round
    for c in f.clients:
        counts = f.server.received[c.id]
        assert counts[:c.num_records].tolist() == [2] * c.num_records and not counts[c.num_records:].any()
        assert c.ledger.summary(1e-5)["max_views"] == 2 and c.views_made == 2
    assert f.server.num_handoffs() == first  # the server trains on this round's views only


@pytest.mark.parametrize("cut,client_trains,server_trains", [(0.0, False, True), (1.0, True, False)])
def test_centralised_and_local_only_use_the_same_code_path(tmp_path, cut, client_trains, server_trains):
    e, f = engine(tmp_path, f"cut={cut}", "client.policy.min_cut=0")  # the clients consent to c = 0
    entry = e.run_round()
    assert ("client0" in entry["loss"] and entry["loss"]["client0"] is not None) == client_trains  # no levels
    assert (entry["loss"]["server"] is not None) == server_trains
    if cut == 0.0:  # the handoff is the raw image: centralised training
        assert f.server.num_handoffs() == sum(c.num_records for c in f.clients)
    else:  # local-only: no handoff is sent (nor recorded), only the report and the sampling request
        assert f.server.num_handoffs() == 0
        assert all(c.ledger.summary(1e-5)["records"] == 0 for c in f.clients)


def test_a_bad_message_changes_nothing_on_the_server(fed):
    held = fed.server.num_handoffs()
    good = fed.clients[0].make_handoffs([0], 8)[0]
    bad = HandoffBatch(client_id=0, level=good.level, record_ids=good.record_ids, views=good.views,
                       handoffs=torch.full_like(good.handoffs, float("inf")))
    with pytest.raises(ProtocolError, match="handoffs: contains NaN or infinite"):
        fed.server.ingest(fed.wire.up(bad, fed.server.limits))
    assert fed.server.num_handoffs() == held


def test_more_clients_than_records_is_refused():
    with pytest.raises(ValueError, match="client"):
        build(smoke("data.clients=700"), device=torch.device("cpu"))


def test_server_refuses_to_train_without_handoffs():
    f = build(smoke(), device=torch.device("cpu"))  # no state folder: ledgers in memory
    with pytest.raises(RuntimeError, match="holds no handoffs"):
        f.server.train(1)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset 'tiny'"):
        load_config("tiny")
    with pytest.raises(ValueError, match="unknown config key 'server.lrate'; valid keys here: .*lr"):
        load_config("smoke", ["server.lrate=1"])
    with pytest.raises(ValueError, match=r"cut must be in \[0, 1\]"):
        load_config("smoke", ["cut=1.5"])
    with pytest.raises(ValueError, match="T must be an integer >= 2"):
        load_config("smoke", ["schedule.T=1"])
    with pytest.raises(ValueError, match="expected key=value"):
        load_config("smoke", ["cut"])
    with pytest.raises(ValueError, match="handoff.mode 'twice' is unknown"):
        load_config("smoke", ["handoff.mode=twice"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config("missing.toml")


def test_sampling_weights_are_an_ema_of_the_trained_weights():
    from collafuse.core.models import EMA, Denoiser, ModelConfig
    model = Denoiser(ModelConfig(channels=(8, 16), attention=False), 8, 1)
    assert EMA(model, 0.0).model is model  # off: sample with the trained weights
    ema = EMA(model, 0.99)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # warm-up: the first update keeps 1/10 of the old weights, not 0.99
    for old, new, e in zip(before, model.parameters(), ema.model.parameters()):
        assert torch.allclose(e, 0.1 * old + 0.9 * new, atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        EMA(model, 1.0)
