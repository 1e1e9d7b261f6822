"""Everything that crosses the client/server boundary, and nothing else.

Each message is a safetensors blob: its tensors plus a JSON header naming the message type and its
scalar fields. `encode` gives the real bytes that travel (in-process or inside a Flower record);
`decode` checks a blob before anything is built from it: size, type, fields, shape, dtype, finite
values and the sender. A violation raises ProtocolError naming the field; the receiver's state is
untouched because decoding happens before any state changes.

`decode` treats every byte as hostile: whatever a sender puts on the wire, the only exception that
leaves it is ProtocolError (a crash there would take the server down for every client). The header's
size and nesting depth are bounded before it is parsed, every parsed JSON value is type-checked, the
tensors are built only from offsets checked against the payload, and every scalar is typed and ranged.

What the server sends: RoundRequest (what it asks of a round), SamplingHandoffs. What a client sends:
HandoffBatch (noised images at the cut, with client-chosen record ids), SamplingRequest, ClientReport
(plain metrics), Refusal (the request broke the client's policy). Never x_0, never the client's noise
or secret, never labels.
"""
from __future__ import annotations

import functools
import json
import math
import re
import struct
from dataclasses import dataclass, field, fields

import torch
from safetensors.torch import save as st_save

MAX_MESSAGE_BYTES = 64 * 2**20
# A real header is a few hundred bytes (a Refusal's 2000-character reason, escaped, stays under 13 KiB).
MAX_HEADER_BYTES = 64 * 2**10
# header -> tensor entry -> shape list, and fields -> metrics: nothing on the wire nests deeper.
MAX_JSON_DEPTH = 3
# Counts, levels, rounds, views and client ids: far beyond any real run, far below any overflow.
MAX_INT = 2**31
# torch.manual_seed takes at most a signed 64-bit seed; SamplingRequest.seed goes straight into it.
MAX_SEED = 2**63
# Records are images in [-1, 1]: the elementwise bound C of a record (DP clipping only scales records down).
RECORD_BOUND = 1.0
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
    metrics: dict = field(default_factory=dict)  # name -> number, names from REPORT_KEYS


MESSAGES = {cls.__name__: cls for cls in (RoundRequest, Refusal, HandoffBatch, SamplingRequest, SamplingHandoffs,
                                          ClientReport)}
MODES = ("once", "fresh")

# What a ClientReport may carry: every number a client reports anywhere in the project, and nothing else
# (a free-form report is a channel for anything). int keys are counts (>= 0); float keys take any finite number.
REPORT_KEYS: dict[str, type] = {
    **dict.fromkeys(("n_train", "n_test", "views_made", "steps_done", "n_samples", "n_reference", "kid_subset_size",
                     "params", "records_released", "views_released"), int),
    **dict.fromkeys(("loss", "train_seconds", "sample_seconds", "fid", "kid_mean", "kid_std", "own_class_share",
                     "own_client_share", "epsilon", "delta", "train_flops", "sample_flops",
                     # the same quality numbers for pure noise (floor) and the client's real images (ceiling)
                     "fid_noise", "kid_noise", "fid_ceiling", "kid_ceiling", "fid_score", "kid_score",
                     "own_class_share_noise", "own_client_share_noise", "own_class_share_ceiling",
                     "own_client_share_ceiling"), float),
}

# Wire dtype -> (torch dtype, bytes per element); only what the messages use, so a foreign dtype never gets near torch.
_WIRE_DTYPES = {"F32": (torch.float32, 4), "I64": (torch.int64, 8)}
_TENSOR_SPECS = {  # field -> (wire dtype, number of dims)
    "record_ids": ("I64", 1), "views": ("I64", 1), "handoffs": ("F32", 4)}
_MARKER = "_"  # the zero-size tensor every message carries (safetensors cannot store an empty file)
_MARKER_SPEC = ("F32", 1)
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_FIELDS = {cls: frozenset(f.name for f in fields(cls)) for cls in MESSAGES.values()}
_JSON_SCALARS = (int, float, str, bool, type(None))


def handoff_bound(alpha_bar_cut: float, k: float = 8.0) -> float:
    """The largest |value| an honest handoff y = sqrt(ᾱ)·x_0 + sqrt(1-ᾱ)·e has, with e inside k sigmas.

    |x_0| <= C = 1 elementwise (images in [-1, 1]; clipping to an L2 norm only scales a record down), and a
    standard normal passes k = 8 sigmas with probability ~1e-15 per value: an honest client never trips it, while
    anything larger is no handoff the mechanism makes. Set Limits.handoff_bound from the server's schedule.
    """
    ab = float(alpha_bar_cut)
    if not 0.0 <= ab <= 1.0:
        raise ValueError(f"alpha_bar_cut must be in [0, 1] (ᾱ at the cut level), got {alpha_bar_cut!r}")
    if not (math.isfinite(k) and k >= 0):
        raise ValueError(f"k (noise sigmas allowed) must be a finite number >= 0, got {k!r}")
    return math.sqrt(ab) * RECORD_BOUND + k * math.sqrt(1.0 - ab)


def _wire_metrics(metrics: dict) -> dict:
    """Counts computed as floats (say 50.0 from a float() over a whole report) travel as the integers they are."""
    return {k: int(v) if REPORT_KEYS.get(k) is int and type(v) is float and v.is_integer() else v
            for k, v in metrics.items()}


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
    if isinstance(scalars.get("metrics"), dict):
        scalars["metrics"] = _wire_metrics(scalars["metrics"])
    tensors.setdefault(_MARKER, torch.zeros(0, dtype=torch.float32))
    return st_save(tensors, metadata={"message": name, "fields": json.dumps(scalars)})


@dataclass(frozen=True)
class Limits:
    """What the receiver accepts; None means 'not checked'."""

    known_clients: frozenset | None = None
    image_shape: tuple[int, int, int] | None = None  # (C, H, W)
    level: int | None = None
    max_bytes: int = MAX_MESSAGE_BYTES
    max_batch: int = 1 << 20
    max_header_bytes: int = MAX_HEADER_BYTES
    max_samples: int | None = None  # SamplingRequest.n and the rows of SamplingHandoffs
    max_steps: int | None = None  # SamplingRequest.steps and RoundRequest.steps (the server passes T)
    max_records: int | None = None  # HandoffBatch.record_ids < this: the sender's declared record count
    max_views: int | None = None  # HandoffBatch.views < this
    handoff_bound: float | None = None  # |HandoffBatch.handoffs| <= this; see handoff_bound()


# ---------------------------------------------------------------- parsing untrusted JSON

def _kind(value) -> str:
    """A JSON value's kind, for error texts."""
    return {dict: "an object", list: "a list", str: "a text", bool: "true/false", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value, n: int = 80) -> str:
    """repr cut to n characters: an error text must not echo 64 KiB of a hostile header."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


class _DuplicateKey(ValueError):
    pass


def _unique_object(pairs: list) -> dict:
    # json.loads keeps the last of duplicate keys while other parsers keep the first: refuse the ambiguity.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


_JSON = json.JSONDecoder(object_pairs_hook=_unique_object)  # built once: json.loads(**kw) builds one per call
# A string, or an unterminated one up to the end: the closing quote is optional so that a match from every '"'
# succeeds and the scan stays linear (with it required, '"' + '\\"' * n retries from each quote: quadratic, a
# 64 KiB header took a minute). Brackets after an unterminated string are not counted, but json.loads stops there.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_EMPTY_PAIR = re.compile(r"\[\]|\{\}")


def _nests_at_most(text: str, depth: int) -> bool:
    """Whether text's brackets (outside strings) nest at most `depth` deep and balance.

    Checked before json.loads, whose parser recurses once per level: a 60k-deep `[[[...` would exhaust the
    stack. Each pass deletes the innermost empty pairs, so `depth` passes empty any text that nests no deeper;
    all in C regex passes, microseconds for a real header.
    """
    s = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    for _ in range(depth):
        if not s:
            return True
        s = _EMPTY_PAIR.sub("", s)
    return not s


def _loads(text: str, where: str, what: str):
    """json.loads for untrusted text: depth bounded first, duplicate keys refused, only ProtocolError escapes."""
    if not _nests_at_most(text, MAX_JSON_DEPTH):
        raise ProtocolError(f"{where}: {what} nest deeper than {MAX_JSON_DEPTH} levels or do not balance; "
                            f"nothing in a message nests deeper")
    try:
        return _JSON.decode(text)
    except _DuplicateKey as e:
        raise ProtocolError(f"{where}.{e}: given twice in the {what}; send each once") from None
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"{where}: {what} is not valid JSON ({_short(str(e), 200)})") from None


def _header(blob: bytes, limits: Limits) -> tuple[dict, int]:
    """The parsed header (an object) and where the payload starts."""
    if not isinstance(blob, (bytes, bytearray)):
        raise ProtocolError(f"message: expected bytes, got {type(blob).__name__}")
    if len(blob) > limits.max_bytes:
        raise ProtocolError(f"message: {len(blob)} bytes exceeds the limit of {limits.max_bytes} bytes; "
                            f"send smaller batches or raise protocol.max_message_bytes")
    if len(blob) < 8:
        raise ProtocolError("message: truncated (no header)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > limits.max_header_bytes:
        raise ProtocolError(f"message: header of {n} bytes exceeds the limit of {limits.max_header_bytes} bytes "
                            f"(a real header is a few hundred bytes)")
    if 8 + n > len(blob):
        raise ProtocolError("message: truncated (header longer than the message)")
    try:
        text = bytes(blob[8:8 + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("message: header is not valid JSON (not UTF-8)") from None
    header = _loads(text, "message", "header")
    if type(header) is not dict:
        raise ProtocolError(f"message: header must be a JSON object of tensor entries, got {_kind(header)}")
    return header, 8 + n


def _metadata(header: dict) -> dict:
    """Pop and check __metadata__: an object of texts, only 'message' and 'fields'."""
    meta = header.pop("__metadata__", None)
    if meta is None:
        return {}
    if type(meta) is not dict:
        raise ProtocolError(f"message: __metadata__ must be an object of texts, got {_kind(meta)}")
    for key, value in meta.items():
        if key not in ("message", "fields"):
            raise ProtocolError(f"message: __metadata__ carries only 'message' and 'fields', not {_short(key)}")
        if type(value) is not str:
            raise ProtocolError(f"message: __metadata__[{key!r}] must be a text, got {_kind(value)}")
    return meta


def _scalars(name: str, cls: type, text: str) -> dict:
    """The scalar fields: a JSON object of numbers, texts, true/false or null (ClientReport.metrics: an object)."""
    scalars = _loads(text, name, "scalar fields")
    if type(scalars) is not dict:
        raise ProtocolError(f"{name}: scalar fields must be a JSON object, got {_kind(scalars)}")
    for key, value in scalars.items():
        if type(value) in _JSON_SCALARS or (key == "metrics" and cls is ClientReport and type(value) is dict):
            continue  # each value's exact type and range are checked in _validate
        raise ProtocolError(f"{name}.{key}: {_kind(value)} where a number or text is expected")
    return scalars


def _entry(name: str, key: str, entry, spec: tuple[str, int], payload: int) -> tuple[str, list, int, int]:
    """Check one tensor entry against its (wire dtype, dims) and the payload size; (dtype, shape, begin, end)."""
    where = f"{name}.{key}"
    if type(entry) is not dict or entry.keys() != _ENTRY_KEYS:
        raise ProtocolError(f"{where}: a tensor entry must be an object of exactly dtype, shape and data_offsets, "
                            f"got {_short(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str or dtype != spec[0]:
        shown = dtype[:16] if type(dtype) is str else _short(dtype)
        raise ProtocolError(f"{where}: dtype {shown} where {_WIRE_DTYPES[spec[0]][0]} is required")
    if type(shape) is not list or not all(type(d) is int and 0 <= d < MAX_INT for d in shape):
        raise ProtocolError(f"{where}: shape {_short(shape)} must be a list of sizes >= 0 and < {MAX_INT}")
    if len(shape) != spec[1]:
        raise ProtocolError(f"{where}: shape {_short(shape)} must have {spec[1]} dims")
    if (type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= payload):
        raise ProtocolError(f"{where}: data_offsets {_short(offsets)} must be [begin, end] within the "
                            f"{payload}-byte payload")
    begin, end = offsets
    if end - begin != math.prod(shape) * _WIRE_DTYPES[dtype][1]:
        raise ProtocolError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, shape {shape} of {dtype} "
                            f"needs {math.prod(shape) * _WIRE_DTYPES[dtype][1]}")
    return dtype, shape, begin, end


def _tensors(name: str, entries: dict, blob: bytes, start: int) -> dict[str, torch.Tensor]:
    """Build the tensors from checked entries that must tile the payload exactly (no gaps, overlaps, tail).

    Built here rather than by safetensors.load so that what was checked is exactly what is built: no second
    parser reads the header differently. Each tensor copies its bytes (safetensors is little-endian, as is
    every platform torch runs on).
    """
    pos = 0
    for _, _, begin, end in sorted(entries.values(), key=lambda e: (e[2], e[3])):
        if begin != pos:
            raise ProtocolError(f"{name}: payload is corrupt (tensor data must follow on without gaps or overlaps; "
                                f"a tensor starts at byte {begin}, expected {pos})")
        pos = end
    if start + pos != len(blob):
        raise ProtocolError(f"{name}: payload is corrupt ({len(blob) - start - pos} bytes after the last tensor)")
    view, out = memoryview(blob), {}
    for key, (dtype, shape, begin, end) in entries.items():
        torch_dtype = _WIRE_DTYPES[dtype][0]
        out[key] = (torch.frombuffer(bytearray(view[start + begin:start + end]), dtype=torch_dtype).reshape(shape)
                    if end > begin else torch.empty(shape, dtype=torch_dtype))  # frombuffer refuses 0 bytes
    return out


def decode(blob: bytes, limits: Limits = Limits(), expect: type | None = None):
    """Parse and validate a blob; raise ProtocolError (and nothing else) naming the first bad field."""
    header, start = _header(blob, limits)
    meta = _metadata(header)
    name = meta.get("message")
    if name not in MESSAGES:
        raise ProtocolError(f"message: unknown type {_short(name)}; known: {', '.join(MESSAGES)}")
    cls = MESSAGES[name]
    if expect is not None and cls is not expect:
        raise ProtocolError(f"message: expected {expect.__name__}, got {name}")
    scalars = _scalars(name, cls, meta.get("fields", "{}"))
    wanted = _FIELDS[cls]
    tensor_fields = wanted & _TENSOR_SPECS.keys()
    extra = (scalars.keys() | header.keys() - {_MARKER}) - wanted
    if extra:
        raise ProtocolError(f"{name}: unexpected field(s) {_short(sorted(extra), 200)}; a {name} carries only "
                            f"{sorted(wanted)}")
    for key in sorted(scalars.keys() & tensor_fields):
        raise ProtocolError(f"{name}.{key}: sent as a scalar field, but it is a tensor; send it as a tensor")
    for key in sorted(header.keys() & (wanted - tensor_fields)):
        raise ProtocolError(f"{name}.{key}: sent as a tensor, but it is a scalar field; send it in 'fields'")
    # Check declared dtypes and shapes before the tensors are materialised.
    entries = {}
    for key in sorted(tensor_fields):
        if key not in header:
            raise ProtocolError(f"{name}.{key}: missing")
        entries[key] = _entry(name, key, header[key], _TENSOR_SPECS[key], len(blob) - start)
    if _MARKER in header:
        entries[_MARKER] = _entry(name, _MARKER, header[_MARKER], _MARKER_SPEC, len(blob) - start)
        if entries[_MARKER][1] != [0]:  # a marker with data would be a channel for anything
            raise ProtocolError(f"{name}.{_MARKER}: the marker tensor must be empty (shape [0]), "
                                f"got shape {entries[_MARKER][1]}")
    for key in wanted - tensor_fields:
        if key not in scalars:
            raise ProtocolError(f"{name}.{key}: missing")
    try:  # the last line of defence: every field was checked above, so this is never expected to fire
        tensors = _tensors(name, entries, blob, start)
        msg = cls(**scalars, **{k: tensors[k] for k in tensor_fields})
    except ProtocolError:
        raise
    except Exception as e:  # the fuzzer (benchmarks/fuzz.py) counts these as findings: a check is missing
        raise ProtocolError(f"{name}: cannot be built from the message ({type(e).__name__}: {_short(str(e))})") \
            from None
    _validate(msg, limits)
    return msg


# ---------------------------------------------------------------- validation of a built message

def _int(msg, key: str, lo: int = 0, hi: int = MAX_INT, why: str = "") -> None:
    value = getattr(msg, key)
    if type(value) is not int or not lo <= value < hi:  # type(...) is int: refuses bool and 1.0
        raise ProtocolError(f"{type(msg).__name__}.{key}: must be an integer >= {lo} and < {hi}{why}, "
                            f"got {_short(value)}")


def _at_most(msg, key: str, limit: int | None, what: str) -> None:
    value = getattr(msg, key)
    if limit is not None and value > limit:
        raise ProtocolError(f"{type(msg).__name__}.{key}: {value} exceeds {what} {limit}")


@functools.lru_cache(maxsize=16)
def _float32(x: float) -> float:
    """x rounded to float32, inf beyond its range (struct.pack would raise)."""
    return struct.unpack("<f", struct.pack("<f", x))[0] if abs(x) < 3.4e38 else math.copysign(math.inf, x)


def _at_most_rows(msg: SamplingHandoffs, limit: int | None) -> None:
    n = msg.handoffs.shape[0]
    if limit is not None and n > limit:
        raise ProtocolError(f"SamplingHandoffs.handoffs: {n} samples exceed max_samples {limit}")


def _finite_values(name: str, h: torch.Tensor, bound: float | None) -> None:
    """All values finite and, when a bound is set, |value| <= bound (refused, never clipped)."""
    if h.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(h))  # NaN propagates into both, inf into one
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ProtocolError(f"{name}.handoffs: contains NaN or infinite values")
    if bound is not None:
        top = max(-lo, hi)
        # Compare with the bound as float32 holds it: a value exactly at the bound passes on the wire too.
        if top > _float32(bound):
            raise ProtocolError(f"{name}.handoffs: max |value| {top:.9g} exceeds the bound {bound:.9g} that noising "
                                f"images in [-1, 1] to the cut level can produce (Limits.handoff_bound); "
                                f"send handoffs of records scaled to [-1, 1]")


def _check_handoff_batch(msg: HandoffBatch, limits: Limits) -> None:
    n = msg.handoffs.shape[0]
    for key, limit, what in (("record_ids", limits.max_records, "max_records (the sender's declared record count)"),
                             ("views", limits.max_views, "max_views")):
        t = getattr(msg, key)
        if t.shape != (n,):
            raise ProtocolError(f"HandoffBatch.{key}: shape {tuple(t.shape)}, expected ({n},) to match handoffs")
        if n == 0:
            continue
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < 0:
            raise ProtocolError(f"HandoffBatch.{key}: negative values")
        if limit is not None and hi >= limit:
            raise ProtocolError(f"HandoffBatch.{key}: {hi} out of range; values must be < {what} = {limit}")
    if n > 1 and len(set(msg.record_ids.tolist())) != n:
        raise ProtocolError("HandoffBatch.record_ids: duplicate ids; a batch carries each record at most once")


def _check_metrics(metrics) -> None:
    if type(metrics) is not dict:
        raise ProtocolError("ClientReport.metrics: must be a mapping of names to numbers")
    if len(metrics) > len(REPORT_KEYS):
        raise ProtocolError(f"ClientReport.metrics: {len(metrics)} keys, a report carries at most {len(REPORT_KEYS)}")
    for k, v in metrics.items():
        kind = REPORT_KEYS.get(k)
        if kind is None:
            raise ProtocolError(f"ClientReport.metrics[{_short(k)}]: unknown key; a report carries only "
                                f"{', '.join(REPORT_KEYS)}")
        if kind is int:
            if type(v) is not int or not 0 <= v < 2**63:
                raise ProtocolError(f"ClientReport.metrics[{k!r}]: must be an integer >= 0 (a count), got {_short(v)}")
        # Ints beyond float range would overflow math.isfinite; no real metric comes near 2**63.
        elif not (type(v) is float and math.isfinite(v) or type(v) is int and -2**63 < v < 2**63):
            raise ProtocolError(f"ClientReport.metrics[{k!r}]: must be a finite number, got {_short(v)}")


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
        # Server samples are not clipped, so only client handoffs have a bound the mechanism guarantees.
        _finite_values(name, h, limits.handoff_bound if isinstance(msg, HandoffBatch) else None)
    if isinstance(msg, HandoffBatch):
        _check_handoff_batch(msg, limits)
    if isinstance(msg, SamplingHandoffs):
        _at_most_rows(msg, limits.max_samples)
    if isinstance(msg, SamplingRequest):
        _int(msg, "n", 1)
        _int(msg, "steps", 1)
        _int(msg, "seed", 0, MAX_SEED, " (torch.manual_seed's limit)")
        if msg.sampler not in SAMPLERS:
            raise ProtocolError(f"SamplingRequest.sampler: {_short(msg.sampler)}; choose one of {', '.join(SAMPLERS)}")
        if msg.n > limits.max_batch:
            raise ProtocolError(f"SamplingRequest.n: {msg.n} exceeds the batch limit {limits.max_batch}")
        _at_most(msg, "n", limits.max_samples, "max_samples")
        _at_most(msg, "steps", limits.max_steps, "max_steps")
    if isinstance(msg, RoundRequest):
        for key in ("round", "first_view", "n_views", "steps"):
            _int(msg, key)
        _at_most(msg, "steps", limits.max_steps, "max_steps")
        if not isinstance(msg.run, str) or not 0 < len(msg.run) <= 64 or not msg.run.isalnum():
            raise ProtocolError(f"RoundRequest.run: must be 1-64 letters or digits, got {_short(msg.run)}")
        if msg.mode not in MODES:
            raise ProtocolError(f"RoundRequest.mode: {_short(msg.mode)}; choose one of {', '.join(MODES)}")
    if isinstance(msg, Refusal):
        if not isinstance(msg.reason, str) or len(msg.reason) > 2000:
            raise ProtocolError("Refusal.reason: must be a text of at most 2000 characters")
    if isinstance(msg, ClientReport):
        _check_metrics(msg.metrics)
