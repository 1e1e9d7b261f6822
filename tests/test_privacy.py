import json
import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from collafuse.roles.privacy import clip_records, dp_block, handoff_epsilon, handoff_mechanism, range_clip_norm

DELTA = 1e-5


def analytic_gaussian_epsilon(sensitivity: float, sigma: float, delta: float) -> float:
    """Balle & Wang 2018, Thm 8: the exact epsilon of the Gaussian mechanism, solved by hand."""

    def delta_of(eps):
        a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
        return norm.cdf(a - b) - math.exp(eps + norm.logcdf(-a - b))  # log space: e^eps overflows

    hi = 1.0
    while delta_of(hi) > delta:
        hi *= 2
    return brentq(lambda eps: delta_of(eps) - delta, 0.0, hi, xtol=1e-12)


def rdp_epsilon_by_hand(sensitivity: float, sigma: float, views: int, delta: float) -> float:
    """eps_RDP(alpha) = k alpha Delta^2 / (2 sigma^2), converted with Canonne-Kamath-Steinke Prop. 12."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
    rho = views * sensitivity**2 / (2 * sigma**2)
    return min(
        a * rho + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in orders if a > 1.01
    )


def test_mechanism_parameters_replace_one():
    mech = handoff_mechanism(0.64, clip_norm=3.0)
    assert mech["sensitivity"] == pytest.approx(2 * 3.0 * 0.8)
    assert mech["sigma"] == pytest.approx(0.6)
    assert mech["noise_multiplier"] == pytest.approx(0.6 / 4.8)


@pytest.mark.parametrize("views", [1, 4])
def test_pld_matches_analytic_gaussian_mechanism(views):
    # alpha_bar 0.5, C = 0.1: Delta = 0.1414, sigma = 0.7071, noise multiplier 5
    eps = handoff_epsilon(0.5, clip_norm=0.1, views=views, delta=DELTA)
    # k Gaussian releases of one record are one Gaussian release with sensitivity sqrt(k) Delta
    exact = analytic_gaussian_epsilon(math.sqrt(views) * 2 * 0.1 * math.sqrt(0.5), math.sqrt(0.5), DELTA)
    assert eps >= exact - 1e-9  # PLD rounds pessimistically: never below the truth
    assert eps == pytest.approx(exact, rel=1e-4)


def test_one_view_below_classical_bound():
    # classical Gaussian mechanism (Dwork & Roth Thm A.1): eps = Delta sqrt(2 ln(1.25/delta)) / sigma, valid for eps < 1
    delta_, sigma = 2 * 0.1 * math.sqrt(0.5), math.sqrt(0.5)
    classical = delta_ * math.sqrt(2 * math.log(1.25 / DELTA)) / sigma
    assert classical < 1.0
    eps = handoff_epsilon(0.5, clip_norm=0.1, views=1, delta=DELTA)
    assert eps < classical
    assert eps == pytest.approx(0.725522, abs=1e-5)


@pytest.mark.parametrize("views", [1, 10])
def test_rdp_matches_hand_conversion(views):
    sensitivity, sigma = 2 * 0.5 * math.sqrt(0.3), math.sqrt(0.7)
    eps = handoff_epsilon(0.3, clip_norm=0.5, views=views, delta=DELTA, accountant="rdp")
    assert eps == pytest.approx(rdp_epsilon_by_hand(sensitivity, sigma, views, DELTA), rel=1e-9)
    # RDP is a valid upper bound: above the exact value, below the zCDP closed form rho + 2 sqrt(rho ln 1/delta)
    rho = views * sensitivity**2 / (2 * sigma**2)
    assert analytic_gaussian_epsilon(math.sqrt(views) * sensitivity, sigma, DELTA) < eps
    assert eps < rho + 2 * math.sqrt(rho * math.log(1 / DELTA))


def test_barely_noised_handoff_is_accounted_without_blowing_up():
    # the paper's cut on unclipped MNIST: alpha_bar 0.9, C = 28 -> noise multiplier 0.006
    eps = handoff_epsilon(0.9, clip_norm=range_clip_norm((1, 28, 28)), views=1, delta=DELTA)
    exact = analytic_gaussian_epsilon(2 * 28 * math.sqrt(0.9), math.sqrt(0.1), DELTA)
    assert eps == pytest.approx(exact, rel=1e-3)
    assert eps > 1e4


def test_epsilon_grows_with_views_and_alpha_bar():
    by_views = [handoff_epsilon(0.2, clip_norm=1.0, views=k, delta=DELTA) for k in (1, 2, 4, 8)]
    assert all(a < b for a, b in zip(by_views, by_views[1:]))
    by_alpha = [handoff_epsilon(ab, clip_norm=1.0, views=2, delta=DELTA) for ab in (0.01, 0.1, 0.5, 0.9)]
    assert all(a < b for a, b in zip(by_alpha, by_alpha[1:]))


def test_edge_cases():
    assert handoff_epsilon(0.5, clip_norm=1.0, views=0, delta=DELTA) == 0.0
    assert handoff_epsilon(0.0, clip_norm=1.0, views=3, delta=DELTA) == 0.0
    assert handoff_epsilon(1.0, clip_norm=1.0, views=1, delta=DELTA) == math.inf
    assert handoff_epsilon(1.0, clip_norm=1.0, views=1, delta=DELTA, accountant="rdp") == math.inf


def test_dp_block_is_json_serialisable():
    block = dp_block(0.5, clip_norm=0.1, views=1, delta=DELTA)
    assert json.loads(json.dumps(block, allow_nan=False)) == block
    assert block["mechanism"] == "gaussian"
    assert block["noise_multiplier"] == pytest.approx(5.0)
    assert block["epsilon"] == pytest.approx(0.725522, abs=1e-5)
    assert block["accountant"] == "dp_accounting pld.PLDAccountant"
    raw = dp_block(1.0, clip_norm=1.0, views=1, delta=DELTA)  # c = 0: unbounded, null in JSON
    assert raw["epsilon"] is None and raw["noise_multiplier"] == 0.0
    assert json.dumps(raw, allow_nan=False)


def test_clip_records():
    x = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 0.1)])  # norms 4 and 0.2
    clipped = clip_records(x, 1.0)
    assert torch.allclose(clipped.flatten(1).norm(dim=1), torch.tensor([1.0, 0.2]))
    assert torch.equal(clipped[1], x[1])  # within the bound: untouched
    assert torch.allclose(clipped[0], x[0] / 4)  # direction kept


def test_range_clip_norm():
    assert range_clip_norm((1, 28, 28)) == 28.0
    assert range_clip_norm((3, 4, 4)) == pytest.approx(math.sqrt(48))
    assert torch.ones(3, 4, 4).norm().item() == pytest.approx(range_clip_norm((3, 4, 4)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": math.inf}, "range_clip_norm"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"views": -1}, "views"),
        ({"views": 1.5}, "views"),
        ({"accountant": "moments"}, "accountant"),
        ({"alpha_bar_cut": 1.2}, "alpha_bar_cut"),
    ],
)
def test_errors(kwargs, match):
    args = {"alpha_bar_cut": 0.5, "clip_norm": 1.0, "views": 1, "delta": DELTA} | kwargs
    with pytest.raises(ValueError, match=match):
        handoff_epsilon(args.pop("alpha_bar_cut"), **args)


def test_clip_errors():
    with pytest.raises(ValueError, match="clip_norm"):
        clip_records(torch.zeros(2, 1, 2, 2), -1.0)
    with pytest.raises(ValueError, match="records"):
        clip_records(torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="record_shape"):
        range_clip_norm((0, 28, 28))


def test_a_composition_is_accounted_once_per_process():
    from collafuse.roles.privacy import _composed_epsilon, releases_epsilon
    first = releases_epsilon([3.0, 2.0, 3.0], 1e-5)
    hits = _composed_epsilon.cache_info().hits
    assert releases_epsilon([3.0, 3.0, 2.0], 1e-5) == first  # the same multiset, in another order
    assert _composed_epsilon.cache_info().hits == hits + 1
