"""Fuzzing protocol.decode: mutated messages of every type raise ProtocolError or decode within every limit.

The mutator, the seed messages and the independent limit check live in benchmarks/fuzz.py (the long
campaign: `python benchmarks/fuzz.py --messages 1000000`); this file runs a short fixed-seed one.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import save

from collafuse.core import protocol
from collafuse.core.models import ModelConfig
from collafuse.core.protocol import HandoffBatch, ProtocolError
from collafuse.core.schedule import NoiseSchedule
from collafuse.roles.server import Server


def make_server() -> Server:
    """The smoke-sized server the fuzzed handoffs are fed to (the one place that knows its constructor)."""
    return Server(schedule=NoiseSchedule(100, "linear"), cut_level=20, client_ids=[0, 1, 2], image_shape=(1, 8, 8),
                  model=ModelConfig(channels=(8, 16), attention=False), batch_size=8)


def load_fuzz():
    # By path, under a unique name: benchmarks/ is no package, and a sys.path entry would let a bare
    # `import fuzz` elsewhere in the session pick up this file (or this file a `fuzz` from site-packages).
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("collafuse_benchmarks_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


fuzz = load_fuzz()
LIMITS = fuzz.fuzz_limits()


@pytest.fixture(scope="module")
def mutator():
    return fuzz.Mutator(fuzz.seed_messages(), LIMITS)


def test_seed_messages_are_valid_and_realistic():
    seeds = fuzz.seed_messages()
    assert sorted(seeds) == sorted(protocol.MESSAGES)
    for msg in seeds.values():
        back = protocol.decode(protocol.encode(msg), LIMITS)
        assert fuzz.check_limits(back, LIMITS) == []
    # The handoffs are digits noised to the cut: inside the bound, but not trivially (noise of sd ~0.58 at level 20).
    h = seeds["HandoffBatch"].handoffs
    assert 1.0 < h.abs().max() < LIMITS.handoff_bound and h.std() > 0.5


def test_check_limits_is_not_vacuous():
    seeds = fuzz.seed_messages()
    b = seeds["HandoffBatch"]
    bad = HandoffBatch(client_id=5, level=3, record_ids=b.record_ids * 100, views=b.views * 9,
                       handoffs=b.handoffs * 100)
    assert set(fuzz.check_limits(bad, LIMITS)) >= {"client_id", "level", "record_ids", "views", "handoffs bound"}


def test_ten_thousand_mutations_raise_only_protocol_error():
    # slow_s: a decode is ~0.1 ms; a quadratic header scan (once a real bug) took 2-20 s on the crafted headers.
    report = fuzz.run(10_000, seed=0, limits=LIMITS, slow_s=5.0)
    assert report.messages == 10_000
    assert report.findings == [], "\n".join(f"{f.what} #{f.index} {f.kind} <- {f.ops}: {f.detail[-400:]}"
                                            for f in report.findings[:5])
    for kind in protocol.MESSAGES:  # every type both refused and, mutated but still valid, accepted
        assert report.rejected[kind] > 500 and report.accepted[kind] > 10, (kind, report.accepted, report.rejected)


def test_fuzzer_finds_planted_bugs(monkeypatch):
    # The harness must see a crash and an escape when decode has them, or its silence means nothing.
    monkeypatch.setattr(protocol, "_check_metrics", lambda metrics: None)  # any metrics accepted
    report = fuzz.run(600, seed=0, limits=LIMITS, kinds=("ClientReport",))
    assert report.of("escape") and not report.of("crash")
    monkeypatch.setattr(protocol, "_scalars", lambda name, cls, text: json.loads(text))  # fields unchecked
    report = fuzz.run(600, seed=0, limits=LIMITS, kinds=("SamplingRequest",))
    assert report.of("crash")


def snapshot(server: Server) -> tuple[bytes, str]:
    """The server's whole state as bytes: tensors (safetensors) and meta (JSON)."""
    tensors, meta = server.state()
    return save({k: v.contiguous() for k, v in sorted(tensors.items())}), json.dumps(meta, sort_keys=True)


def test_rejected_handoffs_leave_the_server_untouched(mutator):
    server = make_server()
    limits = replace(server.limits, max_records=LIMITS.max_records, max_views=LIMITS.max_views,
                     handoff_bound=protocol.handoff_bound(float(server.schedule.alpha_bar[server.t_c])))
    assert limits.handoff_bound == LIMITS.handoff_bound
    before, rejected, accepted, checked, changed = snapshot(server), 0, 0, 0, 0
    for i in range(3000):
        armed = rejected % 100 == 99  # the next refusal is a sampled one: know the state before it
        if armed and before is None:
            before = snapshot(server)
        _, blob, ops = fuzz.message(mutator, 1, i, kinds=("HandoffBatch",))
        try:
            msg = protocol.decode(blob, limits, expect=HandoffBatch)
        except ProtocolError:
            rejected += 1
            if armed:
                assert snapshot(server) == before, f"message {i} ({ops}) changed the server's state"
                checked += 1
            continue
        assert fuzz.check_limits(msg, limits) == [], (i, ops)
        server.ingest(msg)  # only ever after a successful decode
        accepted += 1
        if before is not None:
            changed += snapshot(server) != before
        before = None
    assert checked >= 20 and accepted > 50 and changed > 0, (checked, accepted, changed)



def test_mutations_of_a_real_smoke_runs_messages(tmp_path):
    """The same campaign seeded with every message type a real in-process smoke round put on the wire."""
    import dataclasses

    from collafuse.config import load_config
    from collafuse.federation.inprocess import start
    from collafuse.measure.evaluate import split_sample
    engine, fed, _ = start(load_config("smoke", ["rounds=1"]), tmp_path, capture=True)
    engine.run_round()
    split_sample(fed, fed.clients[1], 8, server_steps=3, client_steps=2, sampler="ddim", seed=0)
    refusal = fed.clients[2].answer(dataclasses.replace(engine.request(2), level=0), handoff_batch=512, sampling=None)
    real = {type(m).__name__: m for m in [protocol.decode(b) for _, _, b in fed.wire.captured] + refusal}
    assert sorted(real) == sorted(protocol.MESSAGES)
    limits = dataclasses.replace(fed.server.limits, max_records=200, max_views=1)
    mutator = fuzz.Mutator(real, limits)
    crashes = []
    for i in range(3000):
        _, blob, ops = fuzz.message(mutator, 7, i)
        msg, error, finding = fuzz.decode_one(blob, limits)
        if finding in ("crash", "escape"):
            crashes.append((i, ops, error))
    assert crashes == []
