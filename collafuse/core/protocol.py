"""Everything that crosses the client/server boundary, and nothing else.

Each message is a safetensors blob: its tensors plus a JSON header naming the message type and its
scalar fields. `encode` gives the real bytes that travel (in-process or inside a Flower record);
`decode` checks a blob before anything is built from it: size, type, fields, shape, dtype, finite
values and the sender. A violation raises ProtocolError naming the field; the receiver's state is
untouched because decoding happens before any state changes.

What the server sends: RoundRequest (what it asks of a round), SamplingHandoffs. What a client sends:
HandoffBatch (noised images at the cut, with client-chosen record ids), SamplingRequest, ClientReport
(plain metrics), Refusal (the request broke the client's policy). Never x_0, never the client's noise
or secret, never labels.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, fields

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAX_MESSAGE_BYTES = 64 * 2**20
SAMPLERS = ("ddpm", "ddim")


class ProtocolError(ValueError):
    """A message that must not be accepted; the text names the field and what was expected."""


@dataclass(frozen=True)
class RoundRequest:
    """Server -> client: what the server asks of one round. The client checks it against its own policy."""

    client_id: int
    run: str  # the server's run id: names the client's model state for this run, nothing else
    round: int
    level: int  # the cut level t_c the server trains above; handoffs are noised to it
    mode: str  # "once" or "fresh"
    first_view: int  # send views first_view .. first_view + n_views - 1 of every record
    n_views: int
    steps: int  # local training steps on levels 1..t_c


@dataclass(frozen=True)
class Refusal:
    """Client -> server: the request broke the client's privacy policy; nothing else left the client."""

    client_id: int
    reason: str


@dataclass(frozen=True)
class HandoffBatch:
    """Client -> server (training): handoffs y = x_{t_c} of some of the client's records."""

    client_id: int
    level: int  # t_c, the level the handoffs are noised to
    record_ids: torch.Tensor  # (N,) int64, ids local to the client (pseudonyms, not indices of anything shared)
    views: torch.Tensor  # (N,) int64, which independent view of the record this is
    handoffs: torch.Tensor  # (N, C, H, W) float32


@dataclass(frozen=True)
class SamplingRequest:
    """Client -> server: run your levels for n samples and send me the handoffs."""

    client_id: int
    n: int
    steps: int  # server-side steps from T down to t_c
    sampler: str  # "ddpm" or "ddim"
    seed: int


@dataclass(frozen=True)
class SamplingHandoffs:
    """Server -> client: samples the server ran down to level t_c, for the client to finish."""

    client_id: int
    level: int
    handoffs: torch.Tensor  # (n, C, H, W) float32, not clipped


@dataclass(frozen=True)
class ClientReport:
    """Client -> server: plain numbers only (quality, losses, timings)."""

    client_id: int
    metrics: dict = field(default_factory=dict)  # str -> float


MESSAGES = {cls.__name__: cls for cls in (RoundRequest, Refusal, HandoffBatch, SamplingRequest, SamplingHandoffs,
                                          ClientReport)}
MODES = ("once", "fresh")
_TENSOR_SPECS = {  # field -> (dtype, number of dims)
    "record_ids": (torch.int64, 1), "views": (torch.int64, 1), "handoffs": (torch.float32, 4)}
_ST_DTYPES = {"I64": torch.int64, "F32": torch.float32}


def encode(msg) -> bytes:
    """Serialise a message to the bytes that travel."""
    name = type(msg).__name__
    if name not in MESSAGES:
        raise ProtocolError(f"{name} is not a protocol message; known: {', '.join(MESSAGES)}")
    tensors, scalars = {}, {}
    for f in fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value.detach().to("cpu").contiguous()
        else:
            scalars[f.name] = value
    # safetensors cannot store an empty file; a zero-size marker keeps every message one format.
    tensors.setdefault("_", torch.zeros(0, dtype=torch.float32))
    return st_save(tensors, metadata={"message": name, "fields": json.dumps(scalars)})


@dataclass(frozen=True)
class Limits:
    """What the receiver accepts; None means 'not checked'."""

    known_clients: frozenset | None = None
    image_shape: tuple[int, int, int] | None = None  # (C, H, W)
    level: int | None = None
    max_bytes: int = MAX_MESSAGE_BYTES
    max_batch: int = 1 << 20


def _header(blob: bytes, limits: Limits) -> dict:
    if not isinstance(blob, (bytes, bytearray)):
        raise ProtocolError(f"message: expected bytes, got {type(blob).__name__}")
    if len(blob) > limits.max_bytes:
        raise ProtocolError(f"message: {len(blob)} bytes exceeds the limit of {limits.max_bytes} bytes; "
                            f"send smaller batches or raise protocol.max_message_bytes")
    if len(blob) < 8:
        raise ProtocolError("message: truncated (no header)")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ProtocolError("message: truncated (header longer than the message)")
    try:
        return json.loads(blob[8:8 + n])
    except ValueError as e:
        raise ProtocolError(f"message: header is not valid JSON ({e})") from None


def decode(blob: bytes, limits: Limits = Limits(), expect: type | None = None):
    """Parse and validate a blob; raise ProtocolError naming the first bad field."""
    header = _header(blob, limits)
    meta = header.pop("__metadata__", None) or {}
    name = meta.get("message")
    if name not in MESSAGES:
        raise ProtocolError(f"message: unknown type {name!r}; known: {', '.join(MESSAGES)}")
    cls = MESSAGES[name]
    if expect is not None and cls is not expect:
        raise ProtocolError(f"message: expected {expect.__name__}, got {name}")
    try:
        scalars = json.loads(meta.get("fields", "{}"))
    except ValueError as e:
        raise ProtocolError(f"{name}: scalar fields are not valid JSON ({e})") from None
    wanted = {f.name for f in fields(cls)}
    tensor_fields = wanted & set(_TENSOR_SPECS)
    extra = (set(scalars) | set(header) - {"_"}) - wanted
    if extra:
        raise ProtocolError(f"{name}: unexpected field(s) {sorted(extra)}; a {name} carries only {sorted(wanted)}")
    # Check declared dtypes and shapes before the tensors are materialised.
    for key in tensor_fields:
        if key not in header:
            raise ProtocolError(f"{name}.{key}: missing")
        dtype, ndim = _TENSOR_SPECS[key]
        if _ST_DTYPES.get(header[key].get("dtype")) is not dtype:
            raise ProtocolError(f"{name}.{key}: dtype {header[key].get('dtype')} where {dtype} is required")
        if len(header[key].get("shape", [])) != ndim:
            raise ProtocolError(f"{name}.{key}: shape {header[key].get('shape')} must have {ndim} dims")
    for key in wanted - tensor_fields:
        if key not in scalars:
            raise ProtocolError(f"{name}.{key}: missing")
    try:
        tensors = st_load(bytes(blob))
    except Exception as e:  # safetensors raises its own error types for corrupt payloads
        raise ProtocolError(f"{name}: payload is corrupt ({e})") from None
    msg = cls(**scalars, **{k: tensors[k] for k in tensor_fields})
    _validate(msg, limits)
    return msg


def _int(msg, key: str, lo: int = 0) -> None:
    value = getattr(msg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ProtocolError(f"{type(msg).__name__}.{key}: must be an integer >= {lo}, got {value!r}")


def _validate(msg, limits: Limits) -> None:
    name = type(msg).__name__
    _int(msg, "client_id")
    if limits.known_clients is not None and msg.client_id not in limits.known_clients:
        raise ProtocolError(f"{name}.client_id: {msg.client_id} is not a known client "
                            f"(known: {sorted(limits.known_clients)})")
    if hasattr(msg, "level"):
        _int(msg, "level")
        if limits.level is not None and msg.level != limits.level:
            raise ProtocolError(f"{name}.level: {msg.level} but the cut level of this run is {limits.level}")
    if hasattr(msg, "handoffs"):
        h = msg.handoffs
        if limits.image_shape is not None and tuple(h.shape[1:]) != tuple(limits.image_shape):
            raise ProtocolError(f"{name}.handoffs: images of shape {tuple(h.shape[1:])}, "
                                f"expected {tuple(limits.image_shape)}")
        if h.shape[0] > limits.max_batch:
            raise ProtocolError(f"{name}.handoffs: {h.shape[0]} records exceed the batch limit {limits.max_batch}")
        if not torch.isfinite(h).all():
            raise ProtocolError(f"{name}.handoffs: contains NaN or infinite values")
    if isinstance(msg, HandoffBatch):
        n = msg.handoffs.shape[0]
        for key in ("record_ids", "views"):
            t = getattr(msg, key)
            if t.shape != (n,):
                raise ProtocolError(f"HandoffBatch.{key}: shape {tuple(t.shape)}, expected ({n},) to match handoffs")
            if (t < 0).any():
                raise ProtocolError(f"HandoffBatch.{key}: negative values")
    if isinstance(msg, SamplingRequest):
        _int(msg, "n", 1)
        _int(msg, "steps", 1)
        _int(msg, "seed")
        if msg.sampler not in SAMPLERS:
            raise ProtocolError(f"SamplingRequest.sampler: {msg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if msg.n > limits.max_batch:
            raise ProtocolError(f"SamplingRequest.n: {msg.n} exceeds the batch limit {limits.max_batch}")
    if isinstance(msg, RoundRequest):
        for key in ("round", "first_view", "n_views", "steps"):
            _int(msg, key)
        if not isinstance(msg.run, str) or not 0 < len(msg.run) <= 64 or not msg.run.isalnum():
            raise ProtocolError(f"RoundRequest.run: must be 1-64 letters or digits, got {msg.run!r}")
        if msg.mode not in MODES:
            raise ProtocolError(f"RoundRequest.mode: {msg.mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(msg, Refusal):
        if not isinstance(msg.reason, str) or len(msg.reason) > 2000:
            raise ProtocolError("Refusal.reason: must be a text of at most 2000 characters")
    if isinstance(msg, ClientReport):
        if not isinstance(msg.metrics, dict):
            raise ProtocolError("ClientReport.metrics: must be a mapping of names to numbers")
        for k, v in msg.metrics.items():
            if not isinstance(k, str) or not isinstance(v, (int, float)) or isinstance(v, bool) \
                    or not math.isfinite(v):
                raise ProtocolError(f"ClientReport.metrics[{k!r}]: must be a finite number, got {v!r}")
