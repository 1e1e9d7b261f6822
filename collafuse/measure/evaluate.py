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
from collafuse.data.partition import MIN_HELD_OUT
from collafuse.measure.images import save_grid
from collafuse.measure.quality import (DomainClassifier, class_shares, evaluate_quality, feature_extractor,
                                       train_domain_classifier)
from collafuse.roles.client import Client

EVALUATOR_FILE = "evaluator.safetensors"  # the measuring instrument (domain classifier), same for every client
EVAL_FILE = "evaluation.json"  # how a client's samples are measured

OWN_CLASS_MIN_SHARE = 0.05  # a class counts as the client's own when >= 5% of its training records carry it

# A failed client: its samples are no nearer its held-out images than pure noise is, by KID or by FID. Either:
# a second noise draw of 32 images scores up to 0.13 by KID (its sampling error) but under 0.06 by FID on the
# domain features of MNIST. Where FID/KID cannot be measured, the classifier's evidence: it puts the samples
# in the client's own classes no more often than noise. The share alone is weak (n = 32 gives it a +-0.09
# standard error; samples of other clients' classes are recognisable images yet score low), so it never
# overrules the scores.
FAILED_SCORE = 0.1  # a score below this: less than a tenth of the way from pure noise to real images
SHARE_MARGIN = 0.1  # the own-class share must beat pure noise's by this much
# Per client in metrics.json: null where not measured (too few images), never missing.
QUALITY_KEYS = ("fid", "kid_mean", "kid_std", "kid_subset_size", "n_reference", "fid_noise", "kid_noise",
                "fid_ceiling", "kid_ceiling", "fid_score", "kid_score")


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
                 seed: int, client_sampler: str | None = None) -> torch.Tensor:
    """The whole sampling exchange for one client of a trained run: request, server levels, client levels.

    `sampler` runs the server's levels, `client_sampler` (default: the same) the client's."""
    t0 = time.perf_counter()
    req = fed.wire.up(client.sampling_request(n, server_steps, sampler, seed), fed.server.limits)
    handoffs = fed.wire.down(fed.server.sample_to_cut(req), fed.client_limits)
    t1 = time.perf_counter()
    images = client.finish(handoffs, client_steps, client_sampler or sampler, seed + 1)
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
    training: torch.Tensor  # the client's training images: a draw of them against `reference` is the ceiling
    extractor: torch.nn.Module
    classifier: DomainClassifier | None
    own: list[int] | None  # the classifier outputs that count as the client's own
    domain_kind: str | None  # what the classifier tells apart: "class", "client" or None

    def measure(self, images: torch.Tensor) -> dict:
        """FID, KID (and own-class or own-client share) of samples, beside pure noise and real images; numbers only.

        Too few held-out images (or samples) for FID/KID leaves them out (null in metrics.json, with the
        reason: quality_verdict); the classifier's shares need no reference and are still measured.
        """
        classifier = self.classifier if self.own is not None else None
        if min(len(images), len(self.reference)) >= MIN_HELD_OUT:
            quality = evaluate_quality(images, self.reference, extractor=self.extractor, real=self.training,
                                       classifier=classifier, client_classes=self.own)
        else:
            quality = {} if classifier is None else class_shares(images, classifier, self.own)
        numbers = {k: v for k, v in quality.items() if isinstance(v, (int, float))}
        if self.domain_kind == "client":  # classes here are clients
            numbers = {k.replace("own_class_share", "own_client_share"): v for k, v in numbers.items()}
        numbers.update(n_samples=len(images), n_test=len(self.reference))
        return numbers

    @classmethod
    def from_folder(cls, extractor_name: str, folder: Path, reference: torch.Tensor,
                    training: torch.Tensor) -> "ClientEvaluation":
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
        return cls(reference, training, feature_extractor(extractor_name, classifier=classifier), classifier,
                   info["own_targets"] if classifier is not None else None, info["domain_labels"])


def _images(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _num(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def quality_verdict(m: dict) -> dict:
    """A client's reported quality for metrics.json: null where unmeasured, `failed` and a `quality_note` saying why.

    Derived from the numbers the client reported, where metrics.json is written: only numbers cross the wire.
    """
    q = {k: m.get(k) for k in QUALITY_KEYS}
    notes, evidence = [], []
    n_test, n_samples, n_train = m.get("n_test"), m.get("n_samples"), m.get("n_train")
    if q["kid_mean"] is None and n_test is not None and n_test < MIN_HELD_OUT:
        notes.append(f"{_images(n_test, 'held-out image')}: FID/KID need >= {MIN_HELD_OUT}; raise data.max_records "
                     f"or data.test_fraction")
    elif q["kid_mean"] is None and n_samples is not None and n_samples < MIN_HELD_OUT:
        notes.append(f"{_images(n_samples, 'sample')}: FID/KID need >= {MIN_HELD_OUT}; raise sampling.n")
    elif q["kid_mean"] is not None and q["kid_ceiling"] is None:
        notes.append(f"{_images(n_train, 'training image')}: the real-vs-real ceiling needs >= {MIN_HELD_OUT}, "
                     f"so there is no kid_score")
    elif q["kid_mean"] is not None and q["kid_score"] is None:
        notes.append(f"these features do not tell pure noise (KID {q['kid_noise']:.3g}) from real images "
                     f"({q['kid_ceiling']:.3g}), so there is no kid_score")
    scores = [v for v in (q["kid_score"], q["fid_score"]) if v is not None]
    judged = bool(scores)
    if judged and min(scores) < FAILED_SCORE:
        evidence.append(f"KID score {_num(q['kid_score'], '.2f')}, FID score {_num(q['fid_score'], '.2f')}: "
                        f"KID {q['kid_mean']:.3g}, pure noise {q['kid_noise']:.3g}, real images {q['kid_ceiling']:.3g}")
    shares = [] if judged else [(k, m.get(k), m.get(f"{k}_noise")) for k in ("own_class_share", "own_client_share")]
    for key, share, noise in shares:
        if share is None or noise is None or noise > 1 - SHARE_MARGIN:  # noise already all 'own': tells nothing
            continue
        judged = True
        if share < noise + SHARE_MARGIN:
            evidence.append(f"{key.replace('_', ' ')} {share:.2f}, pure noise {noise:.2f}")
    if evidence:
        notes.insert(0, f"samples are indistinguishable from noise ({'; '.join(evidence)})")
    return {**q, "failed": bool(evidence) if judged else None, "quality_note": "; ".join(notes) or None}


def quality_line(cid, m: dict) -> str:
    """A client's quality in one line for the command line; a failed client's says so plainly."""
    if m.get("failed"):
        return f"client {cid}: {m['quality_note']}"
    line = f"client {cid}: FID {_num(m.get('fid'), '.2f')}  KID {_num(m.get('kid_mean'), '.4f')}"
    if m.get("kid_score") is not None:
        line += f" (score {m['kid_score']:.2f}: pure noise {m['kid_noise']:.3g}, real images {m['kid_ceiling']:.3g})"
    for key in ("own_class_share", "own_client_share"):
        if m.get(key) is not None:
            line += f"  {key.replace('_', '-')} {m[key]:.2f} (pure noise {_num(m.get(key + '_noise'), '.2f')}"
            if m.get(key + "_ceiling") is not None:
                line += f", real images {m[key + '_ceiling']:.2f}"
            line += ")"
    return line + (f"  ({m['quality_note']})" if m.get("quality_note") else "")


def client_evaluations(fed) -> dict[int, ClientEvaluation]:
    """Each in-process client's evaluation: the run's domain classifier, its own held-out images."""
    domain, classifier, extractor = quality_features(fed)
    return {c.id: ClientEvaluation(fed.data.images[split.test], fed.data.images[split.train], extractor, classifier,
                                   own_targets(fed, c, domain), domain[0] if domain else None)
            for c, split in zip(fed.clients, fed.splits)}


def evaluate(fed, out: Path, *, progress: bool = True) -> dict:
    """Samples (a grid each) and quality per client, for a baseline run outside the round engine (FedAvg)."""
    cfg, s = fed.cfg, fed.cfg.sampling
    evaluations = client_evaluations(fed)
    per_client = {}
    for client in tqdm(fed.clients, desc="sampling", disable=not progress):
        images = split_sample(fed, client, s.n, server_steps=s.server_steps, client_steps=s.client_steps,
                              sampler=s.sampler, client_sampler=s.client_sampler, seed=cfg.seed * 7 + client.id)
        save_grid(images, out / f"samples_client{client.id}.png")
        numbers = evaluations[client.id].measure(images)
        report = fed.wire.up(ClientReport(client_id=client.id, metrics=numbers), fed.server.limits)
        entry = {**report.metrics, "n_train": client.num_records,
                 "train_seconds": fed.seconds[f"client{client.id}.train"],
                 "sample_seconds": fed.seconds[f"client{client.id}.sample"],
                 "params": client.model.num_parameters(),
                 "bytes_up": fed.wire.bytes_up[client.id], "bytes_down": fed.wire.bytes_down[client.id]}
        per_client[str(client.id)] = {**entry, **quality_verdict(entry)}
    kind = next(iter(evaluations.values())).domain_kind
    return {
        "schema": 2, "cut": cfg.cut, "cut_level": fed.cut_level, "T": cfg.schedule.T, "rounds": fed.round,
        "handoff_mode": cfg.handoff.mode, "views": cfg.handoff.views,
        "quality": {"extractor": cfg.eval.extractor, "domain_labels": kind, "n_samples": s.n, "sampler": s.sampler,
                    "server_steps": s.server_steps, "client_sampler": s.client_sampler,
                    "client_steps": s.client_steps},
        "clients": per_client,
        "server": {"train_seconds": fed.seconds["server.train"], "sample_seconds": fed.seconds["server.sample"],
                   "params": fed.server.model.num_parameters(), "handoffs_held": fed.server.num_handoffs()},
        "bytes_up": sum(fed.wire.bytes_up.values()), "bytes_down": sum(fed.wire.bytes_down.values()),
    }
