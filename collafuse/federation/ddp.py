"""Data-parallel server training: a round's server steps over W processes, gradients averaged by DDP.

Every rank is a worker process spawned for the round; this process only hands them the server's state and
takes rank 0's back. Each worker rebuilds the server from that state (weights, optimiser, EMA, generator,
store manifest; the shards it maps from the run folder itself), trains in lockstep and exits. Every rank
draws the whole global batch from the server's one generator and takes its slice (Server.train_steps), so W
processes see exactly the batches of one: only the summation order of the gradients and losses changes.
CPU: gloo; CUDA: nccl, rank r on cuda:r.

Why no rank here: tearing a gloo process group down while holding the GIL deadlocks when one of its worker
threads is still releasing a tensor (it waits for the GIL, the teardown joins it; seen, in this process,
at the next round). A worker that hangs in its teardown after rank 0 has written the result is killed.

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
        # State goes through files, not spawn arguments or return values: a tensor argument is served by this
        # process's resource-sharer thread, and a file outlives a worker killed in its teardown.
        state, result = Path(tmp) / "server", Path(tmp) / "result"
        save_state(state, *server.state())
        ranks = mp.start_processes(_rank, nprocs=world, join=False, start_method="spawn",
                                   args=(cfg, state, server.store.folder, steps, f"file://{Path(tmp) / 'rendezvous'}",
                                         result, cuda, torch.get_num_threads()))
        try:
            _wait(ranks, result)
        finally:
            for p in ranks.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        tensors, meta = load_state(result)
    server.load_training(tensors, meta)
    return meta["losses"]


def _wait(ranks, result: Path) -> None:
    """Until every rank has exited, or rank 0 has written the result and the others had EXIT_GRACE_S to exit.

    ProcessContext.join raises a rank's own error (or its exit code); a rank stuck in a collective gives up
    after TIMEOUT and raises there.
    """
    deadline = None
    while not ranks.join(timeout=1):
        if deadline is None and result.with_suffix(".json").exists():
            deadline = time.monotonic() + EXIT_GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            return
    if not result.with_suffix(".json").exists():
        raise RuntimeError("the data-parallel ranks exited without rank 0's result")


def _rank(rank: int, cfg: Config, state: Path, folder: Path | None, steps: int, init: str, result: Path,
          cuda: bool, threads: int) -> None:
    """One rank: the server rebuilt from its state, trained in lockstep; rank 0 writes what it trained."""
    torch.set_num_threads(threads)
    world = cfg.server.devices
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # nccl's communicator uses the current device
    # First: a failure below then stops the other ranks at once instead of after TIMEOUT.
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        schedule = NoiseSchedule(cfg.schedule.T, cfg.schedule.kind)
        server = Server.from_config(cfg, schedule=schedule, image_shape=cfg.image_shape, device=device)
        if folder is not None:
            server.keep_handoffs_in(folder)
        server.load(*load_state(state))
        # DDP first broadcasts rank 0's weights: every rank starts the round from the same ones.
        model = DistributedDataParallel(server.model)
        losses = torch.tensor(server.train_steps(steps, rank=rank, world=world, model=model),
                              dtype=torch.float64, device=device)
        dist.all_reduce(losses)  # equal slices: the global batch's mean loss is the mean of theirs
        if rank == 0:
            tensors, meta = server.training_state()
            save_state(result, tensors, {**meta, "losses": (losses / world).tolist()})
    finally:
        dist.destroy_process_group()
