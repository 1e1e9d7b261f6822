"""Client partitions (flwr-datasets partitioners) and each client's own train / held-out test split."""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from collafuse.data.imageset import ImageSet

PARTITIONS = ("iid", "dirichlet", "pathological", "attribute", "natural")
MIN_RECORDS = 2  # one to train on, one held out
# FID and KID compare two sets of at least two images (a covariance; KID's pairs). A client holding out fewer
# still trains, and its FID/KID are null in metrics.json (measure/evaluate.py), not an error after training.
MIN_HELD_OUT = 2

# The paper's CelebA clients: one client per attribute group. A record belongs to a group when
# any of the group's attributes is set; a record in several groups goes to one of them at random
# (seeded), so clients are disjoint; a record in none is left out.
CELEBA_ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "hair_colour": ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"),
    "accessories": ("Eyeglasses", "Wearing_Hat", "Wearing_Earrings", "Wearing_Necklace", "Wearing_Necktie"),
    "hairstyle": ("Bald", "Bangs", "Straight_Hair", "Wavy_Hair", "Receding_Hairline"),
    "eyebrows": ("Arched_Eyebrows", "Bushy_Eyebrows"),
    "eyes": ("Bags_Under_Eyes", "Narrow_Eyes"),
}


@dataclass
class ClientSplit:
    """One client's record indices into the ImageSet: what it trains on and what it holds out."""

    train: torch.Tensor  # (n_train,) int64, sorted
    test: torch.Tensor  # (n_test,) int64, sorted


def client_splits(data: ImageSet, n_clients: int, *, partition: str = "iid", alpha: float = 0.5,
                  classes_per_client: int = 2, attribute_groups: Mapping[str, Sequence[str]] | None = None,
                  test_fraction: float = 0.2, seed: int = 0) -> list[ClientSplit]:
    """Partition `data` among n_clients, then split each share (seeded) into train and held-out test."""
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; choose one of {', '.join(PARTITIONS)}")
    if not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients must be a positive integer, got {n_clients!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    if n_clients * MIN_RECORDS > len(data):
        raise ValueError(f"{n_clients} clients need at least {n_clients * MIN_RECORDS} records ({MIN_RECORDS} each), "
                         f"but {data.name} has {len(data)}: use fewer clients or more records")
    if partition in ("dirichlet", "pathological") and bool((data.labels < 0).any()):
        raise ValueError(f"partition={partition!r} splits by class, but {data.name} has no class labels: "
                         "use partition='iid', 'attribute' (with attributes) or 'natural' (with group ids)")
    if partition == "iid":
        shares = _iid(data, n_clients, seed)
    elif partition == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 (smaller is more non-IID, e.g. 0.1..1), got {alpha!r}")
        shares = _dirichlet(data, n_clients, float(alpha), seed)
    elif partition == "pathological":
        shares = _pathological(data, n_clients, classes_per_client, seed)
    elif partition == "attribute":
        shares = _attribute(data, n_clients, attribute_groups, seed)
    else:
        shares = _natural(data, n_clients)
    hint = {"dirichlet": " or a larger alpha", "pathological": " or more classes_per_client"}.get(partition, "")
    g = torch.Generator().manual_seed(seed)
    splits = []
    for k, share in enumerate(shares):
        if len(share) < MIN_RECORDS:
            raise ValueError(f"client {k} got {len(share)} record(s) under partition={partition!r}; each client needs "
                             f"at least {MIN_RECORDS} (train + held-out): use fewer clients{hint}")
        share = torch.as_tensor(np.asarray(share), dtype=torch.long).sort().values
        perm = torch.randperm(len(share), generator=g)
        n_test = min(len(share) - 1, max(1, round(test_fraction * len(share))))
        if n_test < MIN_HELD_OUT:
            warnings.warn(f"client {k} holds out {n_test} of its {len(share)} records: FID/KID need {MIN_HELD_OUT}, "
                          f"so its FID/KID will be null; give it more records or a larger test_fraction", stacklevel=2)
        splits.append(ClientSplit(share[perm[n_test:]].sort().values, share[perm[:n_test]].sort().values))
    return splits


def _table(columns: dict[str, list]):
    """A local datasets.Dataset, the input flwr-datasets partitioners expect."""
    import datasets

    return datasets.Dataset.from_dict(columns)


def _run(partitioner, table, n_clients: int) -> list[np.ndarray]:
    partitioner.dataset = table
    return [np.asarray(partitioner.load_partition(k)["idx"], dtype=np.int64) for k in range(n_clients)]


def _iid(data: ImageSet, n_clients: int, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner cuts contiguous shards without shuffling: shuffle (seeded) first.
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    return _run(IidPartitioner(n_clients), _table({"idx": order}), n_clients)


def _dirichlet(data: ImageSet, n_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    table = _table({"idx": list(range(len(data))), "label": data.labels.tolist()})
    with warnings.catch_warnings():  # it warns on every redraw; the outcome is what matters
        warnings.simplefilter("ignore")
        try:
            return _run(DirichletPartitioner(n_clients, "label", alpha, MIN_RECORDS, seed=seed), table, n_clients)
        except ValueError:
            # Ten redraws all left some client short: draw once without a minimum so the caller names it.
            return _run(DirichletPartitioner(n_clients, "label", alpha, 0, seed=seed), table, n_clients)


def _pathological(data: ImageSet, n_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    present = int(data.labels.unique().numel())
    if not isinstance(classes_per_client, int) or not 1 <= classes_per_client <= present:
        raise ValueError(f"classes_per_client must be an integer in 1..{present} (the classes present in "
                         f"{data.name}), got {classes_per_client!r}")
    table = _table({"idx": list(range(len(data))), "label": data.labels.tolist()})
    # first-deterministic: client k surely holds class k (mod classes), so n_clients >= classes covers them all.
    p = PathologicalPartitioner(n_clients, "label", classes_per_client, "first-deterministic", seed=seed)
    return _run(p, table, n_clients)


def _natural(data: ImageSet, n_clients: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if data.groups is None:
        raise ValueError(f"partition='natural' needs natural group ids (e.g. a 'group' or 'patient_id' column in "
                         f"labels.csv), but {data.name} has none: use partition='iid' or 'dirichlet'")
    n_groups = int(data.groups.unique().numel())
    if n_groups != n_clients:
        raise ValueError(f"partition='natural' makes one client per group id: {data.name} has {n_groups} groups, "
                         f"so set n_clients={n_groups} (got {n_clients})")
    table = _table({"idx": list(range(len(data))), "group": data.groups.tolist()})
    return _run(NaturalIdPartitioner("group"), table, n_clients)


def _attribute(data: ImageSet, n_clients: int, groups: Mapping[str, Sequence[str]] | None,
               seed: int) -> list[np.ndarray]:
    if data.attributes is None or data.attribute_names is None:
        raise ValueError(f"partition='attribute' needs per-record attributes (CelebA, AwA2), but {data.name} has "
                         "none: use partition='iid', 'dirichlet' or 'pathological'")
    groups = CELEBA_ATTRIBUTE_GROUPS if groups is None else groups
    if len(groups) != n_clients:
        raise ValueError(f"partition='attribute' makes one client per attribute group: {len(groups)} groups "
                         f"({', '.join(groups)}), so set n_clients={len(groups)} or pass {n_clients} attribute_groups")
    missing = sorted({a for names in groups.values() for a in names} - set(data.attribute_names))
    if missing:
        raise ValueError(f"attribute_groups name attributes {missing} that {data.name} lacks; "
                         f"it has {data.attribute_names}")
    col = {a: i for i, a in enumerate(data.attribute_names)}
    member = torch.stack([data.attributes[:, [col[a] for a in names]].amax(1) > 0.5
                          for names in groups.values()], 1)  # (N, n_clients) bool
    # Choose uniformly among a record's groups: random keys, masked to its groups, argmax.
    keys = torch.rand(member.shape, generator=torch.Generator().manual_seed(seed)).masked_fill(~member, -1)
    owner = torch.where(member.any(1), keys.argmax(1), -1)
    return [torch.nonzero(owner == k).flatten().numpy() for k in range(n_clients)]
