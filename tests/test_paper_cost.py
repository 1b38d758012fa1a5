"""bench/paper_cost.py and bench/limits.py: projection arithmetic, the two data copies, FLOP counts, the CLI."""

import json
import sys

import numpy as np
import pytest
import torch

from bench import limits, paper_cost, runs
from bench.paper_cost import RoundCost
from flcore.batches import open_image
from flcore.datasets import load as load_dataset
from flcore.partition import make_split
from server_app import launch
from tests.helpers import write_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_projection_scales_the_client_wait_by_the_images_a_round_trains():
    measured = RoundCost(seconds=100.0, wait=80.0, images=40_000.0)
    assert measured.outside == 20.0
    assert paper_cost.projected_round_seconds(measured, 40_000.0) == 100.0
    assert paper_cost.projected_round_seconds(measured, 80_000.0) == 180.0  # 20 outside + 80 x 2
    # two cells (100 s and 180 s per round), 200 rounds, 13 methods, 3 seeds
    assert paper_cost.grid_hours(measured, [40_000.0, 80_000.0], 200, 13, 3) == pytest.approx(280 * 200 * 39 / 3600)
    assert paper_cost.images_per_round([620, 620, 619], sampled=8, epochs=10) == pytest.approx(619.6667 * 80, 1e-4)
    assert limits.limit_ratio(100.0, 1e9, 2e11) == 0.5


def rows(*rounds):
    """metrics.jsonl rows: round 0, then (seconds, train-wait, client images/s, client seconds) per round."""
    out = [{"round": 0, "seconds": 1.0}]
    for i, (seconds, wait, rate, train) in enumerate(rounds, 1):
        out.append(
            {
                "round": i,
                "seconds": seconds,
                "train-wait-seconds": wait,
                "train-images-per-second": rate,
                "train-seconds": train,
                "replies": 8,
            }
        )
    return out


def test_figures_leave_out_round_one_and_set_throughput_against_the_limits():
    run = rows((500.0, 450.0, 1.0, 1.0), (100.0, 80.0, 200.0, 20.0), (120.0, 100.0, 300.0, 25.0))
    assert [r["round"] for r in paper_cost.steady_rows(run)] == [2, 3]
    assert [r["round"] for r in paper_cost.steady_rows(run[:2])] == [1]  # a one-round run keeps its round
    limit = paper_cost.Limits(1e9, 1e12, 4e12)
    cells = {("CIFAR-10-LT", 100.0): 18_000.0, ("CIFAR-100-LT", 10.0): 36_000.0}
    got = paper_cost.path_figures(run, 18_000.0, limit, cells, seeds=2)
    assert got["rounds-measured"] == [2, 3]
    assert got["seconds-per-round"] == 110.0 and got["train-wait-seconds"] == 90.0
    assert got["outside-client-training-share"] == pytest.approx(20 / 110)
    assert got["images-per-second-per-client"] == 250.0
    assert got["client-limit-ratio"] == pytest.approx(250 * 1e9 / 1e12)
    assert got["images-per-second-device"] == 200.0  # 18,000 images in 90 s of waiting
    assert got["device-limit-ratio"] == pytest.approx(200 * 1e9 / 4e12)
    assert got["clients-training-at-once"] == pytest.approx(22.5 * 8 / 90)
    assert got["preset-hours"] == pytest.approx(110 * 200 / 3600)  # the preset is the measured cell
    # 13 methods x 2 seeds x 200 rounds of (110 s) and (20 + 90 x 2 = 200 s)
    assert got["table2-hours"] == pytest.approx((110 + 200) * 200 * 13 * 2 / 3600)


def test_table2_cells_train_the_sampled_share_of_each_long_tailed_pool():
    defaults, _ = launch.project_settings()
    cells = paper_cost.table2_cells(defaults)
    assert len(cells) == 6 and len(paper_cost.TABLE2_METHODS) == 13 and "ours" in paper_cost.TABLE2_METHODS
    for name, factor in (("CIFAR-10-LT", 100.0), ("CIFAR-100-LT", 10.0)):
        _, classes, per_class = paper_cost.TABLE2_DATASETS[name]
        split = make_split(np.repeat(np.arange(classes), per_class), classes, factor, 10, 20, 0.5, 2, 7)
        assert cells[name, factor] == pytest.approx(len(split.pool) / 20 * 8 * 10)  # 8 of 20 equal clients, 10 epochs
    assert cells["CIFAR-10-LT", 100.0] < cells["CIFAR-10-LT", 50.0] < cells["CIFAR-10-LT", 10.0]


def test_memory_and_folder_copies_hold_the_same_images(tmp_path):
    splits = paper_cost.random_cifar(3, 2, 10, seed=1)
    pngs = paper_cost.write_folder_copy(tmp_path / "folder", splits, paper_cost.CIFAR10_CLASSES)
    paper_cost.write_hf_copy(tmp_path / "hf", splits, paper_cost.CIFAR10_CLASSES, pngs)
    memory = load_dataset("cifar10", str(tmp_path / "hf"), 32)
    folder = load_dataset("folder", str(tmp_path / "folder"), 32)
    assert memory.classes == folder.classes == paper_cost.CIFAR10_CLASSES
    for split in ("train", "test"):
        images, labels = splits[split]
        held, files = getattr(memory, split), getattr(folder, split)
        assert held.images is not None and files.images is None and len(files.files) == len(labels)
        assert np.array_equal(held.labels, labels)
        assert torch.equal(held.images, torch.from_numpy(images).permute(0, 3, 1, 2))
        for c in range(10):  # the folder lists a class's files in their original order
            mine = np.flatnonzero(files.labels == c)
            decoded = [torch.from_numpy(np.asarray(open_image(files.files[i]))).permute(2, 0, 1) for i in mine]
            assert torch.equal(torch.stack(decoded), held.images[held.labels == c])


def resnet8_flops(size: int, projection: int, classes: int) -> int:
    """Forward FLOPs of ResNet-8 + projection + classifier, counted by hand (2 per multiply-add)."""
    s1, s2, s3 = size * size, (size // 2) ** 2, (size // 4) ** 2
    convs = (3 * 64 * 9 + 2 * 64 * 64 * 9) * s1
    convs += (64 * 128 * 9 + 128 * 128 * 9 + 64 * 128) * s2 + (128 * 256 * 9 + 256 * 256 * 9 + 128 * 256) * s3
    return 2 * (convs + 256 * projection + projection * projection + projection * classes)


def test_flops_per_image_match_the_architecture_and_the_device_defaults_to_cpu_float32():
    flops = limits.flops_per_image("resnet8", 64, 10, 16, 4)
    assert flops["forward"] == resnet8_flops(16, 64, 10)
    assert 2.5 < flops["train"] / flops["forward"] <= 3.0  # backward: gradients of inputs and of weights
    assert limits.matmul_flops_per_second("cpu", torch.float32, 1, 128, min_seconds=0.05) > 1e8
    assert limits.device_and_dtype({}) == ("cpu", torch.float32)
    assert limits.device_and_dtype({"device": "cpu", "amp": "off"}) == ("cpu", torch.float32)  # the default
    assert limits.device_and_dtype({"device": "cuda", "amp": "bf16"}) == ("cuda", torch.bfloat16)
    assert limits.device_and_dtype({"device": "cuda", "amp": "fp16"}) == ("cuda", torch.float16)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert limits.device_and_dtype({"device": "auto"})[0] == expected


def test_bad_arguments_stop_before_any_data_is_written(tmp_path, capsys):
    root = tmp_path / "data"
    with pytest.raises(SystemExit) as err:
        paper_cost.main(["--paths", "gpu", "--data-root", str(root)])
    assert err.value.code == 2 and "--paths 'gpu'" in capsys.readouterr().err
    assert paper_cost.main(["--run-config", "colour=blue", "--data-root", str(root)]) == 2
    assert "unknown run-config key" in capsys.readouterr().err and not root.exists()
    (root / "mine").mkdir(parents=True)  # a folder the bench did not write is never cleared
    with pytest.raises(SystemExit):
        paper_cost.main(["--data-root", str(root)])
    assert "did not write" in capsys.readouterr().err and (root / "mine").is_dir()


@pytest.mark.slow
def test_paper_cost_runs_both_paths_end_to_end_on_tiny_random_images(tmp_path, capsys):
    overrides = "imbalance-factor=10 local-epochs=1 image-size=8 projection-dim=32"
    argv = ["--rounds", "2", "--train-per-class", "20", "--test-per-class", "3", "--run-config", overrides]
    argv += ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    assert paper_cost.main(argv) == 0
    out = capsys.readouterr().out
    assert "RANDOM images" in out and "Table 2 grid" in out
    report = json.loads((tmp_path / "out" / "paper-cost.json").read_text())
    assert set(report["paths"]) == {"memory", "folder"}
    for figures in report["paths"].values():
        assert figures["rounds-measured"] == [2] and figures["clients-per-round"] == 8
        assert 0 < figures["train-wait-seconds"] < figures["seconds-per-round"]
        assert 0 < figures["client-limit-ratio"] < 2 and figures["table2-hours"] > figures["preset-hours"] > 0


def test_a_finished_run_with_the_same_settings_is_reported_again_not_rerun(tmp_path, monkeypatch):
    run = tmp_path / "memory" / "123"
    run.mkdir(parents=True)
    settings = {"dataset": "cifar10", "data-dir": "/d", "num-server-rounds": 2, "output-dir": str(tmp_path / "memory")}
    (run / "config.json").write_text(json.dumps({**settings, "local-epochs": 1, "seed": 7}))
    write_run(run, rows((5.0, 4.0, 1.0, 1.0)), {})
    launched = []
    monkeypatch.setattr(runs.subprocess, "Popen", lambda *a, **k: launched.append(a) or 1 / 0)
    assert len(paper_cost.run_path("memory", "/d", 2, "local-epochs=1", tmp_path)) == 2 and not launched
    with pytest.raises(ZeroDivisionError):  # other settings: a new run is launched
        paper_cost.run_path("memory", "/d", 2, "local-epochs=2", tmp_path)
    assert len(launched) == 1


def test_the_federation_config_reaches_the_launch_so_clients_can_take_a_gpu_share(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(runs.subprocess, "Popen", lambda cmd, **k: commands.append(cmd) or 1 / 0)
    share = "client-resources-num-gpus=0.125"
    for federation in ("", share):
        with pytest.raises(ZeroDivisionError):
            paper_cost.run_path("memory", "/d", 2, "device=cuda", tmp_path, federation)
    without, with_share = commands
    output_dir = ["--run-config", f'output-dir="{tmp_path / "memory"}"']
    assert "--federation-config" not in without and without[-4:] == ["--run-config", "device=cuda", *output_dir]
    assert with_share[-4:] == [*output_dir, "--federation-config", share]
    assert without[:4] == [sys.executable, "-m", "server_app.launch", "--run-config"]
    assert without[4] == str(paper_cost.PRESET)  # the preset first: the bench's settings and --run-config win
