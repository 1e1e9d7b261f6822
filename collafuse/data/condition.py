"""What a client's model conditions on: its private class labels or attribute vectors, per record."""
from __future__ import annotations

import torch

from collafuse.data.imageset import ImageSet


def client_condition(cfg, data: ImageSet) -> torch.Tensor | None:
    """What each client's model conditions on, per record, as configured."""
    kind = cfg.client.condition
    if kind == "class":
        if data.num_classes < 2:
            raise ValueError(f"client.condition=class, but data set {data.name!r} has no class labels; "
                             f"use client.condition=none" + (" or attributes" if data.attributes is not None else ""))
        return data.labels
    if kind == "attributes":
        if data.attributes is None:
            raise ValueError(f"client.condition=attributes, but data set {data.name!r} has no attributes; "
                             f"use client.condition=class or none")
        return data.attributes
    return None
