"""Formal (epsilon, delta) of the handoffs: each handoff is a Gaussian mechanism on one record.

A handoff y = sqrt(ab) x0 + sqrt(1 - ab) e releases the record x0 scaled by sqrt(ab) plus Gaussian
noise of std sqrt(1 - ab). With every record clipped to L2 norm C, this is the Gaussian mechanism
with L2 sensitivity 2 C sqrt(ab) and noise std sigma = sqrt(1 - ab), i.e. noise multiplier
sigma / sensitivity. `views` handoffs of the same record compose; dp-accounting does the composition.

Neighbouring relation: replace-one. The guarantee is per record, local to the client (the server
sees each record's handoffs, not a data-set aggregate), so "neighbouring" means the record replaced
by any other record of norm <= C; there is no add/remove of a record from a single release. The
distance between two such means is at most 2 C sqrt(ab), hence the factor 2. We fold that into the
noise multiplier and hand dp-accounting a unit-sensitivity Gaussian event under its default
relation, for which its epsilon is exactly the one of a Gaussian mechanism with that multiplier.
"""

import functools
import math

import torch

# name -> the dp-accounting class that composes the views
ACCOUNTANTS = {"pld": "pld.PLDAccountant", "rdp": "rdp.RdpAccountant"}

# PLD buckets the privacy loss; its range grows like 1/noise_multiplier^2, so a fixed bucket width
# runs out of memory for barely noised handoffs (multiplier ~0.006 at c=0.2 on MNIST). Scaling the
# width with that range keeps ~1e5 buckets; PLD rounds pessimistically, so epsilon stays an upper
# bound (measured: within 5e-4 relative of the exact Gaussian epsilon for multipliers 0.006..50).
_PLD_MIN_INTERVAL = 1e-4
_PLD_BUCKETS = 1e5


def range_clip_norm(record_shape: tuple[int, ...]) -> float:
    """L2 bound of any record with values in [-1, 1]: sqrt(number of values); no clipping needed."""
    if not record_shape or any(int(s) <= 0 for s in record_shape):
        raise ValueError(f"record_shape must be non-empty with positive sizes, got {record_shape}")
    return math.sqrt(math.prod(int(s) for s in record_shape))


def clip_records(x0: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each record (first dim) down to L2 norm <= clip_norm; records within the bound are unchanged."""
    _check_clip_norm(clip_norm)
    if x0.ndim < 2:
        raise ValueError(f"x0 must be (N, ...) records, got shape {tuple(x0.shape)}")
    norms = x0.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (clip_norm / norms).clamp(max=1.0)
    return x0 * scale.view(-1, *([1] * (x0.ndim - 1)))


def handoff_mechanism(alpha_bar_cut: float, *, clip_norm: float) -> dict:
    """Sensitivity, noise std and noise multiplier of one handoff at signal fraction alpha_bar_cut."""
    _check_alpha_bar(alpha_bar_cut)
    _check_clip_norm(clip_norm)
    sensitivity = 2.0 * clip_norm * math.sqrt(alpha_bar_cut)  # replace-one, see module docstring
    sigma = math.sqrt(1.0 - alpha_bar_cut)
    if sensitivity == 0.0:
        multiplier = math.inf
    elif sigma == 0.0:
        multiplier = 0.0
    else:
        multiplier = sigma / sensitivity
    return {"sensitivity": sensitivity, "sigma": sigma, "noise_multiplier": multiplier}


def handoff_epsilon(
    alpha_bar_cut: float, *, clip_norm: float, views: int, delta: float, accountant: str = "pld"
) -> float:
    """Per-record epsilon at `delta` of `views` independent handoffs of one record, composed by dp-accounting."""
    _check_views_delta_accountant(views, delta, accountant)
    multiplier = handoff_mechanism(alpha_bar_cut, clip_norm=clip_norm)["noise_multiplier"]
    if views == 0 or multiplier == math.inf:
        return 0.0  # nothing released, or a release that carries no signal
    if multiplier == 0.0:
        return math.inf  # c = 0: the raw record leaves the client
    # Imported here: clients import this module for clip_records, and each Flower ClientApp process
    # would pay the accountant's import for nothing.
    import dp_accounting
    from dp_accounting import pld, rdp
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(multiplier), views)
    if accountant == "rdp":
        acc = rdp.RdpAccountant()
    else:
        effective = multiplier / math.sqrt(views)
        loss_range = 1.0 / (2.0 * effective**2) + 10.0 / effective
        acc = pld.PLDAccountant(value_discretization_interval=max(_PLD_MIN_INTERVAL, loss_range / _PLD_BUCKETS))
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def releases_epsilon(multipliers: list[float], delta: float, accountant: str = "pld") -> float:
    """Per-record epsilon at `delta` of composing Gaussian mechanisms, one noise multiplier per distinct release."""
    _check_views_delta_accountant(0, delta, accountant)
    for m in multipliers:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or math.isnan(m) or m < 0:
            raise ValueError(f"noise multipliers must be numbers >= 0 (handoff_mechanism), got {m!r}")
    counts: dict[float, int] = {}
    for m in multipliers:
        if m != math.inf:  # a release that carries no signal costs nothing
            counts[float(m)] = counts.get(float(m), 0) + 1
    if not counts:
        return 0.0
    if 0.0 in counts:
        return math.inf  # c = 0: the raw record left the client
    # A canonical order: the same multiset always gives the same number, and is computed once per process
    # (a PLD composition takes ~1 s; 100 clients at one cut share one).
    return _composed_epsilon(tuple(sorted(counts.items())), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _composed_epsilon(groups: tuple[tuple[float, int], ...], delta: float, accountant: str) -> float:
    import dp_accounting  # imported here, as in handoff_epsilon
    from dp_accounting import pld, rdp
    events = [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(m), k) for m, k in groups]
    if accountant == "rdp":
        acc = rdp.RdpAccountant()
    else:
        if len(groups) == 1:
            m, k = groups[0]
            effective = m / math.sqrt(k)  # written as handoff_epsilon does, so equal multipliers agree exactly
        else:
            # Gaussians compose like one Gaussian with 1/m^2 summed: size the PLD grid on that, as handoff_epsilon does
            effective = 1.0 / math.sqrt(sum(k / m**2 for m, k in groups))
        loss_range = 1.0 / (2.0 * effective**2) + 10.0 / effective
        acc = pld.PLDAccountant(value_discretization_interval=max(_PLD_MIN_INTERVAL, loss_range / _PLD_BUCKETS))
    acc.compose(events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def dp_block(
    alpha_bar_cut: float, *, clip_norm: float, views: int, delta: float, accountant: str = "pld"
) -> dict:
    """JSON-serialisable DP record for metrics.json: mechanism, its parameters and (epsilon, delta)."""
    mech = handoff_mechanism(alpha_bar_cut, clip_norm=clip_norm)
    epsilon = handoff_epsilon(alpha_bar_cut, clip_norm=clip_norm, views=views, delta=delta, accountant=accountant)
    return {
        "mechanism": "gaussian",
        "neighbouring": "replace-one record",
        "alpha_bar_cut": float(alpha_bar_cut),
        "clip_norm": float(clip_norm),
        "sensitivity": mech["sensitivity"],
        "sigma": mech["sigma"],
        "noise_multiplier": _json_number(mech["noise_multiplier"]),
        "views": int(views),
        "delta": float(delta),
        "epsilon": _json_number(epsilon),
        "accountant": f"dp_accounting {ACCOUNTANTS[accountant]}",
    }



def _json_number(value: float) -> float | None:
    # JSON has no Infinity: None means unbounded (raw data left the client, or no signal at all)
    return value if math.isfinite(value) else None


def _check_alpha_bar(alpha_bar_cut: float) -> None:
    if not 0.0 <= alpha_bar_cut <= 1.0:
        raise ValueError(f"alpha_bar_cut must be in [0, 1] (the signal fraction at the cut), got {alpha_bar_cut}")


def _check_clip_norm(clip_norm: float) -> None:
    if not clip_norm > 0 or math.isinf(clip_norm):
        raise ValueError(
            f"clip_norm must be a finite L2 bound > 0, got {clip_norm}; "
            "for unclipped images in [-1, 1] use range_clip_norm(record_shape)"
        )


def _check_views_delta_accountant(views: int, delta: float, accountant: str) -> None:
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ValueError(f"views must be an int >= 0 (handoffs per record), got {views!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), e.g. 1e-5 or 1/(number of records), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {tuple(ACCOUNTANTS)}, got {accountant!r}")
