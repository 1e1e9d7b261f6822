"""Run configuration: nested dataclasses, presets, config files and `--set key=value` overrides."""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from collafuse.core.models import ModelConfig
from collafuse.core.recipe import LRSchedule, Objective
from collafuse.core.sampling import SAMPLERS
from collafuse.core.schedule import NoiseSchedule
from collafuse.roles.policy import PrivacyPolicy
from collafuse.roles.store import store_dtype


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | digits | cifar10 | celeba | awa2 | imagefolder | hf:<name>
    root: str | None = None
    image_size: int = 16
    channels: int = 1
    max_records: int | None = None
    clients: int = 5
    partition: str = "dirichlet"  # iid | dirichlet | pathological | attribute | natural
    alpha: float = 0.5
    classes_per_client: int = 2
    test_fraction: float = 0.2


@dataclass
class ScheduleConfig:
    T: int = 1000
    kind: str = "linear"


@dataclass
class TrainingRecipe:
    """How one side trains (server.* or client.*, each on its own process: the server's over the handoffs)."""

    # epsilon | v: with v = sqrt(ᾱ)·e - sqrt(1-ᾱ)·x0 an error reaches the x0 estimate at most 1:1, where an error
    # of e is amplified by sqrt((1-ᾱ)/ᾱ) at high noise (Salimans & Ho 2022). Sampling still gets e either way.
    # v on both sides, by measurement (benchmarks/README.md, recipes): the speckle of ε-trained samples goes, and
    # local-only clients (c = 1) draw digits where ε gave saturated squares (mean KID 0.36 against 1.06).
    prediction: str = "v"
    # uniform | min-snr: min-SNR-γ (Hang et al. 2023) stops near-clean levels, whose noise target is unpredictable,
    # from dominating the gradient (the server's SNR is its own: ᾱ' = ᾱ(t)/ᾱ(t_c), high just above the cut).
    # min-snr with v, by measurement: mean FID 2.60 against v's 2.76 at c = 0.4, KID 0.28 against 0.36 at c = 1.
    loss_weighting: str = "min-snr"
    min_snr_gamma: float = 5.0  # min-snr's cap γ on the SNR: 5 is the paper's choice
    lr_warmup_steps: int = 0  # linear warm-up over these first steps: Adam's early moment estimates are noisy
    # constant | cosine: cosine decays to 0 over this side's whole run (rounds x steps per round), so the last
    # steps average out the gradient noise. Its horizon is cfg.rounds: a resume that adds rounds re-plans it.
    lr_decay: str = "constant"

    def objective(self) -> Objective:
        """This side's prediction target and loss weighting."""
        return Objective(self.prediction, self.loss_weighting, self.min_snr_gamma)

    def lr_schedule(self, total_steps: int) -> LRSchedule:
        """This side's lr factor per step over a run of total_steps optimiser steps."""
        return LRSchedule(self.lr_warmup_steps, self.lr_decay, total_steps)


@dataclass
class ServerConfig(TrainingRecipe):
    model: ModelConfig = field(default_factory=ModelConfig)
    steps_per_round: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    client_cond: bool = True  # condition on the client id: personalises the server without any label
    # Classifier-free guidance on the client id (Ho & Salimans 2022): label_dropout trains this share of rows
    # with a null label, so the one net also learns the score of all clients together; guidance w samples
    # with uncond + w·(cond - uncond) (1 = the plain conditional net, 0 = unconditional, > 1 = more like this
    # client and less like the others, at twice the server's sampling calls). The disclosure attacks use the
    # conditional net whatever w is: guidance changes what a client gets, not what the server can score.
    label_dropout: float = 0.0
    guidance: float = 1.0
    ema_decay: float = 0.995  # sampling weights: EMA over ~200 steps (0 = off)
    max_samples: int = 1024  # the most samples one client may ask for (bounds the work a request costs)
    max_records_per_client: int = 1_000_000  # the most records a client may declare (bounds its store)
    # float32 | float16: how the handoff store keeps handoffs on disk; float16 halves it (11 significant bits).
    # The server trains in float32 either way.
    store_dtype: str = "float32"
    # Processes the server trains on, data-parallel (federation/ddp.py): one GPU each on CUDA, else CPU
    # processes. batch_size stays the global batch and must divide by it. Changes nothing but the speed.
    devices: int = 1


@dataclass
class ClientConfig(TrainingRecipe):
    model: ModelConfig = field(default_factory=lambda: ModelConfig(channels=(16, 32), attention=False))
    # An integer, or "auto": the client's share of the levels, max(1, round(c * full_chain_steps)), so its
    # training compute follows the cut (the paper's point: a client with a smaller c does less work).
    steps_per_round: int | str = 100
    full_chain_steps: int = 100  # with "auto": the steps per round of a client that runs the whole chain (c = 1)
    batch_size: int = 64
    lr: float = 1e-3
    condition: str = "none"  # none | class | attributes: the client's private labels, never sent
    # Classifier-free guidance on the client's own classes (condition = class), as server.label_dropout and
    # server.guidance are on the client id: label_dropout trains this share of rows under a null class,
    # guidance w samples with uncond + w·(cond - uncond) at twice the client's sampling calls. Both stay on the
    # client: the labels and the null class never leave it.
    label_dropout: float = 0.0
    guidance: float = 1.0
    ema_decay: float = 0.99  # sampling weights: EMA over ~100 steps (0 = off)
    # What the in-process clients allow (min_cut, modes, max_views, epsilon, delta, clip_norm): the client's
    # policy, checked against every server request. On Flower each SuperNode sets its own (docs/flower.md);
    # a run config's client.policy is ignored there, because the server operator writes the run config.
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    # "private": a 256-bit secret made once per client and kept in its folder. "pinned-for-tests": derived
    # from seed and client id, so anyone can recompute the noise: for reproducible tests and benchmarks only.
    noise_secret: str = "private"


@dataclass
class HandoffConfig:
    mode: str = "once"  # once: each view of a record made and sent once | fresh: new views every round
    views: int = 1  # once: views per record over the whole run
    batch: int = 512  # records per message


@dataclass
class SamplingConfig:
    n: int = 64  # samples per client for the grid and the quality numbers
    # Ancestral DDPM on both sides. On the default preset's trained nets (9 rounds; benchmarks/README.md,
    # samplers.py; after 3 rounds the samplers were level): mean client KID 0.039 with DDPM in
    # 100 server + 200 client steps, 0.064 over all 1,000 levels, 0.067 in 25 + 25, 0.072 with DDIM above the
    # cut and DDPM below it, 0.147 with DDIM in 40 + 10 (the default until 2026-12-06).
    sampler: str = "ddpm"  # the server's levels T..t_c (it travels in the client's SamplingRequest)
    server_steps: int = 100
    client_sampler: str = "ddpm"  # the client's levels t_c..0
    client_steps: int = 200


@dataclass
class EvalConfig:
    extractor: str = "domain"
    classifier_epochs: int = 15  # ~97% held-out on 16 px MNIST in ~8 s
    disclosure: bool = True  # the attacks of collafuse.measure.blocks after sampling; off for quick runs
    disclosure_records: int = 200  # per client: members and held-out non-members each attacked
    mia_draws: int = 2  # seeded noise draws per level in the membership scores
    dp_delta: float = 1e-5  # the delta of the per-record (epsilon, delta)


@dataclass
class Config:
    seed: int = 0
    # c = 0.4, not the paper's 0.2: at 0.2 a curious server re-identified 95% of the records from their handoffs,
    # at 0.4 27% (benchmarks/README.md, sweep). A client may still allow 0.2 (client.policy.min_cut).
    cut: float = 0.4
    rounds: int = 8
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    handoff: HandoffConfig = field(default_factory=HandoffConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    max_message_bytes: int = 64 * 2**20
    # In-process runs: clients of one architecture train in one vectorised step (roles/cohort.py), the same
    # result as one by one up to float rounding. It pays where a client's step is overhead (5.6x at 100 smoke
    # clients, 8 px, batch 32) and costs where it is compute (the default preset's 16 px batch-64 clients on
    # one CPU thread: 1.3x slower; equal on two): so off unless asked. Flower clients always train alone.
    batch_clients: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def client_steps(self) -> int:
        """The client's training steps per round: client.steps_per_round, resolved when it is "auto"."""
        steps = self.client.steps_per_round
        return max(1, round(float(self.cut) * self.client.full_chain_steps)) if steps == "auto" else steps

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the run's records, handoffs and samples."""
        return self.data.channels, self.data.image_size, self.data.image_size


PRESET_DIR = Path(__file__).parent / "presets"


def presets() -> list[str]:
    """Names of the shipped presets (collafuse/presets/*.toml)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _build(cls, values: dict, prefix: str = ""):
    """Instantiate a dataclass from a dict, rejecting unknown keys with the list of valid ones."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown config key {prefix + key!r}; valid keys here: {', '.join(sorted(known))}")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"config key {prefix + key!r} is a section; set its fields, e.g. {prefix + key}.<field>")
            value = _build(type(default), {**dataclasses.asdict(default), **value}, prefix + key + ".")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section that checks itself (client.policy): say which section
        raise ValueError(f"{prefix[:-1]}: {e}" if prefix else str(e)) from None


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(assignments: list[str]) -> dict:
    """['server.lr=1e-3', 'cut=0.4'] -> nested dict; values parse as JSON, else stay strings."""
    out: dict = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set cut=0.4")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_config(source: str | None = "default", overrides: list[str] | None = None) -> Config:
    """Resolve a preset name or a TOML/JSON file, then apply `key=value` overrides."""
    source = source or "default"
    path = PRESET_DIR / f"{source}.toml" if source in presets() else Path(source)
    if path.suffix in (".toml", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        sampling = values.get("sampling")
        if path.suffix == ".json" and isinstance(sampling, dict) and "sampler" in sampling:
            # A run's resolved config from before client_sampler existed: its client sampled with `sampler`.
            sampling.setdefault("client_sampler", sampling["sampler"])
    else:
        raise ValueError(f"unknown preset {source!r}; use one of {', '.join(presets())} or a .toml/.json file")
    values = _merge(values, parse_set(overrides or []))
    cfg = _build(Config, values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values no run could use, before any work starts."""
    if not isinstance(cfg.cut, (int, float)) or not 0.0 <= float(cfg.cut) <= 1.0:
        raise ValueError(f"cut must be in [0, 1] (0 = centralised, 1 = local-only), got {cfg.cut!r}")
    NoiseSchedule(cfg.schedule.T, cfg.schedule.kind)  # raises on a schedule no chain can use
    if cfg.client.condition not in ("none", "class", "attributes"):
        raise ValueError(f"client.condition {cfg.client.condition!r} is unknown; choose none, class or attributes")
    store_dtype(cfg.server.store_dtype)  # raises on a storage dtype the store does not know
    check_guidance(cfg.server, "server")
    check_guidance(cfg.client, "client")
    if cfg.client.label_dropout and cfg.client.condition != "class":
        raise ValueError(f"client.label_dropout needs client.condition = class (got {cfg.client.condition!r}): "
                         f"only a class label has a null class to drop it to")
    if cfg.handoff.mode not in ("once", "fresh"):
        raise ValueError(f"handoff.mode {cfg.handoff.mode!r} is unknown; choose once or fresh")
    if cfg.client.noise_secret not in NOISE_SECRETS:
        raise ValueError(f"client.noise_secret {cfg.client.noise_secret!r} is unknown; choose "
                         f"{' or '.join(NOISE_SECRETS)} (pinned-for-tests makes the noise guessable)")
    steps = cfg.client.steps_per_round
    if steps != "auto" and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"client.steps_per_round must be an integer >= 1 or \"auto\" (steps follow the cut), "
                         f"got {steps!r}")
    for key in ("rounds", "handoff.views", "handoff.batch", "data.clients", "server.batch_size",
                "server.max_samples", "server.max_records_per_client", "server.steps_per_round", "server.devices",
                "client.full_chain_steps", "client.batch_size", "sampling.n", "eval.disclosure_records",
                "eval.mia_draws"):
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    for key in ("sampler", "client_sampler"):  # checked here, not when the trained run first samples
        if getattr(cfg.sampling, key) not in SAMPLERS:
            raise ValueError(f"sampling.{key} must be one of {', '.join(SAMPLERS)}, got {getattr(cfg.sampling, key)!r}")
    if not isinstance(cfg.batch_clients, bool):
        raise ValueError(f"batch_clients must be true or false, got {cfg.batch_clients!r}")
    if cfg.server.batch_size % cfg.server.devices:
        raise ValueError(f"server.batch_size {cfg.server.batch_size} must divide by server.devices "
                         f"{cfg.server.devices}: each device takes an equal share of the global batch")
    for side, steps in (("server", cfg.server.steps_per_round), ("client", cfg.client_steps)):
        recipe = getattr(cfg, side)
        try:
            recipe.objective(), recipe.lr_schedule(cfg.rounds * steps)
        except ValueError as e:  # the recipe's message starts with the key: say which side
            raise ValueError(f"{side}.{e}") from None


NOISE_SECRETS = ("private", "pinned-for-tests")


def check_guidance(side: ServerConfig | ClientConfig, name: str) -> None:
    """Guidance needs a net that also learnt the null label: reject a w it cannot honour, before training."""
    p, w = side.label_dropout, side.guidance
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name}.label_dropout must be in [0, 1) (0.1 is usual), got {p!r}")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 20.0:
        raise ValueError(f"{name}.guidance must be a number in [0, 20] (1 = no guidance), got {w!r}")
    if p and name == "server" and not side.client_cond:
        raise ValueError("server.label_dropout needs server.client_cond = true: an unconditional server has no "
                         "label to drop")
    if w != 1 and not p:
        raise ValueError(f"{name}.guidance = {w} needs a net trained with null labels: set {name}.label_dropout "
                         f"(e.g. 0.1) when training, or keep guidance at 1")
