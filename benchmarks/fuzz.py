"""Fuzzing the wire protocol: mutated messages of every type against `protocol.decode`.

    .venv/bin/python benchmarks/fuzz.py --messages 1000000 --seed 0 [--out fuzz-findings]

Starts from one realistic message of each type (`seed_messages`: digits noised to the cut as a smoke
run makes them, a sampling request and its handoffs, a report with real keys, a round request, a
refusal), applies 1-3 seeded mutations to each copy (random bytes, truncation, junk, the JSON header
rewritten: deep nesting, swapped types, dtypes, shapes, data_offsets, duplicate keys, huge numbers,
NaN/Infinity tokens; tensor values, client ids, message names) and decodes it with realistic Limits.

A finding is any of:
  crash     decode raised something other than ProtocolError (it would take the server down);
  escape    decode accepted a message that breaks a limit (re-checked here, independently of decode);
  fallback  decode refused only through its last-line-of-defence wrapper (an explicit check is missing);
  slow      decode took longer than --slow seconds on one message (a header crafted to be costly to parse).
Each finding's blob is saved to --out with the mutations that made it, for reproduction:
`protocol.decode(open(path, "rb").read(), fuzz_limits())`. Message i of a campaign depends only on
(seed, i), so `--first i --messages 1` replays it.

tests/test_fuzz.py loads this file by path and runs a short campaign; the mutator lives here, outside
the package, because only the fuzzers use it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import re
import struct
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from collafuse.core import protocol
from collafuse.core.protocol import (REPORT_KEYS, ClientReport, HandoffBatch, Limits, ProtocolError, Refusal,
                                     RoundRequest, SamplingHandoffs, SamplingRequest, handoff_bound)
from collafuse.core.schedule import NoiseSchedule

T, LEVEL, CLIENTS, IMAGE = 100, 20, (0, 1, 2), (1, 8, 8)
KINDS = tuple(protocol.MESSAGES)


# ---------------------------------------------------------------- seeds and limits

def fuzz_limits() -> Limits:
    """What a smoke-sized server accepts: 3 clients, 8x8 digits, cut at level 20 of T = 100."""
    return Limits(known_clients=frozenset(CLIENTS), image_shape=IMAGE, level=LEVEL, max_samples=256, max_steps=T,
                  max_records=200, max_views=4,
                  handoff_bound=handoff_bound(float(NoiseSchedule(T, "linear").alpha_bar[LEVEL])))


def seed_messages() -> dict[str, object]:
    """One realistic message of each type, keyed by type name."""
    from sklearn.datasets import load_digits  # the 8x8 digits ship inside scikit-learn: no download
    x0 = torch.tensor(load_digits().images[:8], dtype=torch.float32).unsqueeze(1) / 8 - 1  # 0..16 -> [-1, 1]
    g = torch.Generator().manual_seed(0)
    y = NoiseSchedule(T, "linear").noise(x0, torch.full((8,), LEVEL), torch.randn(x0.shape, generator=g)).float()
    msgs = [
        HandoffBatch(client_id=1, level=LEVEL, record_ids=torch.arange(8) + 16, views=torch.full((8,), 1),
                     handoffs=y),
        SamplingRequest(client_id=2, n=16, steps=80, sampler="ddim", seed=7),
        SamplingHandoffs(client_id=2, level=LEVEL, handoffs=torch.randn(4, *IMAGE, generator=g) * 1.5),
        ClientReport(client_id=0, metrics={"n_train": 120, "views_made": 2, "steps_done": 40, "loss": 0.071,
                                           "train_seconds": 3.5, "fid": 2.29, "kid_mean": 0.208,
                                           "kid_subset_size": 50}),
        RoundRequest(client_id=1, run="smoke0", round=2, level=LEVEL, mode="once", first_view=1, n_views=1,
                     steps=50),
        Refusal(client_id=2, reason="n_views 9 exceeds this client's policy of 4 views per record"),
    ]
    return {type(m).__name__: m for m in msgs}


# ---------------------------------------------------------------- the independent re-check

def check_limits(msg, limits: Limits) -> list[str]:
    """Every limit a decoded message must satisfy, checked independently of protocol._validate (plain Python)."""
    bad = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            bad.append(what)

    def count(v, lo=0, hi=2**31) -> bool:
        return type(v) is int and lo <= v < hi

    name = type(msg).__name__
    need(name in protocol.MESSAGES, "type")
    need(count(msg.client_id) and msg.client_id in limits.known_clients, "client_id")
    if hasattr(msg, "level"):
        need(msg.level == limits.level, "level")
    if hasattr(msg, "handoffs"):
        h = msg.handoffs
        need(h.dtype == torch.float32 and h.dim() == 4 and tuple(h.shape[1:]) == limits.image_shape, "handoffs.shape")
        values = h.flatten().tolist()
        need(all(math.isfinite(v) for v in values), "handoffs finite")
        if isinstance(msg, HandoffBatch):
            bound = struct.unpack("<f", struct.pack("<f", limits.handoff_bound))[0]  # the bound as float32 holds it
            need(all(abs(v) <= bound for v in values), "handoffs bound")
        else:
            need(h.shape[0] <= limits.max_samples, "handoffs rows")
    if isinstance(msg, HandoffBatch):
        n = msg.handoffs.shape[0]
        for key, hi in (("record_ids", limits.max_records), ("views", limits.max_views)):
            t = getattr(msg, key)
            need(t.dtype == torch.int64 and tuple(t.shape) == (n,), f"{key}.shape")
            need(all(0 <= v < hi for v in t.tolist()), key)
        need(len(set(msg.record_ids.tolist())) == n, "record_ids unique")
    if isinstance(msg, SamplingRequest):
        need(count(msg.n, 1) and msg.n <= limits.max_samples, "n")
        need(count(msg.steps, 1) and msg.steps <= limits.max_steps, "steps")
        need(count(msg.seed, 0, 2**63), "seed")
        need(msg.sampler in ("ddpm", "ddim"), "sampler")
    if isinstance(msg, RoundRequest):
        need(all(count(getattr(msg, k)) for k in ("round", "first_view", "n_views", "steps")), "counts")
        need(count(msg.steps) and msg.steps <= limits.max_steps, "steps")
        need(type(msg.run) is str and 0 < len(msg.run) <= 64 and msg.run.isalnum(), "run")
        need(msg.mode in ("once", "fresh"), "mode")
    if isinstance(msg, Refusal):
        need(type(msg.reason) is str and len(msg.reason) <= 2000, "reason")
    if isinstance(msg, ClientReport):
        m = msg.metrics
        need(type(m) is dict and len(m) <= len(REPORT_KEYS), "metrics")
        for k, v in (m.items() if type(m) is dict else ()):
            kind = REPORT_KEYS.get(k)
            need(kind is not None, f"metrics[{k!r}] key")
            if kind is int:
                need(count(v, 0, 2**63), f"metrics[{k!r}] int")
            elif kind is float:
                need((type(v) is float and math.isfinite(v)) or (type(v) is int and abs(v) < 2**63),
                     f"metrics[{k!r}] float")
    return bad


# ---------------------------------------------------------------- the mutator

_UNSET = object()
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass
class Draft:
    """A message being mutated: its header (tensor entries and __metadata__), fields and payload."""

    header: object  # normally a dict; a mutation may make it anything
    fields: object  # the scalar fields, serialised into __metadata__["fields"] unless fields_raw is set
    data: bytearray
    fields_raw: object = _UNSET  # the exact value of __metadata__["fields"] (any JSON value, or raw text)
    header_text: str | None = None
    prefix: int | None = None  # the length prefix, if it must lie
    blob: bytes | None = None

    def text(self) -> str:
        if self.header_text is None:
            header = self.header
            if type(header) is dict and type(header.get("__metadata__")) is dict:
                header = dict(header)
                meta = header["__metadata__"] = dict(header["__metadata__"])
                meta["fields"] = json.dumps(self.fields) if self.fields_raw is _UNSET else self.fields_raw
            self.header_text = json.dumps(header)
        return self.header_text

    def bytes(self) -> bytes:
        if self.blob is None:
            head = self.text().encode("utf-8", "surrogatepass")
            self.blob = struct.pack("<Q", len(head) if self.prefix is None else self.prefix) + head + bytes(self.data)
        return self.blob


def _split(blob: bytes) -> tuple[dict, bytearray]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), bytearray(blob[8 + n:])


HOSTILE = [-1, 0, 1, 2, 3, 4, 16, 19, 20, 21, 100, 101, 199, 200, 255, 256, 257, 2**31 - 1, 2**31, 2**53 + 1,
           2**63 - 1, 2**63, 2**64, 2**70, -2**63, 10**30, -10**30, 1.0, 20.0, 0.5, -0.0, 1e308, 1e-320,
           float("nan"), float("inf"), float("-inf"), True, False, None, "", "0", "1", "x" * 70, "ddim", "ddpm",
           "euler", "once", "fresh", "run1", "smoke0", "ru n", "é", "\u0000", "[", [], [1], [[[]]], {}, {"a": 1},
           {"fid": 1.0}]
INT_VALUES = [-1, 0, 1, 3, 4, 15, 16, 199, 200, 2**31, 2**63 - 1, -2**63, 123456789]
FLOAT_VALUES = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 3.4e38, 0.0, -0.0, 1e-45, 1.0, -1.0]
DTYPES = ["F64", "I64", "BF16", "U8", "F16", "BOOL", "I32", "F32", "F8_E4M3", "", "f32", 5, None, ["F32"], {}]
TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e400", "99999999999999999999999", "1" * 5000,
          "1.0", "-0", "0.5", "1e2", "-1", "true", "null", '"8"', "[]", "{}"]
FIELD_NAMES = sorted({f for cls in protocol.MESSAGES.values() for f in protocol._FIELDS[cls]}
                     | {"_", "noise", "x0", "labels", "__metadata__", "", "client_id "})


class Mutator:
    """Seeded mutations of valid messages; `mutate(rng, kind)` gives (blob, list of the mutations applied)."""

    def __init__(self, seeds: dict[str, object], limits: Limits):
        self.blobs = {k: protocol.encode(m) for k, m in seeds.items()}
        self.parts = {k: _split(b) for k, b in self.blobs.items()}
        self.texts = {k: json.dumps(header) for k, (header, _) in self.parts.items()}
        self.bound = limits.handoff_bound
        self.structured = [self.field_value, self.field_drop, self.field_add, self.fields_retype, self.fields_dup,
                           self.metrics, self.message_name, self.meta_junk, self.client_swap, self.entry_dtype,
                           self.entry_shape, self.entry_offsets, self.entry_form, self.entry_rename,
                           self.header_retype, self.tensor_values, self.tensor_values, self.splice, self.relayout,
                           self.smuggle]
        self.textual = [self.nest_deep, self.dup_key, self.number_token, self.pad_whitespace, self.junk_text,
                        self.length_prefix, self.quote_storm, self.wide]
        self.raw = [self.flip, self.flip, self.truncate, self.extend, self.insert_delete]
        # What each type is most worth attacking with, beyond the generic mutations: near-valid messages that
        # reach the range checks, not only the parser.
        tensors = [self.tensor_values, self.tensor_values, self.entry_shape, self.entry_offsets, self.flip_payload,
                   self.relayout, self.smuggle]
        self.focus = {"HandoffBatch": tensors, "SamplingHandoffs": tensors, "ClientReport": [self.metrics],
                      "SamplingRequest": [self.field_value, self.near_limit], "RoundRequest": [self.field_value,
                      self.near_limit], "Refusal": [self.field_value, self.client_swap]}

    def mutate(self, rng: random.Random, kind: str) -> tuple[bytes, list[str]]:
        header, data = self.parts[kind]
        # A fresh copy of the seed's header through JSON: several times faster than copy.deepcopy.
        d = Draft(header=json.loads(self.texts[kind]), fields=json.loads(header["__metadata__"]["fields"]),
                  data=bytearray(data))
        # Structure first, then the header text, then raw bytes: each stage works on what the last one made.
        picks = sorted((rng.choices((0, 1, 2, 3), weights=(5, 5, 2, 2))[0] for _ in range(rng.randint(1, 3))))
        ops = []
        for stage in picks:
            op = rng.choice((self.focus[kind], self.structured, self.textual, self.raw)[stage])
            try:
                ops.append(op(rng, d))
            except Exception as e:  # noqa: BLE001 - a mutation that does not fit what earlier ones made
                ops.append(f"{op.__name__}(skipped: {type(e).__name__})")
        return d.bytes(), ops

    # -- structured mutations: header and fields as objects

    @staticmethod
    def _entries(d: Draft) -> list[str]:
        return [k for k in d.header if k != "__metadata__"] if type(d.header) is dict else []

    def field_value(self, rng, d):
        if type(d.fields) is not dict:
            return "field_value(skipped)"
        key = rng.choice(list(d.fields) or ["client_id"]) if rng.random() < 0.8 else rng.choice(FIELD_NAMES)
        d.fields[key] = value = rng.choice(HOSTILE)
        return f"field_value({key}={_show(value)})"

    def near_limit(self, rng, d):
        """A count at or just past a limit, or at the edge of its type: most are valid, some just are not."""
        if type(d.fields) is not dict:
            return "near_limit(skipped)"
        key = rng.choice([k for k in d.fields if k not in ("run", "mode", "sampler", "reason")] or ["client_id"])
        d.fields[key] = value = rng.choice([0, 1, 2, 3, 19, 20, 21, 99, 100, 101, 255, 256, 257, 2**31 - 1, 2**31,
                                            2**63 - 1, 2**63, 2**70, -1])
        return f"near_limit({key}={value})"

    def field_drop(self, rng, d):
        if type(d.fields) is not dict or not d.fields:
            return "field_drop(skipped)"
        key = rng.choice(list(d.fields))
        del d.fields[key]
        return f"field_drop({key})"

    def field_add(self, rng, d):
        if type(d.fields) is not dict:
            return "field_add(skipped)"
        key = rng.choice(FIELD_NAMES)
        d.fields[key] = value = rng.choice(HOSTILE)
        return f"field_add({key}={_show(value)})"

    def fields_retype(self, rng, d):
        depth = rng.choice((2, 3, 4, 50, 30000))
        d.fields_raw = raw = rng.choice(["[1,2]", "3", '"x"', "null", "", "{", '{"a":{"b":{"c":1}}}', "[" * depth +
                                         "]" * depth, '{"metrics":' + "{" * depth + "}" * depth + "}", 5, [], None,
                                         {"client_id": 1}, "{}"])
        return f"fields_retype({_show(raw)})"

    def fields_dup(self, rng, d):
        if type(d.fields) is not dict or not d.fields:
            return "fields_dup(skipped)"
        key = rng.choice(list(d.fields))
        value = rng.choice([d.fields[key], rng.choice(HOSTILE)])
        d.fields_raw = json.dumps(d.fields)[:-1] + f", {json.dumps(key)}: {json.dumps(value)}}}"
        return f"fields_dup({key}={_show(value)})"

    def metrics(self, rng, d):
        if type(d.fields) is not dict:
            return "metrics(skipped)"
        m = d.fields.get("metrics")
        m = dict(m) if type(m) is dict else {}
        how = rng.randrange(9)
        key = rng.choice(list(REPORT_KEYS))
        if how == 0:
            m[rng.choice(["x", "steps", "fid ", "FID", "", "__class__", "n_train\u0000"])] = 1.0
        elif how == 1:
            m[rng.choice([k for k, t in REPORT_KEYS.items() if t is int])] = rng.choice([12.0, 12.5, -1, 2**63,
                                                                                         True, "12", None])
        elif how == 2:
            m[key] = rng.choice(FLOAT_VALUES + INT_VALUES + [10**400 if rng.random() < 0.1 else 10**30, 2**64])
        elif how == 3:
            m[key] = rng.choice([{"a": 1}, [1.0], "1.0", None, True, {}])
        elif how == 4:
            m = {k: (1 if t is int else 0.5) for k, t in REPORT_KEYS.items()}  # every key: still valid
            if rng.random() < 0.5:
                m["extra"] = 1.0
        elif how == 5:
            m = {f"k{i}": 1.0 for i in range(rng.choice((22, 200)))}
        elif how == 6:
            m = rng.choice([[], [1, 2], 3, "m", None, True])
        elif how == 7:
            m[key] = 0 if REPORT_KEYS[key] is int else rng.choice([0.0, 1e300, -1e300, 5])  # edge but valid
        else:
            m.pop(key, None)
        d.fields["metrics"] = m
        return f"metrics({how}, {key})"

    def message_name(self, rng, d):
        meta = d.header.get("__metadata__") if type(d.header) is dict else None
        if type(meta) is not dict:
            return "message_name(skipped)"
        meta["message"] = name = rng.choice(list(KINDS) * 3 + ["", "Weights", "handoffbatch", 1, None,
                                                               ["HandoffBatch"]])
        return f"message_name({_show(name)})"

    def meta_junk(self, rng, d):
        if type(d.header) is not dict:
            return "meta_junk(skipped)"
        how = rng.randrange(5)
        meta = d.header.get("__metadata__")
        if how == 0 and type(meta) is dict:
            meta[rng.choice(["noise", "format", "fields "])] = "pt"
        elif how == 1:
            d.header["__metadata__"] = rng.choice([[], ["message"], 3, "HandoffBatch", None, True])
        elif how == 2:
            d.header.pop("__metadata__", None)
        elif how == 3 and type(meta) is dict:
            meta["message"] = rng.choice([1, None, [], {}, True])
        else:
            d.fields_raw = rng.choice([1, None, [], {"client_id": 0}, True, 2.5])
        return f"meta_junk({how})"

    def client_swap(self, rng, d):
        if type(d.fields) is not dict:
            return "client_swap(skipped)"
        d.fields["client_id"] = cid = rng.choice([0, 1, 2, 0, 1, 2, 3, -1, 2**31, 2**63, "1", 1.0, True, None])
        return f"client_swap({_show(cid)})"

    def entry_dtype(self, rng, d):
        names = [k for k in self._entries(d) if type(d.header[k]) is dict]
        if not names:
            return "entry_dtype(skipped)"
        key = rng.choice(names)
        d.header[key]["dtype"] = dtype = rng.choice(DTYPES)
        return f"entry_dtype({key}={_show(dtype)})"

    def entry_shape(self, rng, d):
        names = [k for k in self._entries(d) if type(d.header[k]) is dict]
        if not names:
            return "entry_shape(skipped)"
        key = rng.choice(names)
        shape = d.header[key].get("shape")
        shape = list(shape) if type(shape) is list else []
        how = rng.randrange(6)
        if how == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 7, 9, 16, -1, 2**31, 2**40, 2**64, 1.5, 8.0,
                                                          "8", None, True, [8]])
        elif how == 1:
            shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 0, 2]))
        elif how == 2 and shape:
            shape.pop(rng.randrange(len(shape)))
        elif how == 3 and len(shape) == 4:
            # Same number of values, other layout: the offsets still agree, the image shape does not.
            shape = rng.choice([[shape[0] * 2, 1, 4, 8], [shape[0], 2, 4, 8], [1, 1, shape[0] * 8, 8],
                                [shape[0], 1, 64, 1]])
        elif how == 4:
            shape = rng.choice([[], 5, "x", {}, None, [[8]], [-0.0]])
        else:
            shape = shape[::-1]
        d.header[key]["shape"] = shape
        return f"entry_shape({key}={_show(shape)})"

    def entry_offsets(self, rng, d):
        names = [k for k in self._entries(d) if type(d.header[k]) is dict]
        if not names:
            return "entry_offsets(skipped)"
        key = rng.choice(names)
        off = d.header[key].get("data_offsets")
        b, e = off if type(off) is list and len(off) == 2 else (0, 0)
        off = rng.choice([[e, b], [b, e + 1], [b - 1, e], [b + 1, e + 1], [-1, e], [b, 2**64], [b, 2**63],
                          [0, len(d.data)], [b, e - 1], [b + 0.0, e], [b], [b, e, e], "0,8", None,
                          [len(d.data), len(d.data)], [b, b]])
        d.header[key]["data_offsets"] = off
        return f"entry_offsets({key}={_show(off)})"

    def entry_form(self, rng, d):
        names = self._entries(d)
        if not names:
            return "entry_form(skipped)"
        key = rng.choice(names)
        how = rng.randrange(3)
        if how == 0:
            d.header[key] = rng.choice([[], ["F32", [0], [0, 0]], 1, "F32", None, True])
        elif how == 1 and type(d.header[key]) is dict:
            d.header[key]["extra"] = 1
        elif type(d.header[key]) is dict:
            d.header[key].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        return f"entry_form({key}, {how})"

    def entry_rename(self, rng, d):
        names = self._entries(d)
        if not names:
            return "entry_rename(skipped)"
        key = rng.choice(names)
        new = rng.choice(["noise", "client_id", "level", "metrics", "seed", "_", "", "handoffs", "record_ids",
                          "views", "x0"])
        if rng.random() < 0.5:
            d.header[new] = d.header.pop(key)
            return f"entry_rename({key}->{new})"
        d.header[new] = copy.deepcopy(d.header[key])  # a second name for the same bytes: overlapping spans
        return f"entry_copy({key}->{new})"

    def header_retype(self, rng, d):
        d.header_text = rng.choice(["[]", "[{}]", "3", '"x"', "null", "true", "{}", '{"__metadata__": {}}',
                                    '{"__metadata__": {"message": "Refusal"}}', "", " ", "{"])
        return f"header_retype({d.header_text!r})"

    def tensor_values(self, rng, d):
        names = [k for k in self._entries(d) if type(d.header[k]) is dict and k != "_"]
        if not names:
            return "tensor_values(skipped)"
        key = rng.choice(names)
        entry = d.header[key]
        try:
            b, e = entry["data_offsets"]
            wide, code = (8, "<q") if entry["dtype"] == "I64" else (4, "<f")
        except (KeyError, TypeError, ValueError):
            return "tensor_values(skipped)"
        count = (e - b) // wide
        if type(b) is not int or type(e) is not int or count <= 0 or b < 0 or e > len(d.data):
            return "tensor_values(skipped)"
        if code == "<f":
            bound = self.bound
            palette = FLOAT_VALUES + [bound, -bound, math.nextafter(bound, math.inf) * (1 + 1e-6), bound * 0.999]
        else:
            palette = INT_VALUES + [struct.unpack_from("<q", d.data, b)[0]]  # the first id again: a duplicate
        value = rng.choice(palette)
        spots = range(count) if rng.random() < 0.2 else rng.sample(range(count), min(count, rng.randint(1, 3)))
        for i in spots:
            struct.pack_into(code, d.data, b + i * wide, value)
        return f"tensor_values({key}={_show(value)} x{len(spots)})"

    def relayout(self, rng, d):
        """Move tensor spans: a gap at the start or between, spans that overlap, or two equal spans swapped."""
        spans = {k: d.header[k]["data_offsets"] for k in self._entries(d)
                 if type(d.header[k]) is dict and type(d.header[k].get("data_offsets")) is list
                 and len(d.header[k]["data_offsets"]) == 2 and all(type(o) is int for o in d.header[k]["data_offsets"])}
        if not spans:
            return "relayout(skipped)"
        how, k = rng.randrange(4), rng.choice((1, 4, 8))
        if how == 0:  # every span shifted by k, with k junk bytes in front: a gap at the start
            d.data[:0] = bytes(k)
            for off in spans.values():
                off[0], off[1] = off[0] + k, off[1] + k
        elif how == 1:  # one span shifted by k: a gap before it and an overlap after (or a short payload)
            off = spans[rng.choice(list(spans))]
            off[0], off[1] = off[0] + k, off[1] + k
            d.data += bytes(k)
        elif how == 2:  # two names for one span, the payload padded to the same length
            a, b = rng.sample(list(spans), 2) if len(spans) > 1 else (next(iter(spans)),) * 2
            spans[b][:] = spans[a]
        else:  # swap the spans of two entries: valid exactly when their sizes agree
            a, b = rng.sample(list(spans), 2) if len(spans) > 1 else (next(iter(spans)),) * 2
            spans[a][:], spans[b][:] = list(spans[b]), list(spans[a])
        return f"relayout({how}, {k})"

    def smuggle(self, rng, d):
        """Data in the zero-size marker: every other check passes, only the marker's emptiness refuses it."""
        if type(d.header) is not dict:
            return "smuggle(skipped)"
        n = rng.choice((1, 4, 64))
        d.header["_"] = {"dtype": "F32", "shape": [n], "data_offsets": [len(d.data), len(d.data) + 4 * n]}
        d.data += struct.pack(f"<{n}f", *([0.5] * n))
        return f"smuggle({n})"

    def splice(self, rng, d):
        other = rng.choice(KINDS)
        if rng.random() < 0.5:
            d.data = bytearray(self.parts[other][1])
            return f"splice(data of {other})"
        d.header = copy.deepcopy(self.parts[other][0])
        return f"splice(header of {other})"

    # -- textual mutations: the header's JSON text

    def nest_deep(self, rng, d):
        depth = rng.choice((3, 4, 10, 100, 1000, 30000, 100000))
        deep = "[" * depth + "]" * depth
        text = d.text()
        how = rng.randrange(3)
        if how == 0:
            d.header_text = deep
        elif how == 1:
            d.header_text = text[:-1] + ', "deep": ' + deep + "}" if text.endswith("}") else deep
        else:
            d.header_text = text.replace('"shape": [', '"shape": ' + "[" * depth, 1) + "]" * (depth - 1)
        return f"nest_deep({depth}, {how})"

    def dup_key(self, rng, d):
        text = d.text()
        how = rng.randrange(3)
        if how == 0 and type(d.header) is dict and d.header:
            key = rng.choice(list(d.header))
            d.header_text = text[:-1] + f", {json.dumps(key)}: {json.dumps(d.header[key])}}}"
            return f"dup_key({key})"
        field_name = rng.choice(['"dtype": ', '"shape": ', '"data_offsets": ', '"message": '])
        i = text.find(field_name)
        if i < 0:
            return "dup_key(skipped)"
        dup = {'"dtype": ': '"F32", ', '"shape": ': "[1], ", '"data_offsets": ': "[0, 0], ",
               '"message": ': '"Refusal", '}[field_name]
        d.header_text = text[:i] + field_name + dup + text[i:]
        return f"dup_key({field_name.strip()})"

    def number_token(self, rng, d):
        text = d.text()
        spots = list(_NUMBER.finditer(text))
        if not spots:
            return "number_token(skipped)"
        m = rng.choice(spots)
        token = rng.choice(TOKENS)
        d.header_text = text[:m.start()] + token + text[m.end():]
        return f"number_token({m.group()}->{token[:20]})"

    def pad_whitespace(self, rng, d):
        n = rng.choice((1, 7, 1000, 65536, 70000))
        text = d.text()
        d.header_text = text + " " * n if rng.random() < 0.5 else text[:1] + "\n" * n + text[1:]
        return f"pad_whitespace({n})"

    def junk_text(self, rng, d):
        text = d.text()
        junk = rng.choice(["\x00", "\ufeff", '"\\ud800"', "\\", '"', "]", "}", ",", ":", "\u2028", "é", "/*x*/"])
        i = rng.randrange(len(text) + 1)
        d.header_text = text[:i] + junk + text[i:]
        return f"junk_text({junk!r} at {i})"

    def quote_storm(self, rng, d):
        """Escaped quotes without an end: a string scan that retries from every quote is quadratic (slow)."""
        n = rng.choice((100, 10_000, 30_000))
        storm = '"' + '\\"' * n
        text = d.text()
        i = rng.randrange(len(text) + 1)
        d.header_text = rng.choice([storm, text[:i] + storm + text[i:], text[:-1] + ', "x": ' + storm])
        return f"quote_storm({n} at {i})"

    def wide(self, rng, d):
        """Wide rather than deep: thousands of keys, list items or characters within the header limit."""
        n = rng.choice((1000, 5000, 20_000))
        how = rng.randrange(4)
        if how == 0 and type(d.header) is dict:
            d.header.update({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n // 50)})
        elif how == 1 and type(d.fields) is dict:
            d.fields.update({f"f{i}": i for i in range(n // 10)})
        elif how == 2 and type(d.fields) is dict:
            d.fields[rng.choice(["reason", "run", "sampler", "metrics"])] = "x" * n
        elif type(d.header) is dict and type(d.header.get("_")) is dict:
            d.header["_"]["shape"] = [0] * (n // 3)
        d.header_text = None  # structure changed: serialise again
        return f"wide({how}, {n})"

    def length_prefix(self, rng, d):
        n = len(d.text().encode("utf-8", "surrogatepass"))
        d.prefix = rng.choice([0, 1, max(0, n - 1), n + 1, n + 8, 2**63, 2**64 - 1, 65537, rng.randrange(2**32)])
        return f"length_prefix({d.prefix})"

    # -- raw mutations: the final bytes

    def flip(self, rng, d):
        blob = bytearray(d.bytes())
        head = min(len(blob), 8 + len(d.text()))
        spots = [rng.randrange(head if rng.random() < 0.5 else len(blob)) for _ in range(rng.randint(1, 8))]
        for i in spots:
            blob[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        d.blob = bytes(blob)
        return f"flip({spots})"

    def flip_payload(self, rng, d):
        """Flip bits in the tensor bytes only: the header stays valid, the values go anywhere."""
        if not d.data:
            return "flip_payload(skipped)"
        spots = [rng.randrange(len(d.data)) for _ in range(rng.randint(1, 4))]
        for i in spots:
            d.data[i] ^= 1 << rng.randrange(8)
        return f"flip_payload({spots})"

    def truncate(self, rng, d):
        blob = d.bytes()
        n = rng.randrange(len(blob))
        d.blob = blob[:n]
        return f"truncate({n})"

    def extend(self, rng, d):
        junk = rng.randbytes(rng.choice((1, 8, 64)))
        d.blob = d.bytes() + junk
        return f"extend({len(junk)})"

    def insert_delete(self, rng, d):
        blob = bytearray(d.bytes())
        i = rng.randrange(len(blob))
        if rng.random() < 0.5:
            blob.insert(i, rng.randrange(256))
        else:
            del blob[i]
        d.blob = bytes(blob)
        return f"insert_delete({i})"


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


# ---------------------------------------------------------------- a campaign

@dataclass
class Finding:
    what: str  # crash, escape, fallback or slow
    index: int
    kind: str
    ops: list[str]
    detail: str
    blob: bytes = field(repr=False)


@dataclass
class Report:
    messages: int = 0
    seconds: float = 0.0
    accepted: Counter = field(default_factory=Counter)  # seed kind -> decoded
    rejected: Counter = field(default_factory=Counter)  # seed kind -> ProtocolError
    findings: list[Finding] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def of(self, what: str) -> list[Finding]:
        return [f for f in self.findings if f.what == what]


def message(mutator: Mutator, seed: int, i: int, kinds=KINDS) -> tuple[str, bytes, list[str]]:
    """Message i of the campaign `seed`: it depends on (seed, i) alone, so any one can be replayed."""
    rng = random.Random(seed * 1_000_003 + i)
    kind = kinds[i % len(kinds)]
    blob, ops = mutator.mutate(rng, kind)
    return kind, blob, ops


def decode_one(blob: bytes, limits: Limits, expect: type | None = None) -> tuple[object, str | None, str | None]:
    """(message or None, the ProtocolError text or None, a finding's kind or None) for one blob."""
    try:
        msg = protocol.decode(blob, limits, expect=expect)
    except ProtocolError as e:
        return None, str(e), "fallback" if "cannot be built" in str(e) else None
    except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for
        return None, "".join(traceback.format_exception(e)), "crash"
    bad = check_limits(msg, limits)
    return msg, None, "escape" if bad else None


def run(n: int, seed: int = 0, limits: Limits | None = None, first: int = 0, kinds=KINDS,
        slow_s: float = 1.0) -> Report:
    """Decode n mutated messages (indices first .. first+n-1); count outcomes and keep every finding.

    slow_s: a decode taking longer is a finding (a normal one takes ~0.1 ms; a quadratic parse of a crafted
    64 KiB header takes a minute, so a generous bound still catches it on a busy machine).
    """
    limits = limits or fuzz_limits()
    mutator = Mutator(seed_messages(), limits)
    report = Report()
    start = time.perf_counter()
    for i in range(first, first + n):
        kind, blob, ops = message(mutator, seed, i, kinds)
        t0 = time.perf_counter()
        msg, error, finding = decode_one(blob, limits)
        took = time.perf_counter() - t0
        if took > slow_s and not finding:
            finding, error = "slow", f"decode took {took:.2f} s ({error or 'accepted'})"
        (report.accepted if msg is not None else report.rejected)[kind] += 1
        if finding:
            detail = error if msg is None or error else f"accepted but breaks {check_limits(msg, limits)}"
            report.findings.append(Finding(finding, i, kind, ops, detail, blob))
    report.messages, report.seconds = n, time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first", type=int, default=0, help="index of the first message (replay one with --messages 1)")
    p.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="where findings' blobs are saved")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--slow", type=float, default=1.0, help="seconds one decode may take before it is a finding")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args.messages, args.seed, first=args.first, slow_s=args.slow)
    print(f"{report.messages} messages in {report.seconds:.1f} s: {report.rate:,.0f} messages/s")
    for kind in KINDS:
        print(f"  {kind:17s} accepted {report.accepted[kind]:7d}  rejected {report.rejected[kind]:7d}")
    shown = Counter()
    for f in report.findings:
        signature = (f.what, f.detail.strip().splitlines()[-1][:120])
        shown[signature] += 1
        if shown[signature] > 3:  # the same failure again: counted, not saved
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{f.what}-{args.seed}-{f.index}.bin"
        path.write_bytes(f.blob)
        path.with_suffix(".txt").write_text(f"{f.kind} <- {f.ops}\n{f.detail}\n")
        print(f"{f.what.upper()} #{f.index} ({f.kind} <- {'; '.join(f.ops)}): {signature[1]}\n  saved {path}")
    print(f"findings: {len(report.of('crash'))} crashes, {len(report.of('escape'))} escapes, "
          f"{len(report.of('fallback'))} fallbacks, {len(report.of('slow'))} slow")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
