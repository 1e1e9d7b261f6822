"""The server's handoff store: append-only, one immutable safetensors shard per ingested batch.

Why safetensors shards: one well-kept format, the one every checkpoint here already uses. A shard is
written once (temporary name, fsync, rename, directory fsync) and never changed, so a checkpoint names
shards instead of copying them, and a torn write is only ever a file no checkpoint names. The format is
an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte range), then
the raw little-endian data: a shard's handoffs are memory-mapped where they lie and a training batch
reads only its own rows (its keys, 24 bytes a row, are read: the index needs every one).
`torch.from_file` maps them rather than `numpy.memmap`, which keeps a file descriptor open per shard:
a store of thousands of shards would hit the open-files limit.

A re-sent (client, record, view) replaces the older row; `forget` drops what a client sent so far (a
tombstone: the client and the first shard that counts again). The live index is rebuilt from the
shards' keys, so a checkpoint holds only a manifest: shard names in order, tombstones, the next shard.
Without a folder the shards stay in memory and travel in the checkpoint's tensors (unit tests, attacks).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file

from collafuse.core.state import fsync_dir

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16}  # safetensors' dtype names


def store_dtype(name: str) -> torch.dtype:
    """The storage dtype server.store_dtype names."""
    if name not in STORE_DTYPES:
        raise ValueError(f"server.store_dtype {name!r} is unknown; choose float32 or float16 (float16 halves the "
                         f"store and rounds handoffs to 11 significant bits; the server trains in float32 either way)")
    return STORE_DTYPES[name]


class Shard(NamedTuple):
    keys: torch.Tensor  # (N, 3) int64: client, record, view
    handoffs: torch.Tensor  # (N, C, H, W) in the store's dtype


def shard_name(seq: int) -> str:
    return f"{seq:08d}.safetensors"


def map_shard(path: Path) -> Shard:
    """A shard from disk: its keys read (the index needs every one), its handoffs memory-mapped where the
    header says they lie, so that nothing of them is read until a row is used."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        begin, end = header["keys"]["data_offsets"]
        f.seek(8 + n + begin)
        keys = torch.frombuffer(bytearray(f.read(end - begin)), dtype=torch.int64).view(-1, 3)
    begin, end = header["handoffs"]["data_offsets"]  # safetensors pads the header: the data stays aligned
    data = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)[8 + n:]
    handoffs = data[begin:end].view(FILE_DTYPES[header["handoffs"]["dtype"]]).view(header["handoffs"]["shape"])
    return Shard(keys, handoffs)


class HandoffStore:
    """Handoffs keyed (client, record, view) in immutable shards: on disk in `folder`, or in memory (None)."""

    def __init__(self, image_shape: tuple[int, int, int], dtype: str = "float32", folder: Path | None = None):
        self.image_shape, self.dtype_name, self.folder = tuple(image_shape), dtype, folder
        self.dtype = store_dtype(dtype)
        self._shards: dict[int, Shard] = {}  # seq -> shard, oldest first; only shards a live row needs
        self._forgotten: dict[int, int] = {}  # client -> the first seq whose rows of it count
        self._next = 0  # the seq of the next shard
        self._live: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # see _index

    def add(self, keys: torch.Tensor, handoffs: torch.Tensor) -> None:
        """Keep a batch as one new shard: keys (N, 3) = client, record, view; handoffs (N, C, H, W)."""
        if not len(keys):
            return
        keys, handoffs = keys.long().contiguous(), handoffs.to(self.dtype).contiguous()
        self._shards[self._next] = (Shard(keys.clone(), handoffs.clone()) if self.folder is None  # not the message's
                                    else self._write(self._next, keys, handoffs))
        self._next += 1
        self._live = None

    def _write(self, seq: int, keys: torch.Tensor, handoffs: torch.Tensor) -> Shard:
        """The shard durably on disk, then mapped from there: the batch itself is not kept."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / shard_name(seq)
        tmp = path.with_suffix(".tmp")
        save_file({"keys": keys, "handoffs": handoffs}, str(tmp))  # straight from the tensors: no copy in RAM
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self.folder)  # a checkpoint may name it from now on: the rename must survive a crash
        return map_shard(path)

    def forget(self, client_id: int) -> None:
        """Drop every row the client sent so far."""
        self._forgotten[client_id] = self._next
        self._live = None

    def _index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live rows sorted by key: keys (N, 3), their shards' seqs (N,) and rows (N,). Lets go of
        shards no live row needs (on disk they stay until `prune`: the last checkpoint may name them)."""
        if self._live is None:
            sizes = torch.tensor([len(s.keys) for s in self._shards.values()], dtype=torch.long)
            keys = torch.cat([s.keys for s in self._shards.values()] + [torch.empty(0, 3, dtype=torch.long)])
            seq = torch.tensor(list(self._shards), dtype=torch.long).repeat_interleave(sizes)
            row = torch.arange(len(keys)) - (torch.cumsum(sizes, 0) - sizes).repeat_interleave(sizes)
            alive = torch.ones(len(keys), dtype=torch.bool)
            for client, first in self._forgotten.items():
                alive &= (keys[:, 0] != client) | (seq >= first)
            keys, seq, row = keys[alive], seq[alive], row[alive]
            # By key, then by age: the last row of each key is the newest, the one that counts.
            order = torch.from_numpy(np.lexsort((row.numpy(), seq.numpy(), *keys.numpy().T[::-1])))
            keys, seq, row = keys[order], seq[order], row[order]
            newest = torch.ones(len(keys), dtype=torch.bool)
            newest[:-1] = (keys[1:] != keys[:-1]).any(1)
            self._live = keys[newest], seq[newest], row[newest]
            needed = set(self._live[1].unique().tolist())
            self._shards = {s: shard for s, shard in self._shards.items() if s in needed}
        return self._live

    def __len__(self) -> int:
        return len(self._index()[0])

    def keys(self) -> torch.Tensor:
        """(N, 3) client, record, view of every live row, sorted."""
        return self._index()[0]

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The live rows at `positions` of the sorted index, as float32 (B, C, H, W), and their clients (B,)."""
        keys, seqs, rows = self._index()
        seq, row = seqs[positions], rows[positions]
        out = torch.empty((len(positions), *self.image_shape), dtype=self.dtype)
        for s in seq.unique().tolist():  # one gather per shard
            at = seq == s
            out[at] = self._shards[s].handoffs[row[at]]
        return out.float(), keys[positions, 0]

    def held(self, client_id: int) -> dict[tuple[int, int], torch.Tensor]:
        """A client's live rows keyed (record, view), as float32 (views of the mapped shards when stored so)."""
        keys, seqs, rows = self._index()
        mine = keys[:, 0] == client_id
        return {(r, v): self._shards[s].handoffs[i].float()
                for (_, r, v), s, i in zip(keys[mine].tolist(), seqs[mine].tolist(), rows[mine].tolist())}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """For a checkpoint: the manifest, and the shards' tensors only when they live in memory."""
        self._index()  # names only the shards a live row needs
        names = [shard_name(s) for s in self._shards]
        manifest = {"shards": names, "forgotten": sorted([c, s] for c, s in self._forgotten.items()),
                    "next": self._next}
        if self.folder is not None:
            return {}, manifest
        return {f"{n}/{k}": v for n, shard in zip(names, self._shards.values())
                for k, v in shard._asdict().items()}, manifest

    def load(self, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        """The store a checkpoint's manifest names; shard files it does not name are ignored."""
        shards = {}
        for name in manifest["shards"]:
            if self.folder is None:
                shard = Shard(tensors[f"{name}/keys"], tensors[f"{name}/handoffs"])
            elif (self.folder / name).is_file():
                shard = map_shard(self.folder / name)
            else:
                raise FileNotFoundError(
                    f"handoff shard {self.folder / name} is missing, but the checkpoint names it: a run folder "
                    f"travels whole (its {self.folder.name}/ beside checkpoint/); copy that file back, or start "
                    f"the run again in a new folder")
            shards[int(name.split(".")[0])] = shard
        self._shards, self._next = shards, manifest["next"]
        self._forgotten = {c: s for c, s in manifest["forgotten"]}
        self._live = None

    def prune(self) -> None:
        """Delete the files of shards the store no longer holds (torn writes too): call it right after a
        checkpoint of this store is in place, so that none of them is named by it."""
        if self.folder is not None and self.folder.is_dir():
            held = {shard_name(s) for s in self._shards}
            for path in self.folder.iterdir():
                if path.name not in held:
                    path.unlink()
