import json
import math
import os
import time
import warnings

import pytest
import torch

from collafuse.roles import policy as policy_mod
from collafuse.roles.noise import record_digests, release_key
from collafuse.roles.policy import PolicyViolation, PrivacyPolicy, Release, ReleaseLedger
from collafuse.roles.privacy import handoff_epsilon, handoff_mechanism, range_clip_norm, releases_epsilon

DELTA = 1e-5


def digests(n: int, seed: int = 0) -> list[bytes]:
    return record_digests(torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)))


def release(level: int = 40, T: int = 100, alpha_bar: float = 0.5, clip_norm: float = 0.1) -> Release:
    return Release(level=level, T=T, alpha_bar=alpha_bar, clip_norm=clip_norm)


# ---- releases_epsilon (privacy.py)


@pytest.mark.parametrize("alpha_bar, clip, views", [(0.5, 0.1, 1), (0.5, 0.1, 4), (0.3, 0.5, 10), (0.9, 28.0, 1)])
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_releases_epsilon_equals_handoff_epsilon(alpha_bar, clip, views, accountant):
    m = handoff_mechanism(alpha_bar, clip_norm=clip)["noise_multiplier"]
    want = handoff_epsilon(alpha_bar, clip_norm=clip, views=views, delta=DELTA, accountant=accountant)
    assert releases_epsilon([m] * views, DELTA, accountant) == want


def test_releases_epsilon_heterogeneous():
    # Gaussians compose exactly like one Gaussian with 1/m^2 summed: 1/25 + 2/4 -> m = 1/sqrt(0.54)
    eps = releases_epsilon([5.0, 2.0, 2.0], DELTA)
    assert eps == pytest.approx(releases_epsilon([1 / math.sqrt(1 / 25 + 2 / 4)], DELTA), rel=1e-4)
    assert releases_epsilon([2.0, 5.0, 2.0], DELTA) == eps  # order does not matter
    assert releases_epsilon([2.0, 2.0], DELTA) < eps < releases_epsilon([2.0, 2.0, 2.0], DELTA)
    assert releases_epsilon([5.0, 2.0, 2.0], DELTA, "rdp") >= eps


def test_releases_epsilon_edge_cases():
    assert releases_epsilon([], DELTA) == 0.0
    assert releases_epsilon([math.inf, math.inf], DELTA) == 0.0
    assert releases_epsilon([5.0, math.inf], DELTA) == releases_epsilon([5.0], DELTA)
    assert releases_epsilon([5.0, 0.0], DELTA) == math.inf
    for bad, match in [([-1.0], "multipliers"), ([math.nan], "multipliers"), (["2"], "multipliers")]:
        with pytest.raises(ValueError, match=match):
            releases_epsilon(bad, DELTA)
    with pytest.raises(ValueError, match="delta"):
        releases_epsilon([1.0], 0.0)
    with pytest.raises(ValueError, match="accountant"):
        releases_epsilon([1.0], DELTA, "moments")


# ---- PrivacyPolicy


def test_policy_defaults_and_mapping():
    p = PrivacyPolicy()
    assert (p.min_cut, p.modes, p.max_views, p.epsilon, p.delta, p.clip_norm) == (0.2, ("once",), 1, None, 1e-5, None)
    q = PrivacyPolicy.from_mapping({"min-cut": 0.4, "modes": ["once", "fresh"], "max-views": 3, "epsilon": 8,
                                    "delta": 1e-6, "clip_norm": 2.5}, "node config")
    assert q == PrivacyPolicy(min_cut=0.4, modes=("once", "fresh"), max_views=3, epsilon=8, delta=1e-6, clip_norm=2.5)
    # Flower node configs hold scalars only: a comma-separated string works too
    assert PrivacyPolicy.from_mapping({"modes": "once, fresh"}, "x").modes == ("once", "fresh")
    assert PrivacyPolicy.from_mapping({}, "x") == p
    hash(q)  # frozen, hashable


def test_policy_from_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('min_cut = 0.5\nmodes = ["once"]\nmax-views = 2\nepsilon = 10.0\n')
    assert PrivacyPolicy.from_file(path) == PrivacyPolicy(min_cut=0.5, max_views=2, epsilon=10.0)
    path.write_text('[policy]\nmin-cut = 0.3\n')
    assert PrivacyPolicy.from_file(path).min_cut == 0.3
    path.write_text('min_cut = \n')
    with pytest.raises(ValueError, match="policy.toml.*TOML"):
        PrivacyPolicy.from_file(path)
    path.write_text('min_cut = 1.5\n')
    with pytest.raises(ValueError, match=r"policy\.toml: .*min_cut = 1\.5.*\[0, 1\]"):
        PrivacyPolicy.from_file(path)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"min_cut": 1.5}, r"min_cut = 1\.5 is invalid; set a cut ratio in \[0, 1\]"),
        ({"min_cut": "0.4"}, r"min_cut = '0\.4' is invalid; set a cut ratio"),
        ({"min_cut": True}, r"min_cut = True is invalid"),
        ({"modes": ["once", "always"]}, r"modes = .* is invalid; use a non-empty list of \['once', 'fresh'\]"),
        ({"modes": []}, r"modes = \(\) is invalid; use a non-empty list"),
        ({"modes": 3}, r"modes = 3 is invalid"),
        ({"max_views": 0}, r"max_views = 0 is invalid; set an int >= 1"),
        ({"max-views": 1.5}, r"max_views = 1\.5 is invalid; set an int >= 1"),
        ({"epsilon": 0}, r"epsilon = 0 is invalid; set a finite number > 0.*leave it out"),
        ({"epsilon": math.inf}, r"epsilon = inf is invalid.*leave it out for no budget"),
        ({"delta": 1.0}, r"delta = 1\.0 is invalid; set a number in \(0, 1\)"),
        ({"clip_norm": -1.0}, r"clip_norm = -1\.0 is invalid; set a finite L2 bound > 0"),
        ({"min_cutt": 0.4}, r"unknown privacy policy key 'min_cutt'; valid keys: min_cut, modes, max_views, epsilon"),
        ({"min-cut": 0.4, "min_cut": 0.5}, r"'min_cut' is given twice.*keep one"),
    ],
)
def test_policy_validation_names_key_source_and_fix(values, match):
    with pytest.raises(ValueError, match=match) as e:
        PrivacyPolicy.from_mapping(values, "client 3 node config")
    assert str(e.value).startswith("client 3 node config: ")


def test_policy_direct_construction_is_validated():
    with pytest.raises(ValueError, match="min_cut"):
        PrivacyPolicy(min_cut=-0.1)
    assert PrivacyPolicy(modes=["fresh"]).modes == ("fresh",)


def test_check_request_boundary_and_modes():
    p = PrivacyPolicy(min_cut=0.4, modes=("once",))
    p.check_request(level=40, T=100, mode="once")  # exactly at the floor: allowed
    p.check_request(level=100, T=100, mode="once")
    with pytest.raises(PolicyViolation, match=r"cut level 39 of T=100.*min_cut=0\.4 \(level 40\).*owner") as e:
        p.check_request(level=39, T=100, mode="once")
    assert "server" in str(e.value)
    with pytest.raises(PolicyViolation, match=r"mode 'fresh' is not allowed.*modes=\['once'\].*owner"):
        p.check_request(level=60, T=100, mode="fresh")
    # the same rounding as NoiseSchedule.cut_level: round(0.25 * 10) = 2 (banker's rounding), so level 2 is allowed
    PrivacyPolicy(min_cut=0.25).check_request(level=2, T=10, mode="once")
    with pytest.raises(PolicyViolation):
        PrivacyPolicy(min_cut=0.35).check_request(level=3, T=10, mode="once")  # round(3.5) = 4
    with pytest.raises(PolicyViolation, match="level"):
        p.check_request(level=101, T=100, mode="once")


def test_check_request_matches_schedule_rounding():
    from collafuse.core.schedule import NoiseSchedule

    for T in (10, 50, 1000):
        sched = NoiseSchedule(T, "linear")
        for c in (0.0, 0.15, 0.2, 0.25, 0.35, 0.4, 0.45, 1.0):
            p = PrivacyPolicy(min_cut=c)
            p.check_request(level=sched.cut_level(c), T=T, mode="once")  # the run at the floor itself passes
            if sched.cut_level(c) > 0:
                with pytest.raises(PolicyViolation):
                    p.check_request(level=sched.cut_level(c) - 1, T=T, mode="once")


# ---- Release


def test_release():
    r = release()
    assert r.multiplier == handoff_mechanism(0.5, clip_norm=0.1)["noise_multiplier"]
    assert r.key() == release_key(0.5, 0.1)
    unclipped = Release.of(level=40, T=100, alpha_bar=0.5, clip_norm=None, record_shape=(1, 28, 28))
    assert unclipped.clip_norm == range_clip_norm((1, 28, 28)) == 28.0
    with pytest.raises(ValueError, match="clip_norm"):
        Release(level=1, T=10, alpha_bar=0.5, clip_norm=math.inf)
    with pytest.raises(ValueError, match="level"):
        Release(level=11, T=10, alpha_bar=0.5, clip_norm=1.0)


# ---- ReleaseLedger


def test_ledger_record_and_reopen(tmp_path):
    path = tmp_path / "state" / "ledger.jsonl"
    ledger = ReleaseLedger(path)
    ds = digests(10)
    assert ledger.record(ds, release(), [0], run="r1", round=0) == 10
    assert ledger.record(ds[:4], release(), [1], run="r1", round=1) == 4
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    again = ReleaseLedger(path)
    assert [again.views(d) for d in ds] == [2] * 4 + [1] * 6
    assert again.entries == 2
    assert again.epsilon(ds[0], DELTA) == ledger.epsilon(ds[0], DELTA)
    assert again.summary(DELTA) == ledger.summary(DELTA)
    assert again.views(bytes(32)) == 0 and again.epsilon(bytes(32), DELTA) == 0.0
    # digests only: no record values, no secret
    line = json.loads(path.read_text().splitlines()[0])
    assert set(line) == {"level", "T", "alpha_bar", "clip_norm", "views", "run", "round", "time", "records"}
    assert line["records"] == [d.hex() for d in ds] and line["views"] == [0] and line["run"] == "r1"


def test_resending_the_same_view_is_free(tmp_path):
    ledger, ds = ReleaseLedger(tmp_path / "l.jsonl"), digests(5)
    p = PrivacyPolicy(max_views=1, epsilon=1.0)
    ledger.plan(ds, release(), [0], p)
    assert ledger.record(ds, release(), [0], run="a", round=0) == 5
    size = (tmp_path / "l.jsonl").stat().st_size
    ledger.plan(ds, release(), [0], p)  # the same view again: allowed
    assert ledger.record(ds, release(), [0], run="b", round=3) == 0
    assert (tmp_path / "l.jsonl").stat().st_size == size  # nothing new, nothing written
    # a tighter policy later still allows re-sending what already left (bit-identical, nothing new)
    ledger.plan(ds, release(), [0], PrivacyPolicy(max_views=1, epsilon=0.01))


def test_views_beyond_max_refused(tmp_path):
    ledger, ds = ReleaseLedger(tmp_path / "l.jsonl"), digests(6)
    p = PrivacyPolicy(max_views=2)
    ledger.plan(ds, release(), [0, 1], p)
    ledger.record(ds, release(), [0, 1], run="a", round=0)
    with pytest.raises(PolicyViolation, match=r"6 record\(s\) 3 distinct views \(already 2\).*max_views=2.*owner"):
        ledger.plan(ds, release(), [2], p)
    with pytest.raises(PolicyViolation, match="max_views=2"):
        ledger.plan(digests(3, seed=1), release(), [0, 1, 2], p)  # fresh records, three views at once
    ledger.plan(digests(3, seed=1), release(), [5, 7], p)  # any two view indices are fine
    ledger.plan(ds + digests(3, seed=1), release(), [1], p)  # old records re-sent, new ones a first view


def test_another_level_is_another_view(tmp_path):
    ledger, ds = ReleaseLedger(tmp_path / "l.jsonl"), digests(4)
    p = PrivacyPolicy(max_views=1)
    ledger.record(ds, release(level=40, alpha_bar=0.5), [0], run="a", round=0)
    with pytest.raises(PolicyViolation, match="max_views=1"):
        ledger.plan(ds, release(level=50, alpha_bar=0.4), [0], p)  # same view index, another mechanism
    with pytest.raises(PolicyViolation, match="max_views=1"):
        ledger.plan(ds, release(clip_norm=0.2), [0], p)  # the same cut clipped another way
    ledger.record(ds, release(level=50, alpha_bar=0.4), [0], run="a", round=1)
    assert ledger.views(ds[0]) == 2
    want = releases_epsilon([release(level=50, alpha_bar=0.4).multiplier, release().multiplier], DELTA)
    assert ledger.epsilon(ds[0], DELTA) == want


def test_epsilon_budget_refuses_exactly_when_exceeded(tmp_path):
    ledger, ds = ReleaseLedger(tmp_path / "l.jsonl"), digests(8)
    r1, r2 = release(alpha_bar=0.5, clip_norm=0.1), release(level=30, alpha_bar=0.6, clip_norm=0.1)
    one = releases_epsilon([r1.multiplier], DELTA)
    two = releases_epsilon([r1.multiplier, r1.multiplier], DELTA)
    mixed = releases_epsilon([r1.multiplier, r2.multiplier], DELTA)
    assert one < two < mixed
    ledger.plan(ds, r1, [0], PrivacyPolicy(max_views=5, epsilon=one))  # exactly at the budget: allowed
    with pytest.raises(PolicyViolation, match=r"epsilon=.*above this client's budget epsilon="):
        ledger.plan(ds, r1, [0], PrivacyPolicy(max_views=5, epsilon=one * (1 - 1e-9)))
    ledger.record(ds[:4], r1, [0], run="a", round=0)
    ledger.plan(ds, r1, [1], PrivacyPolicy(max_views=5, epsilon=two))
    with pytest.raises(PolicyViolation, match=r"4 record\(s\)"):  # only those with a view already
        ledger.plan(ds, r1, [1], PrivacyPolicy(max_views=5, epsilon=two * (1 - 1e-9)))
    ledger.plan(ds, r2, [0], PrivacyPolicy(max_views=5, epsilon=mixed))
    with pytest.raises(PolicyViolation):
        ledger.plan(ds, r2, [0], PrivacyPolicy(max_views=5, epsilon=mixed * (1 - 1e-9)))
    assert ledger.epsilon(ds[0], DELTA) == one and ledger.epsilon(ds[5], DELTA) == 0.0


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger, ds = ReleaseLedger(path), digests(3)
    ledger.record(ds, release(), [0], run="a", round=0)
    with open(path, "ab") as f:
        f.write(b'{"level":40,"T":100,"alpha_bar":0.5,"clip_norm":0.1,"views":[1],"run":"a","round":1,"records":["ab')
    with pytest.warns(UserWarning, match="torn last line"):
        again = ReleaseLedger(path)
    assert [again.views(d) for d in ds] == [1, 1, 1] and again.entries == 1
    # the next append cuts the torn tail off, so the file stays one JSON object per line
    assert again.record(ds, release(), [1], run="a", round=1) == 3
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        third = ReleaseLedger(path)
    assert not [w for w in seen if "torn" in str(w.message)]  # repaired: no warning any more
    assert [third.views(d) for d in ds] == [2, 2, 2] and third.entries == 2
    assert all(json.loads(line) for line in path.read_text().splitlines())


@pytest.mark.parametrize("bad", [b"not json\n", b'{"level": 1}\n', b'{"level":40,"T":100,"alpha_bar":0.5,'
                                 b'"clip_norm":0.1,"views":[0],"records":["zz"]}\n'])
def test_corrupt_line_raises(tmp_path, bad):
    path = tmp_path / "l.jsonl"
    ReleaseLedger(path).record(digests(2), release(), [0], run="a", round=0)
    with open(path, "ab") as f:
        f.write(bad)
    ReleaseLedger(tmp_path / "other.jsonl")  # unrelated
    with pytest.raises(ValueError, match=r"l\.jsonl, line 2: corrupt ledger line.*restore"):
        ReleaseLedger(path)
    path.write_bytes(bad + path.read_bytes())  # in the middle too
    with pytest.raises(ValueError, match=r"line 1: corrupt"):
        ReleaseLedger(path)


def test_summary(tmp_path):
    ledger = ReleaseLedger(tmp_path / "l.jsonl")
    empty = ledger.summary(DELTA)
    assert empty["records"] == 0 and empty["epsilon_max"] == 0.0 and empty["by_release"] == [] and empty["entries"] == 0
    ds = digests(5)
    r1, r2 = release(), release(level=30, alpha_bar=0.6)
    ledger.record(ds, r1, [0], run="a", round=0)
    ledger.record(ds[:2], r1, [1], run="a", round=1)
    ledger.record(ds[:1], r2, [0], run="b", round=0)
    s = ledger.summary(DELTA)
    assert s["records"] == 5 and s["record_views"] == 5 + 2 + 1 and s["max_views"] == 3 and s["entries"] == 3
    assert s["epsilon_max"] == releases_epsilon([r1.multiplier, r1.multiplier, r2.multiplier], DELTA)
    assert s["epsilon_median"] == releases_epsilon([r1.multiplier], DELTA)  # 3 of 5 records hold one view
    assert s["by_release"] == [
        {"level": 30, "T": 100, "alpha_bar": 0.6, "clip_norm": 0.1, "views": {0: 1}},
        {"level": 40, "T": 100, "alpha_bar": 0.5, "clip_norm": 0.1, "views": {0: 5, 1: 2}},
    ]
    assert json.loads(json.dumps(s, allow_nan=False))["records"] == 5
    ledger.record(ds[:1], release(level=0, alpha_bar=1.0), [0], run="c", round=0)  # c = 0: raw record
    assert ledger.summary(DELTA)["epsilon_max"] is None  # unbounded, JSON-safe


def test_ledger_refresh_sees_another_process(tmp_path):
    path, ds = tmp_path / "l.jsonl", digests(3)
    a, b = ReleaseLedger(path), ReleaseLedger(path)
    a.record(ds, release(), [0], run="a", round=0)
    with pytest.raises(PolicyViolation):  # b re-reads what a appended before deciding
        b.plan(ds, release(), [1], PrivacyPolicy(max_views=1))
    assert b.record(ds, release(), [0], run="b", round=0) == 0


def test_ledger_speed_5000_records_two_views(tmp_path, monkeypatch):
    ds = digests(5000)
    r = Release.of(level=40, T=100, alpha_bar=0.5, clip_norm=None, record_shape=(1, 16, 16))
    ledger = ReleaseLedger(tmp_path / "l.jsonl")
    t0 = time.perf_counter()
    ledger.plan(ds, r, [0, 1], PrivacyPolicy(max_views=2))
    assert ledger.record(ds, r, [0, 1], run="a", round=0) == 10_000
    ledger.plan(ds, r, [0, 1], PrivacyPolicy(max_views=2))
    assert ledger.record(ds, r, [0, 1], run="a", round=1) == 0
    assert time.perf_counter() - t0 < 1.0
    t0 = time.perf_counter()
    assert ReleaseLedger(tmp_path / "l.jsonl").views(ds[-1]) == 2
    assert time.perf_counter() - t0 < 1.0
    # with a budget, the accountant runs once per group of records with one history, not per record
    calls = []
    real = policy_mod.releases_epsilon
    monkeypatch.setattr(policy_mod, "releases_epsilon", lambda m, d: calls.append(m) or real(m, d))
    more = digests(5000, seed=1)
    ledger.plan(ds[:2500] + more, r, [0, 1, 2], PrivacyPolicy(max_views=3, epsilon=1e9))
    assert len(calls) == 1  # old records {0, 1} + 2 and new ones {0, 1, 2}: one multiset, one accountant call
    ledger.plan(ds + more, r, [0, 1, 2], PrivacyPolicy(max_views=3, epsilon=1e9))
    assert len(calls) == 1  # cached across calls
