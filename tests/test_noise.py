import hashlib
import hmac
import math
import os
import secrets
import struct
import threading
import time

import numpy as np
import pytest
import torch
from scipy import stats

from collafuse.roles import noise
from collafuse.roles.noise import (SECRET_BYTES, handoff_noise, load_or_create_secret, new_secret, pinned_secret,
                                   record_digests, release_key)

SHAPE = (1, 4, 4)


def digests_of(n: int, seed: int = 0) -> list[bytes]:
    return record_digests(torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed)))


def chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    """RFC 8439 ChaCha20 block function, by hand: an independent check of the keystream."""
    def rotl(v, c):
        return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))

    def qr(s, a, b, c, d):
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 7)

    init = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8I", key), counter,
            *struct.unpack("<3I", nonce)]
    s = list(init)
    for _ in range(10):
        qr(s, 0, 4, 8, 12); qr(s, 1, 5, 9, 13); qr(s, 2, 6, 10, 14); qr(s, 3, 7, 11, 15)
        qr(s, 0, 5, 10, 15); qr(s, 1, 6, 11, 12); qr(s, 2, 7, 8, 13); qr(s, 3, 4, 9, 14)
    return struct.pack("<16I", *((a + b) & 0xFFFFFFFF for a, b in zip(s, init)))


def test_construction_matches_the_spec_by_hand():
    secret, digest, key = pinned_secret(3, 1), bytes(range(32)), release_key(0.3, 2.0)
    k = hmac.new(secret, b"collafuse handoff noise v1" + digest + key + (5).to_bytes(8, "big"), hashlib.sha256).digest()
    u = [((w >> 11) + 0.5) * 2.0**-53 for w in struct.unpack("<4Q", chacha20_block(k, 0, bytes(12))[:32])]
    want = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        r = math.sqrt(-2 * math.log(u1))
        want += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
    got = handoff_noise(secret, [digest], key, 5, (3,))  # odd count: the 4th value is made and dropped
    assert got.dtype == torch.float32 and got.shape == (1, 3)
    assert got[0].tolist() == pytest.approx(want[:3], abs=1e-6)


def test_pinned_values_do_not_drift():
    # if these change, every replayed view changes: old handoffs and new ones would be independent views
    assert pinned_secret(0, 0).hex() == "140c614cc6475289107f3cd477d8e45009ee8b477d71f62e7d31a7ce23ed7e81"
    e = handoff_noise(pinned_secret(0, 0), [bytes(range(32))], release_key(0.5, None), 0, (3,))
    assert [round(v, 6) for v in e[0].tolist()] == [-0.772706, -1.562395, 1.166731]
    e = handoff_noise(pinned_secret(0, 0), [bytes(range(32))], release_key(0.5, 1.0), 7, (3,))
    assert [round(v, 6) for v in e[0].tolist()] == [1.385431, -0.504661, -1.437804]
    assert record_digests(torch.zeros(1, 1, 2, 2))[0].hex() == (
        "2f0446a228f2d08e7948ff3883cd8bfde8944e647e5167367aa9b3c54b9ffb3b")


def test_replay_stable_across_restarts(tmp_path):
    ds, key = digests_of(20), release_key(0.6, None)
    first = handoff_noise(load_or_create_secret(tmp_path), ds, key, 2, SHAPE)
    again = handoff_noise(load_or_create_secret(tmp_path), ds, key, 2, SHAPE)  # "restart": re-read from disk
    assert torch.equal(first, again)
    # a record's noise depends on the record, not on its position or its batch companions
    assert torch.equal(handoff_noise(load_or_create_secret(tmp_path), ds[5:7][::-1], key, 2, SHAPE), first[[6, 5]])


def test_different_inputs_give_different_noise():
    s, ds, key = pinned_secret(0, 0), digests_of(8), release_key(0.6, None)
    base = handoff_noise(s, ds, key, 0, SHAPE)
    others = [
        handoff_noise(s, ds, key, 1, SHAPE),  # another view
        handoff_noise(s, ds, release_key(0.61, None), 0, SHAPE),  # another mechanism (cut)
        handoff_noise(s, ds, release_key(0.6, 4.0), 0, SHAPE),  # the same cut, clipped
        handoff_noise(pinned_secret(0, 1), ds, key, 0, SHAPE),  # another client's secret
        handoff_noise(s, digests_of(8, seed=1), key, 0, SHAPE),  # other records
    ]
    for other in others:
        assert not torch.isclose(base, other).any()
    assert len(set(d.hex() for d in ds)) == 8  # distinct records within the batch are distinct too
    assert not torch.isclose(base[0], base[1]).any()


def test_release_key_is_canonical():
    assert release_key(0.5, None) != release_key(0.5, 1.0)
    assert release_key(0.5, 1.0) != release_key(0.5, 1.0 + 1e-12)
    assert release_key(0.0, None) == release_key(-0.0, None)
    assert release_key(0.5, 2) == release_key(0.5, 2.0)  # int and float of one value: one mechanism
    with pytest.raises(ValueError, match="alpha_bar"):
        release_key(1.5, None)
    with pytest.raises(ValueError, match="clip_norm"):
        release_key(0.5, 0.0)


def test_record_digests():
    x = torch.randn(4, 1, 16, 16)
    ds = record_digests(x)
    assert len(ds) == 4 and all(isinstance(d, bytes) and len(d) == 32 for d in ds)
    assert ds == record_digests(x.double())  # identity by float32 content
    assert record_digests(x[1:2]) == ds[1:2]  # per record, not per batch
    assert record_digests(x.reshape(4, 1, 8, 32)) != ds  # the shape is part of the identity
    y = x.clone()
    y[2, 0, 3, 3] = torch.nextafter(y[2, 0, 3, 3], torch.tensor(10.0))
    assert record_digests(y) == ds[:2] + [record_digests(y)[2]] + ds[3:] and record_digests(y)[2] != ds[2]
    with pytest.raises(ValueError, match="records"):
        record_digests(torch.zeros(5))


def test_marginal_normality_and_independence():
    s, key = pinned_secret(7, 3), release_key(0.4, None)
    ds = digests_of(1000)
    z = handoff_noise(s, ds, key, 0, (100,)).double().numpy().ravel()  # 100k values
    assert abs(z.mean()) < 1e-2 and abs(z.std() - 1) < 1e-2
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert stats.normaltest(z).pvalue > 0.01
    z2 = handoff_noise(s, ds, key, 1, (100,)).double().numpy().ravel()
    assert abs(np.corrcoef(z, z2)[0, 1]) < 0.02
    # neighbouring values within a record (the Box-Muller pair, and the next pair) are uncorrelated too
    pairs = z.reshape(-1, 2)
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 0.02
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.02


def test_speed_5000_records():
    s, ds, key = pinned_secret(0, 0), digests_of(5000), release_key(0.5, None)
    handoff_noise(s, ds[:10], key, 0, (1, 16, 16))  # warm-up
    t0 = time.perf_counter()
    e = handoff_noise(s, ds, key, 0, (1, 16, 16))
    assert time.perf_counter() - t0 < 2.0
    assert e.shape == (5000, 1, 16, 16) and torch.isfinite(e).all()


def test_secret_file(tmp_path, monkeypatch):
    calls = []

    def fake_token_bytes(n):
        calls.append(n)
        return bytes([7]) * n

    monkeypatch.setattr(secrets, "token_bytes", fake_token_bytes)
    folder = tmp_path / "state" / "client0"  # created when missing
    secret = load_or_create_secret(folder)
    assert calls == [SECRET_BYTES] and secret == bytes([7]) * 32  # the secrets module is the source
    path = folder / "secret.key"
    assert path.read_bytes() == secret and os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_secret(folder) == secret and calls == [SECRET_BYTES]  # made once, then re-read
    assert os.listdir(folder) == ["secret.key"]  # no temporary left behind


def test_new_secret_is_random():
    a, b = new_secret(), new_secret()
    assert len(a) == SECRET_BYTES and a != b


def test_racing_creators_share_one_secret(tmp_path):
    results, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait()
        results.append(load_or_create_secret(tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert (tmp_path / "secret.key").read_bytes() == results[0]
    assert os.listdir(tmp_path) == ["secret.key"]


def test_bad_secret_files_raise_with_the_fix(tmp_path):
    path = tmp_path / "secret.key"
    load_or_create_secret(tmp_path)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match=r"chmod 600") as e:
        load_or_create_secret(tmp_path)
    assert str(path) in str(e.value)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match=r"5 bytes.*only if no handoff was ever sent") as e:
        load_or_create_secret(tmp_path)
    assert str(path) in str(e.value)


def test_pinned_secret():
    assert pinned_secret(0, 0) == pinned_secret(0, 0) != pinned_secret(0, 1) != pinned_secret(1, 0)
    assert len(pinned_secret(5, 2)) == SECRET_BYTES
    assert "guessable" in noise.pinned_secret.__doc__
    with pytest.raises(ValueError, match="seed"):
        pinned_secret(1.5, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"secret": b"x" * 31}, "secret"),
        ({"secret": "x" * 32}, "secret"),
        ({"view": -1}, "view"),
        ({"view": 1.0}, "view"),
        ({"view": True}, "view"),
        ({"digests": [b"x" * 31]}, "digests"),
        ({"key": b""}, "key"),
        ({"shape": (0, 4)}, "shape"),
    ],
)
def test_noise_input_errors(kwargs, match):
    args = {"secret": pinned_secret(0, 0), "digests": [bytes(32)], "key": release_key(0.5, None), "view": 0,
            "shape": (1, 2, 2)} | kwargs
    with pytest.raises(ValueError, match=match):
        handoff_noise(**args)
