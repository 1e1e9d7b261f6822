"""After training: each client gets samples through the split chain and measures them on its own held-out images."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from collafuse.core.protocol import ClientReport
from collafuse.measure.images import save_grid
from collafuse.measure.quality import DomainClassifier, evaluate_quality, feature_extractor, train_domain_classifier
from collafuse.roles.client import Client

EVALUATOR_FILE = "evaluator.safetensors"  # the measuring instrument (domain classifier), same for every client
EVAL_FILE = "evaluation.json"  # how a client's samples are measured

OWN_CLASS_MIN_SHARE = 0.05  # a class counts as the client's own when >= 5% of its training records carry it


def own_classes(labels: torch.Tensor, num_classes: int) -> list[int]:
    """The classes that make up at least OWN_CLASS_MIN_SHARE of a client's records."""
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes).float()
    return [k for k in range(num_classes) if counts[k] >= OWN_CLASS_MIN_SHARE * len(labels)]


def domain_labels(fed) -> tuple[str, torch.Tensor, torch.Tensor, int] | None:
    """What the evaluator's classifier learns to tell apart: (kind, record ids, labels, count), or None.

    Classes where every record has one. Otherwise (CelebA: labels all -1, 40 attributes) the client
    that holds each record: it exists for every partition and needs no download, and under the
    attribute-group and natural-id partitions the clients are the very domains per-client FID must
    separate. One chosen attribute would favour one client's group and ignore the rest. Under an IID
    partition client ids carry no signal, so the features are little better than an untrained CNN's.
    The evaluator sees all clients' images anyway: this is measurement, not part of the protocol.
    """
    data, train = fed.data, [s.train for s in fed.splits]
    idx = torch.cat(train)
    if bool((data.labels >= 0).all()) and data.num_classes > 1:
        return "class", idx, data.labels[idx], data.num_classes
    if len(train) < 2:
        return None
    owner = torch.cat([torch.full((len(t),), k, dtype=torch.long) for k, t in enumerate(train)])
    return "client", idx, owner, len(train)


def own_targets(fed, client: Client, domain) -> list[int] | None:
    """The classifier outputs that count as this client's own, where that share means something."""
    if domain is None:
        return None
    if domain[0] == "class":
        return own_classes(client.labels, fed.data.num_classes)
    # A sample classified as its own client's domain is personalised, but only if clients differ by design.
    return [client.id] if fed.cfg.data.partition in ("attribute", "natural") else None


def split_sample(fed, client: Client, n: int, *, server_steps: int, client_steps: int, sampler: str,
                 seed: int) -> torch.Tensor:
    """The whole sampling exchange for one client of a trained run: request, server levels, client levels."""
    t0 = time.perf_counter()
    req = fed.wire.up(client.sampling_request(n, server_steps, sampler, seed), fed.server.limits)
    handoffs = fed.wire.down(fed.server.sample_to_cut(req), fed.client_limits)
    t1 = time.perf_counter()
    images = client.finish(handoffs, client_steps, sampler, seed + 1)
    fed.seconds["server.sample"] += t1 - t0
    fed.seconds[f"client{client.id}.sample"] += time.perf_counter() - t1
    return images


def quality_features(fed):
    """(domain labels, the evaluator's classifier or None, the FID feature extractor) for a federation."""
    cfg, data = fed.cfg, fed.data
    domain = domain_labels(fed)
    classifier = None
    if domain is not None:
        _, train_idx, labels, num_labels = domain
        classifier = train_domain_classifier(data.images[train_idx], labels, num_classes=num_labels, seed=cfg.seed,
                                             epochs=cfg.eval.classifier_epochs)
    elif cfg.eval.extractor == "domain":
        raise ValueError(f"data set {data.name!r} has no class labels and the run has a single client, so the "
                         f"domain classifier has nothing to learn for FID features; use data.clients >= 2 or "
                         f"set eval.extractor=inception")
    return domain, classifier, feature_extractor(cfg.eval.extractor, classifier=classifier)


@dataclass
class ClientEvaluation:
    """How one client measures its samples: against its own held-out images, with the run's instrument."""

    reference: torch.Tensor  # the client's held-out images
    extractor: torch.nn.Module
    classifier: DomainClassifier | None
    own: list[int] | None  # the classifier outputs that count as the client's own
    domain_kind: str | None  # what the classifier tells apart: "class", "client" or None

    def measure(self, images: torch.Tensor) -> dict:
        """FID, KID (and own-class or own-client share) of samples, as numbers a ClientReport may carry."""
        quality = evaluate_quality(images, self.reference, extractor=self.extractor,
                                   classifier=self.classifier if self.own is not None else None,
                                   client_classes=self.own)
        numbers = {k: v for k, v in quality.items() if isinstance(v, (int, float))}
        if self.domain_kind == "client" and "own_class_share" in numbers:
            numbers["own_client_share"] = numbers.pop("own_class_share")  # classes here are clients
        numbers["n_test"] = len(self.reference)
        return numbers

    @classmethod
    def from_folder(cls, extractor_name: str, folder: Path, reference: torch.Tensor) -> "ClientEvaluation":
        """A Flower client's evaluation, from the instrument `collafuse flower prepare-data` left in its folder."""
        info_path = folder / EVAL_FILE
        info = json.loads(info_path.read_text()) if info_path.is_file() else {"domain_labels": None,
                                                                             "own_targets": None}
        classifier = None
        if (folder / EVALUATOR_FILE).is_file():
            path = str(folder / EVALUATOR_FILE)
            with safe_open(path, "pt") as f:
                arch = json.loads(f.metadata()["config"])
            arch.pop("arch")
            arch["image_size"] = tuple(arch["image_size"])
            classifier = DomainClassifier(**arch)
            classifier.load_state_dict(load_file(path))
            classifier.eval()
        elif extractor_name == "domain":
            raise FileNotFoundError(f"{folder / EVALUATOR_FILE} not found: eval.extractor=domain needs the "
                                    f"evaluator written by `collafuse flower prepare-data`, or run with "
                                    f"--set eval.extractor=inception")
        return cls(reference, feature_extractor(extractor_name, classifier=classifier), classifier,
                   info["own_targets"] if classifier is not None else None, info["domain_labels"])


def client_evaluations(fed) -> dict[int, ClientEvaluation]:
    """Each in-process client's evaluation: the run's domain classifier, its own held-out images."""
    domain, classifier, extractor = quality_features(fed)
    return {c.id: ClientEvaluation(fed.data.images[split.test], extractor, classifier,
                                   own_targets(fed, c, domain), domain[0] if domain else None)
            for c, split in zip(fed.clients, fed.splits)}


def evaluate(fed, out: Path, *, progress: bool = True) -> dict:
    """Samples (a grid each) and quality per client, for a baseline run outside the round engine (FedAvg)."""
    cfg, s = fed.cfg, fed.cfg.sampling
    evaluations = client_evaluations(fed)
    per_client = {}
    for client in tqdm(fed.clients, desc="sampling", disable=not progress):
        images = split_sample(fed, client, s.n, server_steps=s.server_steps, client_steps=s.client_steps,
                              sampler=s.sampler, seed=cfg.seed * 7 + client.id)
        save_grid(images, out / f"samples_client{client.id}.png")
        numbers = evaluations[client.id].measure(images)
        report = fed.wire.up(ClientReport(client_id=client.id, metrics=numbers), fed.server.limits)
        per_client[str(client.id)] = {
            **report.metrics, "n_train": client.num_records,
            "train_seconds": fed.seconds[f"client{client.id}.train"],
            "sample_seconds": fed.seconds[f"client{client.id}.sample"],
            "params": client.model.num_parameters(),
            "bytes_up": fed.wire.bytes_up[client.id], "bytes_down": fed.wire.bytes_down[client.id]}
    kind = next(iter(evaluations.values())).domain_kind
    return {
        "schema": 2, "cut": cfg.cut, "cut_level": fed.cut_level, "T": cfg.schedule.T, "rounds": fed.round,
        "handoff_mode": cfg.handoff.mode, "views": cfg.handoff.views,
        "quality": {"extractor": cfg.eval.extractor, "domain_labels": kind, "n_samples": s.n, "sampler": s.sampler,
                    "server_steps": s.server_steps, "client_steps": s.client_steps},
        "clients": per_client,
        "server": {"train_seconds": fed.seconds["server.train"], "sample_seconds": fed.seconds["server.sample"],
                   "params": fed.server.model.num_parameters(), "handoffs_held": fed.server.num_handoffs()},
        "bytes_up": sum(fed.wire.bytes_up.values()), "bytes_down": sum(fed.wire.bytes_down.values()),
    }
