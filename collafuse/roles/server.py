"""The server role: one shared model for the high-noise levels t_c+1..T, trained on handoffs only."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from collafuse.core.models import EMA, Denoiser, ModelConfig, optimise, to_device
from collafuse.core.protocol import HandoffBatch, Limits, SamplingHandoffs, SamplingRequest, handoff_bound
from collafuse.core.recipe import LRSchedule, Objective, guided_output
from collafuse.core.sampling import eta_of, in_cpu_calls, level_grid, randn, row_batches, sample_levels
from collafuse.core.schedule import NoiseSchedule
from collafuse.core.state import load_role, role_tensors, split_prefix
from collafuse.roles.store import HandoffStore


class Server:
    """Ingests handoffs from many clients; trains on levels > t_c; samples down to the cut per client."""

    def __init__(self, *, schedule: NoiseSchedule, cut_level: int, client_ids: list[int],
                 image_shape: tuple[int, int, int], model: ModelConfig, lr: float = 1e-3, batch_size: int = 64,
                 objective: Objective = Objective(), lr_schedule: LRSchedule = LRSchedule(),
                 client_cond: bool = True, label_dropout: float = 0.0, guidance: float = 1.0,
                 ema_decay: float = 0.0, seed: int = 0,
                 device: torch.device | str = "cpu", store_dtype: str = "float32",
                 max_message_bytes: int | None = None, max_samples: int = 1024):
        self.schedule, self.t_c = schedule, cut_level
        self.client_ids, self.image_shape = sorted(client_ids), tuple(image_shape)
        self.device, self.batch_size = torch.device(device), batch_size
        self.client_cond = client_cond
        if guidance != 1 and not label_dropout:
            raise ValueError(f"guidance {guidance} needs a net trained with null labels (label_dropout > 0)")
        # Client ids index the label embedding: the server personalises without seeing any class. With label
        # dropout one more index, past every client's, is the null label of classifier-free guidance.
        self.label_dropout, self.guidance = label_dropout, guidance
        self.null_label = max(self.client_ids) + 1 if label_dropout else None
        labels = (max(self.client_ids) + 1 + bool(label_dropout)) if client_cond else None
        self.model = Denoiser(model, image_shape[-1], image_shape[0], labels, seed=seed).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.lr, self.lr_schedule, self.objective = lr, lr_schedule, objective
        self.ema = EMA(self.model, ema_decay)
        self.gen = torch.Generator().manual_seed(seed + 104729)
        # What any client message must satisfy before anything is built from it: handoffs no bigger than the
        # mechanism can make (a poisoned batch is rejected, not clipped), bounded sampling work.
        self.limits = Limits(known_clients=frozenset(self.client_ids), image_shape=self.image_shape,
                             level=cut_level, max_samples=max_samples, max_steps=schedule.T,
                             handoff_bound=handoff_bound(float(schedule.alpha_bar[cut_level])),
                             **({"max_bytes": max_message_bytes} if max_message_bytes else {}))
        # The handoffs, keyed by (client, record, view): a re-sent view replaces, never duplicates. In memory
        # until keep_handoffs_in gives it a run's folder.
        self.store = HandoffStore(self.image_shape, store_dtype)
        # client -> handoffs received over the run, by record id: 4 bytes a record, so neither memory nor
        # checkpoint grows by more than that with the data set.
        self.received: dict[int, torch.Tensor] = {}
        self.steps_done = 0

    @classmethod
    def from_config(cls, cfg, *, schedule: NoiseSchedule, image_shape: tuple[int, int, int],
                    device: torch.device) -> "Server":
        """The server as a run Config describes it, for clients 0..data.clients-1."""
        s = cfg.server
        return cls(schedule=schedule, cut_level=schedule.cut_level(cfg.cut), client_ids=list(range(cfg.data.clients)),
                   image_shape=image_shape, model=s.model, lr=s.lr, batch_size=s.batch_size, objective=s.objective(),
                   lr_schedule=s.lr_schedule(cfg.rounds * s.steps_per_round),
                   client_cond=s.client_cond, label_dropout=s.label_dropout, guidance=s.guidance,
                   ema_decay=s.ema_decay, seed=cfg.seed, device=device,
                   store_dtype=s.store_dtype, max_message_bytes=cfg.max_message_bytes, max_samples=s.max_samples)

    @property
    def has_levels(self) -> bool:
        """False at c = 1: the clients run the whole chain and need no handoffs."""
        return self.t_c < self.schedule.T

    def keep_handoffs_in(self, folder: Path) -> None:
        """Keep the handoff store on disk in `folder` (a run's), before anything is ingested or loaded."""
        if len(self.store):
            raise RuntimeError("the server already holds handoffs in memory; give it its folder before it ingests")
        self.store = HandoffStore(self.image_shape, self.store.dtype_name, folder)

    def ingest(self, msg: HandoffBatch) -> None:
        """Keep a validated batch of handoffs (decode with self.limits before calling)."""
        keys = torch.stack([torch.full_like(msg.record_ids, msg.client_id), msg.record_ids, msg.views], 1)
        self.store.add(keys, msg.handoffs)
        counts = self.received.get(msg.client_id, torch.zeros(0, dtype=torch.int32))
        if len(msg.record_ids) and int(msg.record_ids.max()) >= len(counts):
            # Grown by doubling (zeros past the last record): one copy per message, as records arrive in order,
            # would cost O(records x messages) and leave the heap full of ever larger holes.
            size = max(int(msg.record_ids.max()) + 1, 2 * len(counts))
            counts = torch.cat([counts, counts.new_zeros(size - len(counts))])
        self.received[msg.client_id] = counts.index_add_(0, msg.record_ids,
                                                         torch.ones(len(msg.record_ids), dtype=torch.int32))

    def forget(self, client_id: int) -> None:
        """Drop a client's handoffs (fresh mode replaces them every round)."""
        self.store.forget(client_id)

    def held_handoffs(self, client_id: int) -> dict[tuple[int, int], torch.Tensor]:
        """The handoffs held from one client, keyed (record, view): all an attacker on this server has of it."""
        return self.store.held(client_id)

    def num_handoffs(self, client_id: int | None = None) -> int:
        """How many handoffs the server holds, from one client or from all."""
        keys = self.store.keys()
        return len(keys) if client_id is None else int((keys[:, 0] == client_id).sum())

    def records_received(self) -> int:
        """How many (client, record) pairs sent at least one handoff over the run."""
        return sum(int((n > 0).sum()) for n in self.received.values())

    def num_views(self, client_id: int) -> int:
        """How many different views of a client's records the server holds (without reading any handoff)."""
        keys = self.store.keys()
        return int(keys[keys[:, 0] == client_id, 2].unique().numel())

    def train(self, steps: int) -> float:
        """`steps` steps on levels t_c+1..T from stored handoffs; returns the mean loss (nan if nothing to do)."""
        losses = self.train_steps(steps)
        return sum(losses) / steps if losses else float("nan")

    def train_steps(self, steps: int, *, rank: int = 0, world: int = 1, model: nn.Module | None = None) -> list[float]:
        """The steps of `train`, each step's loss ([] if nothing to do).

        Data-parallel (federation/ddp.py): every one of the `world` ranks draws the whole global batch from the
        one generator, so that W processes see exactly the batches of one, and computes the loss of its 1/W
        slice through `model`, the wrapper of self.model that averages the gradients; the losses are the slice's.
        """
        if not self.has_levels or steps == 0:
            return []
        held = len(self.store)
        if not held:
            raise RuntimeError("the server holds no handoffs yet: clients must send handoffs before it trains")
        if self.batch_size % world:
            raise ValueError(f"server.batch_size {self.batch_size} must divide by the {world} devices: each "
                             f"takes an equal share of the global batch")
        share = self.batch_size // world
        mine = slice(rank * share, (rank + 1) * share)
        net = self.model if model is None else model
        self.model.train()
        losses = []
        for step in range(self.steps_done, self.steps_done + steps):
            idx = torch.randint(held, (self.batch_size,), generator=self.gen)[mine]
            t = torch.randint(self.t_c + 1, self.schedule.T + 1, (self.batch_size,), generator=self.gen)[mine]
            e = torch.randn((self.batch_size, *self.image_shape), generator=self.gen)[mine]
            y, owners = self.store.batch(idx)  # float32 whatever the store keeps
            if self.label_dropout:  # drawn only then: a run without guidance keeps its random stream
                drop = torch.rand(self.batch_size, generator=self.gen)[mine] < self.label_dropout
                owners = owners.masked_fill(drop, self.null_label)
            x_t = to_device(self.schedule.renoise(y, self.t_c, t, e), self.device)
            label = to_device(owners, self.device) if self.client_cond else None
            # The server's own process: data y, noise e', signal fraction ᾱ'; eps_fn rescales to full-chain noise.
            out = net(x_t, to_device(t, self.device), label)
            a = self.schedule.server_alpha_bar(self.t_c, t)
            loss = self.objective.loss(out, *(to_device(v, self.device) for v in (a, y, e)))
            losses.append(optimise(self.opt, loss, self.lr * self.lr_schedule.factor(step)))
            self.ema.update(self.model)
        self.steps_done += steps
        return torch.stack(losses).tolist()  # the host waits for the device once, here

    def eps_fn(self, client_id: int | torch.Tensor, guidance: float = 1.0):
        """Full-chain noise prediction for the requesting client, or per record for a batch of clients' records,
        with classifier-free guidance w = `guidance` on the client id (1: none)."""
        net = in_cpu_calls(self.ema.model)

        def fn(x, t):
            if not self.client_cond:
                return self.objective.server_noise(net(x, t, None), self.schedule, self.t_c, x, t)
            label = client_id.to(t.device) if torch.is_tensor(client_id) else torch.full_like(t, client_id)
            out = guided_output(net, x, t, label, self.null_label, guidance)
            return self.objective.server_noise(out, self.schedule, self.t_c, x, t)
        return fn

    def sample_to_cut(self, req: SamplingRequest) -> SamplingHandoffs:
        """Run levels T..t_c for a client (validated request); the result is not clipped."""
        return self.sample_to_cut_many([req])[0]

    @torch.no_grad()
    def sample_to_cut_many(self, reqs: list[SamplingRequest]) -> list[SamplingHandoffs]:
        """sample_to_cut for many clients, those with the same steps and sampler in one batch per network call.

        Each request keeps its own random stream (its seed), so its handoffs are those it would get alone, up to
        float rounding: with many small clients the server's sampling costs a few calls instead of one per client.
        """
        done: dict[int, torch.Tensor] = {}
        groups: dict[tuple, list[SamplingRequest]] = {}
        for req in reqs:
            groups.setdefault((req.steps, req.sampler), []).append(req)
        for (steps, sampler), group in groups.items():
            for rows in row_batches([r.n for r in group], self.image_shape):
                batch = [group[i] for i in rows]
                streams = [(torch.Generator().manual_seed(r.seed), r.n) for r in batch]
                x = randn((sum(r.n for r in batch), *self.image_shape), streams)
                owner = torch.cat([torch.full((r.n,), r.client_id) for r in batch]).to(self.device)
                x = sample_levels(self.eps_fn(owner, self.guidance), x.to(self.device),
                                  level_grid(self.schedule.T, self.t_c, steps),
                                  self.schedule, eta_of(sampler), streams)
                for r, part in zip(batch, x.float().cpu().split([r.n for r in batch])):
                    done[id(r)] = part
        return [SamplingHandoffs(client_id=r.client_id, level=self.t_c, handoffs=done[id(r)]) for r in reqs]

    def training_state(self) -> tuple[dict, dict]:
        """What training changes: model, optimiser, EMA, random stream and step count."""
        tensors, meta = role_tensors(self.model, self.opt, self.gen)
        tensors.update(self.ema.state())
        meta.update(steps_done=self.steps_done, ema_updates=self.ema.updates)
        return tensors, meta

    def load_training(self, tensors: dict, meta: dict) -> None:
        load_role(self.model, self.opt, self.gen, tensors, meta)
        self.ema.load(tensors, meta["ema_updates"])
        self.steps_done = meta["steps_done"]

    def state(self) -> tuple[dict, dict]:
        """The training state and what was received; the store as its manifest (its shards stay where they are)."""
        tensors, meta = self.training_state()
        store, manifest = self.store.state()
        tensors.update({f"store/{k}": v for k, v in store.items()})
        tensors.update({f"received/{c}": n for c, n in self.received.items()})
        meta.update(store=manifest)
        return tensors, meta

    def load(self, tensors: dict, meta: dict) -> None:
        if "store" not in meta:
            raise ValueError("this checkpoint keeps its handoffs inside it (written before the shard store); "
                             "finish it with the collafuse version that wrote it, or start a new run")
        self.load_training(tensors, meta)
        self.store.load(split_prefix(tensors, "store/"), meta["store"])
        self.received = {int(c): n for c, n in split_prefix(tensors, "received/").items()}
