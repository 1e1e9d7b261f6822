"""diffusers pipelines for a trained run's parties, and `collafuse export`: one party's weights, chain and model card.

The pipelines step the chain with collafuse's own sampler (core/sampling.py), so the handoff lands exactly
at t_c and a pipeline reproduces `collafuse sample` bit for bit on CPU. The DDPMScheduler each one carries
records the run's chain (T and betas) for other diffusers tools; the pipelines do not step it.

Loading needs collafuse installed, and no network:
    from collafuse.export import CollaFuseClientPipeline
    pipe = CollaFuseClientPipeline.from_pretrained("my-client")
Each folder also holds a `pipeline.py` that imports its class, for diffusers' own custom-pipeline loader:
    DiffusionPipeline.from_pretrained("my-client", custom_pipeline="pipeline", trust_remote_code=True)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel

from collafuse.core.recipe import Objective, guided_output
from collafuse.core.sampling import eta_of, level_grid, sample_levels
from collafuse.core.schedule import NoiseSchedule

PARTS = ("server", "client", "split")
IMAGE_OUTPUTS = ("pil", "np", "pt")
HANDOFF_OUTPUTS = ("pt", "np")  # a handoff is the chain's state at t_c, not an image: no PIL
QUALITY_KEYS = ("fid", "kid_mean", "kid_std", "kid_score", "failed", "own_class_share", "own_class_share_ceiling",
                "own_client_share", "own_client_share_ceiling", "n_samples", "n_reference")


def chain_scheduler(schedule: NoiseSchedule, prediction: str = "epsilon") -> DDPMScheduler:
    """The run's chain as a diffusers scheduler: T and the betas of ᾱ, no clipping (a handoff is not an image).

    Its prediction_type records what the pipeline's net outputs. A client's is on the chain itself; the server's
    v or ε is on its own process (ᾱ' = ᾱ(t)/ᾱ(t_c)), which no diffusers scheduler steps.
    """
    ab = schedule.alpha_bar
    return DDPMScheduler(num_train_timesteps=schedule.T, trained_betas=(1 - ab[1:] / ab[:-1]).tolist(),
                         clip_sample=False, prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[prediction])


def server_eps(unet: UNet2DModel, prediction: str, schedule: NoiseSchedule, cut_level: int, client_id: int,
               guidance: float = 1.0, null_label: int | None = None):
    """Full-chain noise prediction of the server's net for one client, as Server.eps_fn computes it."""
    objective = Objective(prediction)

    def fn(x, t):
        if not unet.config.num_class_embeds:
            return objective.server_noise(unet(x, t).sample, schedule, cut_level, x, t)
        out = guided_output(lambda x, t, label: unet(x, t, class_labels=label).sample, x, t,
                            torch.full_like(t, client_id), null_label, guidance)
        return objective.server_noise(out, schedule, cut_level, x, t)
    return fn


def class_condition(unet: UNet2DModel, class_labels, n: int, device, null_class: int | None = None
                    ) -> torch.Tensor | None:
    """The client's class per sample (one int for all, or n of them); None for an unconditional client.
    The null class of a client trained for guidance is no class of its own."""
    classes = null_class if null_class is not None else unet.config.num_class_embeds
    if classes is None:
        if class_labels is not None:
            raise ValueError("this client's model is unconditional (client.condition=none); drop class_labels")
        return None
    if class_labels is None:
        raise ValueError(f"this client's model is conditioned on its private classes 0..{classes - 1}: pass "
                         f"class_labels (one int, or one per sample)")
    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
    labels = labels.expand(n) if labels.numel() == 1 else labels
    if labels.shape != (n,) or not bool(((labels >= 0) & (labels < classes)).all()):
        raise ValueError(f"class_labels must be one int or {n} ints in 0..{classes - 1}, got {class_labels!r}")
    return labels.to(device)


class _ChainPipeline(DiffusionPipeline):
    """What the three pipelines share: the run's schedule, a descent over levels, output conversion."""

    @property
    def noise_schedule(self) -> NoiseSchedule:
        """The run's ᾱ(t) as collafuse computes it (float64), from T and the schedule kind."""
        return NoiseSchedule(self.scheduler.config.num_train_timesteps, self.config.schedule)

    def _descend(self, schedule: NoiseSchedule, eps_fn, x, levels: list[int], sampler: str,
                 generator) -> torch.Tensor:
        """core.sampling.sample_levels from levels[0] to levels[-1], ticking the progress bar once per step."""
        with self.progress_bar(total=len(levels) - 1) as bar:
            def ticking(x_t, t):
                bar.update()
                return eps_fn(x_t, t)
            return sample_levels(ticking, x, levels, schedule, eta_of(sampler), generator)

    def _to_cut(self, unet, prediction: str, client_id: int, n: int, steps: int, sampler: str, generator,
                guidance: float) -> torch.Tensor:
        """Levels T..t_c for one client, as Server.sample_to_cut (noise drawn on the CPU from `generator`)."""
        null = self.config.null_label
        clients = null if null is not None else unet.config.num_class_embeds  # the null label is no client's
        if clients and not 0 <= client_id < clients:
            raise ValueError(f"client_id {client_id} is not one of this server's clients 0..{clients - 1}")
        if guidance != 1 and null is None:
            raise ValueError(f"guidance_scale {guidance} needs a server trained with label dropout "
                             f"(server.label_dropout > 0); this one was not: keep guidance_scale at 1")
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        schedule, t_c = self.noise_schedule, self.config.cut_level
        x = torch.randn((n, *shape), generator=generator).to(self.device)
        x = self._descend(schedule, server_eps(unet, prediction, schedule, t_c, client_id, guidance, null), x,
                          level_grid(schedule.T, t_c, steps), sampler, generator)
        return x.float().cpu()

    def _finish(self, unet, prediction: str, handoffs, class_labels, steps: int, sampler: str, generator,
                guidance: float, null_class: int | None) -> torch.Tensor:
        """Levels t_c..0 on handoffs, as Client.finish with the given classes and guidance w on them.
        Returns (n, C, H, W) in [-1, 1]."""
        y = torch.as_tensor(handoffs, dtype=torch.float32)
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        if y.dim() != 4 or tuple(y.shape[1:]) != shape:
            raise ValueError(f"handoffs must have shape (n, {', '.join(map(str, shape))}), got {tuple(y.shape)}")
        if guidance != 1 and null_class is None:
            raise ValueError(f"client guidance {guidance} needs a client trained with label dropout "
                             f"(client.label_dropout > 0); this one was not: keep it at 1")
        cond = class_condition(unet, class_labels, y.shape[0], self.device, null_class)
        schedule, objective = self.noise_schedule, Objective(prediction)

        def eps(x, t):
            out = guided_output(lambda x, t, c: unet(x, t, class_labels=c).sample, x, t, cond, null_class, guidance)
            return objective.client_noise(out, schedule, x, t)
        x = self._descend(schedule, eps, y.to(self.device), level_grid(self.config.cut_level, 0, steps), sampler,
                          generator)
        return x.clamp(-1, 1).cpu()

    def _images(self, x: torch.Tensor, output_type: str):
        """[-1, 1] samples as diffusers' image pipelines return them: [0, 1] tensors, NHWC arrays or PIL images."""
        x = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return x
        x = x.permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(x) if output_type == "pil" else x


def _check_output(output_type: str, allowed: tuple[str, ...]) -> None:
    if output_type not in allowed:
        raise ValueError(f"output_type {output_type!r} is not offered here; choose one of {', '.join(allowed)}")


class CollaFuseServerPipeline(_ChainPipeline):
    """Noise -> handoffs at t_c for one client: the server operator's part (levels T..t_c+1)."""

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, cut_level: int = 0, schedule: str = "linear",
                 sampler: str = "ddim", steps: int = 40, prediction: str = "epsilon", guidance_scale: float = 1.0,
                 null_label: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(cut_level=cut_level, schedule=schedule, sampler=sampler, steps=steps,
                                prediction=prediction, guidance_scale=guidance_scale, null_label=null_label)

    @torch.no_grad()
    def __call__(self, client_id: int, batch_size: int = 1, num_inference_steps: int | None = None,
                 sampler: str | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pt", return_dict: bool = True):
        """Handoffs (batch_size, C, H, W), unclipped, for client `client_id`.

        A CPU `generator` seeded s gives exactly the handoffs `collafuse sample --seed s` sends that client.
        `guidance_scale` defaults to the run's server.guidance.
        """
        _check_output(output_type, HANDOFF_OUTPUTS)
        y = self._to_cut(self.unet, self.config.prediction, client_id, batch_size,
                         num_inference_steps or self.config.steps, sampler or self.config.sampler, generator,
                         self.config.guidance_scale if guidance_scale is None else guidance_scale)
        y = y if output_type == "pt" else y.numpy()
        return ImagePipelineOutput(images=y) if return_dict else (y,)


class CollaFuseClientPipeline(_ChainPipeline):
    """Handoffs -> images with one client's private model (levels t_c..1), optionally class-conditioned."""

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, cut_level: int = 0, schedule: str = "linear",
                 sampler: str = "ddim", steps: int = 10, client_id: int = 0, prediction: str = "epsilon",
                 guidance_scale: float = 1.0, null_class: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(cut_level=cut_level, schedule=schedule, sampler=sampler, steps=steps,
                                client_id=client_id, prediction=prediction, guidance_scale=guidance_scale,
                                null_class=null_class)

    @torch.no_grad()
    def __call__(self, handoffs, class_labels=None, num_inference_steps: int | None = None,
                 sampler: str | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        """Images from handoffs at t_c (a tensor or array (n, C, H, W), e.g. CollaFuseServerPipeline's output).

        A CPU `generator` seeded s + 1 finishes as `collafuse sample --seed s` does (Client.finish gets seed + 1).
        A class-conditioned client needs `class_labels`: `collafuse sample` draws them from the client's own
        records, which no export carries. `guidance_scale` (on those classes) defaults to the run's client.guidance.
        """
        _check_output(output_type, IMAGE_OUTPUTS)
        x = self._finish(self.unet, self.config.prediction, handoffs, class_labels,
                         num_inference_steps or self.config.steps, sampler or self.config.sampler, generator,
                         self.config.guidance_scale if guidance_scale is None else guidance_scale,
                         self.config.null_class)
        images = self._images(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class CollaFuseSplitPipeline(_ChainPipeline):
    """Noise -> images through both parties, for whoever legitimately holds both (in-process research runs)."""

    def __init__(self, server_unet: UNet2DModel, client_unet: UNet2DModel, scheduler: DDPMScheduler,
                 cut_level: int = 0, schedule: str = "linear", sampler: str = "ddim", server_steps: int = 40,
                 client_steps: int = 10, client_id: int = 0, server_prediction: str = "epsilon",
                 client_prediction: str = "epsilon", guidance_scale: float = 1.0, null_label: int | None = None,
                 client_sampler: str | None = None, client_guidance_scale: float = 1.0,
                 client_null_class: int | None = None):
        super().__init__()
        self.register_modules(server_unet=server_unet, client_unet=client_unet, scheduler=scheduler)
        self.register_to_config(cut_level=cut_level, schedule=schedule, sampler=sampler, server_steps=server_steps,
                                client_steps=client_steps, client_id=client_id, server_prediction=server_prediction,
                                client_prediction=client_prediction, guidance_scale=guidance_scale,
                                null_label=null_label, client_sampler=client_sampler,
                                client_guidance_scale=client_guidance_scale, client_null_class=client_null_class)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps: int | None = None,
                 client_inference_steps: int | None = None, sampler: str | None = None,
                 client_sampler: str | None = None, guidance_scale: float | None = None,
                 client_guidance_scale: float | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        """Images of client `client_id` (the config's) through the whole chain.

        `seed` = s equals `collafuse sample --seed s` bit for bit on CPU: the server's side draws from a
        generator seeded s, the client's from one seeded s + 1, as split_sample does. A `generator` instead
        drives both sides from its one stream. `guidance_scale` (the server's, on the client id) and
        `client_guidance_scale` (the client's, on its classes) default to the run's.
        `sampler` runs the server's levels (default: the run's); `client_sampler` the client's (default: `sampler`
        where one is passed, else the run's client sampler).
        """
        _check_output(output_type, IMAGE_OUTPUTS)
        if seed is not None and generator is not None:
            raise ValueError("pass seed (reproduces collafuse sample) or generator, not both")
        client_sampler = client_sampler or sampler or self.config.client_sampler or self.config.sampler
        sampler = sampler or self.config.sampler
        server_gen = torch.Generator().manual_seed(seed) if seed is not None else generator
        client_gen = torch.Generator().manual_seed(seed + 1) if seed is not None else generator
        y = self._to_cut(self.server_unet, self.config.server_prediction, self.config.client_id, batch_size,
                         num_inference_steps or self.config.server_steps, sampler, server_gen,
                         self.config.guidance_scale if guidance_scale is None else guidance_scale)
        x = self._finish(self.client_unet, self.config.client_prediction, y, class_labels,
                         client_inference_steps or self.config.client_steps, client_sampler, client_gen,
                         self.config.client_guidance_scale if client_guidance_scale is None else client_guidance_scale,
                         self.config.client_null_class)
        images = self._images(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def pipeline_of(fed, part: str, client: int | None = None) -> DiffusionPipeline:
    """The pipeline of one party of a built federation (sampling weights: the EMA where the run keeps one)."""
    s, server, client_side = fed.cfg.sampling, fed.cfg.server.prediction, fed.cfg.client.prediction
    common = dict(scheduler=chain_scheduler(fed.schedule, server if part == "server" else client_side),
                  cut_level=fed.cut_level, schedule=fed.schedule.kind, sampler=s.sampler)
    guided = dict(guidance_scale=fed.server.guidance, null_label=fed.server.null_label)
    if part == "server":
        return CollaFuseServerPipeline(fed.server.ema.model.unet, steps=s.server_steps, prediction=server, **guided,
                                       **common)
    mine = fed.clients[client]
    model = mine.ema.model
    if model.vector_embed is not None:
        raise ValueError("this run's clients condition on attribute vectors (client.condition=attributes), whose "
                         "projection is not a diffusers model; export runs with client.condition none or class")
    if part == "client":
        return CollaFuseClientPipeline(model.unet, steps=s.client_steps, client_id=client, prediction=client_side,
                                       guidance_scale=mine.guidance, null_class=mine.null_class,
                                       **{**common, "sampler": s.client_sampler})
    return CollaFuseSplitPipeline(fed.server.ema.model.unet, model.unet, server_steps=s.server_steps,
                                  client_steps=s.client_steps, client_id=client, server_prediction=server,
                                  client_prediction=client_side, client_sampler=s.client_sampler,
                                  client_guidance_scale=mine.guidance, client_null_class=mine.null_class, **guided,
                                  **common)


def export_run(run_dir: Path, part: str, out: Path, client: int | None = None) -> Path:
    """Write one party of a trained run as a diffusers pipeline folder with a model card; returns the folder."""
    from collafuse.config import load_config
    from collafuse.federation.engine import CHECKPOINT
    from collafuse.federation.inprocess import build, load_checkpoint
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose server (the operator's model), client (one client's "
                         f"model, with --client K) or split (both, for a run that legitimately holds both)")
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json: --run must be a run folder of `collafuse run`")
    if not (run_dir / CHECKPOINT / "progress.json").is_file():
        raise FileNotFoundError(f"no checkpoint in {run_dir}: nothing to export; train the run first "
                                f"(collafuse run --out {run_dir})")
    cfg = load_config(str(run_dir / "config.json"))
    if part == "server" and client is not None:
        raise ValueError("--part server exports the model shared by every client; drop --client")
    if part != "server" and not (client is not None and 0 <= client < cfg.data.clients):
        raise ValueError(f"--part {part} needs --client K with K in 0..{cfg.data.clients - 1} (this run's clients), "
                         f"got {client}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not empty; export into a new folder, so that no other party's "
                              f"weights linger there")
    fed = build(cfg, device=torch.device("cpu"))
    load_checkpoint(fed, run_dir)
    pipe = pipeline_of(fed, part, client)
    pipe.save_pretrained(out)
    (out / "pipeline.py").write_text(f"from collafuse.export import {type(pipe).__name__}  # noqa: F401\n")
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    (out / "README.md").write_text(model_card(cfg, fed.cut_level, part, client, metrics))
    return out


# ---- the model card: YAML front matter as the Hugging Face Hub reads it, then the same numbers as tables

WHO = {"server": "the server's shared model for the high-noise levels t_c+1..T; it makes handoffs at t_c for any "
                 "client id and holds no client's model",
       "client": "client {client}'s private model for the low-noise levels t_c..1; it turns handoffs into images and "
                 "holds none of the server's weights",
       "split": "the server's model and client {client}'s model, the whole chain, for a run that holds both"}
USAGE = {"server": "handoffs = pipe(client_id=0, batch_size=16, generator=torch.Generator().manual_seed(0)).images",
         "client": "images = pipe(handoffs, generator=torch.Generator().manual_seed(1)).images  # from the server",
         "split": "images = pipe(batch_size=16, seed=0).images  # = collafuse sample --seed 0"}


def _only(block: dict | None, clients: list[str]) -> dict | None:
    """A metrics block with its run-wide entries and only the given clients' entries."""
    if block is None:
        return None
    per = block.get("clients") or {}
    return {**block, "clients": {c: per[c] for c in clients if c in per}}


def _leaves(value, prefix: str = ""):
    """(dotted key, scalar) for every scalar under a nested block, whatever keys it has."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{prefix}.{i}")
    else:
        yield prefix, value


def _fmt(v) -> str:
    """A table cell: 4 significant digits, "–" for null, no "|" that would split the cell."""
    return f"{v:.4g}" if isinstance(v, float) else "–" if v is None else str(v).replace("|", "/")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows)]


def model_card(cfg, cut_level: int, part: str, client: int | None, metrics: dict | None) -> str:
    """README.md of an export: Hub front matter (library, tags, the run's numbers) and a readable body."""
    clients = [str(k) for k in range(cfg.data.clients)] if part == "server" else [str(client)]
    m = metrics or {}
    quality = {c: {k: q[k] for k in QUALITY_KEYS if k in q} for c, q in m.get("clients", {}).items() if c in clients}
    dp, disclosure = _only(m.get("dp"), clients), m.get("disclosure")
    run = {"part": part, "client": client, "cut": cfg.cut, "cut_level": cut_level, "T": cfg.schedule.T,
           "schedule": cfg.schedule.kind, "sampler": cfg.sampling.sampler,
           "client_sampler": cfg.sampling.client_sampler,
           "prediction": {"server": cfg.server.prediction, "client": cfg.client.prediction},
           "guidance": {"server": cfg.server.guidance, "client": cfg.client.guidance},
           "data": {"name": cfg.data.name, "image_size": cfg.data.image_size, "channels": cfg.data.channels,
                    "clients": cfg.data.clients, "partition": cfg.data.partition},
           "quality": quality, "dp": dp, "disclosure": disclosure}
    front = {"library_name": "diffusers", "license": "other",  # the licence is the data owners' call: set it
             "pipeline_tag": "unconditional-image-generation",
             "tags": ["collafuse", "diffusion", "split-learning", "collaborative-learning", f"collafuse-{part}"],
             "collafuse": run}
    cls = {"server": CollaFuseServerPipeline, "client": CollaFuseClientPipeline, "split": CollaFuseSplitPipeline}[part]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# CollaFuse {part} model", "",
             f"Trained with [collafuse](https://arxiv.org/abs/2406.14429): {WHO[part].format(client=client)}. "
             f"Cut c = {cfg.cut} (t_c = {cut_level} of T = {cfg.schedule.T}, {cfg.schedule.kind} schedule), data "
             f"`{cfg.data.name}` ({cfg.data.image_size} px, {cfg.data.clients} clients, {cfg.data.partition} "
             f"partition), sampler {cfg.sampling.sampler} above the cut and {cfg.sampling.client_sampler} below it.", "",
             "```python", f"from collafuse.export import {cls.__name__}", "import torch", "",
             f'pipe = {cls.__name__}.from_pretrained(".")', USAGE[part], "```", "",
             "## Quality (each client's samples against its own held-out images)", ""]
    if quality:
        keys = [k for k in QUALITY_KEYS if any(k in q for q in quality.values())]
        lines += _table(["client", *keys], [[c, *(q.get(k) for k in keys)] for c, q in quality.items()])
    else:
        lines.append("Not measured (the run has no metrics.json).")
    lines += ["", "## Privacy of the handoffs: per-record (ε, δ)", ""]
    if dp:
        lines += ["Each handoff is a Gaussian mechanism on its record; ε composes every view the client released "
                  "(replace-one DP: a record's content, not its presence). Small c gives large ε.", ""]
        lines += _table(["client", "ε", "δ", "records released", "views released"],
                        [[c, "unbounded" if d.get("epsilon") is None else d["epsilon"], d.get("delta"),
                          d.get("records_released"), d.get("views_released")] for c, d in dp["clients"].items()])
    else:
        lines.append("No DP block in this run's metrics.")
    lines += ["", "## Disclosure measured on this run (attacks on the handoffs and models)", ""]
    if disclosure:
        lines += _table(["measure", "value"], [list(leaf) for leaf in _leaves(disclosure)])
    else:
        lines.append("Not measured (eval.disclosure was off, or the run has no metrics.json).")
    return "\n".join(lines) + "\n"
