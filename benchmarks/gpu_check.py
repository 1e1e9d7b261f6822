"""The CUDA path, checked briefly on a GPU machine: roles, split sampling, protocol, quality, step times.

    python benchmarks/gpu_check.py        # exits non-zero on any failed check; prints a timing table

Needs only torch, diffusers, safetensors, torchmetrics, scikit-learn (no Flower, no data download):
it builds the roles directly on sklearn's 8x8 digits padded to 16 px.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from collafuse.core import protocol
from collafuse.roles.client import Client
from collafuse.roles.noise import new_secret
from collafuse.roles.policy import ReleaseLedger
from collafuse.config import load_config
from collafuse.core.models import Denoiser, ModelConfig, device_auto
from collafuse.measure.quality import evaluate_quality, feature_extractor, train_domain_classifier
from collafuse.core.sampling import level_grid, sample_levels
from collafuse.core.schedule import NoiseSchedule
from collafuse.roles.server import Server


def digits16() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # (N, 1, 8, 8) in [-1, 1]
    return F.interpolate(x, size=16, mode="bilinear", align_corners=False), torch.tensor(d.target)


def step_time(model: Denoiser, batch: int, size: int, device, steps: int = 20) -> float:
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch, 1, size, size, device=device)
    t = torch.randint(1, 1000, (batch,), device=device)
    label = torch.zeros(batch, dtype=torch.long, device=device) if model.num_labels else None
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize() if device.type == "cuda" else None
            start = time.perf_counter()
        loss = F.mse_loss(model(x, t, label), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize() if device.type == "cuda" else None
    return (time.perf_counter() - start) / steps


def main() -> None:
    device = device_auto()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    images, labels = digits16()
    s = NoiseSchedule(1000)
    t_c = s.cut_level(0.2)
    small = ModelConfig(channels=(16, 32), attention=False)
    client = Client(0, images[:1200], labels[:1200], schedule=s, cut_level=t_c, model=small, device=device,
                    secret=new_secret(), ledger=ReleaseLedger(None))
    server = Server(schedule=s, cut_level=t_c, client_ids=[0], image_shape=(1, 16, 16), model=ModelConfig(),
                    device=device)
    assert next(client.model.parameters()).device.type == device.type
    for msg in client.make_handoffs([0], 512):
        server.ingest(protocol.decode(protocol.encode(msg), server.limits))
    losses = client.train(30), server.train(30)
    assert all(l == l for l in losses), losses
    print(f"client/server loss after 30 steps: {losses[0]:.4f} / {losses[1]:.4f}")

    # The sampling exchange through real bytes; the images come back on the CPU, finite, in [-1, 1].
    req = protocol.decode(protocol.encode(client.sampling_request(64, 20, "ddim", 0)), server.limits)
    handoffs = protocol.decode(protocol.encode(server.sample_to_cut(req)), server.limits)
    samples = client.finish(handoffs, 5, "ddim", 1)
    assert samples.device.type == "cpu" and torch.isfinite(samples).all() and samples.abs().max() <= 1

    # Split sampling equals the unsplit chain on the GPU too.
    model = Denoiser(small, 16, 1).to(device).eval()
    fn = lambda x, t: model(x, t)
    x_T = torch.randn(8, 1, 16, 16).to(device)
    for eta in (1.0, 0.0):
        g = torch.Generator().manual_seed(3)
        y = sample_levels(fn, x_T, level_grid(1000, t_c, 7), s, eta, g)
        split = sample_levels(fn, y, level_grid(t_c, 0, 3), s, eta, g)
        g = torch.Generator().manual_seed(3)
        whole = sample_levels(fn, x_T, level_grid(1000, t_c, 7) + level_grid(t_c, 0, 3)[1:], s, eta, g)
        err = (split - whole).abs().max().item()
        assert err < 1e-4, (eta, err)
        print(f"split vs unsplit, eta={eta}: max |diff| {err:.2e}")

    # Quality on the GPU equals quality on the CPU.
    clf = train_domain_classifier(images, labels, num_classes=10, epochs=3, device=device)
    ext = feature_extractor("domain", classifier=clf)
    gpu = evaluate_quality(samples, images[1200:1400], extractor=ext, device=device)
    cpu = evaluate_quality(samples, images[1200:1400], extractor=feature_extractor("domain", classifier=clf.cpu()),
                           device="cpu")
    assert abs(gpu["fid"] - cpu["fid"]) < 1e-3 * max(1.0, cpu["fid"]), (gpu["fid"], cpu["fid"])
    print(f"FID cuda {gpu['fid']:.5f} vs cpu {cpu['fid']:.5f}")

    # Checkpoint state from the GPU round-trips.
    tensors, meta = server.state()
    other = Server(schedule=s, cut_level=t_c, client_ids=[0], image_shape=(1, 16, 16), model=ModelConfig(),
                   device=device, seed=5)
    other.load(tensors, meta)
    assert all(torch.equal(a, b) for a, b in zip(server.model.state_dict().values(), other.model.state_dict().values()))

    cfg = load_config("default")
    print("| role (default preset) | params | batch | s/step |")
    print("|---|---|---|---|")
    for role, mcfg, labels_ in (("server", cfg.server.model, 5), ("client", cfg.client.model, None)):
        m = Denoiser(mcfg, 16, 1, num_labels=labels_).to(device)
        print(f"| {role} | {m.num_parameters():,} | 64 | {step_time(m, 64, 16, device):.4f} |")
    print("all GPU checks passed")


if __name__ == "__main__":
    main()
