"""Image quality per client: FID and KID (torchmetrics) on named features, and a digit classifier's own-class share."""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
from torchmetrics.utilities.data import dim_zero_cat

from collafuse.data.partition import MIN_HELD_OUT
from collafuse.measure.inception import cache_root, load_inception

EXTRACTORS = ("domain", "inception")
KID_SUBSETS = 100  # torchmetrics' default number of random subsets
KID_MAX_SUBSET = 1000  # the usual KID subset size once there are enough samples
KID_KERNEL_ENTRIES = 2 ** 13  # kernel entries per call of SubsetBatchedKID: many small subsets at once


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_images(x: torch.Tensor, field: str) -> None:
    if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"{field} must be a float tensor (N, C, H, W) in [-1, 1], got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{field} contains NaN or infinite values")


class DomainClassifier(nn.Module):
    """Small CNN trained on the project's own data; its penultimate layer is the 'domain' FID feature space."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 16,
                 num_features: int = 32):
        # 32-d: FID estimates a d x d covariance, so it needs clearly more than d images per set (64+ here).
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, tuple(image_size), num_classes
        self.width, self.num_features = width, num_features
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # (B, 2w, 4, 4) for any input size >= 8
            nn.Flatten(), nn.Linear(2 * width * 16, num_features), nn.ReLU())
        self.head = nn.Linear(num_features, num_classes)
        # Set after training so that mean ||f||^2 / d = 1 on the training images: KID's cubic kernel
        # (f.g / d + 1)^3 then works at the scale it was designed for (Inception-like), whatever the seed.
        self.register_buffer("feature_scale", torch.ones(()))

    @property
    def config(self) -> dict:
        return {"arch": "DomainClassifier/v1", "in_channels": self.in_channels, "image_size": list(self.image_size),
                "num_classes": self.num_classes, "width": self.width, "num_features": self.num_features}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"the domain classifier was trained on {self.in_channels}-channel images, got shape "
                             f"{tuple(x.shape)}; evaluate images with the channels it was trained on")
        if tuple(x.shape[-2:]) != self.image_size:  # features are only comparable at the training size
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        return x.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, num_features) of images (N, C, H, W) in [-1, 1]."""
        return self.body(self._prepare(x)) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self._prepare(x)))


def _cache_key(images: torch.Tensor, labels: torch.Tensor, config: dict, training: dict) -> str:
    content = hashlib.sha256(images.detach().cpu().float().contiguous().numpy().tobytes())
    content.update(labels.cpu().long().numpy().tobytes())
    spec = {"shape": list(images.shape), "content": content.hexdigest(), "config": config, "training": training}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def train_domain_classifier(images: torch.Tensor, labels, *, num_classes: int, seed: int = 0, epochs: int = 15,
                            cache_dir: str | os.PathLike | None = None, device=None) -> DomainClassifier:
    """Train (or load from the cache) the evaluator's classifier on all given labelled images (N, C, H, W)."""
    _check_images(images, "images")
    labels = torch.as_tensor(np.asarray(labels)).long().flatten()
    n, c, h, w = images.shape
    if c not in (1, 3) or min(h, w) < 8:
        raise ValueError(f"images must have 1 or 3 channels and be at least 8x8 pixels, "
                         f"got shape {tuple(images.shape)}")
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} images; give one class label per image")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got {int(labels.min())}.."
                         f"{int(labels.max())}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    with torch.random.fork_rng(devices=[]):  # seeded weight init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = DomainClassifier(c, (h, w), num_classes)
    training = {"seed": seed, "epochs": epochs, "batch": 128, "lr": 5e-3, "weight_decay": 1e-4}
    path = cache_root(cache_dir) / "classifiers" / f"{_cache_key(images, labels, model.config, training)}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    _fit(model, images, labels, training, _device(device))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    save_file(model.state_dict(), str(partial), metadata={"config": json.dumps(model.config),
                                                          "training": json.dumps(training)})
    os.replace(partial, path)  # atomic, so concurrent runs never read half a file
    return model.eval()


def _fit(model: DomainClassifier, images: torch.Tensor, labels: torch.Tensor, training: dict,
         device: torch.device) -> None:
    """AdamW with a one-cycle learning rate: ~97% held-out on 4,000 16 px MNIST digits in a few CPU seconds."""
    model.to(device).train()
    x, y = images.to(device).float(), labels.to(device)
    batch, n = training["batch"], len(x)
    opt = torch.optim.AdamW(model.parameters(), lr=training["lr"], weight_decay=training["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=training["lr"],
                                                   total_steps=training["epochs"] * -(-n // batch))
    gen = torch.Generator().manual_seed(training["seed"])
    threads = torch.get_num_threads()
    if device.type == "cpu":  # convs this small gain nothing from threads; on busy cores OpenMP makes them 10x slower
        torch.set_num_threads(1)
    try:
        for _ in range(training["epochs"]):
            order = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.inference_mode():
        f = torch.cat([model.body(x[i:i + 1024]) for i in range(0, n, 1024)])
    model.feature_scale.fill_(f.square().sum(1).mean().div(f.shape[1]).rsqrt().item())
    model.cpu()


class DomainFeatures(nn.Module):
    """The domain classifier's penultimate features (float64) as a torchmetrics `feature=` extractor."""

    name = "domain"

    def __init__(self, classifier: DomainClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x).double()


def feature_extractor(name: str, *, classifier: DomainClassifier | None = None,
                      cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """A named FID/KID feature extractor: 'domain' (needs classifier) or 'inception' (cached TF-port weights)."""
    if name == "domain":
        if classifier is None:
            raise ValueError("extractor 'domain' needs classifier=train_domain_classifier(...) for its features")
        return DomainFeatures(classifier)
    if name == "inception":
        return load_inception(cache_dir)
    raise ValueError(f"feature extractor {name!r} is unknown; choose one of {', '.join(EXTRACTORS)}")


class _Precomputed(nn.Module):
    """Pass-through `feature=` module: features are extracted once and shared by FID and KID."""

    # torchmetrics 1.9 hands a custom `feature=` module the update() input untouched (no uint8 cast: `normalize`
    # only matters for its built-in Inception); FID sums features in float64 but returns its result in the
    # features' dtype, and KID keeps the features' dtype, so float64 features keep both in float64.

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.inference_mode()
def _extract(extractor: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    chunks = [extractor(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).double()


def pure_noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    """The quality floor: seeded Gaussian noise clamped to [-1, 1], as many images of the same shape as `like`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=g).clamp_(-1, 1)


def normalised_score(value: float, floor: float, ceiling: float) -> float | None:
    """Where value lies from pure noise (0) to real images (1), clipped to [0, 1]; None if noise scores no worse."""
    span = floor - ceiling
    if not span > 0:  # the features cannot tell noise from real images: there is no scale to place value on
        return None
    return min(1.0, max(0.0, (floor - value) / span))


class SubsetBatchedKID(KernelInceptionDistance):
    """torchmetrics' KID with its subsets scored in one vectorised call instead of a Python loop.

    The same subsets (the same randperm draws in the same order) and torchmetrics' own poly_mmd, vmapped over them:
    equal to KernelInceptionDistance.compute up to float rounding (tests/test_quality.py). The loop costs ~11 ms for
    100 subsets of a few features whatever their size, three times per client: 3.8 s of a 100-client smoke run.
    """

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        m = self.subset_size
        per_call = KID_KERNEL_ENTRIES // (m * m)
        if per_call < 4:  # large subsets: the loop's overhead is small beside the kernels (measured)
            return super().compute()
        if min(len(real), len(fake)) < m:
            raise ValueError("Argument `subset_size` should be smaller than the number of samples")
        picks = torch.stack([torch.cat([torch.randperm(len(real))[:m], torch.randperm(len(fake))[:m]])
                             for _ in range(self.subsets)])
        mmd = torch.vmap(lambda a, b: poly_mmd(a, b, self.degree, self.gamma, self.coef))
        scores = torch.cat([mmd(real[p[:, :m]], fake[p[:, m:]]) for p in picks.split(per_call)])
        return scores.mean(), scores.std(unbiased=False)


def _fid_kid(fake: torch.Tensor, real: torch.Tensor, subset: int, seed: int) -> tuple[float, float, float]:
    """FID, KID mean and KID std between two feature sets (N, d)."""
    d = fake.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(d))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with warnings.catch_warnings():  # its note that features are buffered in memory: that is intended here
        warnings.simplefilter("ignore", UserWarning)
        # When one subset covers both whole sets, every draw is the same: one is enough (kid_std is then 0).
        subsets = 1 if subset == len(fake) == len(real) else KID_SUBSETS
        kid = SubsetBatchedKID(feature=_Precomputed(d), subsets=subsets, subset_size=subset)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG: seed it, then restore
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return float(fid.compute()), float(kid_mean), float(kid_std)


def evaluate_quality(samples: torch.Tensor, reference: torch.Tensor, *, extractor: nn.Module,
                     classifier: DomainClassifier | None = None, client_classes=None, real: torch.Tensor | None = None,
                     kid_subset_size: int | None = None, device=None, batch_size: int = 64, seed: int = 0) -> dict:
    """FID, KID (and the own-class share) of a client's samples against its held-out reference images.

    Beside them the same numbers for pure noise (the floor, `*_noise`) and, given at least MIN_HELD_OUT `real`
    images of the client that are not in the reference, for those (the ceiling, `*_ceiling`), and where the
    samples lie between the two (`fid_score`, `kid_score`: 0 = as bad as noise, 1 = as good as real images).
    """
    _check_images(samples, "samples")
    _check_images(reference, "reference")
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples have shape (C, H, W) = {tuple(samples.shape[1:])} but the reference images "
                         f"{tuple(reference.shape[1:])}; generate samples in the reference's format")
    if real is not None:
        _check_images(real, "real")
        if real.shape[1:] != reference.shape[1:]:
            raise ValueError(f"real images have shape (C, H, W) = {tuple(real.shape[1:])} but the reference images "
                             f"{tuple(reference.shape[1:])}; give the client's own images in the reference's format")
    n_s, n_r = len(samples), len(reference)
    if min(n_s, n_r) < MIN_HELD_OUT:
        raise ValueError(f"FID/KID need at least {MIN_HELD_OUT} samples and {MIN_HELD_OUT} reference images, "
                         f"got {n_s} and {n_r}")
    if (classifier is None) != (client_classes is None):
        raise ValueError("own_class_share needs both classifier and client_classes; give both or neither")
    subset = min(KID_MAX_SUBSET, n_s, n_r) if kid_subset_size is None else kid_subset_size
    if not isinstance(subset, int) or not 2 <= subset <= min(n_s, n_r):
        raise ValueError(f"kid_subset_size must be an integer in [2, {min(n_s, n_r)}] (the smaller set's size), "
                         f"got {kid_subset_size!r}")
    device = _device(device)
    extractor = extractor.to(device).eval()  # the extractor (and classifier) stay on `device` afterwards
    ref = _extract(extractor, reference, device, batch_size)  # shared by the samples, the floor and the ceiling
    fid, kid_mean, kid_std = _fid_kid(_extract(extractor, samples, device, batch_size), ref, subset, seed)
    result = {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": subset, "n_samples": n_s,
              "n_reference": n_r, "extractor": getattr(extractor, "name", type(extractor).__name__)}
    noise = _extract(extractor, pure_noise(samples, seed), device, batch_size)
    result["fid_noise"], result["kid_noise"], _ = _fid_kid(noise, ref, subset, seed)
    if real is not None and len(real) >= MIN_HELD_OUT:
        # Ceiling: as many real images as there are samples (fewer if the client has fewer) against the same whole
        # reference, so FID's small-sample bias, which depends on the counts compared, is the samples' own. Two
        # halves of the reference would compare n_r/2 with n_r/2 images (a worse FID than a perfect generator
        # gets here) and need 4 held-out images where the samples need 2.
        draw = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n_s]]
        fid_c, kid_c, _ = _fid_kid(_extract(extractor, draw, device, batch_size), ref, min(subset, len(draw)), seed)
        result.update(fid_ceiling=fid_c, kid_ceiling=kid_c,
                      fid_score=normalised_score(fid, result["fid_noise"], fid_c),
                      kid_score=normalised_score(kid_mean, result["kid_noise"], kid_c))
    if classifier is not None:
        result.update(class_shares(samples, classifier, client_classes, reference=reference, device=device,
                                   batch_size=batch_size, seed=seed))
    return result


def class_shares(samples: torch.Tensor, classifier: DomainClassifier, client_classes, *,
                 reference: torch.Tensor | None = None, device=None, batch_size: int = 64, seed: int = 0) -> dict:
    """The own-class share of the samples, of as much pure noise (what the classifier says of no image at all) and,
    given `reference`, of the client's held-out real images (`_ceiling`).

    The ceiling is what a perfect generator of this client's images scores: the run counts only a client's
    common classes as its own (measure/evaluate.own_classes), so its real images hold a few percent of others,
    and the classifier errs on some. Held-out images, because the classifier was trained on the training ones.
    """
    kw = {"device": device, "batch_size": batch_size}
    shares = {"own_class_share": own_class_share(samples, classifier, client_classes, **kw),
              "own_class_share_noise": own_class_share(pure_noise(samples, seed), classifier, client_classes, **kw)}
    if reference is not None:
        shares["own_class_share_ceiling"] = own_class_share(reference, classifier, client_classes, **kw)
    return shares


def own_class_share(samples: torch.Tensor, classifier: DomainClassifier, client_classes, *, device=None,
                    batch_size: int = 64) -> float:
    """The share of samples the classifier assigns to one of the client's own classes."""
    classes = sorted({int(k) for k in client_classes})
    if not classes or classes[0] < 0 or classes[-1] >= classifier.num_classes:
        raise ValueError(f"client_classes must be a non-empty set of classes in [0, {classifier.num_classes}), "
                         f"got {list(client_classes)!r}")
    device = _device(device)
    classifier = classifier.to(device).eval()
    with torch.inference_mode():
        pred = torch.cat([classifier(samples[i:i + batch_size].to(device)).argmax(1).cpu()
                          for i in range(0, len(samples), batch_size)])
    return float(torch.isin(pred, torch.tensor(classes)).float().mean())
