import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DModel

from collafuse.measure.cost import count_flops, denoiser_flops, train_step_flops


def seeded(make, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def test_linear_forward_matches_hand_count():
    layer = seeded(lambda: nn.Linear(20, 30))
    x = torch.zeros(8, 20)
    assert count_flops(layer, x) == 2 * 8 * 20 * 30  # one multiply-add per weight per row


def test_conv_forward_matches_hand_count():
    conv = seeded(lambda: nn.Conv2d(3, 5, kernel_size=3, padding=1))
    x = torch.zeros(2, 3, 8, 8)
    # 2 * batch * out channels * output pixels * (in channels * kernel area)
    assert count_flops(conv, x) == 2 * 2 * 5 * 8 * 8 * 3 * 3 * 3
    strided = seeded(lambda: nn.Conv2d(3, 5, kernel_size=3, stride=2))  # 8x8 -> 3x3
    assert count_flops(strided, x) == 2 * 2 * 5 * 3 * 3 * 3 * 3 * 3


def test_attention_matches_hand_count():
    q = torch.zeros(2, 4, 16, 8, requires_grad=True)  # (batch, heads, tokens, head dim)
    attention = lambda: F.scaled_dot_product_attention(q, q, q)  # noqa: E731
    scores_and_mix = 2 * (2 * 2 * 4 * 16 * 16 * 8)  # q k^T and softmax(.) v: 2 flops per multiply-add
    assert count_flops(attention) == scores_and_mix
    # backward, torch's flash-attention formula: recompute q k^T, then grads of v, probabilities, q, k
    assert count_flops(lambda: attention().sum().backward()) == scores_and_mix + 5 * scores_and_mix // 2


def test_train_step_matches_hand_count():
    b, i, h, o = 4, 10, 16, 6
    mlp = seeded(lambda: nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o)))
    x, target = torch.zeros(b, i), torch.zeros(b, o)
    flops = train_step_flops(mlp, lambda: (mlp(x) - target).pow(2).mean())
    forward = 2 * b * (i * h + h * o)
    # backward: both layers need their weight gradient; only the second passes a gradient to its input
    backward = 2 * b * i * h + 2 * (2 * b * h * o)
    assert flops == forward + backward
    assert all(p.grad is None for p in mlp.parameters())  # counting leaves the model's gradients alone


def test_denoiser_flops_scale_linearly_with_steps_and_batch():
    unet = seeded(
        lambda: UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=8,
        )
    ).eval()
    eps_fn = lambda x_t, t: unet(x_t, t).sample  # noqa: E731
    x, t = torch.zeros(2, 1, 8, 8), torch.full((2,), 10)
    one = denoiser_flops(eps_fn, x, t)
    assert one > 0

    def sample(steps):  # a sampler's loop: one denoiser evaluation per step
        y = x
        with torch.no_grad():
            for _ in range(steps):
                y = y - 0.1 * eps_fn(y, t)

    assert [count_flops(sample, k) for k in (1, 3, 5)] == [one, 3 * one, 5 * one]
    assert denoiser_flops(eps_fn, torch.zeros(6, 1, 8, 8), torch.full((6,), 10)) == 3 * one
    step = train_step_flops(unet, lambda: eps_fn(x, t).pow(2).mean())
    # backward ~2x forward: less the first conv's input gradient, plus flash attention's recompute
    assert step == pytest.approx(3 * one, rel=0.02)


def test_errors():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_step_flops(frozen, lambda: frozen(torch.zeros(1, 2)).sum())
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="scalar loss"):
        train_step_flops(layer, lambda: layer(torch.zeros(3, 2)))


def test_a_step_is_counted_once_per_architecture(monkeypatch):
    from collafuse.config import load_config
    from collafuse.federation.inprocess import build
    from collafuse.measure import cost
    counted = []

    def counting(*args, **kwargs):
        counted.append(1)
        return real(*args, **kwargs)
    real = cost._count_step_flops
    monkeypatch.setattr(cost, "_STEP_FLOPS", {})
    monkeypatch.setattr(cost, "_count_step_flops", counting)
    a, b = build(load_config("smoke")).clients[:2]
    assert cost.client_step_flops(a, 8) == cost.client_step_flops(b, 8) and len(counted) == 1
    cost.client_step_flops(a, 16)  # another sampling batch is another count
    assert len(counted) == 2


def test_guided_sampling_counts_twice_the_network():
    """Classifier-free guidance runs the net on twice the rows each sampling step; the count says so."""
    from collafuse.config import load_config
    from collafuse.federation.inprocess import build
    from collafuse.measure import cost
    fed = build(load_config("smoke", ["client.condition=class", "client.label_dropout=0.1",
                                      "server.label_dropout=0.1"]))
    client, server = fed.clients[0], fed.server
    (train_1, sample_1), (server_train_1, server_sample_1) = cost.client_step_flops(client, 8), \
        cost.server_step_flops(server, 8)
    client.guidance = server.guidance = 2.0
    (train_2, sample_2), (server_train_2, server_sample_2) = cost.client_step_flops(client, 8), \
        cost.server_step_flops(server, 8)
    assert (train_2, server_train_2) == (train_1, server_train_1)
    assert sample_2 == 2 * sample_1 and server_sample_2 == 2 * server_sample_1
