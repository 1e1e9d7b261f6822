"""The client role: private images, labels and noise; the low-noise levels 1..t_c; its own privacy policy."""
from __future__ import annotations

import time

import torch

from collafuse.core.models import EMA, Denoiser, ModelConfig, optimise, to_device
from collafuse.core.protocol import (ClientReport, HandoffBatch, Refusal, RoundRequest, SamplingHandoffs,
                                     SamplingRequest)
from collafuse.core.recipe import LRSchedule, Objective, guided_output
from collafuse.core.sampling import eta_of, in_cpu_calls, level_grid, sample_levels
from collafuse.core.schedule import NoiseSchedule
from collafuse.core.state import load_role, role_tensors
from collafuse.roles.noise import handoff_noise, record_digests
from collafuse.roles.policy import PolicyViolation, PrivacyPolicy, Release, ReleaseLedger
from collafuse.roles.privacy import clip_records, range_clip_norm


class Client:
    """Owns a partition, its private labels, noise secret, policy and release ledger, and a model for levels <= t_c.

    `condition` (optional, per record): class ids (N,) int64 or attribute vectors (N, A) float; the
    client's model conditions on it and it never leaves the client. `labels` serve only the client's
    own measurements. `policy` is what the client's owner allows; every server request is checked
    against it and the `ledger` of everything released before, and refused when outside.
    """

    def __init__(self, client_id: int, images: torch.Tensor, labels: torch.Tensor, *, schedule: NoiseSchedule,
                 cut_level: int, model: ModelConfig, secret: bytes, ledger: ReleaseLedger,
                 policy: PrivacyPolicy = PrivacyPolicy(), lr: float = 1e-3, batch_size: int = 64,
                 objective: Objective = Objective(), lr_schedule: LRSchedule = LRSchedule(),
                 condition: torch.Tensor | None = None, num_classes: int | None = None,
                 label_dropout: float = 0.0, guidance: float = 1.0,
                 ema_decay: float = 0.0, seed: int = 0, device: torch.device | str = "cpu"):
        if images.shape[0] == 0:
            raise ValueError(f"client {client_id} has no training records; use fewer clients or another partition")
        self.id, self.schedule, self.t_c = client_id, schedule, cut_level
        self.images, self.labels = images, labels
        self.device, self.batch_size = torch.device(device), batch_size
        self.policy, self.ledger = policy, ledger
        self.clip_norm = policy.clip_norm
        self.condition = condition
        vector = condition is not None and condition.dim() == 2
        if label_dropout and (condition is None or vector or not num_classes):
            raise ValueError("label_dropout needs class labels (client.condition = class): only a class has a null "
                             "class to drop it to")
        if guidance != 1 and not label_dropout:
            raise ValueError(f"guidance {guidance} needs a net trained with null classes (label_dropout > 0)")
        # Classifier-free guidance on the client's classes: with label dropout one more class, past every real
        # one, is the null class; it is as private as the others.
        self.label_dropout, self.guidance = label_dropout, guidance
        self.null_class = num_classes if label_dropout else None
        self.model = Denoiser(model, images.shape[-1], images.shape[1],
                              num_labels=num_classes + bool(label_dropout) if condition is not None and not vector
                              else None,
                              vector_dim=condition.shape[1] if vector else None, seed=seed).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.lr, self.lr_schedule, self.objective = lr, lr_schedule, objective
        self.ema = EMA(self.model, ema_decay)
        self.gen = torch.Generator().manual_seed(seed)
        # The secret behind every handoff's noise; it never leaves the client (nor its state folder).
        self._secret = secret
        self.digests = record_digests(images)  # who a record is, by content, across runs and sessions
        self.views_made = 0  # the highest view index sent + 1 (the ledger holds the full history)
        self.steps_done = 0

    @classmethod
    def from_config(cls, cfg, client_id: int, images: torch.Tensor, labels: torch.Tensor, *,
                    schedule: NoiseSchedule, condition: torch.Tensor | None, num_classes: int | None,
                    device: torch.device, secret: bytes, ledger: ReleaseLedger,
                    policy: PrivacyPolicy) -> "Client":
        """Client `client_id` as a run Config describes it, over its own records, under its owner's policy."""
        c = cfg.client
        return cls(client_id, images, labels, schedule=schedule, cut_level=schedule.cut_level(cfg.cut),
                   model=c.model, secret=secret, ledger=ledger, policy=policy, lr=c.lr, batch_size=c.batch_size,
                   objective=c.objective(), lr_schedule=c.lr_schedule(cfg.rounds * cfg.client_steps),
                   condition=condition, num_classes=num_classes, label_dropout=c.label_dropout,
                   guidance=c.guidance, ema_decay=c.ema_decay,
                   seed=cfg.seed * 1000 + client_id, device=device)

    @property
    def num_records(self) -> int:
        return self.images.shape[0]

    def release(self) -> Release:
        """The mechanism this client's handoffs are released under: its cut and its records' L2 bound."""
        bound = self.clip_norm if self.clip_norm is not None else range_clip_norm(tuple(self.images.shape[1:]))
        return Release(level=self.t_c, T=self.schedule.T, alpha_bar=float(self.schedule.alpha_bar[self.t_c]),
                       clip_norm=float(bound))

    def view_noise(self, view: int, release: Release | None = None) -> torch.Tensor:
        """The private noise of one view of every record: a PRF of the secret, the record, the mechanism, the view."""
        key = (release or self.release()).key()
        return handoff_noise(self._secret, self.digests, key, view, tuple(self.images.shape[1:]))

    def private_records(self) -> torch.Tensor:
        """The records as the handoff sees them: clipped to L2 norm clip_norm when the policy says so."""
        return self.images if self.clip_norm is None else clip_records(self.images, self.clip_norm)

    def make_handoffs(self, views: list[int], batch: int, *, run: str = "", round: int = 0) -> list[HandoffBatch]:
        """Views `views` of every record, noised to t_c, in messages of <= batch records.

        The policy and the ledger decide first (PolicyViolation if they refuse); the ledger is written
        before anything leaves. A view released before is re-made bit for bit: the server learns nothing new.
        """
        if not views:
            return []
        release = self.release()
        self.ledger.plan(self.digests, release, views, self.policy)
        self.ledger.record(self.digests, release, views, run=run, round=round)
        x0, out = self.private_records(), []
        levels = torch.full((self.num_records,), self.t_c, dtype=torch.long)
        for view in views:
            y = self.schedule.noise(x0, levels, self.view_noise(view, release))
            for start in range(0, self.num_records, batch):
                ids = torch.arange(start, min(start + batch, self.num_records))
                out.append(HandoffBatch(client_id=self.id, level=self.t_c, record_ids=ids,
                                        views=torch.full_like(ids, view), handoffs=y[ids].float()))
        self.views_made = max(self.views_made, max(views) + 1)
        return out

    def check(self, req: RoundRequest) -> list[int]:
        """The views a request asks for, if this client's policy and ledger allow them (else PolicyViolation)."""
        self.policy.check_request(level=req.level, T=self.schedule.T, mode=req.mode)
        if req.level != self.t_c:
            raise PolicyViolation(f"the server asks for handoffs at level {req.level}, but this client runs levels "
                                  f"1..{self.t_c} (its cut); the run's cut must match on both sides")
        views = list(range(req.first_view, req.first_view + req.n_views))
        if views and self.t_c < self.schedule.T:  # refuse before any training
            self.ledger.plan(self.digests, self.release(), views, self.policy)
        return views

    def accepts(self, req: RoundRequest) -> bool:
        """Whether this client's policy and ledger allow the request (answer then trains and sends)."""
        try:
            if self.t_c < self.schedule.T:
                self.check(req)
        except PolicyViolation:
            return False
        return True

    def answer(self, req: RoundRequest, *, handoff_batch: int, sampling: SamplingRequest,
               trained: tuple[float, float] | None = None) -> list:
        """One round as the server asked, if the policy allows: local steps, then the handoffs.

        Replies [ClientReport, SamplingRequest, HandoffBatch...], or [Refusal] with nothing else: a refused
        request costs no training and releases nothing. `trained` (mean loss, seconds): the round's steps were
        already taken, for a request this client accepts (roles/cohort.py trains simulated clients together).
        """
        try:
            views = self.check(req) if self.t_c < self.schedule.T else []
            if trained is None:
                t0 = time.perf_counter()
                trained = self.train(req.steps), time.perf_counter() - t0
            loss, seconds = trained
            # planned again there: another process of this client may have released meanwhile
            batches = self.make_handoffs(views, handoff_batch, run=req.run, round=req.round)
        except PolicyViolation as e:
            return [Refusal(client_id=self.id, reason=str(e))]
        numbers = {"n_train": self.num_records, "views_made": self.views_made, "steps_done": self.steps_done,
                   "train_seconds": seconds, **self.released()}
        if loss == loss:  # nan: no levels below the cut
            numbers["loss"] = loss
        return [ClientReport(client_id=self.id, metrics=numbers), sampling, *batches]

    def released(self) -> dict:
        """What this client's records have released over its lifetime, from its ledger (numbers only)."""
        summary = self.ledger.summary(self.policy.delta)
        out = {"records_released": summary["records"], "views_released": summary["record_views"],
               "delta": self.policy.delta}
        if summary["epsilon_max"] is not None:  # None: unbounded, the raw records left (c = 0)
            out["epsilon"] = float(summary["epsilon_max"])
        return out

    def train(self, steps: int) -> float:
        """`steps` training steps on levels 1..t_c (the chain's own ᾱ); returns the mean loss (nan if no levels)."""
        if self.t_c == 0 or steps == 0:
            return float("nan")
        self.model.train()
        losses = []
        for step in range(self.steps_done, self.steps_done + steps):
            x_t, t, cond, a, x0, eps = self.draw_batch()
            loss = self.objective.loss(self.model(x_t, t, cond), a, x0, eps)
            losses.append(optimise(self.opt, loss, self.lr * self.lr_schedule.factor(step)))
            self.ema.update(self.model)
        self.steps_done += steps
        return sum(torch.stack(losses).tolist()) / steps  # the host waits for the device once, here

    def draw_batch(self) -> tuple:
        """One training step's batch from this client's generator: (x_t, t, cond, ᾱ(t), x0, eps).

        The one place that fixes the draw order: training together (roles/cohort.py) equals training alone
        because both draw through here.
        """
        idx = torch.randint(self.num_records, (self.batch_size,), generator=self.gen)
        t = torch.randint(1, self.t_c + 1, (self.batch_size,), generator=self.gen)
        eps = torch.randn((self.batch_size, *self.images.shape[1:]), generator=self.gen)
        x0 = self.images[idx]
        x_t = self.schedule.noise(x0, t, eps)
        cond = self.condition[idx] if self.condition is not None else None
        if self.label_dropout:  # drawn only then: a run without guidance keeps its random stream
            drop = torch.rand(self.batch_size, generator=self.gen) < self.label_dropout
            cond = cond.masked_fill(drop, self.null_class)
        return tuple(None if v is None else to_device(v, self.device)
                     for v in (x_t, t, cond, self.schedule.alpha_bar[t], x0, eps))

    def eps_fn(self, cond: torch.Tensor | None, guidance: float = 1.0):
        """Noise prediction of the sampling (EMA) weights for levels <= t_c, with classifier-free guidance
        w = `guidance` on `cond` (1: none). finish samples with self.guidance; the disclosure attacks score the
        conditional net, as they do the server's."""
        net = in_cpu_calls(self.ema.model)

        def fn(x, t):
            out = guided_output(net, x, t, cond, self.null_class, guidance)
            return self.objective.client_noise(out, self.schedule, x, t)
        return fn

    def sampling_request(self, n: int, steps: int, sampler: str, seed: int) -> SamplingRequest:
        return SamplingRequest(client_id=self.id, n=n, steps=steps, sampler=sampler, seed=seed)

    @torch.no_grad()
    def finish(self, msg: SamplingHandoffs, steps: int, sampler: str, seed: int) -> torch.Tensor:
        """Run levels t_c..0 on the server's handoffs; the images stay here. Returns (n, C, H, W) in [-1, 1]."""
        g, cond = self.sampling_stream(msg.handoffs.shape[0], seed)
        x = sample_levels(self.eps_fn(cond, self.guidance), msg.handoffs.to(self.device),
                          level_grid(self.t_c, 0, steps), self.schedule, eta_of(sampler), g)
        return x.clamp(-1, 1).cpu()

    def sampling_stream(self, n: int, seed: int) -> tuple[torch.Generator, torch.Tensor | None]:
        """finish's random stream for n samples, and the conditions it draws first from this client's own records."""
        g = torch.Generator().manual_seed(seed)
        if self.condition is None:
            return g, None
        return g, self.condition[torch.randint(self.num_records, (n,), generator=g)].to(self.device)

    def state(self) -> tuple[dict, dict]:
        tensors, meta = role_tensors(self.model, self.opt, self.gen)
        tensors.update(self.ema.state())
        meta.update(views_made=self.views_made, steps_done=self.steps_done, ema_updates=self.ema.updates)
        return tensors, meta

    def load(self, tensors: dict, meta: dict) -> None:
        load_role(self.model, self.opt, self.gen, tensors, meta)
        self.ema.load(tensors, meta["ema_updates"])
        self.views_made, self.steps_done = meta["views_made"], meta["steps_done"]
