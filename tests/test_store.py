"""The server's handoff store: the old dict's semantics, float16 storage, a checkpoint that names shards
instead of copying them, a writer killed mid-write, a missing shard; and a role's state written packed.

Run as a script (`python tests/test_store.py RUN`) it is the writer the kill test kills.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from collafuse.config import load_config
from collafuse.core.models import ModelConfig
from collafuse.core.protocol import HandoffBatch
from collafuse.core.schedule import NoiseSchedule
from collafuse.core.state import load_state, save_state, swap_in
from collafuse.federation.engine import CHECKPOINT, HANDOFFS
from collafuse.roles.server import Server

SHAPE = (1, 8, 8)


def make_server(run: Path | None = None, store_dtype: str = "float32") -> Server:
    """A smoke-sized server; its store in run/handoffs, or in memory."""
    server = Server(schedule=NoiseSchedule(100, "linear"), cut_level=20, client_ids=[0, 1, 2], image_shape=SHAPE,
                    model=ModelConfig(channels=(8, 16), attention=False), batch_size=8, store_dtype=store_dtype)
    if run is not None:
        server.keep_handoffs_in(run / HANDOFFS)
    return server


def handoffs(client: int, records: list[int], views: list[int], seed: int) -> HandoffBatch:
    y = torch.randn((len(records), *SHAPE), generator=torch.Generator().manual_seed(seed))
    return HandoffBatch(client_id=client, level=20, record_ids=torch.tensor(records, dtype=torch.long),
                        views=torch.tensor(views, dtype=torch.long), handoffs=y)


def checkpoint(server: Server, run: Path, **progress) -> None:
    """As the round engine checkpoints: swapped in whole, then the shards it no longer names are deleted."""
    def write(folder: Path) -> None:
        save_state(folder / "server", *server.state())
        (folder / "progress.json").write_text(json.dumps(progress))
    swap_in(run, CHECKPOINT, write)
    server.store.prune()


def reloaded(run: Path) -> Server:
    server = make_server(run)
    server.load(*load_state(run / CHECKPOINT / "server"))
    return server


def assert_holds(server: Server, held: dict) -> None:
    """The server holds exactly `held` ({(client, record, view): handoff}), as the old dict store did."""
    assert server.num_handoffs() == len(held)
    for c in range(3):
        mine = {(r, v): y for (k, r, v), y in held.items() if k == c}
        got = server.held_handoffs(c)
        assert got.keys() == mine.keys() and all(torch.equal(got[k], y) for k, y in mine.items())
        assert server.num_handoffs(c) == len(mine) and server.num_views(c) == len({v for _, v in mine})
    # The training batch draws positions in the sorted keys, as the old pool did (resume stays bit for bit).
    keys = sorted(held)
    if keys:
        positions = torch.randint(len(keys), (16,), generator=torch.Generator().manual_seed(1))
        y, owners = server.store.batch(positions)
        assert torch.equal(y, torch.stack([held[keys[p]] for p in positions.tolist()]))
        assert owners.tolist() == [keys[p][0] for p in positions.tolist()]


@pytest.mark.parametrize("on_disk", [False, True])
def test_ingest_replace_forget_as_the_old_dict(tmp_path, on_disk):
    run = tmp_path if on_disk else None
    server, held, rnd = make_server(run), {}, random.Random(0)
    for i in range(40):
        client = rnd.randrange(3)
        if rnd.random() < 0.15:
            server.forget(client)
            held = {k: y for k, y in held.items() if k[0] != client}
            continue
        n = rnd.randrange(6)  # an empty batch too; repeated keys within a batch and across batches
        msg = handoffs(client, [rnd.randrange(6) for _ in range(n)], [rnd.randrange(3) for _ in range(n)], i)
        server.ingest(msg)
        held.update({(client, r, v): y for r, v, y in zip(msg.record_ids.tolist(), msg.views.tolist(), msg.handoffs)})
        assert_holds(server, held)
    if on_disk:
        checkpoint(server, tmp_path)
        assert_holds(reloaded(tmp_path), held)
        manifest = json.loads((tmp_path / CHECKPOINT / "server.json").read_text())["store"]
        # Forgotten and replaced shards are gone once no checkpoint names them.
        assert sorted(p.name for p in (tmp_path / HANDOFFS).iterdir()) == manifest["shards"]
    else:
        tensors, meta = server.state()
        other = make_server()
        other.load(tensors, meta)
        assert_holds(other, held)


def test_a_packed_state_holds_one_tensor_per_dtype_and_loads_back_exactly(tmp_path):
    """pack=True (in-process clients' checkpoints): the same tensors back, shapes, dtypes and 0-dim ones included,
    none sharing memory with another (so the loaded state saves again), beside states written unpacked."""
    g = torch.Generator().manual_seed(0)
    tensors = {"model/w": torch.randn((3, 4), generator=g), "opt/0/step": torch.tensor(7.0),
               "model/b": torch.randn((4,), generator=g), "generator": torch.arange(5, dtype=torch.uint8),
               "count": torch.tensor([2, 3], dtype=torch.int64), "empty": torch.zeros((0, 2))}
    save_state(tmp_path / "packed", tensors, {"steps": 4}, pack=True)
    assert set(load_file(str(tmp_path / "packed.safetensors"))) == {"float32", "uint8", "int64"}
    for kind in ("packed", "again"):
        back, meta = load_state(tmp_path / kind)
        assert meta == {"steps": 4} and back.keys() == tensors.keys()
        assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
        assert len({v.untyped_storage().data_ptr() for v in back.values() if v.numel()}) == 5
        save_state(tmp_path / "again", back, meta)  # unpacked: safetensors refuses tensors that share memory


def test_float16_storage_round_trips_within_float16_rounding(tmp_path):
    server = make_server(tmp_path, store_dtype="float16")
    msg = handoffs(1, list(range(50)), [0] * 50, seed=3)
    server.ingest(msg)
    checkpoint(server, tmp_path)
    (shard,) = (tmp_path / HANDOFFS).iterdir()
    assert json.loads(shard.read_bytes()[8:8 + int.from_bytes(shard.read_bytes()[:8], "little")])[
        "handoffs"]["dtype"] == "F16"
    for s in (server, reloaded(tmp_path)):
        got = torch.stack([s.held_handoffs(1)[(r, 0)] for r in range(50)])
        assert got.dtype == torch.float32
        assert ((got - msg.handoffs).abs() <= msg.handoffs.abs() * 2 ** -11 + 2 ** -24).all()
        assert not torch.equal(got, msg.handoffs)  # really rounded
    assert torch.isfinite(torch.tensor(server.train(2)))  # float32 training from float16 rows
    with pytest.raises(ValueError, match="server.store_dtype 'bfloat16' is unknown; choose float32 or float16"):
        load_config("smoke", ["server.store_dtype=bfloat16"])


def test_the_checkpoint_names_shards_and_does_not_grow_with_the_store(tmp_path):
    """100 handoffs vs 10,000 (100 records, 1 vs 100 views): the checkpoint differs by the manifest's names."""
    sizes = {}
    for views, batches in ((1, 1), (100, 20)):
        run = tmp_path / str(views)
        server = make_server(run)
        pairs = [(r, v) for r in range(100) for v in range(views)]
        for b in range(batches):
            part = pairs[b::batches]
            server.ingest(handoffs(0, [r for r, _ in part], [v for _, v in part], seed=b))
        checkpoint(server, run)
        assert server.num_handoffs() == 100 * views
        sizes[views] = [(run / CHECKPOINT / f"server{s}").stat().st_size for s in (".safetensors", ".json")]
        assert json.loads((run / CHECKPOINT / "server.json").read_text())["store"]["shards"] == [
            f"{b:08d}.safetensors" for b in range(batches)]
    assert sizes[1][0] == sizes[100][0]  # tensors: model, optimiser, per-record counts; no handoff
    assert 0 < sizes[100][1] - sizes[1][1] < 19 * 30  # 19 more shard names
    assert sum(p.stat().st_size for p in (tmp_path / "100" / HANDOFFS).iterdir()) > 10_000 * 256


def test_a_missing_shard_is_a_clear_error(tmp_path):
    server = make_server(tmp_path)
    for b in range(2):
        server.ingest(handoffs(0, [b], [0], seed=b))
    checkpoint(server, tmp_path)
    (tmp_path / HANDOFFS / "00000001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"handoffs/00000001.safetensors is missing, but the checkpoint "
                                                r"names it.*copy that file back, or start the run again"):
        reloaded(tmp_path)


# ---------------------------------------------------------------- a writer killed mid-write

def kill_test_batch(i: int) -> HandoffBatch:
    """The writer's i-th batch: overlapping records, so newer rows replace older ones."""
    records = [(i * 37 + k) % 600 for k in range(500)]
    return handoffs(i % 3, records, [i % 2] * 500, seed=i)


def kill_test_step(server: Server, i: int) -> None:
    if i % 5 == 4:  # now and then a client's handoffs are replaced whole (fresh mode)
        server.forget(i % 3)
    server.ingest(kill_test_batch(i))


def ingest_until_killed(run: Path) -> None:
    """Ingest batches for ever, checkpointing after every third; say how many each checkpoint holds."""
    torch.set_num_threads(1)
    server = make_server(run)
    i = 0
    while True:
        kill_test_step(server, i)
        i += 1
        if i % 3 == 0:
            checkpoint(server, run, batches=i)
            print(i, flush=True)


def test_a_writer_killed_mid_write_leaves_the_last_checkpoint_whole(tmp_path):
    writer = subprocess.Popen([sys.executable, __file__, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parents[1])
    try:
        while int(writer.stdout.readline() or 0) < 9:  # three checkpoints
            assert writer.poll() is None, "the writer died on its own"
        time.sleep(random.Random().uniform(0, 0.3))  # somewhere in the next batches' writes
    finally:
        writer.kill()
        writer.wait()
    batches = json.loads((tmp_path / CHECKPOINT / "progress.json").read_text())["batches"]
    expected = make_server()
    for i in range(batches):
        kill_test_step(expected, i)
    # A torn write is a temporary or an unnamed file: load ignores it, the next checkpoint's prune deletes it.
    (tmp_path / HANDOFFS / "99999999.safetensors").write_bytes(b"\x08\x00\x00torn")
    loaded = reloaded(tmp_path)
    held = {(c, r, v): y for c in range(3) for (r, v), y in expected.held_handoffs(c).items()}
    assert_holds(loaded, held)
    assert all(torch.equal(loaded.received[c], n) for c, n in expected.received.items())
    loaded.store.prune()
    manifest = json.loads((tmp_path / CHECKPOINT / "server.json").read_text())["store"]
    assert sorted(p.name for p in (tmp_path / HANDOFFS).iterdir()) == manifest["shards"]


if __name__ == "__main__":
    ingest_until_killed(Path(sys.argv[1]))
