"""Checks that need a CUDA GPU, skipped where `torch.cuda.is_available()` is false.

- A ClientApp round and an alignment step on `cuda` match the same round and step on the CPU: same seed, same
  order and augmentation (drawn on the CPU), every weight within ATOL + RTOL * |w| of the CPU's.
- A round with `amp=bf16` (and `fp16`, with its gradient scaler) trains: finite weights, a lower loss.
- Every server-side method runs a small in-process run end to end with the ServerApp and the clients on `cuda`.
- Under Ray, client actors train on the GPU share `client-resources-num-gpus` gives them (slow: `flwr run`).

The tolerance holds with cuDNN's TF32 convolutions off (`float32_only`), so the comparison measures the device
path in float32 on both sides rather than TF32's 10-bit mantissa.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignment.loss import AlignSettings, fine_tune
from flcore.batches import Batches
from flcore.device import CPU, Compute, compute_of
from flcore.models import build_model, run_model
from flcore.reports import read_metrics
from flcore.run_data import client_batches, prepare
from flcore.server_data import server_data
from server_app import app as server_app
from server_app import launch
from tests.helpers import TINY, ClientAppGrid, client_train, validated

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("flower_identity"),
]

ATOL, RTOL = 1e-3, 1e-3
CUDA = Compute(torch.device("cuda", 0))


@pytest.fixture
def float32_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def config(**overrides):
    """The tiny run on ten clients (partition 0: a few dozen images), with `overrides`."""
    return validated({**TINY, "num-clients": 10, **overrides})


def client_round(cfg: dict, epochs: int = 1):
    """One ClientApp train call on partition 0 from the same seeded global model; the reply's weights and metrics."""
    train = {"local-epochs": epochs, "lr": 0.1, "momentum": 0.0, "augment": True}
    reply = client_train(cfg, train)
    return reply.content["arrays"].to_torch_state_dict(), dict(reply.content["metrics"])


def assert_close_states(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].device.type == "cpu"  # weights come back to the CPU as Flower arrays
        torch.testing.assert_close(got[key].double(), want[key].double(), atol=ATOL, rtol=RTOL, msg=key)


def test_in_memory_batches_on_cuda_are_the_cpu_batches():
    cfg = config()
    part = client_batches(cfg, 0).data
    dataset = prepare(cfg).dataset
    on_cpu, on_gpu = (Batches(part, dataset, 8, 16, compute) for compute in (CPU, CUDA))
    runs = [list(b.iterate_indexed(True, True, torch.Generator().manual_seed(3))) for b in (on_cpu, on_gpu)]
    for (i_cpu, x_cpu, y_cpu), (i_gpu, x_gpu, y_gpu) in zip(*runs, strict=True):
        assert x_gpu.device.type == "cuda" and x_gpu.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(i_gpu.cpu(), i_cpu) and torch.equal(y_gpu.cpu(), y_cpu)
        torch.testing.assert_close(x_gpu.cpu(), x_cpu, atol=1e-6, rtol=0)


@pytest.mark.usefixtures("float32_only")
def test_a_client_round_on_cuda_matches_the_cpu_round():
    cpu_state, cpu_metrics = client_round(config(device="cpu"))
    gpu_state, gpu_metrics = client_round(config(device="cuda"))
    assert_close_states(gpu_state, cpu_state)
    assert gpu_metrics["local-steps"] == cpu_metrics["local-steps"]
    assert gpu_metrics["train-loss"] == pytest.approx(cpu_metrics["train-loss"], rel=1e-4)


@pytest.mark.usefixtures("float32_only")
def test_an_alignment_step_on_cuda_matches_the_cpu_step():
    cfg = config(device="cpu")
    data = server_data(cfg)
    q = torch.randn(len(data.align), 10, generator=torch.Generator().manual_seed(0))
    settings = AlignSettings(3, 0.01, 32, 1.0, 3.0, "ce+kl", "every-round", True)
    start = build_model("resnet8", 16, 10, seed=0)
    results = []
    for compute in (CPU, CUDA):
        model = copy.deepcopy(start).to(compute.device)
        stats = fine_tune(model, data.align, data.dataset, 8, q, settings, torch.Generator().manual_seed(3), compute)
        results.append(({k: v.cpu() for k, v in model.state_dict().items()}, stats))
    (cpu_state, cpu_stats), (gpu_state, gpu_stats) = results
    assert_close_states(gpu_state, cpu_state)
    assert gpu_stats["align-loss"] == pytest.approx(cpu_stats["align-loss"], rel=1e-4)


def partition_loss(state: dict) -> float:
    """Mean cross-entropy of `state` on partition 0, in float32 on the CPU."""
    cfg = config(device="cpu")
    model = run_model(cfg, 10)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y, reduction="sum") for x, y in client_batches(cfg, 0).iterate()]
    return float(sum(losses)) / len(client_batches(cfg, 0).data)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_round_with_mixed_precision_trains(amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    cfg = config(device="cuda", amp=amp)
    assert compute_of(cfg).amp == amp
    before = {k: v.clone() for k, v in run_model(cfg, 10, seed=0).state_dict().items()}
    after, metrics = client_round(cfg, epochs=5)
    assert all(torch.isfinite(v.double()).all() for v in after.values())
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert np.isfinite(metrics["train-loss"]) and metrics["local-steps"] > 0
    assert partition_loss(after) < partition_loss(before)


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": "fedavg", "align": True},
        {"strategy": "fedavg", "align": True, "align-teacher": "holdout", "holdout-epochs": 2},
        {"strategy": "creff"},
        {"strategy": "clip2fl"},
        {"strategy": "ccvr"},
        {"strategy": "feddf", "feddf-steps": 4},
        {"strategy": "fedbe", "fedbe-epochs": 2, "fedbe-samples": 2},
        {"strategy": "ratioloss"},
        {"strategy": "fedprox", "amp": "bf16"},
    ],
)
def test_every_server_method_runs_on_cuda(tmp_path, overrides):
    if overrides.get("amp") == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    small = {"num-clients": 4, "fraction-train": 1.0, "num-server-rounds": 2, "local-epochs": 1}
    calibration = {"virtual-per-class": 5, "match-epochs": 3, "calibration-epochs": 3}
    cfg = config(**small, **calibration, **overrides, device="cuda", **{"output-dir": str(tmp_path)})
    summary = server_app.run(ClientAppGrid(cfg), cfg, "gpu")
    rows = read_metrics(tmp_path / "gpu")
    assert [row["round"] for row in rows] == [0, 1, 2]  # every round scored on the GPU, none refused as NaN
    assert summary["final"]["accuracy"] == rows[-1]["accuracy"] and math.isfinite(rows[-1]["accuracy"])
    weights = torch.load(tmp_path / "gpu" / "model.pt", weights_only=True)
    assert all(v.device.type == "cpu" and torch.isfinite(v.double()).all() for v in weights.values())


@pytest.mark.slow
def test_client_actors_under_ray_train_on_the_gpu_share_they_are_given(tmp_path, capsys):
    """With `device=cuda` a client without a GPU refuses to train, so a run in which every client replied every
    round proves that each Ray actor saw the GPU share `client-resources-num-gpus` gave it."""
    run = (
        "num-clients=4 num-server-rounds=2 fraction-train=1.0 local-epochs=1 image-size=8 projection-dim=16 "
        f"dirichlet-alpha=100.0 device=cuda output-dir={tmp_path}"
    )
    share = "client-resources-num-gpus=0.25"
    assert launch.main(["--run-config", run, "--federation-config", share]) == 0
    assert "finished:completed" in capsys.readouterr().out
    (run_dir,) = list(tmp_path.iterdir())
    rows = read_metrics(run_dir)
    assert [r["replies"] for r in rows[1:]] == [4, 4]
