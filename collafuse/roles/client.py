"""The client role: private images, labels and noise; the low-noise levels 1..t_c."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from collafuse.core.models import EMA, Denoiser, ModelConfig, optimise
from collafuse.roles.privacy import clip_records
from collafuse.core.protocol import HandoffBatch, SamplingHandoffs, SamplingRequest
from collafuse.core.sampling import eta_of, level_grid, sample_levels
from collafuse.core.schedule import NoiseSchedule
from collafuse.core.state import load_role, role_tensors


class Client:
    """Owns a partition, its private labels and noise seed, and a (small) model for levels <= t_c.

    `condition` (optional, per record): class ids (N,) int64 or attribute vectors (N, A) float; the
    client's model conditions on it and it never leaves the client. `labels` serve only the client's
    own measurements.
    """

    def __init__(self, client_id: int, images: torch.Tensor, labels: torch.Tensor, *, schedule: NoiseSchedule,
                 cut_level: int, model: ModelConfig, lr: float = 1e-3, batch_size: int = 64,
                 condition: torch.Tensor | None = None, num_classes: int | None = None,
                 clip_norm: float | None = None, ema_decay: float = 0.0, seed: int = 0,
                 noise_seed: int | None = None, device: torch.device | str = "cpu"):
        if images.shape[0] == 0:
            raise ValueError(f"client {client_id} has no training records; use fewer clients or another partition")
        self.id, self.schedule, self.t_c = client_id, schedule, cut_level
        self.images, self.labels = images, labels
        self.device, self.batch_size = torch.device(device), batch_size
        self.clip_norm = clip_norm
        self.condition = condition
        vector = condition is not None and condition.dim() == 2
        self.model = Denoiser(model, images.shape[-1], images.shape[1],
                              num_labels=num_classes if condition is not None and not vector else None,
                              vector_dim=condition.shape[1] if vector else None, seed=seed).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.ema = EMA(self.model, ema_decay)
        self.gen = torch.Generator().manual_seed(seed)
        # The secret behind every handoff; it never leaves the client.
        self._noise_seed = noise_seed if noise_seed is not None else seed + 7919
        self.views_made = 0
        self.steps_done = 0

    @classmethod
    def from_config(cls, cfg, client_id: int, images: torch.Tensor, labels: torch.Tensor, *,
                    schedule: NoiseSchedule, condition: torch.Tensor | None, num_classes: int | None,
                    device: torch.device, noise_seed: int | None = None) -> "Client":
        """Client `client_id` as a run Config describes it, over its own records."""
        c = cfg.client
        return cls(client_id, images, labels, schedule=schedule, cut_level=schedule.cut_level(cfg.cut),
                   model=c.model, lr=c.lr, batch_size=c.batch_size, condition=condition, num_classes=num_classes,
                   clip_norm=cfg.handoff.clip_norm, ema_decay=c.ema_decay, seed=cfg.seed * 1000 + client_id,
                   noise_seed=noise_seed, device=device)

    @property
    def num_records(self) -> int:
        return self.images.shape[0]

    def _view_noise(self, view: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self._noise_seed * 1_000_003 + view)
        return torch.randn(self.images.shape, generator=g)

    def private_records(self) -> torch.Tensor:
        """The records as the handoff sees them: clipped to L2 norm clip_norm when formal DP is on."""
        return self.images if self.clip_norm is None else clip_records(self.images, self.clip_norm)

    def make_handoffs(self, n_views: int, batch: int) -> list[HandoffBatch]:
        """The next n_views independent views of every record, noised to t_c, in messages of <= batch records."""
        x0, out = self.private_records(), []
        levels = torch.full((self.num_records,), self.t_c, dtype=torch.long)
        for view in range(self.views_made, self.views_made + n_views):
            y = self.schedule.noise(x0, levels, self._view_noise(view))
            for start in range(0, self.num_records, batch):
                ids = torch.arange(start, min(start + batch, self.num_records))
                out.append(HandoffBatch(client_id=self.id, level=self.t_c, record_ids=ids,
                                        views=torch.full_like(ids, view), handoffs=y[ids].float()))
        self.views_made += n_views
        return out

    def train(self, steps: int) -> float:
        """`steps` DDPM noise-prediction steps on levels 1..t_c; returns the mean loss (nan if no levels)."""
        if self.t_c == 0 or steps == 0:
            return float("nan")
        self.model.train()
        total = 0.0
        for _ in range(steps):
            idx = torch.randint(self.num_records, (self.batch_size,), generator=self.gen)
            t = torch.randint(1, self.t_c + 1, (self.batch_size,), generator=self.gen)
            eps = torch.randn((self.batch_size, *self.images.shape[1:]), generator=self.gen)
            x_t = self.schedule.noise(self.images[idx], t, eps).to(self.device)
            cond = self.condition[idx].to(self.device) if self.condition is not None else None
            total += optimise(self.opt, F.mse_loss(self.model(x_t, t.to(self.device), cond), eps.to(self.device)))
            self.ema.update(self.model)
        self.steps_done += steps
        return total / steps

    def eps_fn(self, cond: torch.Tensor | None):
        """Noise prediction of the sampling (EMA) weights for levels <= t_c."""
        return lambda x, t: self.ema.model(x, t, cond)

    def sampling_request(self, n: int, steps: int, sampler: str, seed: int) -> SamplingRequest:
        return SamplingRequest(client_id=self.id, n=n, steps=steps, sampler=sampler, seed=seed)

    @torch.no_grad()
    def finish(self, msg: SamplingHandoffs, steps: int, sampler: str, seed: int) -> torch.Tensor:
        """Run levels t_c..0 on the server's handoffs; the images stay here. Returns (n, C, H, W) in [-1, 1]."""
        g = torch.Generator().manual_seed(seed)
        n = msg.handoffs.shape[0]
        cond = None
        if self.condition is not None:  # draw conditions from this client's own records
            cond = self.condition[torch.randint(self.num_records, (n,), generator=g)].to(self.device)
        x = sample_levels(self.eps_fn(cond), msg.handoffs.to(self.device), level_grid(self.t_c, 0, steps),
                          self.schedule, eta_of(sampler), g)
        return x.clamp(-1, 1).cpu()

    def state(self) -> tuple[dict, dict]:
        tensors, meta = role_tensors(self.model, self.opt, self.gen)
        tensors.update(self.ema.state())
        meta.update(views_made=self.views_made, steps_done=self.steps_done, ema_updates=self.ema.updates)
        return tensors, meta

    def load(self, tensors: dict, meta: dict) -> None:
        load_role(self.model, self.opt, self.gen, tensors, meta)
        self.ema.load(tensors, meta["ema_updates"])
        self.views_made, self.steps_done = meta["views_made"], meta["steps_done"]
