"""The client's own privacy policy, and the ledger of every release it ever made.

The server controls the run's configuration, so nothing that protects a client may come from
there: the policy is set by the client's owner alone, and the client refuses (PolicyViolation)
any request below it. The ledger counts, per record and over the client's lifetime, every distinct
view released under every mechanism, so a budget holds across runs, sessions and restarts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
import math
import os
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from collafuse.core.state import fsync_dir
from collafuse.roles.noise import DIGEST_BYTES, release_key
from collafuse.roles.privacy import handoff_mechanism, range_clip_norm, releases_epsilon

try:  # POSIX: serialise appends and reads with other processes on the same state folder
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

MODES = ("once", "fresh")
_OWNER = ("the client's owner sets it in the client's privacy policy (client.policy / node config / policy.toml), "
          "never the server")


class PolicyViolation(Exception):
    """A server request the client's policy refuses; str(e) is the reason sent back."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """What this client allows, set by the client alone (in-process: the config's client.policy;
    Flower: the SuperNode's node config or policy.toml in its state folder), never by the server."""

    min_cut: float = 0.2  # lowest cut ratio c = t_c / T it sends handoffs at
    modes: tuple[str, ...] = ("once",)  # allowed handoff modes: once, fresh
    max_views: int = 1  # distinct views per record over the client's lifetime
    epsilon: float | None = None  # per-record (epsilon, delta) budget over the lifetime; None = no budget
    delta: float = 1e-5
    clip_norm: float | None = None  # L2 clip of records before noising (formal DP with a smaller bound)

    def __post_init__(self):
        if isinstance(self.modes, (list, tuple, str)):  # convenience: a list or "once,fresh"; stored as a tuple
            object.__setattr__(self, "modes", _parse_modes(self.modes))
        _validate(self)

    @classmethod
    def from_mapping(cls, values: dict, source: str) -> "PrivacyPolicy":
        """A policy from a mapping (TOML table, node config); dash or underscore keys; errors name `source`."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: a privacy policy must be a table of keys {_valid_keys()}, "
                             f"got {type(values).__name__}")
        kwargs: dict = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in _FIELDS:
                raise ValueError(f"{source}: unknown privacy policy key {raw_key!r}; valid keys: {_valid_keys()}")
            if key in kwargs:
                raise ValueError(f"{source}: privacy policy key {key!r} is given twice "
                                 f"(dash and underscore spellings); keep one")
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: Path) -> "PrivacyPolicy":
        """A policy from a TOML file: top-level keys, or a single [policy] table."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e}); fix the syntax, e.g. min_cut = 0.4") from e
        if set(data) == {"policy"} and isinstance(data["policy"], dict):
            data = data["policy"]
        return cls.from_mapping(data, str(path))

    def check_request(self, *, level: int, T: int, mode: str) -> None:
        """Raise PolicyViolation unless handoffs at cut `level` of `T` in `mode` are allowed."""
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise PolicyViolation(f"the request's T={T!r} is not a positive number of levels")
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= T:
            raise PolicyViolation(f"the request's cut level {level!r} is not in 0..T={T}")
        min_level = self.min_level(T)
        if level < min_level:
            raise PolicyViolation(
                f"requested cut level {level} of T={T} (c={level / T:.4g}) is below this client's "
                f"min_cut={self.min_cut} (level {min_level}); {_OWNER}"
            )
        if mode not in self.modes:
            raise PolicyViolation(f"requested handoff mode {mode!r} is not allowed by this client's "
                                  f"modes={list(self.modes)}; {_OWNER}")

    def min_level(self, T: int) -> int:
        """The lowest cut level allowed for T levels: round(min_cut * T), as NoiseSchedule.cut_level rounds."""
        return int(round(float(self.min_cut) * T))


_FIELDS = tuple(PrivacyPolicy.__dataclass_fields__)


def _valid_keys() -> str:
    return ", ".join(_FIELDS) + " (dashes or underscores)"


def _parse_modes(value) -> tuple:
    # Flower node configs hold scalars only, so "once,fresh" is accepted as well as a list
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        return value  # _validate names the key and the fix
    return tuple(dict.fromkeys(value))  # duplicates collapse; order kept


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate(p: PrivacyPolicy) -> None:
    def bad(key: str, fix: str):
        raise ValueError(f"privacy policy {key} = {getattr(p, key)!r} is invalid; {fix}")

    if not (_is_number(p.min_cut) and 0.0 <= p.min_cut <= 1.0):
        bad("min_cut", "set a cut ratio in [0, 1], e.g. min_cut = 0.4 (higher hides more)")
    if (not isinstance(p.modes, tuple) or not p.modes
            or any(not isinstance(m, str) or m not in MODES for m in p.modes)):
        bad("modes", f"use a non-empty list of {list(MODES)} (or a comma-separated string), e.g. modes = [\"once\"]")
    if isinstance(p.max_views, bool) or not isinstance(p.max_views, int) or p.max_views < 1:
        bad("max_views", "set an int >= 1, e.g. max_views = 1 (each view is another noisy copy of a record)")
    if p.epsilon is not None and not (_is_number(p.epsilon) and 0.0 < p.epsilon < math.inf):
        bad("epsilon", "set a finite number > 0, e.g. epsilon = 8.0, or leave it out for no budget")
    if not (_is_number(p.delta) and 0.0 < p.delta < 1.0):
        bad("delta", "set a number in (0, 1), e.g. delta = 1e-5 or below 1/(number of records)")
    if p.clip_norm is not None and not (_is_number(p.clip_norm) and 0.0 < p.clip_norm < math.inf):
        bad("clip_norm", "set a finite L2 bound > 0, e.g. clip_norm = 1.0, or leave it out for the [-1, 1] range bound")


@dataclass(frozen=True)
class Release:
    """One mechanism a view is released under: cut `level` of `T`, its alpha_bar, the records' L2 bound."""

    level: int
    T: int
    alpha_bar: float
    clip_norm: float  # effective L2 bound: the policy's clip, or range_clip_norm of [-1, 1] records

    def __post_init__(self):
        for name in ("level", "T"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"Release.{name} must be an int, got {v!r}")
        if not 0 <= self.level <= self.T or self.T < 1:
            raise ValueError(f"Release needs 0 <= level <= T and T >= 1, got level={self.level}, T={self.T}")
        if not (_is_number(self.alpha_bar) and 0.0 <= self.alpha_bar <= 1.0):
            raise ValueError(f"Release.alpha_bar must be in [0, 1], got {self.alpha_bar!r}")
        if not (_is_number(self.clip_norm) and 0.0 < self.clip_norm < math.inf):
            raise ValueError(f"Release.clip_norm must be a finite L2 bound > 0 (range_clip_norm when unclipped), "
                             f"got {self.clip_norm!r}")
        object.__setattr__(self, "alpha_bar", float(self.alpha_bar))
        object.__setattr__(self, "clip_norm", float(self.clip_norm))

    @classmethod
    def of(cls, *, level: int, T: int, alpha_bar: float, clip_norm: float | None,
           record_shape: tuple[int, ...]) -> "Release":
        """The release for a policy clip (None: records in [-1, 1], bounded by range_clip_norm(record_shape))."""
        bound = clip_norm if clip_norm is not None else range_clip_norm(tuple(record_shape))
        return cls(level=level, T=T, alpha_bar=float(alpha_bar), clip_norm=float(bound))

    @property
    def multiplier(self) -> float:
        """The Gaussian noise multiplier (noise std / L2 sensitivity) of one view."""
        return handoff_mechanism(self.alpha_bar, clip_norm=self.clip_norm)["noise_multiplier"]

    def key(self) -> bytes:
        """The noise PRF's mechanism key: one noise e never serves two mechanisms."""
        return release_key(self.alpha_bar, self.clip_norm)

    def to_json(self) -> dict:
        return {"level": self.level, "T": self.T, "alpha_bar": self.alpha_bar, "clip_norm": self.clip_norm}


@dataclass
class _Entry:
    release: Release
    views: list[int]
    digests: list[bytes] = field(default_factory=list)


class ReleaseLedger:
    """Every view of every record this client ever released, on its own disk (append-only JSON lines,
    fsynced before the handoffs leave)."""

    def __init__(self, path: Path | None):
        """Open (or start) the ledger at `path`; loads every line; a torn last line is ignored with a warning.

        path None keeps the ledger in memory only: for a federation that must remember nothing it releases
        (a throwaway in-process build, e.g. `collafuse sample` or data preparation).
        """
        self.path = None if path is None else Path(path)
        self._pairs: dict[tuple[Release, int], int] = {}  # (release, view) -> pair id
        self._pair_list: list[tuple[Release, int]] = []
        self._records: dict[bytes, frozenset[int]] = {}  # digest -> ids of its released (release, view) pairs
        self._eps_cache: dict[tuple[tuple[float, ...], float], float] = {}
        self._offset = 0  # bytes of the file consumed (complete lines)
        self._line_no = 0
        self._torn_warned = False
        self.entries = 0  # lines in the ledger
        self._refresh()

    # ---- queries

    def views(self, digest: bytes) -> int:
        """Distinct (release, view) pairs released of one record."""
        return len(self._records.get(digest, ()))

    def epsilon(self, digest: bytes, delta: float) -> float:
        """Per-record epsilon at `delta` of everything released of this record so far."""
        return self._epsilon(self._records.get(digest, frozenset()), delta)

    def summary(self, delta: float) -> dict:
        """Counts and (epsilon, delta) over every record in the ledger, JSON-ready (None = unbounded epsilon)."""
        groups: dict[frozenset[int], int] = {}
        for ids in self._records.values():
            groups[ids] = groups.get(ids, 0) + 1
        eps = sorted((self._epsilon(ids, delta), n) for ids, n in groups.items())
        by_release: dict[Release, dict[int, int]] = {}
        for ids, n in groups.items():
            for i in ids:
                release, view = self._pair_list[i]
                counts = by_release.setdefault(release, {})
                counts[view] = counts.get(view, 0) + n
        return {
            "records": len(self._records),
            "record_views": sum(len(ids) * n for ids, n in groups.items()),
            "max_views": max((len(ids) for ids in groups), default=0),
            "epsilon_max": _json_number(eps[-1][0] if eps else 0.0),
            "epsilon_median": _json_number(_median(eps)),
            "delta": float(delta),
            "by_release": [release.to_json() | {"views": dict(sorted(views.items()))}
                           for release, views in sorted(by_release.items(), key=lambda kv: _release_order(kv[0]))],
            "entries": self.entries,
        }

    # ---- decisions

    def plan(self, digests: list[bytes], release: Release, views: list[int], policy: PrivacyPolicy) -> None:
        """Raise PolicyViolation if releasing `views` of these records under `release` breaks `policy`."""
        views = _check_views(views)
        _check_digests(digests)
        self._refresh()  # another process of this client may have released since we loaded
        new_pairs = [(release, v) for v in views]
        extra = [self._pairs.get(p, -1 - i) for i, p in enumerate(new_pairs)]  # negative ids: not yet released
        multipliers = {i: release.multiplier for i in extra if i < 0}
        groups: dict[frozenset[int], int] = {}
        for d in set(digests):
            ids = self._records.get(d, frozenset())
            groups[ids] = groups.get(ids, 0) + 1
        for ids, n in groups.items():
            union = ids.union(extra)
            if union == ids:
                continue  # re-sending views already released: bit-identical, nothing new
            if len(union) > policy.max_views:
                raise PolicyViolation(
                    f"releasing views {views} at cut level {release.level} of T={release.T} would give "
                    f"{n} record(s) {len(union)} distinct views (already {len(ids)}), above this client's "
                    f"max_views={policy.max_views}; {_OWNER}"
                )
            if policy.epsilon is not None:
                eps = self._epsilon(union, policy.delta, multipliers)
                if eps > policy.epsilon:
                    raise PolicyViolation(
                        f"releasing views {views} at cut level {release.level} of T={release.T} (noise "
                        f"multiplier {release.multiplier:.4g}) would raise {n} record(s) to epsilon={eps:.4g} at "
                        f"delta={policy.delta:g} (now {self._epsilon(ids, policy.delta):.4g}), above this "
                        f"client's budget epsilon={policy.epsilon}; {_OWNER}"
                    )

    def record(self, digests: list[bytes], release: Release, views: list[int], *, run: str, round: int) -> int:
        """Append the new releases (one fsynced JSON line) and return how many record-views are new."""
        views = _check_views(views)
        _check_digests(digests)
        if self.path is None:
            new_digests, count = self._new(digests, release, views)
            if new_digests:
                self._apply(_Entry(release, views, new_digests))
            return count
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _lock(fd, exclusive=True)
            self._refresh(truncate_torn_fd=fd)
            new_digests, count = self._new(digests, release, views)
            if not new_digests:
                return 0  # nothing new leaves: nothing to write
            line = {**release.to_json(), "views": views, "run": str(run), "round": int(round),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "records": [d.hex() for d in new_digests]}
            data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # durable before the caller lets any handoff leave
            if self._offset == 0:
                fsync_dir(self.path.parent)
            self._offset += len(data)
            self._line_no += 1
            self._apply(_Entry(release, views, new_digests))
            return count
        finally:
            os.close(fd)

    # ---- internals

    def _new(self, digests: list[bytes], release: Release, views: list[int]) -> tuple[list[bytes], int]:
        """The records with a (release, view) not released before, and how many record-views are new."""
        pair_ids = [self._pairs.get((release, v)) for v in views]
        new_digests, seen, count = [], set(), 0
        for d in digests:
            if d in seen:
                continue
            seen.add(d)
            have = self._records.get(d, frozenset())
            missing = sum(1 for i in pair_ids if i is None or i not in have)
            if missing:
                new_digests.append(d)
                count += missing
        return new_digests, count

    def _pair_id(self, pair: tuple[Release, int]) -> int:
        i = self._pairs.get(pair)
        if i is None:
            i = self._pairs[pair] = len(self._pair_list)
            self._pair_list.append(pair)
        return i

    def _apply(self, entry: _Entry) -> None:
        ids = [self._pair_id((entry.release, v)) for v in entry.views]
        unions: dict[frozenset[int], frozenset[int]] = {}  # records sharing a history share one set object
        for d in entry.digests:
            old = self._records.get(d, frozenset())
            new = unions.get(old)
            if new is None:
                new = unions[old] = old.union(ids)
            self._records[d] = new
        self.entries += 1

    def _epsilon(self, ids, delta: float, pending: dict[int, float] | None = None) -> float:
        multipliers = tuple(sorted(pending[i] if i < 0 else self._pair_list[i][0].multiplier for i in ids))
        key = (multipliers, float(delta))
        eps = self._eps_cache.get(key)
        if eps is None:
            eps = self._eps_cache[key] = releases_epsilon(list(multipliers), delta)
        return eps

    def _refresh(self, truncate_torn_fd: int | None = None) -> None:
        # Reads whatever complete lines were appended since the last read. The writer holds an
        # exclusive lock while it appends, so under our lock an unterminated tail is a crash remnant.
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if truncate_torn_fd is None:
                _lock(fd, exclusive=False)
            size = os.fstat(fd).st_size
            if size < self._offset:
                raise ValueError(f"{self.path}: the ledger shrank ({size} < {self._offset} bytes read); it is "
                                 f"append-only; restore it from a backup")
            if size == self._offset:
                return
            os.lseek(fd, self._offset, os.SEEK_SET)
            chunk = b""
            while len(chunk) < size - self._offset:
                part = os.read(fd, size - self._offset - len(chunk))
                if not part:
                    break
                chunk += part
        finally:
            os.close(fd)
        complete, newline, torn = chunk.rpartition(b"\n")
        if newline:
            for raw in complete.split(b"\n"):
                self._line_no += 1
                self._apply(self._parse(raw))
            self._offset += len(complete) + 1
        if torn:
            if not self._torn_warned:
                warnings.warn(f"{self.path}: ignoring a torn last line ({len(torn)} bytes, a crash while writing "
                              f"it, before any of its handoffs could leave)", stacklevel=3)
                self._torn_warned = True
            if truncate_torn_fd is not None:
                os.ftruncate(truncate_torn_fd, self._offset)  # so the next line starts on a line of its own

    def _parse(self, raw: bytes) -> _Entry:
        where = f"{self.path}, line {self._line_no}"
        try:
            obj = json.loads(raw)
            release = Release(level=obj["level"], T=obj["T"], alpha_bar=obj["alpha_bar"], clip_norm=obj["clip_norm"])
            views = _check_views(obj["views"])
            digests = [bytes.fromhex(h) for h in obj["records"]]
            _check_digests(digests)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: corrupt ledger line ({e}); the ledger is append-only and fsynced, so this "
                             f"is damage: restore the file from a backup (never delete it: the budget would reset)") from e
        return _Entry(release, views, digests)


def _check_views(views) -> list[int]:
    if not isinstance(views, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in views):
        raise ValueError(f"views must be a list of ints >= 0, got {views!r}")
    return sorted(set(views))


def _check_digests(digests) -> None:
    if not isinstance(digests, (list, tuple)):
        raise ValueError(f"digests must be a list of {DIGEST_BYTES}-byte record digests (record_digests)")
    for d in digests:
        if not isinstance(d, bytes) or len(d) != DIGEST_BYTES:
            raise ValueError(f"digests must be {DIGEST_BYTES}-byte record digests (record_digests), got {d!r:.80}")


def _lock(fd: int, *, exclusive: bool) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)  # released when fd closes


def _release_order(r: Release) -> tuple:
    return (r.T, r.level, r.alpha_bar, r.clip_norm)


def _median(sorted_counts: list[tuple[float, int]]) -> float:
    # the median over records, from (value, number of records) sorted by value
    total = sum(n for _, n in sorted_counts)
    if total == 0:
        return 0.0

    def at(k: int) -> float:
        for value, n in sorted_counts:
            if k < n:
                return value
            k -= n
        raise IndexError(k)

    lo, hi = at((total - 1) // 2), at(total // 2)
    return lo if lo == hi else (lo + hi) / 2


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None
