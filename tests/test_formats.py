"""On-disk formats: the tests write tiny files in each real format, then load them (no download)."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.data import CELEBA_ATTRIBUTE_GROUPS, client_splits, load_images

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
# One attribute per CelebA record, cycling through the paper's five groups (hair colour, accessories,
# hairstyle, eyebrows, eyes); record 11 also has Eyeglasses, so it belongs to two groups.
CELEBA_ROWS = ["Black_Hair", "Eyeglasses", "Bangs", "Arched_Eyebrows", "Narrow_Eyes"] * 2 + ["Black_Hair", "Bangs"]
CELEBA_ROWS += ["Blond_Hair"] * 2
AWA2_CLASSES = ["antelope", "grizzly+bear", "killer+whale"]
AWA2_PREDICATES = ["black", "white", "blue", "brown"]
AWA2_MATRIX = [[0, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 0]]


def solid(colour, size=(10, 10), mode="RGB"):
    return Image.new(mode, size, colour)


def write_cifar(root, n_train=6, n_test=4):
    """cifar-10-batches-py: pickled dicts with bytes keys, rows of R, G, B planes (1024 each)."""
    root.mkdir()
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_train, b"num_vis": 3072}, f)
    rng = np.random.default_rng(0)
    for file, n, offset in (("data_batch_1", n_train, 0), ("test_batch", n_test, n_train)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[0] = 0
        data[0, :1024] = 255  # record 0 of each batch is pure red
        batch = {b"batch_label": file.encode(), b"labels": [(offset + i) % 10 for i in range(n)],
                 b"data": data, b"filenames": [f"img_{offset + i}.png".encode() for i in range(n)]}
        with open(root / file, "wb") as f:
            pickle.dump(batch, f)
    return root


def write_celeba(root, rows=CELEBA_ROWS):
    """img_align_celeba/000001.jpg.. (178x218), list_attr_celeba.txt, list_eval_partition.txt."""
    (root / "img_align_celeba").mkdir(parents=True)
    lines = [str(len(rows)), " ".join(CELEBA_ATTRIBUTES)]
    for i, attr in enumerate(rows, 1):
        solid((20 * i, 100, 200), (178, 218)).save(root / "img_align_celeba" / f"{i:06d}.jpg", quality=95)
        on = {attr} | ({"Eyeglasses"} if i == 11 else set())
        lines.append(f"{i:06d}.jpg " + " ".join(" 1" if a in on else "-1" for a in CELEBA_ATTRIBUTES))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    # The last two records are the official val and test images: not loaded.
    split = [0] * (len(rows) - 2) + [1, 2]
    (root / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {s}\n" for i, s in enumerate(split, 1)))
    return root


def write_awa2(root):
    """JPEGImages/<class>/*.jpg of varied sizes, classes.txt, predicates.txt, predicate-matrix-binary.txt."""
    for k, c in enumerate(AWA2_CLASSES):
        (root / "JPEGImages" / c).mkdir(parents=True)
        for j in range(2):
            solid((80 * k, 40, 0), (60 + 10 * j, 40 + 20 * k)).save(root / "JPEGImages" / c / f"{c}_{10001 + j}.jpg")
    (root / "classes.txt").write_text("".join(f"\t{i}\t{c}\n" for i, c in enumerate(AWA2_CLASSES, 1)))
    (root / "predicates.txt").write_text("".join(f"\t{i}\t{p}\n" for i, p in enumerate(AWA2_PREDICATES, 1)))
    (root / "predicate-matrix-binary.txt").write_text("\n".join(" ".join(map(str, r)) for r in AWA2_MATRIX) + "\n")
    return root


def write_class_folders(root, mode="L"):
    """<root>/<class>/*.png: 2 classes x 3 images."""
    for k, c in enumerate(("benign", "tumour")):
        (root / c).mkdir(parents=True)
        for j in range(3):
            solid(60 * k + 10 * j, (12, 12), mode).save(root / c / f"{j}.png")
    return root


def write_csv_folder(root):
    """Flat folder of RGB images listed in labels.csv with a label and a patient_id column."""
    root.mkdir()
    rows = ["file_name,label,patient_id"]
    for i in range(6):
        solid((255, 0, 0) if i % 2 else (0, 0, 255), (12, 12)).save(root / f"slice_{i}.png")
        rows.append(f"slice_{i}.png,{'healthy' if i % 2 else 'lesion'},p{i // 3}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_cifar10_python_batches(tmp_path):
    root = write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_images("cifar10", root=str(tmp_path))  # the parent of cifar-10-batches-py works too
    assert d.images.shape == (10, 3, 32, 32) and d.images.dtype == torch.float32
    assert d.labels.tolist() == list(range(10)) and d.class_names[0] == "airplane" and d.num_classes == 10
    assert d.images[0, 0].eq(1).all() and d.images[0, 1:].eq(-1).all()  # R, G, B plane order
    assert d.images[6, 0].eq(1).all()  # the test batch follows the training batches
    grey = load_images("cifar10", root=str(root), channels=1, image_size=64, max_records=4, seed=1)
    assert grey.images.shape == (4, 1, 64, 64)
    assert -1 <= grey.images.min() and grey.images.max() <= 1
    assert torch.equal(grey.labels, load_images("cifar10", root=str(root), max_records=4, seed=1).labels)


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"batches.meta.*cifar-10-python.tar.gz"):
        load_images("cifar10", root=str(tmp_path))
    root = write_cifar(tmp_path / "c")
    (root / "data_batch_1").unlink()
    (root / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_images("cifar10", root=str(root))


def test_celeba_attributes_and_official_split(tmp_path):
    root = write_celeba(tmp_path)
    d = load_images("celeba", root=str(root))
    assert d.images.shape == (12, 3, 64, 64) and d.attributes.shape == (12, 40)
    assert d.attribute_names == CELEBA_ATTRIBUTES and d.num_classes == 0 and d.labels.eq(-1).all()
    assert d.attributes.sum().item() == 13  # one per record, plus record 11's Eyeglasses
    assert d.attributes[0, CELEBA_ATTRIBUTES.index("Black_Hair")] == 1
    # Solid (20, 100, 200) survives crop, resize and JPEG within a few grey levels.
    expected = torch.tensor([20, 100, 200]) / 127.5 - 1
    assert torch.allclose(d.images[0].mean((1, 2)), expected, atol=0.03)
    small = load_images("celeba", root=str(root), image_size=32, channels=1)
    assert small.images.shape == (12, 1, 32, 32)
    (root / "list_eval_partition.txt").unlink()  # without the split file, every record loads
    assert len(load_images("celeba", root=str(root), image_size=8)) == 14


def test_celeba_attribute_group_clients(tmp_path):
    d = load_images("celeba", root=str(write_celeba(tmp_path)), image_size=8)
    splits = client_splits(d, 5, partition="attribute", seed=0)
    members = [torch.cat([s.train, s.test]).sort().values.tolist() for s in splits]
    assert members[2:] == [[2, 7, 11], [3, 8], [4, 9]]  # hairstyle, eyebrows, eyes
    assert sorted(members[0] + members[1]) == [0, 1, 5, 6, 10]  # record 10 is in hair colour or accessories
    for group, m in zip(CELEBA_ATTRIBUTE_GROUPS.values(), members):
        cols = [d.attribute_names.index(a) for a in group]
        assert d.attributes[m][:, cols].amax(1).eq(1).all()
    assert [len(s.test) for s in splits] == [1] * 5


def test_celeba_errors(tmp_path):
    root = write_celeba(tmp_path)
    (root / "img_align_celeba" / "000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*000002.jpg"):
        load_images("celeba", root=str(root), image_size=8)
    (root / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000002.jpg is missing"):
        load_images("celeba", root=str(root), image_size=8)
    attr = (root / "list_attr_celeba.txt").read_text().splitlines()
    (root / "list_attr_celeba.txt").write_text("\n".join(attr[:3] + [attr[3][:-3]] + attr[4:]))
    with pytest.raises(ValueError, match="line 4 has 39 values for 40 attributes"):
        load_images("celeba", root=str(root), image_size=8)
    (root / "list_attr_celeba.txt").write_text("12\n")
    with pytest.raises(ValueError, match="lacks its count and header lines"):
        load_images("celeba", root=str(root), image_size=8)
    (root / "list_eval_partition.txt").write_text("000001.jpg 2\n")
    (root / "list_attr_celeba.txt").write_text("\n".join(attr[:3]))
    with pytest.raises(ValueError, match="selects none"):
        load_images("celeba", root=str(root), image_size=8)
    (root / "list_attr_celeba.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        load_images("celeba", root=str(root))
    with pytest.raises(FileNotFoundError, match="img_align_celeba"):
        load_images("celeba", root=str(tmp_path / "img_align_celeba"))


def test_awa2_classes_and_predicates(tmp_path):
    root = write_awa2(tmp_path)
    d = load_images("awa2", root=str(root))
    assert d.images.shape == (6, 3, 64, 64)  # varied sizes, centre-cropped and resized
    assert d.class_names == AWA2_CLASSES and d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert d.attribute_names == AWA2_PREDICATES
    assert d.attributes.tolist() == [r for r in AWA2_MATRIX for _ in range(2)]
    assert torch.allclose(d.images[4].mean((1, 2)), torch.tensor([160, 40, 0]) / 127.5 - 1, atol=0.03)
    assert load_images("awa2", root=str(root), image_size=32, max_records=3).images.shape == (3, 3, 32, 32)


def test_awa2_errors(tmp_path):
    root = write_awa2(tmp_path)
    (root / "JPEGImages" / "unicorn").mkdir()
    with pytest.raises(ValueError, match=r"\['unicorn'\].*not in classes.txt"):
        load_images("awa2", root=str(root))
    (root / "JPEGImages" / "unicorn").rmdir()
    (root / "predicate-matrix-binary.txt").write_text("0 1\n1 0\n")
    with pytest.raises(ValueError, match=r"is \(2, 2\), expected .* \(3, 4\)"):
        load_images("awa2", root=str(root))
    (root / "predicate-matrix-binary.txt").unlink()
    with pytest.raises(FileNotFoundError, match="predicate-matrix-binary.txt"):
        load_images("awa2", root=str(root))
    (root / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        load_images("awa2", root=str(root))
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        load_images("awa2", root=str(tmp_path / "JPEGImages"))


def test_image_folder_labels_from_subfolders(tmp_path):
    d = load_images("imagefolder", root=str(write_class_folders(tmp_path / "scans")))
    assert d.images.shape == (6, 1, 12, 12)  # all greyscale -> 1 channel by default
    assert d.class_names == ["benign", "tumour"] and d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.groups is None and d.name == "scans"
    assert torch.allclose(d.images[3], torch.tensor(60 / 127.5 - 1), atol=1e-6)
    rgb = load_images("imagefolder", root=str(tmp_path / "scans"), channels=3, image_size=32)
    assert rgb.images.shape == (6, 3, 32, 32)
    assert torch.equal(rgb.images, rgb.images[:, :1].expand(-1, 3, -1, -1))  # grey copied to R, G, B


def test_image_folder_csv_with_groups(tmp_path):
    d = load_images("imagefolder", root=str(write_csv_folder(tmp_path / "mri")))
    assert d.images.shape == (6, 3, 12, 12)
    assert d.class_names == ["healthy", "lesion"] and d.labels.tolist() == [1, 0, 1, 0, 1, 0]
    assert d.groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.images[1, 0].eq(1).all() and d.images[0, 2].eq(1).all()  # red and blue images
    grey = load_images("imagefolder", root=str(tmp_path / "mri"), channels=1)
    assert torch.allclose(grey.images[1], torch.full((1, 12, 12), 0.299 * 2 - 1))  # PIL's luma weights


def test_image_folder_unlabelled_and_16_bit(tmp_path):
    (tmp_path / "raw").mkdir()
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(tmp_path / "raw" / "a.png")
    solid(128, (2, 2), "L").save(tmp_path / "raw" / "b.png")
    d = load_images("imagefolder", root=str(tmp_path / "raw"))
    assert d.num_classes == 0 and d.labels.eq(-1).all() and d.images.shape == (2, 1, 2, 2)
    # 16-bit images are scaled per image to the full range: 0..4000 -> -1..1.
    assert torch.allclose(d.images[0, 0], torch.tensor([[0.0, 64], [128, 255]]) / 127.5 - 1, atol=1e-6)
    assert torch.allclose(d.images[1], torch.tensor(128 / 127.5 - 1), atol=1e-6)


def test_image_folder_errors(tmp_path):
    root = write_class_folders(tmp_path / "f")
    solid(0, (9, 12), "L").save(root / "benign" / "odd.png")
    with pytest.raises(ValueError, match=r"mixed sizes .*odd.png.*pass image_size"):
        load_images("imagefolder", root=str(root))
    assert load_images("imagefolder", root=str(root), image_size=8).images.shape == (7, 1, 8, 8)
    solid(0, (12, 12), "L").save(root / "top.png")
    with pytest.raises(ValueError, match="both at the top and in sub-folders"):
        load_images("imagefolder", root=str(root))
    (root / "top.png").write_text("garbage")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("garbage")
    with pytest.raises(ValueError, match=r"cannot read image .*x.png"):
        load_images("imagefolder", root=str(tmp_path / "bad"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_images("imagefolder", root=str(tmp_path / "empty"))
    csv_root = write_csv_folder(tmp_path / "c")
    (csv_root / "slice_2.png").unlink()
    with pytest.raises(FileNotFoundError, match="slice_2.png is missing"):
        load_images("imagefolder", root=str(csv_root))
    (csv_root / "labels.csv").write_text("path,label\nslice_0.png,a\n")
    with pytest.raises(ValueError, match="needs a 'file_name' column"):
        load_images("imagefolder", root=str(csv_root))


def test_hf_imagefolder_builder_offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # keep ~/.cache clean
    root = write_class_folders(tmp_path / "scans", mode="RGB")
    d = load_images("hf:imagefolder", root=str(root), image_size=16)
    assert d.images.shape == (6, 3, 16, 16) and d.class_names == ["benign", "tumour"]
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="could not load Hugging Face dataset 'imagefolder'"):
        load_images("hf:imagefolder", root=str(tmp_path / "nowhere"))


def test_generic_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar100'; known: mnist, digits, cifar10, celeba"):
        load_images("cifar100")
    with pytest.raises(ValueError, match="pass root="):
        load_images("celeba")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images("imagefolder", root=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"channels must be 1 \(greyscale\) or 3 \(RGB\), got 4"):
        load_images("digits", channels=4)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        load_images("digits", image_size=0)
    with pytest.raises(ValueError, match="max_records must be a positive integer"):
        load_images("digits", max_records=0)
