"""The server role: one shared model for the high-noise levels t_c+1..T, trained on handoffs only."""
from __future__ import annotations

from collections import Counter

import torch

from collafuse.core.models import EMA, Denoiser, ModelConfig, optimise
from collafuse.core.protocol import HandoffBatch, Limits, SamplingHandoffs, SamplingRequest, handoff_bound
from collafuse.core.recipe import LRSchedule, Objective
from collafuse.core.sampling import eta_of, level_grid, sample_levels
from collafuse.core.schedule import NoiseSchedule
from collafuse.core.state import load_role, role_tensors, split_prefix


class Server:
    """Ingests handoffs from many clients; trains on levels > t_c; samples down to the cut per client."""

    def __init__(self, *, schedule: NoiseSchedule, cut_level: int, client_ids: list[int],
                 image_shape: tuple[int, int, int], model: ModelConfig, lr: float = 1e-3, batch_size: int = 64,
                 objective: Objective = Objective(), lr_schedule: LRSchedule = LRSchedule(),
                 client_cond: bool = True, ema_decay: float = 0.0, seed: int = 0,
                 device: torch.device | str = "cpu",
                 max_message_bytes: int | None = None, max_samples: int = 1024):
        self.schedule, self.t_c = schedule, cut_level
        self.client_ids, self.image_shape = sorted(client_ids), tuple(image_shape)
        self.device, self.batch_size = torch.device(device), batch_size
        self.client_cond = client_cond
        # Client ids index the label embedding: the server personalises without seeing any class.
        self.model = Denoiser(model, image_shape[-1], image_shape[0],
                              max(self.client_ids) + 1 if client_cond else None, seed=seed).to(self.device)
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
        # The handoff store, keyed by (client, record, view): a re-sent view replaces, never duplicates.
        self._store: dict[tuple[int, int, int], torch.Tensor] = {}
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None
        self.received = Counter()  # (client, record) -> handoffs received over the run
        self.steps_done = 0

    @classmethod
    def from_config(cls, cfg, *, schedule: NoiseSchedule, image_shape: tuple[int, int, int],
                    device: torch.device) -> "Server":
        """The server as a run Config describes it, for clients 0..data.clients-1."""
        s = cfg.server
        return cls(schedule=schedule, cut_level=schedule.cut_level(cfg.cut), client_ids=list(range(cfg.data.clients)),
                   image_shape=image_shape, model=s.model, lr=s.lr, batch_size=s.batch_size, objective=s.objective(),
                   lr_schedule=s.lr_schedule(cfg.rounds * s.steps_per_round),
                   client_cond=s.client_cond, ema_decay=s.ema_decay, seed=cfg.seed, device=device,
                   max_message_bytes=cfg.max_message_bytes, max_samples=s.max_samples)

    @property
    def has_levels(self) -> bool:
        """False at c = 1: the clients run the whole chain and need no handoffs."""
        return self.t_c < self.schedule.T

    def ingest(self, msg: HandoffBatch) -> None:
        """Keep a validated batch of handoffs (decode with self.limits before calling)."""
        for rid, view, y in zip(msg.record_ids.tolist(), msg.views.tolist(), msg.handoffs):
            self._store[(msg.client_id, rid, view)] = y.clone()
            self.received[(msg.client_id, rid)] += 1
        self._pool = None

    def forget(self, client_id: int) -> None:
        """Drop a client's handoffs (fresh mode replaces them every round)."""
        self._store = {k: v for k, v in self._store.items() if k[0] != client_id}
        self._pool = None

    def held_handoffs(self, client_id: int) -> dict[tuple[int, int], torch.Tensor]:
        """The handoffs held from one client, keyed (record, view): all an attacker on this server has of it."""
        return {(r, v): y for (c, r, v), y in self._store.items() if c == client_id}

    def num_handoffs(self, client_id: int | None = None) -> int:
        return sum(1 for k in self._store if client_id is None or k[0] == client_id)

    def _handoff_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pool is None:
            keys = sorted(self._store)
            self._pool = (torch.stack([self._store[k] for k in keys]), torch.tensor([k[0] for k in keys]))
        return self._pool

    def train(self, steps: int) -> float:
        """`steps` steps on levels t_c+1..T from stored handoffs; returns the mean loss (nan if nothing to do)."""
        if not self.has_levels or steps == 0:
            return float("nan")
        if not self._store:
            raise RuntimeError("the server holds no handoffs yet: clients must send handoffs before it trains")
        handoffs, owners = self._handoff_pool()
        self.model.train()
        total = 0.0
        for step in range(self.steps_done, self.steps_done + steps):
            idx = torch.randint(handoffs.shape[0], (self.batch_size,), generator=self.gen)
            t = torch.randint(self.t_c + 1, self.schedule.T + 1, (self.batch_size,), generator=self.gen)
            e = torch.randn((self.batch_size, *self.image_shape), generator=self.gen)
            y = handoffs[idx]
            x_t = self.schedule.renoise(y, self.t_c, t, e).to(self.device)
            label = owners[idx].to(self.device) if self.client_cond else None
            # The server's own process: data y, noise e', signal fraction ᾱ'; eps_fn rescales to full-chain noise.
            out = self.model(x_t, t.to(self.device), label)
            loss = self.objective.loss(out, self.schedule.server_alpha_bar(self.t_c, t), y, e)
            total += optimise(self.opt, loss, self.lr * self.lr_schedule.factor(step))
            self.ema.update(self.model)
        self.steps_done += steps
        return total / steps

    def eps_fn(self, client_id: int):
        """Full-chain noise prediction for the requesting client."""
        def fn(x, t):
            label = torch.full_like(t, client_id) if self.client_cond else None
            out = self.ema.model(x, t, label)
            e = self.objective.predicted_noise(out, self.schedule.server_alpha_bar(self.t_c, t), x)  # its own e'
            scale = self.schedule.server_eps_scale(self.t_c, t.cpu()).to(x.device, x.dtype).view(-1, 1, 1, 1)
            return scale * e
        return fn

    @torch.no_grad()
    def sample_to_cut(self, req: SamplingRequest) -> SamplingHandoffs:
        """Run levels T..t_c for a client (validated request); the result is not clipped."""
        g = torch.Generator().manual_seed(req.seed)
        x = torch.randn((req.n, *self.image_shape), generator=g).to(self.device)
        x = sample_levels(self.eps_fn(req.client_id), x, level_grid(self.schedule.T, self.t_c, req.steps),
                          self.schedule, eta_of(req.sampler), g)
        return SamplingHandoffs(client_id=req.client_id, level=self.t_c, handoffs=x.float().cpu())

    def state(self) -> tuple[dict, dict]:
        tensors, meta = role_tensors(self.model, self.opt, self.gen)
        keys = sorted(self._store)
        if keys:
            tensors["store/handoffs"] = torch.stack([self._store[k] for k in keys])
            tensors["store/keys"] = torch.tensor(keys, dtype=torch.long)
        tensors.update(self.ema.state())
        meta.update(steps_done=self.steps_done, ema_updates=self.ema.updates, received=[[*k, v] for k, v in sorted(self.received.items())])
        return tensors, meta

    def load(self, tensors: dict, meta: dict) -> None:
        load_role(self.model, self.opt, self.gen, tensors, meta)
        self.ema.load(tensors, meta["ema_updates"])
        store = split_prefix(tensors, "store/")
        self._store = ({tuple(k): y for k, y in zip(store["keys"].tolist(), store["handoffs"])}
                       if store else {})
        self._pool = None
        self.steps_done = meta["steps_done"]
        self.received = Counter({(c, r): n for c, r, n in meta["received"]})
