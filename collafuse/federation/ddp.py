"""Data-parallel server training: a round's server steps over W processes, gradients averaged by DDP.

Rank 0 is this process and keeps the authoritative server (store, EMA, checkpoint). Ranks 1..W-1 are
spawned for the round: each loads rank 0's state (weights, optimiser, generator, store manifest; the
shards it maps from the run folder itself), trains in lockstep and exits, returning nothing, since the
weights are the same on every rank. Every rank draws the whole global batch from the server's one
generator and takes its slice (Server.train_steps), so W processes see exactly the batches of one: only
the summation order of the gradients and losses changes. CPU: gloo; CUDA: nccl, rank r on cuda:r.

DDP rather than a hand-written all-reduce: it wraps self.model without replacing its parameters, so the
optimiser and the EMA, which hold those parameters, work unchanged, and it overlaps the all-reduce with
the backward pass.
"""
from __future__ import annotations

import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from collafuse.config import Config
from collafuse.core.schedule import NoiseSchedule
from collafuse.core.state import load_state, save_state
from collafuse.roles.server import Server

# A rank silent this long (in the rendezvous or a step's all-reduce) has failed: the others stop waiting.
TIMEOUT = timedelta(minutes=5)
EXIT_GRACE_S = 30


def check_devices(devices: int, batch_size: int, cuda: bool) -> None:
    """ValueError unless `devices` ranks can share the global batch (and exist, on CUDA)."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"server.devices must be an integer >= 1, got {devices!r}")
    if batch_size % devices:
        raise ValueError(f"server.batch_size {batch_size} must divide by server.devices {devices}: each device "
                         f"takes an equal share of the global batch")
    if cuda and devices > torch.cuda.device_count():
        raise ValueError(f"server.devices {devices} exceeds the {torch.cuda.device_count()} CUDA device(s) "
                         f"visible here")


def train_data_parallel(server: Server, cfg: Config, steps: int) -> list[float]:
    """`steps` server steps over cfg.server.devices processes; each step's loss on the global batch."""
    world, cuda = cfg.server.devices, server.device.type == "cuda"
    check_devices(world, server.batch_size, cuda)
    if not server.has_levels or steps == 0:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        # The state goes through a file, not the spawn arguments: a tensor argument is fetched from rank 0's
        # resource-sharer thread, which cannot run while rank 0 waits in the rendezvous (a deadlock, seen).
        state = Path(tmp) / "server"
        save_state(state, *server.state())
        init = f"file://{Path(tmp) / 'rendezvous'}"
        others = mp.start_processes(_replica, nprocs=world - 1, join=False, start_method="spawn",
                                    args=(cfg, state, server.store.folder, steps, init, cuda,
                                          torch.get_num_threads()))
        try:
            _join(0, world, init, server.device)
            losses = _train(server, world, steps)
        except BaseException:
            for p in others.processes:  # they would wait for rank 0 until TIMEOUT
                p.kill()
            raise
        # Past the last all-reduce a replica has nothing left to do: one that has not exited after a grace
        # period is stopped, so a stuck replica can never hold up the run. join raises a rank's own error.
        deadline = time.monotonic() + EXIT_GRACE_S
        while not others.join(timeout=1):
            if time.monotonic() > deadline:
                for p in others.processes:
                    p.kill()
                    p.join()
                break
    return losses


def _replica(index: int, cfg: Config, state: Path, folder: Path | None, steps: int, init: str,
             cuda: bool, threads: int) -> None:
    """Rank index+1: rank 0's server rebuilt from its state, trained in lockstep, then dropped."""
    torch.set_num_threads(threads)
    rank = index + 1
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    _join(rank, cfg.server.devices, init, device)  # first: a failure below then stops rank 0 at once
    schedule = NoiseSchedule(cfg.schedule.T, cfg.schedule.kind)
    server = Server.from_config(cfg, schedule=schedule, image_shape=cfg.image_shape, device=device)
    if folder is not None:
        server.keep_handoffs_in(folder)
    server.load(*load_state(state))
    _train(server, cfg.server.devices, steps)


def _join(rank: int, world: int, init: str, device: torch.device) -> None:
    """Enter the round's process group: gloo on CPU, nccl on CUDA (its communicator uses the current device)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank,
                            world_size=world, timeout=TIMEOUT)


def _train(server: Server, world: int, steps: int) -> list[float]:
    """This rank's slice of every step, DDP averaging the gradients; each step's loss on the global batch."""
    try:
        # DDP first broadcasts rank 0's weights: every rank starts the round from the same ones.
        model = DistributedDataParallel(server.model)
        losses = torch.tensor(server.train_steps(steps, rank=dist.get_rank(), world=world, model=model),
                              dtype=torch.float64, device=server.device)
        dist.all_reduce(losses)  # equal slices: the global batch's mean loss is the mean of theirs
        return (losses / world).tolist()
    finally:
        dist.destroy_process_group()
