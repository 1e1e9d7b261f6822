"""The paper's datasets through the whole pipeline (load, split, train, sample, measure) on tiny real-format files."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.config import load_config, presets
from collafuse.core.models import Denoiser
from collafuse.federation.inprocess import build, run
from test_formats import write_awa2, write_celeba, write_cifar  # the real on-disk formats

# One round of a couple of steps on 16-32 px images: each run checks the plumbing, not the quality.
TINY = ["rounds=1", "schedule.T=50", "server.steps_per_round=2", "client.steps_per_round=2",
        "server.batch_size=8", "client.batch_size=8", "sampling.n=4", "sampling.server_steps=2",
        "sampling.client_steps=2", "eval.classifier_epochs=1", "eval.disclosure=false", "data.max_records=null"]
GROUP_FIRST = ["Black_Hair", "Eyeglasses", "Bangs", "Arched_Eyebrows", "Narrow_Eyes"]  # one per paper group


def tiny_run(tmp_path, root, overrides):
    cfg = load_config("smoke", TINY + [f"data.root={root}"] + overrides)
    metrics, fed = run(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "run"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert len(metrics["clients"]) == cfg.data.clients
    for cid, m in metrics["clients"].items():
        assert math.isfinite(m["fid"]) and math.isfinite(m["kid_mean"]) and m["n_test"] >= 2
        with Image.open(out / f"samples_client{cid}.png") as grid:  # 4 tiles, 2 x 2, 2 px padding
            size = cfg.data.image_size
            assert grid.size == (2 + 2 * (size + 2),) * 2 and grid.mode == ("RGB" if cfg.data.channels == 3 else "L")
    return metrics, fed


def write_awa2_more(root, per_class=4):
    """write_awa2's three classes, topped up to per_class JPEGs each so every client holds out two."""
    write_awa2(root)
    rng = np.random.default_rng(0)
    for c in sorted((root / "JPEGImages").iterdir()):
        for j in range(2, per_class):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(c / f"{c.name}_{10001 + j}.jpg")
    return root


def write_patient_folder(root, patients=3, per_patient=4):
    """Greyscale slices listed in labels.csv with a patient_id column: the natural client ids (brain-MRI style)."""
    root.mkdir()
    rng = np.random.default_rng(1)
    rows = ["file_name,label,patient_id"]
    for p in range(patients):
        for j in range(per_patient):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), "L").save(root / f"p{p}_{j}.png")
            rows.append(f"p{p}_{j}.png,{'lesion' if j % 2 else 'healthy'},p{p}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_cifar10_32px_rgb_whole_pipeline(tmp_path):
    root = write_cifar(tmp_path / "cifar-10-batches-py", n_train=30, n_test=10)
    metrics, fed = tiny_run(tmp_path, root, ["data.name=cifar10", "data.image_size=32", "data.channels=3",
                                             "data.clients=2", "data.partition=dirichlet", "data.alpha=10",
                                             "client.condition=class"])
    assert fed.data.images.shape == (40, 3, 32, 32) and fed.server.image_shape == (3, 32, 32)
    assert metrics["quality"]["domain_labels"] == "class"
    assert [(m["n_train"], m["n_test"]) for m in metrics["clients"].values()] == [(10, 3), (22, 5)]  # Dirichlet sizes, seeded
    assert all(0 <= m["own_class_share"] <= 1 for m in metrics["clients"].values())
    # Each record's handoff went up once: 32 records x 3 x 32 x 32 float32 plus framing.
    assert 32 * 3 * 32 * 32 * 4 < metrics["bytes_up"] < 32 * 3 * 32 * 32 * 4 * 1.05


def test_celeba_attribute_group_clients_conditioned_on_attributes(tmp_path):
    root = write_celeba(tmp_path / "celeba", rows=GROUP_FIRST * 4 + ["Blond_Hair"] * 2)
    metrics, fed = tiny_run(tmp_path, root, ["data.name=celeba", "data.image_size=16", "data.channels=3",
                                             "data.clients=5", "data.partition=attribute", "data.test_fraction=0.5",
                                             "client.condition=attributes", "eval.disclosure=true",
                                             "eval.mia_draws=1"])
    assert fed.data.attributes.shape == (20, 40) and fed.data.labels.eq(-1).all()
    assert metrics["disclosure"] is not None  # the measurement side handles sets without classes too
    assert all(c.condition.shape[1] == 40 and c.model.vector_dim == 40 for c in fed.clients)
    # CelebA has no classes: the evaluator's classifier tells the attribute-group clients apart.
    assert metrics["quality"]["domain_labels"] == "client"
    assert [m["n_train"] + m["n_test"] for m in metrics["clients"].values()] == [3, 5, 4, 4, 4]  # record 11 (hair + glasses) drew accessories
    assert all(0 <= m["own_client_share"] <= 1 and "classes" not in m for m in metrics["clients"].values())


def test_awa2_class_clients_conditioned_on_class(tmp_path):
    root = write_awa2_more(tmp_path / "awa2")
    metrics, fed = tiny_run(tmp_path, root, ["data.name=awa2", "data.image_size=16", "data.channels=3",
                                             "data.clients=3", "data.partition=pathological",
                                             "data.classes_per_client=1", "data.test_fraction=0.5",
                                             "client.condition=class"])
    assert [sorted(set(c.labels.tolist())) for c in fed.clients] == [[0], [1], [2]]  # one animal class each
    assert all(c.model.num_labels == 3 for c in fed.clients)
    # Each client's own class is its private label: measured on its side, never in the server's metrics.
    from collafuse.measure.evaluate import client_evaluations
    assert [e.own for e in client_evaluations(fed).values()] == [[0], [1], [2]]
    assert all("classes" not in m and 0 <= m["own_class_share"] <= 1 for m in metrics["clients"].values())


def test_image_folder_natural_ids_greyscale(tmp_path):
    root = write_patient_folder(tmp_path / "mri")
    metrics, fed = tiny_run(tmp_path, root, ["data.name=imagefolder", "data.image_size=16", "data.channels=1",
                                             "data.clients=3", "data.partition=natural", "data.test_fraction=0.5"])
    assert fed.data.images.shape == (12, 1, 16, 16)
    for k, split in enumerate(fed.splits):  # one client per patient
        assert fed.data.groups[torch.cat([split.train, split.test])].eq(k).all()
    assert [(m["n_train"], m["n_test"]) for m in metrics["clients"].values()] == [(2, 2)] * 3


def test_unlabelled_iid_run_reports_no_own_share(tmp_path):
    """Client ids as domain labels give FID features everywhere, but an own-client share only by design."""
    (tmp_path / "raw").mkdir()
    rng = np.random.default_rng(2)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(tmp_path / "raw" / f"{i}.png")
    metrics, _ = tiny_run(tmp_path, tmp_path / "raw", ["data.name=imagefolder", "data.image_size=8",
                                                      "data.channels=1", "data.clients=2", "data.partition=iid",
                                                      "data.test_fraction=0.5"])
    assert metrics["quality"]["domain_labels"] == "client"
    assert not any("own_client_share" in m or "own_class_share" in m for m in metrics["clients"].values())


def test_single_unlabelled_client_needs_inception(tmp_path):
    (tmp_path / "raw").mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "raw" / f"{i}.png")
    cfg = load_config("smoke", TINY + [f"data.root={tmp_path / 'raw'}", "data.name=imagefolder", "data.clients=1",
                                       "data.partition=iid", "data.image_size=8", "data.test_fraction=0.5"])
    with pytest.raises(ValueError, match=r"no class labels and the run has a single client.*eval.extractor=inception"):
        run(cfg, tmp_path / "run", progress=False)


def test_clear_errors_through_config_and_build(tmp_path):
    def build_with(*overrides):
        return build(load_config("smoke", TINY + list(overrides)))

    with pytest.raises(FileNotFoundError, match=r"dataset folder .*nowhere does not exist"):
        build_with("data.name=cifar10", f"data.root={tmp_path / 'nowhere'}")
    celeba = write_celeba(tmp_path / "celeba", rows=GROUP_FIRST[:4] * 3)  # nobody has an "eyes" attribute
    with pytest.raises(ValueError, match=r"client 4 got 0 record\(s\) under partition='attribute'"):
        build_with("data.name=celeba", f"data.root={celeba}", "data.image_size=8", "data.clients=5",
                   "data.partition=attribute")
    (celeba / "list_attr_celeba.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        build_with("data.name=celeba", f"data.root={celeba}", "data.partition=attribute", "data.clients=5")
    cifar = write_cifar(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ValueError, match="client.condition=attributes, but data set 'cifar10' has no attributes"):
        build_with("data.name=cifar10", f"data.root={cifar}", "data.clients=2", "data.partition=iid",
                   "client.condition=attributes")


@pytest.mark.parametrize("name", [p for p in presets() if p not in ("smoke", "default")])
def test_dataset_presets_load_and_fit_their_image_size(name):
    cfg = load_config(name)
    d = cfg.data
    assert d.name in ("cifar10", "celeba", "awa2", "imagefolder") and d.image_size in (32, 64)
    assert cfg.cut == load_config("default").cut == 0.4  # the README's default cut, in every data-set preset
    if d.partition == "attribute":
        assert d.clients == 5 and cfg.client.condition == "attributes"  # the paper's five CelebA groups
    for role in (cfg.server, cfg.client):  # every role's UNet builds at the preset's size
        Denoiser(role.model, d.image_size, d.channels)
