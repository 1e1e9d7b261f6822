import json
import math
import time

import pytest
import torch
from safetensors.torch import save

from collafuse.core.protocol import (MAX_HEADER_BYTES, REPORT_KEYS, ClientReport, HandoffBatch, Limits, ProtocolError,
                                     Refusal, RoundRequest, SamplingHandoffs, SamplingRequest, decode, encode,
                                     handoff_bound)

LIMITS = Limits(known_clients=frozenset({0, 1}), image_shape=(1, 4, 4), level=3)


def batch(**kw):
    fields = dict(client_id=1, level=3, record_ids=torch.arange(5), views=torch.zeros(5, dtype=torch.long),
                  handoffs=torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
    fields.update(kw)
    return HandoffBatch(**fields)


def test_round_trip_of_every_message():
    for msg in (batch(), SamplingRequest(client_id=0, n=8, steps=4, sampler="ddim", seed=3),
                SamplingHandoffs(client_id=0, level=3, handoffs=torch.ones(2, 1, 4, 4)),
                ClientReport(client_id=1, metrics={"fid": 1.5, "steps_done": 3})):
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


# ---------------------------------------------------------------- hostile input: every limit names its field
STRICT = Limits(known_clients=frozenset({0, 1}), image_shape=(1, 4, 4), level=3, max_samples=256, max_steps=100,
                max_records=10, max_views=2, handoff_bound=handoff_bound(0.5))


def request(**kw):
    fields = dict(client_id=0, n=8, steps=4, sampler="ddim", seed=3)
    fields.update(kw)
    return SamplingRequest(**fields)


def round_request(**kw):
    fields = dict(client_id=1, run="run0", round=0, level=3, mode="once", first_view=0, n_views=1, steps=10)
    fields.update(kw)
    return RoundRequest(**fields)


def crafted(message: str, fields, tensors=None) -> bytes:
    """A blob with the given scalar-fields text (or object) that encode would never write."""
    text = fields if isinstance(fields, str) else json.dumps(fields)
    return save(tensors or {"_": torch.zeros(0)}, metadata={"message": message, "fields": text})


def raw(header, data: bytes = b"") -> bytes:
    """A blob with exactly this header (an object, or JSON text) and payload."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(text).to_bytes(8, "little") + text + data


MARKER = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}


def meta(message="SamplingRequest", **fields):
    return {"message": message, "fields": json.dumps({**dict(client_id=0, n=8, steps=4, sampler="ddim", seed=3),
                                                      **fields})}


@pytest.mark.parametrize("msg,field", [
    (request(seed=2**63), r"SamplingRequest.seed: must be an integer >= 0 and < 9223372036854775808 "
                          r"\(torch.manual_seed's limit\), got 9223372036854775808"),
    (request(seed=2**70), r"SamplingRequest.seed: .* got 1180591620717411303424"),
    (request(seed=-1), "SamplingRequest.seed: must be an integer >= 0"),
    (request(n=257), "SamplingRequest.n: 257 exceeds max_samples 256"),
    (request(steps=101), "SamplingRequest.steps: 101 exceeds max_steps 100"),
    (request(client_id=True), "SamplingRequest.client_id: must be an integer"),
    (round_request(steps=101), "RoundRequest.steps: 101 exceeds max_steps 100"),
    (round_request(round=2**31), "RoundRequest.round: must be an integer >= 0 and < 2147483648"),
    (round_request(first_view=-1), "RoundRequest.first_view: must be an integer >= 0"),
    (round_request(n_views=False), "RoundRequest.n_views: must be an integer"),
    (round_request(run="../x"), "RoundRequest.run: must be 1-64 letters or digits"),
    (batch(record_ids=torch.arange(5) + 6), "HandoffBatch.record_ids: 10 out of range; values must be < max_records"),
    (batch(views=torch.full((5,), 2)), "HandoffBatch.views: 2 out of range; values must be < max_views = 2"),
    (batch(record_ids=torch.tensor([0, 1, 2, 1, 4])), "HandoffBatch.record_ids: duplicate ids"),
    (batch(record_ids=torch.tensor([0, 1, 2, 3, -2**63])), "HandoffBatch.record_ids: negative values"),
    (ClientReport(client_id=0, metrics={"fid": 1.0, "steps": 3}), r"ClientReport.metrics\['steps'\]: unknown key; "
                                                                  r"a report carries only n_train, n_test"),
    (ClientReport(client_id=0, metrics={"n_train": 12.5}), r"metrics\['n_train'\]: must be an integer >= 0"),
    (ClientReport(client_id=0, metrics={"n_train": -1}), r"metrics\['n_train'\]: must be an integer >= 0"),
    (ClientReport(client_id=0, metrics={"params": True}), r"metrics\['params'\]: must be an integer"),
    (ClientReport(client_id=0, metrics={"loss": 10**400}), r"metrics\['loss'\]: must be a finite number"),
    (ClientReport(client_id=0, metrics={"loss": float("nan")}), r"metrics\['loss'\]: must be a finite number"),
    (ClientReport(client_id=0, metrics={"loss": "1.0"}), r"metrics\['loss'\]: must be a finite number"),
])
def test_every_limit_names_its_field(msg, field):
    with pytest.raises(ProtocolError, match=field):
        decode(encode(msg), STRICT)


def test_values_at_the_limits_pass():
    for msg in (request(seed=2**63 - 1, n=256, steps=100), round_request(steps=100, round=2**31 - 1),
                batch(record_ids=torch.arange(5) + 5, views=torch.ones(5, dtype=torch.long)),
                ClientReport(client_id=0, metrics={**{k: 0 for k in REPORT_KEYS}, "loss": 2, "fid": -0.0}),
                Refusal(client_id=1, reason="x" * 2000)):
        decode(encode(msg), STRICT)


def test_new_limits_default_to_unchecked():
    # Existing callers build Limits without the new fields: nothing new refuses their messages.
    decode(encode(request(n=10_000, steps=5000, seed=2**63 - 1)), LIMITS)
    decode(encode(batch(record_ids=torch.arange(5) + 10**9, views=torch.full((5,), 99),
                        handoffs=torch.full((5, 1, 4, 4), 1e6))), LIMITS)


def test_int_report_keys_refuse_floats_but_encode_sends_whole_counts_as_ints():
    with pytest.raises(ProtocolError, match=r"metrics\['kid_subset_size'\]: must be an integer >= 0 \(a count\), "
                                            r"got 50.0"):
        decode(crafted("ClientReport", '{"client_id": 0, "metrics": {"kid_subset_size": 50.0}}'))
    # evaluate.py reports float(v) for every quality number: the count still travels as the integer it is.
    back = decode(encode(ClientReport(client_id=0, metrics={"kid_subset_size": 50.0, "fid": 3.0})))
    assert back.metrics == {"kid_subset_size": 50, "fid": 3.0} and type(back.metrics["kid_subset_size"]) is int
    assert type(back.metrics["fid"]) is float


def test_report_schema_and_size():
    # The schema grows with what clients report (delta joined with the privacy ledger); these must stay as typed.
    assert set(REPORT_KEYS.values()) <= {int, float}
    assert {k for k, t in REPORT_KEYS.items() if t is int} >= {
        "n_train", "n_test", "views_made", "steps_done", "n_samples", "n_reference", "kid_subset_size", "params",
        "records_released", "views_released"}
    assert {k for k, t in REPORT_KEYS.items() if t is float} >= {
        "loss", "train_seconds", "sample_seconds", "fid", "kid_mean", "kid_std", "own_class_share",
        "own_client_share", "epsilon", "train_flops", "sample_flops"}
    too_many = {f"k{i}": 1.0 for i in range(len(REPORT_KEYS) + 1)}
    with pytest.raises(ProtocolError, match=f"ClientReport.metrics: {len(REPORT_KEYS) + 1} keys, a report carries "
                                            f"at most {len(REPORT_KEYS)}"):
        decode(encode(ClientReport(client_id=0, metrics=too_many)))
    with pytest.raises(ProtocolError, match="ClientReport.metrics: missing"):
        decode(crafted("ClientReport", {"client_id": 0}))
    with pytest.raises(ProtocolError, match="ClientReport.client_id: missing"):
        decode(crafted("ClientReport", {"metrics": {}}))


@pytest.mark.parametrize("fields,error", [
    ({"client_id": 1.0, "n": 8, "steps": 4, "sampler": "ddim", "seed": 3}, "client_id: must be an integer"),
    ({"client_id": 0, "n": 8.0, "steps": 4, "sampler": "ddim", "seed": 3}, "n: must be an integer >= 1"),
    ({"client_id": 0, "n": 8, "steps": 4, "sampler": "ddim", "seed": 3.0}, "seed: must be an integer"),
    ({"client_id": 0, "n": 8, "steps": 4, "sampler": "ddim", "seed": 1e30}, "seed: must be an integer"),
    ({"client_id": 0, "n": 8, "steps": None, "sampler": "ddim", "seed": 3}, "steps: must be an integer"),
    ({"client_id": 0, "n": 8, "steps": 4, "sampler": ["ddim"], "seed": 3}, "SamplingRequest.sampler: a list where"),
    ({"client_id": 0, "n": {"a": 1}, "steps": 4, "sampler": "ddim", "seed": 3}, "SamplingRequest.n: an object where"),
    ('{"client_id": 0, "n": 8, "steps": 4, "sampler": "ddim", "seed": NaN}', "seed: must be an integer"),
    ('{"client_id": 0, "n": 8, "n": 9, "steps": 4, "sampler": "ddim", "seed": 3}',
     r"SamplingRequest.n: given twice in the scalar fields"),
    ({"client_id": 0, "n": 8, "steps": 4, "sampler": "ddim", "seed": 3, "noise": 1},
     r"unexpected field\(s\) \['noise'\]"),
    ({"client_id": 0, "n": 8, "steps": 4, "sampler": "ddim"}, "SamplingRequest.seed: missing"),
    ("[1, 2]", "SamplingRequest: scalar fields must be a JSON object, got a list"),
    ("7", "SamplingRequest: scalar fields must be a JSON object, got a number"),
    ('{"a": {"b": {"c": 1}}}', "SamplingRequest.a: an object where a number or text is expected"),
    ('{"a": {"b": {"c": {"d": 1}}}}', "SamplingRequest: scalar fields nest deeper than 3 levels"),
    ("{" * 50_000, "SamplingRequest: scalar fields nest deeper"),
    ('{"client_id" 0}', "SamplingRequest: scalar fields is not valid JSON"),
])
def test_crafted_scalar_fields(fields, error):
    with pytest.raises(ProtocolError, match=error):
        decode(crafted("SamplingRequest", fields), STRICT)


def test_fields_and_tensors_cannot_swap_places():
    b = batch()
    tensors = {"record_ids": b.record_ids, "views": b.views, "handoffs": b.handoffs}
    with pytest.raises(ProtocolError, match="HandoffBatch.handoffs: sent as a scalar field, but it is a tensor"):
        decode(crafted("HandoffBatch", {"client_id": 1, "level": 3, "handoffs": 1}, tensors), STRICT)
    with pytest.raises(ProtocolError, match="HandoffBatch.level: sent as a tensor, but it is a scalar field"):
        decode(crafted("HandoffBatch", {"client_id": 1}, {**tensors, "level": torch.tensor([3])}), STRICT)
    with pytest.raises(ProtocolError, match="SamplingRequest.metrics: an object where a number or text is expected"):
        decode(crafted("SamplingRequest", {"client_id": 0, "metrics": {}}), STRICT)
    # A ClientReport's metrics are the only nested value, and they are flat.
    with pytest.raises(ProtocolError, match=r"metrics\['fid'\]: must be a finite number"):
        decode(crafted("ClientReport", {"client_id": 0, "metrics": {"fid": [1.0]}}))


@pytest.mark.parametrize("header,error", [
    ([], "header must be a JSON object of tensor entries, got a list"),
    (7, "header must be a JSON object of tensor entries, got a number"),
    ('"x"', "got a text"),
    ({"__metadata__": []}, "__metadata__ must be an object of texts, got a list"),
    ({"__metadata__": {"message": 5}}, r"__metadata__\['message'\] must be a text, got a number"),
    ({"__metadata__": {"message": "SamplingRequest", "fields": {"client_id": 0}}},
     r"__metadata__\['fields'\] must be a text, got an object"),
    ({"__metadata__": {**meta(), "format": "pt"}}, "__metadata__ carries only 'message' and 'fields', not 'format'"),
    ({"__metadata__": meta(), "_": []}, "SamplingRequest._: a tensor entry must be an object"),
    ({"__metadata__": meta(), "_": 5}, "SamplingRequest._: a tensor entry must be an object"),
    ({"__metadata__": meta(), "_": {**MARKER, "extra": 1}}, "SamplingRequest._: a tensor entry must be an object of "
                                                           "exactly dtype, shape and data_offsets"),
    ({"__metadata__": meta(), "_": {**MARKER, "dtype": "BF16"}}, "SamplingRequest._: dtype BF16 where torch.float32"),
    ({"__metadata__": meta(), "_": {**MARKER, "dtype": ["F32"]}}, r"SamplingRequest._: dtype \['F32'\] where"),
    ({"__metadata__": meta(), "_": {**MARKER, "shape": [0.0]}}, r"_: shape \[0.0\] must be a list of sizes"),
    ({"__metadata__": meta(), "_": {**MARKER, "shape": [-1]}}, r"_: shape \[-1\] must be a list of sizes"),
    ({"__metadata__": meta(), "_": {**MARKER, "shape": "0"}}, r"_: shape '0' must be a list of sizes"),
    ({"__metadata__": meta(), "_": {**MARKER, "shape": [True]}}, r"_: shape \[True\] must be a list of sizes"),
    ({"__metadata__": meta(), "_": {**MARKER, "data_offsets": [1, 0]}}, r"_: data_offsets \[1, 0\] must be"),
    ({"__metadata__": meta(), "_": {**MARKER, "data_offsets": [0, 2**64]}}, "_: data_offsets .* within the 0-byte"),
    ({"__metadata__": meta(), "_": {**MARKER, "data_offsets": [0]}}, r"_: data_offsets \[0\] must be"),
    ({"__metadata__": meta(), "_": {**MARKER, "data_offsets": None}}, "_: data_offsets None must be"),
    ({"__metadata__": meta(), "_": {**MARKER, "data_offsets": [0.0, 0]}}, "_: data_offsets .* must be"),
    ({"__metadata__": meta(message=None)}, r"__metadata__\['message'\] must be a text, got null"),
    ({"_": MARKER}, "unknown type None"),
    ({"__metadata__": meta(message="Weights")}, "unknown type 'Weights'"),
    ('{"__metadata__": {"message": "SamplingRequest"}, "__metadata__": {}}',
     r"message.__metadata__: given twice in the header"),
    ("[" * 100_000 + "]" * 100_000, "header of 200000 bytes exceeds the limit of 65536 bytes"),
    ("[" * 30_000 + "]" * 30_000, "header nest deeper than 3 levels"),
    ('{"__metadata__": {"a": [[[1]]]}}', "header nest deeper than 3 levels"),
    ({"__metadata__": meta(), "_": {**MARKER, "data_offsets": [0, 1e999]}}, r"_: data_offsets \[0, inf\] must be"),
    ('{"a": ' + "1" * 5000 + "}", "header is not valid JSON"),
])
def test_crafted_headers(header, error):
    with pytest.raises(ProtocolError, match=error):
        decode(raw(header), STRICT)


def test_crafted_payloads():
    # The marker is empty: data in it is a channel for anything.
    marker = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    with pytest.raises(ProtocolError, match=r"SamplingRequest._: the marker tensor must be empty \(shape \[0\]\), "
                                            r"got shape \[2\]"):
        decode(raw({"__metadata__": meta(), "_": marker}, bytes(8)), STRICT)
    # Bytes before, between or after the tensors, and overlapping tensors, are corrupt payloads.
    with pytest.raises(ProtocolError, match=r"payload is corrupt \(4 bytes after the last tensor\)"):
        decode(raw({"__metadata__": meta(), "_": MARKER}, bytes(4)), STRICT)
    b = batch()
    blob = encode(b)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["record_ids"]["data_offsets"] = header["views"]["data_offsets"]  # two names for one span
    with pytest.raises(ProtocolError, match="payload is corrupt .*without gaps or overlaps"):
        decode(raw(header, blob[8 + n:]), STRICT)
    header = json.loads(blob[8:8 + n])
    header["handoffs"]["shape"] = [5, 1, 4, 5]
    with pytest.raises(ProtocolError, match=r"HandoffBatch.handoffs: data_offsets \[\d+, \d+\] hold 320 bytes, shape "
                                            r"\[5, 1, 4, 5\] of F32 needs 400"):
        decode(raw(header, blob[8 + n:]), STRICT)
    header = json.loads(blob[8:8 + n])
    header["handoffs"]["shape"] = [10, 1, 2, 4]  # the same bytes as other images: the offsets agree, the shape not
    with pytest.raises(ProtocolError, match=r"handoffs: images of shape \(1, 2, 4\), expected \(1, 4, 4\)"):
        decode(raw(header, blob[8 + n:]), STRICT)
    with pytest.raises(ProtocolError, match="header is not valid JSON"):
        decode(blob[:8] + b"\xff" * n + blob[8 + n:], STRICT)
    with pytest.raises(ProtocolError, match="header of 65537 bytes exceeds the limit"):
        decode((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b" " * (MAX_HEADER_BYTES + 1))


def test_deep_header_is_refused_fast():
    text = b"[" * 30_000 + b"]" * 30_000
    start = time.perf_counter()
    with pytest.raises(ProtocolError, match="nest deeper"):
        decode(len(text).to_bytes(8, "little") + text)
    assert time.perf_counter() - start < 0.5


def test_handoff_bound():
    assert handoff_bound(1.0) == 1.0  # c = 0: the raw images
    assert handoff_bound(0.0, k=8.0) == 8.0
    assert handoff_bound(0.64, k=5) == pytest.approx(0.8 + 5 * 0.6)
    with pytest.raises(ValueError, match="alpha_bar_cut must be in"):
        handoff_bound(1.5)


def test_handoffs_at_the_bound_pass_and_just_past_it_fail():
    bound = STRICT.handoff_bound
    at = torch.full((5, 1, 4, 4), bound)  # bound as float32 holds it: what an honest sender can put on the wire
    at[0, 0, 0, 0] = -bound
    decode(encode(batch(handoffs=at)), STRICT)
    next32 = torch.nextafter(at[1, 0, 0, 0], torch.tensor(math.inf)).item()  # one float32 step past it
    for sign, past in ((1, bound * (1 + 1e-6)), (-1, next32)):
        h = at.clone()
        h[2, 0, 1, 1] = sign * past
        past32 = torch.tensor(past, dtype=torch.float32).item()
        assert past32 > at[1, 0, 0, 0].item()
        with pytest.raises(ProtocolError, match=rf"HandoffBatch.handoffs: max \|value\| {past32:.9g} exceeds the bound "
                                                rf"{bound:.9g}"):
            decode(encode(batch(handoffs=h)), STRICT)
    # Refused, never clipped: nothing of the batch is accepted.
    with pytest.raises(ProtocolError, match="Limits.handoff_bound"):
        decode(encode(batch(handoffs=at * 1000)), STRICT)


def test_server_samples_are_not_bounded_but_must_be_finite():
    big = SamplingHandoffs(client_id=0, level=3, handoffs=torch.full((2, 1, 4, 4), 1e6))
    assert decode(encode(big), STRICT).handoffs.max() == 1e6
    with pytest.raises(ProtocolError, match="SamplingHandoffs.handoffs: contains NaN or infinite values"):
        decode(encode(SamplingHandoffs(client_id=0, level=3, handoffs=torch.full((2, 1, 4, 4), float("-inf")))),
               STRICT)
    with pytest.raises(ProtocolError, match="SamplingHandoffs.handoffs: 300 samples exceed max_samples 256"):
        decode(encode(SamplingHandoffs(client_id=0, level=3, handoffs=torch.zeros(300, 1, 4, 4))), STRICT)
