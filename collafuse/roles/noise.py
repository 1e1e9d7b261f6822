"""Handoff noise: a cryptographic function of a secret only the client holds.

A handoff y = sqrt(ab) x0 + sqrt(1 - ab) e hides x0 only as long as the server cannot guess e. A
seeded Mersenne Twister with a small seed can be searched; here e is a PRF of a 32-byte secret:
per record, HMAC-SHA256(secret, label || record digest || mechanism key || view) keys ChaCha20,
whose keystream becomes uniforms and, by Box-Muller, standard normals.

The noise is replay-stable: the same secret, record, mechanism and view give the same e bit for bit,
in any run or session, so re-sending a view releases nothing new. It is never shared across
mechanisms: y1 = a1 x + b1 e and y2 = a2 x + b2 e with one e give x exactly (two equations, two
unknowns), so the mechanism (alpha_bar, clip) is part of the PRF input.
"""

import hashlib
import hmac
import math
import os
import secrets
import struct
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from collafuse.core.state import fsync_dir

SECRET_BYTES = 32
SECRET_FILE = "secret.key"
DIGEST_BYTES = 32

_NOISE_LABEL = b"collafuse handoff noise v1"
_PINNED_LABEL = b"collafuse pinned test secret v1 (guessable)"
_ZERO_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte counter + 12-byte nonce; each key is used once


def new_secret() -> bytes:
    """A fresh 32-byte secret from the operating system's CSPRNG."""
    return secrets.token_bytes(SECRET_BYTES)


def load_or_create_secret(folder: Path) -> bytes:
    """The client's one secret for its lifetime: folder/secret.key, created once (mode 0600), re-read after."""
    folder = Path(folder)
    path = folder / SECRET_FILE
    if not path.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _create_secret_file(path)
    return _read_secret_file(path)


def pinned_secret(seed: int, client_id: int) -> bytes:
    """FOR TESTS AND BENCHMARKS ONLY: a reproducible secret from (seed, client id).

    It is guessable by anyone who knows or searches the seed and the client id, so handoffs made
    with it hide nothing; real clients use load_or_create_secret.
    """
    for name, value in (("seed", seed), ("client_id", client_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    return hashlib.sha256(_PINNED_LABEL + f"|{seed}|{client_id}".encode()).digest()


def record_digests(records: torch.Tensor) -> list[bytes]:
    """SHA-256 of each record (first dim): its shape and its float32 little-endian bytes; 32 bytes each."""
    if records.ndim < 2:
        raise ValueError(f"records must be (N, ...) with one record per row, got shape {tuple(records.shape)}")
    arr = np.ascontiguousarray(records.detach().to("cpu", torch.float32).numpy(), dtype="<f4")
    shape = arr.shape[1:]
    # the shape is hashed too: the same values laid out as 1x16x16 and 1x8x32 are different records
    header = struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
    return [hashlib.sha256(header + row.tobytes()).digest() for row in arr]


def release_key(alpha_bar_cut: float, clip_norm: float | None) -> bytes:
    """Canonical bytes of the mechanism a view belongs to, so one noise e never serves two mechanisms."""
    ab = float(alpha_bar_cut)
    if not 0.0 <= ab <= 1.0:
        raise ValueError(f"alpha_bar_cut must be in [0, 1] (the signal fraction at the cut), got {alpha_bar_cut}")
    key = struct.pack(">d", ab + 0.0)  # + 0.0: -0.0 and 0.0 are one mechanism, one encoding
    if clip_norm is None:
        return key + b"\x00"  # unclipped: a tag no clip value can produce
    clip = float(clip_norm)
    if not (clip > 0.0 and math.isfinite(clip)):
        raise ValueError(f"clip_norm must be None or a finite L2 bound > 0, got {clip_norm}")
    return key + b"\x01" + struct.pack(">d", clip)


def handoff_noise(secret: bytes, digests: list[bytes], key: bytes, view: int,
                  shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise (len(digests), *shape), float32: a PRF of (secret, record, mechanism key, view)."""
    _check_noise_args(secret, digests, key, view, shape)
    n = math.prod(shape)
    m = n + (n % 2)  # Box-Muller makes values in pairs
    zeros = bytes(8 * m)
    prefix = _NOISE_LABEL
    suffix = key + view.to_bytes(8, "big")
    streams = []
    for digest in digests:
        k = hmac.new(secret, prefix + digest + suffix, hashlib.sha256).digest()
        streams.append(Cipher(algorithms.ChaCha20(k, _ZERO_NONCE), mode=None).encryptor().update(zeros))
    words = np.frombuffer(b"".join(streams), dtype="<u8").reshape(len(digests), m)
    # 53 random bits -> (0, 1): never 0, so log() is finite; the top value rounds to 1.0 in float64
    # (probability 2^-53), which only gives r = 0 below.
    u = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    r = np.sqrt(-2.0 * np.log(u[:, 0::2]))
    theta = 2.0 * np.pi * u[:, 1::2]
    z = np.empty((len(digests), m), dtype=np.float64)
    z[:, 0::2] = r * np.cos(theta)
    z[:, 1::2] = r * np.sin(theta)
    return torch.from_numpy(z[:, :n].astype(np.float32)).reshape(len(digests), *shape)


def _check_noise_args(secret, digests, key, view, shape) -> None:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        got = len(secret) if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
        raise ValueError(f"secret must be {SECRET_BYTES} bytes (load_or_create_secret), got {got}")
    if isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < 2**64:
        raise ValueError(f"view must be an int >= 0, got {view!r}")
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError(f"key must be the non-empty bytes of release_key(alpha_bar, clip_norm), got {key!r}")
    bad = [i for i, d in enumerate(digests) if not isinstance(d, (bytes, bytearray)) or len(d) != DIGEST_BYTES]
    if bad:
        raise ValueError(f"digests must be {DIGEST_BYTES}-byte SHA-256 values (record_digests); "
                         f"{len(bad)} are not, first at index {bad[0]}")
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints (one record's shape), got {shape!r}")


def _create_secret_file(path: Path) -> None:
    # Written in full under a temporary name, then linked into place: a crash leaves at most a stray
    # temporary file, never a short secret.key, and link() fails if another process got there first,
    # so racing processes end up sharing the one secret that won.
    secret = new_secret()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(8).hex()}.tmp")
    try:
        _write_new_file(tmp, secret)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return  # another process won the race: its secret is the one
        except OSError:
            # a file system without hard links: create in place, still exclusive (a crash mid-write
            # leaves a short file, which _read_secret_file refuses with the fix)
            try:
                _write_new_file(path, secret)
            except FileExistsError:
                return
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_secret_file(path: Path) -> bytes:
    st = path.stat()
    if os.name == "posix" and st.st_mode & 0o077:
        raise ValueError(
            f"{path} is readable or writable by group/others (mode {oct(st.st_mode & 0o777)}); "
            f"anyone who reads it can strip the noise off this client's handoffs. Fix: chmod 600 {path}"
        )
    data = path.read_bytes()
    if len(data) != SECRET_BYTES:
        raise ValueError(
            f"{path} holds {len(data)} bytes, a secret is {SECRET_BYTES}. Restore it from a backup; delete it "
            f"(a new secret is made) only if no handoff was ever sent with it, since new noise on records "
            f"already released gives the server fresh views of them"
        )
    return data
