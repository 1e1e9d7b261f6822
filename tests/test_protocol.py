import pytest
import torch

from collafuse.core.protocol import (ClientReport, HandoffBatch, Limits, ProtocolError, SamplingHandoffs,
                                SamplingRequest, decode, encode)

LIMITS = Limits(known_clients=frozenset({0, 1}), image_shape=(1, 4, 4), level=3)


def batch(**kw):
    fields = dict(client_id=1, level=3, record_ids=torch.arange(5), views=torch.zeros(5, dtype=torch.long),
                  handoffs=torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
    fields.update(kw)
    return HandoffBatch(**fields)


def test_round_trip_of_every_message():
    for msg in (batch(), SamplingRequest(client_id=0, n=8, steps=4, sampler="ddim", seed=3),
                SamplingHandoffs(client_id=0, level=3, handoffs=torch.ones(2, 1, 4, 4)),
                ClientReport(client_id=1, metrics={"fid": 1.5, "steps": 3})):
        back = decode(encode(msg), LIMITS)
        assert type(back) is type(msg)
        for k, v in vars(msg).items():
            w = getattr(back, k)
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def test_byte_count_is_real():
    blob = encode(batch())
    # 5 handoffs of 16 float32, 2 x 5 int64 ids, plus a small header.
    assert 5 * 16 * 4 + 2 * 5 * 8 < len(blob) < 5 * 16 * 4 + 2 * 5 * 8 + 400


@pytest.mark.parametrize("msg,field", [
    (batch(client_id=7), "client_id: 7 is not a known client"),
    (batch(level=4), "level: 4 but the cut level of this run is 3"),
    (batch(handoffs=torch.zeros(5, 1, 8, 8)), r"handoffs: images of shape \(1, 8, 8\), expected \(1, 4, 4\)"),
    (batch(handoffs=torch.full((5, 1, 4, 4), float("nan"))), "handoffs: contains NaN"),
    (batch(handoffs=torch.zeros(5, 1, 4, 4, dtype=torch.float64)), "handoffs: dtype F64"),
    (batch(handoffs=torch.zeros(5, 16)), "handoffs: shape .* must have 4 dims"),
    (batch(record_ids=torch.arange(4)), r"record_ids: shape \(4,\), expected \(5,\)"),
    (batch(views=-torch.ones(5, dtype=torch.long)), "views: negative"),
    (SamplingRequest(client_id=0, n=0, steps=4, sampler="ddim", seed=0), "n: must be an integer >= 1"),
    (SamplingRequest(client_id=0, n=2, steps=4, sampler="euler", seed=0), "sampler: 'euler'"),
    (ClientReport(client_id=0, metrics={"fid": float("inf")}), r"metrics\['fid'\]: must be a finite number"),
    (ClientReport(client_id=0, metrics={"x": "text"}), r"metrics\['x'\]"),
])
def test_violations_name_the_field(msg, field):
    with pytest.raises(ProtocolError, match=field):
        decode(encode(msg), LIMITS)


def test_oversized_truncated_and_foreign_blobs():
    blob = encode(batch())
    with pytest.raises(ProtocolError, match="exceeds the limit of 100 bytes"):
        decode(blob, Limits(max_bytes=100))
    with pytest.raises(ProtocolError, match="truncated"):
        decode(blob[:4])
    with pytest.raises(ProtocolError, match="truncated"):
        decode(blob[:8] + b"{}")
    with pytest.raises(ProtocolError, match="header is not valid JSON"):
        decode(blob[:8] + b"x" * (len(blob) - 8))
    with pytest.raises(ProtocolError, match="expected bytes"):
        decode("text")
    with pytest.raises(ProtocolError, match="expected SamplingRequest, got HandoffBatch"):
        decode(blob, expect=SamplingRequest)
    with pytest.raises(ProtocolError, match="not a protocol message"):
        encode(object())


def test_smuggled_fields_are_refused():
    # A blob with an extra tensor (say, the client's noise) is not a HandoffBatch.
    from safetensors.torch import save
    b = batch()
    blob = save({"record_ids": b.record_ids, "views": b.views, "handoffs": b.handoffs, "noise": b.handoffs.clone()},
                metadata={"message": "HandoffBatch", "fields": '{"client_id": 1, "level": 3}'})
    with pytest.raises(ProtocolError, match=r"unexpected field\(s\) \['noise'\]"):
        decode(blob, LIMITS)
    blob = save({"record_ids": b.record_ids, "views": b.views},
                metadata={"message": "HandoffBatch", "fields": '{"client_id": 1, "level": 3}'})
    with pytest.raises(ProtocolError, match="handoffs: missing"):
        decode(blob, LIMITS)
    blob = save({"_": torch.zeros(0)}, metadata={"message": "Weights", "fields": "{}"})
    with pytest.raises(ProtocolError, match="unknown type 'Weights'"):
        decode(blob, LIMITS)
