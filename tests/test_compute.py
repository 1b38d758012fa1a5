"""The `device`, `amp` and `num-workers` keys: validation, resolution, refusals before start, and CPU training that
is bitwise the training of the code before these keys existed."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flcore import device as devices
from flcore.batches import Batches
from flcore.config import ConfigError
from flcore.datasets import Dataset, ImageSet, load
from flcore.device import CPU, Compute, compute_of
from flcore.losses import kd_loss
from flcore.models import build_model
from flcore.training import TrainSettings, predict, train
from server_app import launch
from server_app import preflight as preflight_checks
from server_app.preflight import check_client_devices, client_resources, preflight
from tests.helpers import make_run_plan, validated


def _seeing(monkeypatch, gpus: int):
    """This process sees `gpus` GPUs, whatever the machine has; resolutions are not cached across tests."""
    monkeypatch.setattr(devices, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(preflight_checks, "visible_gpus", lambda: gpus)
    devices._compute.cache_clear()
    yield
    devices._compute.cache_clear()


@pytest.fixture
def no_gpu(monkeypatch):
    yield from _seeing(monkeypatch, 0)


@pytest.fixture
def two_gpus(monkeypatch):
    """Two GPUs (nothing runs on them: only resolution and the launcher's checks are tested)."""
    yield from _seeing(monkeypatch, 2)


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_values_the_schema_accepts(value):
    assert validated({"device": value})["device"] == value


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        ({"device": "gpu"}, "device", "auto, cpu, cuda or cuda:N"),
        ({"device": "cuda:x"}, "device", "auto, cpu, cuda or cuda:N"),
        ({"device": 0}, "device", "wrong type"),
        ({"amp": "fp8"}, "amp", "off, bf16, fp16"),
        ({"amp": "bf16", "device": "cpu"}, "amp", "mixed precision runs on a CUDA device"),
        ({"num-workers": -1}, "num-workers", "auto or an integer >= 0"),
        ({"num-workers": "many"}, "num-workers", "auto or an integer >= 0"),
        ({"num-workers": 1.5}, "num-workers", "wrong type"),
        ({"num-workers": True}, "num-workers", "wrong type"),
    ],
)
def test_bad_compute_settings_name_the_key(overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        validated(overrides)
    assert f"'{key}'" in str(err.value) and hint in str(err.value)


def test_num_workers_takes_auto_or_a_count():
    assert validated({"num-workers": 3})["num-workers"] == 3 and validated()["num-workers"] == "auto"


def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused_naming_the_key(no_gpu):
    assert compute_of(validated()) == Compute(torch.device("cpu"), "off", devices.loader_workers("auto"))
    with pytest.raises(
        ConfigError, match=r"'device' = 'cuda' is not allowed on this machine: this process sees no GPU"
    ):
        compute_of(validated({"device": "cuda"}))
    with pytest.raises(ConfigError, match=r"'amp' = 'bf16' is not allowed here: mixed precision runs on a CUDA"):
        compute_of(validated({"amp": "bf16"}))


def test_a_gpu_index_the_process_does_not_see_is_refused(two_gpus):
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"'device' = 'cuda:2'.*2 GPU\(s\), cuda:0..cuda:1"):
        devices.resolve_device("cuda:2")


def test_auto_workers_leave_one_core_of_the_share_to_training(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert devices.loader_workers("auto") == 3 and devices.loader_workers(0) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert devices.loader_workers("auto") == 0


def test_device_cuda_on_a_machine_without_gpu_fails_before_anything_starts(no_gpu, no_superlink, capsys):
    """The launcher resolves the device as the ServerApp's preflight does: exit code 2, the key named."""
    assert launch.main(["--run-config", "device=cuda"]) == 2
    assert "run-config key 'device' = 'cuda' is not allowed on this machine: this process sees no GPU" in (
        capsys.readouterr().err
    )
    with pytest.raises(ConfigError, match=r"'device' = 'cuda' is not allowed on this machine: this process sees no"):
        preflight(validated({"device": "cuda"}))
    assert launch.main(["--federation-config", "client-resources-num-gpus=0.5"]) == 2
    assert "'client-resources-num-gpus' = 0.5 needs a GPU, and this machine has none" in capsys.readouterr().err
    assert launch.main(["--run-config", "amp=bf16"]) == 2
    assert "'amp' = 'bf16' is not allowed here: mixed precision runs on a CUDA device" in capsys.readouterr().err


def test_client_resources_are_checked_before_start(two_gpus):
    simulation = launch.project_settings()[1]
    bad = [
        ({"num-supernodes": 3}, "unknown option(s) num-supernodes"),
        ({"client-resources-num-gpus": -0.5}, "'client-resources-num-gpus' = -0.5"),
        ({"client-resources-num-gpus": 1.5}, "a fraction below 1"),
        ({"client-resources-num-cpus": 0}, "'client-resources-num-cpus' = 0"),
    ]
    for overrides, hint in bad:
        with pytest.raises(ConfigError, match=hint.replace("(", r"\(").replace(")", r"\)")):
            client_resources(simulation, overrides)
    options = client_resources(simulation, {"client-resources-num-gpus": 0.25})
    assert "client-resources-num-gpus=0.25" in launch.federation_config(options, validated({"num-clients": 4}))
    check_client_devices(validated({"device": "cuda", "amp": "bf16"}), options, "")
    with pytest.raises(ConfigError, match=r"'device' = 'cuda:1' is not allowed in the simulation"):
        check_client_devices(validated({"device": "cuda:1"}), options, "")
    on_cpu = client_resources(simulation, {})
    with pytest.raises(ConfigError, match=r"'amp' = 'fp16' is not allowed with client-resources-num-gpus = 0"):
        check_client_devices(validated({"amp": "fp16"}), on_cpu, "")


def test_client_resources_beyond_the_machine_are_refused_before_start(two_gpus, no_superlink, capsys, monkeypatch):
    """Issue 28 item 6: client-resources-num-cpus=100 failed 36 s after start inside Flower ("ActorPool is
    empty"); one client actor must fit on this machine, in CPUs and in GPUs."""
    monkeypatch.setattr(preflight_checks, "machine_cpus", lambda: 4)
    assert launch.main(["--federation-config", "client-resources-num-cpus=100"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'client-resources-num-cpus' = 100 is more than this machine has (4 CPU(s), 2 GPU(s)" in err
    assert "expected <= 4" in err and "\n" not in err
    assert launch.main(["--federation-config", "client-resources-num-gpus=3"]) == 2
    err = capsys.readouterr().err
    assert "'client-resources-num-gpus' = 3 is more than this machine has (4 CPU(s), 2 GPU(s))" in err
    assert "<= 2 GPU(s)" in err


def test_make_run_passes_the_federation_config(tmp_path):
    dry = make_run_plan(tmp_path, "FEDERATION_CONFIG=client-resources-num-gpus=0.25")
    assert '--federation-config "client-resources-num-gpus=0.25"' in dry


def test_amp_off_changes_nothing():
    scaler = CPU.scaler()
    assert not scaler.is_enabled()
    with CPU.autocast():
        assert not torch.is_autocast_enabled("cpu")


# The batching, augmentation and training loop as they were before `device` and `amp` existed, kept verbatim as
# the reference that CPU training must reproduce bit for bit (benchmarks published from that code stay valid).
def reference_batches(images, labels, mean, std, size, batch_size, flip, shuffle, augment, gen):
    n = len(labels)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    labels = torch.from_numpy(labels)
    mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(std).view(1, 3, 1, 1) * 255.0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        x = images[idx]
        if augment:
            pad, m = max(1, size // 8), x.shape[0]
            padded = F.pad(x, (pad, pad, pad, pad))
            dx = torch.randint(0, 2 * pad + 1, (m,), generator=gen)
            dy = torch.randint(0, 2 * pad + 1, (m,), generator=gen)
            rows = (dy[:, None] + torch.arange(size))[:, None, :, None].expand(m, 3, size, size + 2 * pad)
            x = padded.gather(2, rows)
            cols = (dx[:, None] + torch.arange(size))[:, None, None, :].expand(m, 3, size, size)
            x = x.gather(3, cols)
            if flip:
                mask = torch.rand(m, generator=gen) < 0.5
                x = torch.where(mask[:, None, None, None], x.flip(3), x)
        x = ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        yield idx, x, labels[idx]


def reference_train(model, batches_of_epoch, settings, extra):
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else None
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(settings.epochs):
        for idx, x, y in batches_of_epoch():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if extra is not None:
                loss = loss + extra(logits, idx)
            if anchor is not None:
                loss = loss + 0.5 * settings.proximal_mu * sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            steps += 1
    return {"train-loss": total_loss / max(seen, 1), "train-accuracy": correct / max(seen, 1), "local-steps": steps}


def natural_set(n=45, size=16, seed=0) -> Dataset:
    """Random natural-looking images (flipped in augmentation, unlike digits)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    train = ImageSet(np.arange(n, dtype=np.int64) % 10, images)
    return Dataset(train, train, tuple(str(c) for c in range(10)), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), natural=True)


@pytest.mark.parametrize(
    ("dataset", "settings", "with_extra"),
    [
        ("digits", TrainSettings(2, 0.1, 0.0, 0.0, True), False),
        ("natural", TrainSettings(2, 0.05, 0.9, 5e-4, True, proximal_mu=0.01), True),
        ("natural", TrainSettings(1, 0.1, 0.0, 0.0, False), False),
    ],
)
def test_cpu_training_is_bitwise_the_training_before_the_device_keys(one_thread, dataset, settings, with_extra):
    data = load("digits", "", 16) if dataset == "digits" else natural_set()
    part = data.train.subset(np.arange(45))
    q = torch.randn(len(part), 10, generator=torch.Generator().manual_seed(1))
    extra = (lambda logits, idx: 0.5 * kd_loss(logits, q[idx], 3.0)) if with_extra else None
    new, old = (build_model("resnet8", 16, 10, seed=0) for _ in range(2))
    gen_new, gen_old = (torch.Generator().manual_seed(7) for _ in range(2))

    def reference_epoch():
        images, labels = part.images, part.labels
        return reference_batches(
            images, labels, data.mean, data.std, 16, 8, data.natural, True, settings.augment, gen_old
        )

    got = train(
        new, Batches(part, data, 16, 8, compute_of(validated({"device": "cpu"}))), settings, gen_new, extra_loss=extra
    )
    want = reference_train(old, reference_epoch, settings, extra)
    timings = {"train-seconds", "train-images-per-second"}  # wall time, not a result
    assert {k: v for k, v in got.items() if k not in timings} == want and timings <= set(got)
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values(), strict=True))
    assert torch.equal(gen_new.get_state(), gen_old.get_state())  # the same random numbers were drawn
    preds, labels = predict(new, Batches(part, data, 16, 8))
    with torch.no_grad():
        want_preds = torch.cat(
            [
                old.eval()(x).argmax(1)
                for _, x, _ in reference_batches(
                    part.images, part.labels, data.mean, data.std, 16, 8, data.natural, False, False, None
                )
            ]
        )
    assert np.array_equal(preds, want_preds.numpy()) and np.array_equal(labels, part.labels)
