"""Data-parallel server training (federation/ddp.py): 2 gloo processes train exactly like one, and say why not."""
import pytest
import torch

from collafuse.config import load_config
from collafuse.core.protocol import HandoffBatch
from collafuse.core.schedule import NoiseSchedule
from collafuse.federation.ddp import check_devices, train_data_parallel
from collafuse.federation.inprocess import start
from collafuse.roles.server import Server
from test_run import PINNED, invoke


def server(cfg):
    """A smoke server holding 3 clients x 40 random handoffs (in memory: they travel to the replicas)."""
    s = Server.from_config(cfg, schedule=NoiseSchedule(cfg.schedule.T, cfg.schedule.kind),
                           image_shape=cfg.image_shape, device="cpu")
    g = torch.Generator().manual_seed(1)
    for c in range(3):
        s.ingest(HandoffBatch(client_id=c, level=s.t_c, record_ids=torch.arange(40),
                              views=torch.zeros(40, dtype=torch.long),
                              handoffs=torch.randn((40, *cfg.image_shape), generator=g)))
    return s


def test_two_gloo_processes_train_like_one():
    one, cfg = server(load_config("smoke")), load_config("smoke", ["server.devices=2"])
    two = server(cfg)
    # Two rounds: the second starts the replicas from rank 0's state after the first (optimiser moments too).
    expected = one.train_steps(4) + one.train_steps(4)
    losses = train_data_parallel(two, cfg, 4) + train_data_parallel(two, cfg, 4)
    assert losses == pytest.approx(expected, rel=1e-4)  # the same batches: only summation orders differ
    for a, b in [(one.model, two.model), (one.ema.model, two.ema.model)]:
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4)
    assert two.steps_done == 8 and torch.equal(two.gen.get_state(), one.gen.get_state())


def test_a_round_on_two_devices_gives_the_pinned_smoke_loss(tmp_path):
    # Through the round engine: the store lies in the run folder, and the replica maps its shards from there.
    e, _, _ = start(load_config("smoke", ["rounds=1", "server.devices=2"]), tmp_path, device=torch.device("cpu"))
    assert e.run_round()["loss"]["server"] == pytest.approx(PINNED["server_loss_round1"], rel=1e-4)


@pytest.mark.parametrize("overrides,message", [
    (["server.devices=3"], "server.batch_size 32 must divide by server.devices 3"),
    (["server.devices=0"], "server.devices must be an integer >= 1, got 0"),
    (["server.devices=-1"], "server.devices must be an integer >= 1, got -1"),
])
def test_devices_the_batch_cannot_be_shared_over_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("smoke", overrides)
    devices = int(overrides[0].split("=")[1])
    with pytest.raises(ValueError, match=message):  # before any process is spawned
        check_devices(devices, 32, cuda=False)


def test_cli_server_devices_flag_is_checked():
    result = invoke("run", "-c", "smoke", "--server-devices", "0")
    assert result.exit_code == 2 and "server.devices must be an integer >= 1, got 0" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_more_devices_than_gpus_are_refused():
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"exceeds the {n} CUDA device"):
        check_devices(n + 1, 32 * (n + 1), cuda=True)
