"""Embedded digits, ImageSet, client partitions and sample grids."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.data import CELEBA_ATTRIBUTE_GROUPS, ImageSet, client_splits, load_images
from collafuse.measure.images import save_grid


@pytest.fixture(scope="module")
def digits():
    return load_images("digits")


def label_skew(data, splits):
    """Mean total-variation distance between each client's class mix and the whole set's."""
    whole = data.labels.bincount(minlength=data.num_classes).float() / len(data)
    tv = []
    for s in splits:
        own = data.labels[torch.cat([s.train, s.test])].bincount(minlength=data.num_classes).float()
        tv.append(0.5 * (own / own.sum() - whole).abs().sum())
    return torch.stack(tv).mean().item()


def check_disjoint(splits, n):
    seen = torch.cat([torch.cat([s.train, s.test]) for s in splits])
    assert seen.unique().numel() == seen.numel() and seen.max() < n  # no record on two clients or twice
    for s in splits:
        assert s.train.dtype == s.test.dtype == torch.int64
        assert torch.equal(s.train, s.train.sort().values) and len(s.train) > 0 and len(s.test) > 0


def test_digits_default(digits):
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.float32
    assert digits.images.min() == -1 and digits.images.max() == 1
    assert digits.num_classes == 10 and digits.labels.dtype == torch.int64 and digits.name == "digits"
    assert digits.images.sum().item() == pytest.approx(-44793.25, abs=1e-2)
    assert digits.attributes is None and digits.groups is None


def test_digits_resized_rgb_and_subsampled():
    d = load_images("digits", image_size=32, channels=3, max_records=50, seed=3)
    assert d.images.shape == (50, 3, 32, 32)
    assert torch.equal(d.images[:, 0], d.images[:, 2]) and -1 <= d.images.min() and d.images.max() <= 1
    again = load_images("digits", image_size=64, max_records=50, seed=3)
    assert again.images.shape == (50, 1, 64, 64) and torch.equal(again.labels, d.labels)
    assert not torch.equal(load_images("digits", max_records=50, seed=4).labels, d.labels)


def test_mnist_embedded_loads_fast():
    load_images("digits", max_records=1)  # torch and sklearn warm
    t0 = time.perf_counter()
    d = load_images("mnist")
    assert time.perf_counter() - t0 < 3.0
    assert d.images.shape == (5000, 1, 16, 16) and d.labels.bincount().tolist() == [500] * 10
    assert d.images.min() == -1 and d.images.max() == 1
    assert d.images.mean().item() == pytest.approx(-0.73700, abs=1e-4)
    rgb32 = load_images("mnist", image_size=32, channels=3, max_records=10)
    assert rgb32.images.shape == (10, 3, 32, 32)


def test_subset_keeps_every_field():
    d = ImageSet(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]), ["a", "b"], "toy",
                 torch.eye(4), ["w", "x", "y", "z"], torch.tensor([5, 5, 6, 6]))
    s = d.subset(torch.tensor([3, 1]))
    assert len(s) == 2 and s.labels.tolist() == [1, 1] and s.groups.tolist() == [6, 5]
    assert s.attributes.tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]] and s.class_names == ["a", "b"]


def test_iid_partition_sizes_and_determinism(digits):
    splits = client_splits(digits, 5, seed=0)
    assert [(len(s.train), len(s.test)) for s in splits] == [(288, 72)] * 2 + [(287, 72)] * 3
    check_disjoint(splits, len(digits))
    assert sum(len(s.train) + len(s.test) for s in splits) == len(digits)
    again = client_splits(digits, 5, seed=0)
    assert all(torch.equal(a.train, b.train) and torch.equal(a.test, b.test) for a, b in zip(splits, again))
    assert not torch.equal(client_splits(digits, 5, seed=1)[0].train, splits[0].train)
    assert label_skew(digits, splits) < 0.06


def test_dirichlet_is_non_iid(digits):
    splits = client_splits(digits, 5, partition="dirichlet", alpha=0.1, seed=0)
    check_disjoint(splits, len(digits))
    assert [len(s.train) + len(s.test) for s in splits] == [209, 839, 538, 86, 125]
    near_iid = client_splits(digits, 5, partition="dirichlet", alpha=100.0)
    assert label_skew(digits, splits) > 0.4 > 0.1 > label_skew(digits, near_iid)
    assert torch.equal(splits[2].test, client_splits(digits, 5, partition="dirichlet", alpha=0.1, seed=0)[2].test)


@pytest.mark.filterwarnings("ignore:Classes")  # flwr-datasets notes the classes no client drew
def test_pathological_gives_each_client_its_classes(digits):
    splits = client_splits(digits, 5, partition="pathological", classes_per_client=2, seed=0)
    check_disjoint(splits, len(digits))
    classes = [digits.labels[torch.cat([s.train, s.test])].unique().tolist() for s in splits]
    assert all(len(c) == 2 and k in c for k, c in enumerate(classes))  # client k surely holds class k
    assert label_skew(digits, splits) > 0.75


def test_natural_partition_by_group():
    d = ImageSet(torch.zeros(9, 1, 2, 2), torch.full((9,), -1), [], "sites",
                 groups=torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 1]))
    splits = client_splits(d, 3, partition="natural", test_fraction=0.34)
    assert [torch.cat([s.train, s.test]).sort().values.tolist() for s in splits] == [[1, 4, 7], [2, 5, 8], [0, 3, 6]]
    assert [len(s.test) for s in splits] == [1, 1, 1]


def test_attribute_partition_follows_groups():
    names = [a for group in CELEBA_ATTRIBUTE_GROUPS.values() for a in group]
    attrs = torch.zeros(12, len(names))
    for i in range(10):  # record i carries the first attribute of group i % 5
        attrs[i, names.index(list(CELEBA_ATTRIBUTE_GROUPS.values())[i % 5][0])] = 1
    attrs[10, names.index("Bangs")] = attrs[10, names.index("Narrow_Eyes")] = 1  # hairstyle or eyes
    d = ImageSet(torch.zeros(12, 3, 2, 2), torch.full((12,), -1), [], "faces", attrs, names)  # record 11: no group
    splits = client_splits(d, 5, partition="attribute", seed=0)
    members = [torch.cat([s.train, s.test]).sort().values.tolist() for s in splits]
    assert members[:2] == [[0, 5], [1, 6]] and members[3] == [3, 8]
    assert sorted(members[2] + members[4]) == [2, 4, 7, 9, 10]  # record 10 went to one of its groups
    assert 11 not in sum(members, [])
    groups = {"glasses": ["Eyeglasses"], "dark": ["Black_Hair"]}
    custom = client_splits(d, 2, partition="attribute", attribute_groups=groups)
    assert [torch.cat([s.train, s.test]).sort().values.tolist() for s in custom] == [[1, 6], [0, 5]]


def test_partition_errors(digits):
    small = digits.subset(torch.arange(30))
    unlabelled = ImageSet(torch.zeros(6, 1, 2, 2), torch.full((6,), -1), [], "plain")
    with pytest.raises(ValueError, match="unknown partition 'shards'; choose one of iid, dirichlet"):
        client_splits(small, 2, partition="shards")
    with pytest.raises(ValueError, match="20 clients need at least 40 records .* has 30: use fewer clients"):
        client_splits(small, 20)
    with pytest.raises(ValueError, match=r"client \d+ got [01] record\(s\) .*use fewer clients or a larger alpha"):
        client_splits(small, 10, partition="dirichlet", alpha=0.01)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        client_splits(small, 2, partition="dirichlet", alpha=0)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="test_fraction must lie strictly between 0 and 1"):
            client_splits(small, 2, test_fraction=bad)
    for label_based in ("dirichlet", "pathological"):
        with pytest.raises(ValueError, match="splits by class, but plain has no class labels: use partition='iid'"):
            client_splits(unlabelled, 2, partition=label_based)
    with pytest.raises(ValueError, match=r"classes_per_client must be an integer in 1..10"):
        client_splits(digits, 2, partition="pathological", classes_per_client=11)
    with pytest.raises(ValueError, match="needs natural group ids"):
        client_splits(unlabelled, 2, partition="natural")
    with pytest.raises(ValueError, match="has 3 groups, so set n_clients=3"):
        client_splits(ImageSet(torch.zeros(6, 1, 2, 2), torch.zeros(6, dtype=torch.long), ["a"], "g",
                               groups=torch.tensor([0, 1, 2, 0, 1, 2])), 2, partition="natural")
    with pytest.raises(ValueError, match="needs per-record attributes"):
        client_splits(unlabelled, 2, partition="attribute")
    faces = ImageSet(torch.zeros(6, 1, 2, 2), torch.full((6,), -1), [], "faces", torch.ones(6, 1), ["Smiling"])
    with pytest.raises(ValueError, match="5 groups .* set n_clients=5"):
        client_splits(faces, 2, partition="attribute")
    with pytest.raises(ValueError, match=r"name attributes \['Black_Hair'\] that faces lacks"):
        client_splits(faces, 1, partition="attribute", attribute_groups={"dark": ["Black_Hair"]})
    with pytest.raises(ValueError, match="n_clients must be a positive integer"):
        client_splits(small, 0)


def test_save_grid_grey_and_rgb(tmp_path):
    grey = torch.linspace(-1, 1, 5 * 4 * 3).view(5, 1, 4, 3)
    save_grid(grey, tmp_path / "deep" / "grey.png")
    img = Image.open(tmp_path / "deep" / "grey.png")
    assert img.mode == "L" and img.size == (2 + 3 * 5, 2 + 2 * 6)  # 3 per row, 2 rows, 2 px padding
    a = np.asarray(img)
    assert a[2, 2] == 0 and a[2 + 3, 2 + 2] == round((grey[0, 0, 3, 2].item() + 1) * 127.5)
    save_grid(torch.ones(2, 3, 4, 4).index_fill_(1, torch.tensor([1, 2]), -1), tmp_path / "rgb.png", nrow=1)
    rgb = Image.open(tmp_path / "rgb.png")
    assert rgb.mode == "RGB" and rgb.size == (8, 14) and rgb.getpixel((2, 2)) == (255, 0, 0)
    with pytest.raises(ValueError, match=r"C = 1 or 3, got \(2, 2, 4, 4\)"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "x.png")
