"""Every input problem that can be known before round 1 stops the launcher with exit code 2 and one line
naming the key or file, before any Flower process starts; inputs read later never crash a run."""

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deploy import local_cluster
from flcore.config import ConfigError
from flcore.datasets import DataNotFound, load
from flcore.images import check_images
from flcore.memory import check_memory
from flcore.models import build_model
from pretrain.checkpoints import CacheError, Checkpoints
from pretrain.dwp import DWPConfig, DWPError, build_gfl, train_dwp
from pretrain.llava_data import LlavaSamples, Record
from pretrain.stage import check as pretrain_check
from pretrain.teacher import tiny_teacher
from rounds import checkpoint
from server_app import launch
from tests.helpers import TINY, run_config, validated


def launch_error(capsys, overrides: str, *files: str) -> str:
    """The launcher's one-line error for `overrides` (exit code 2, nothing started)."""
    args = ["--run-config", f"{run_config(TINY)} {overrides}".strip()]
    for file in files:
        args += ["--run-config", file]
    assert launch.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def png_claiming(path: Path, width: int, height: int) -> None:
    """A 50-byte PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)))


def folder_dataset(root: Path, classes=("cat", "dog"), per_class=12) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == "train" else 3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


FOLDER = "dataset=folder num-clients=2 align-per-class=1 min-partition-size=1 imbalance-factor=1.0"


# --- 7: the run config itself -------------------------------------------------------------------------


def test_missing_or_malformed_run_config_files_are_named(no_superlink, capsys, tmp_path):
    assert "'missing.toml' cannot be read" in launch_error(capsys, "", "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("seed = = 3\n")
    assert f"'{broken}' is not valid TOML" in launch_error(capsys, "", str(broken))


def test_seeds_and_integers_are_bounded_to_what_numpy_torch_and_flower_accept():
    with pytest.raises(ConfigError, match="'seed' = 99999999999999999999.*<= 2147483647"):
        validated({"seed": 99999999999999999999})
    with pytest.raises(ConfigError, match="'num-server-rounds' = .*64-bit"):
        validated({"num-server-rounds": 2**70})
    torch.manual_seed(2**31 - 1)
    np.random.default_rng(2**31 - 1)


@pytest.mark.parametrize(
    ("overrides", "key"), [("num-clients=100000", "num-clients"), ("align-per-class=1000", "align-per-class")]
)
def test_a_split_the_data_cannot_give_names_the_key(no_superlink, capsys, overrides, key):
    assert f"run-config key '{key}'" in launch_error(capsys, overrides)


def test_settings_beyond_the_machines_memory_are_refused_with_the_estimate(no_superlink, capsys):
    err = launch_error(capsys, "head=mlp projection-dim=100000000")
    assert "'projection-dim' = 100000000" in err and "GiB per training process" in err
    cfg = validated({"model": "resnet50", "image-size": 1024})
    with pytest.raises(ConfigError, match=r"'image-size' = 1024.*need about 8\d\.\d GiB.*this machine's 64\.0 GiB"):
        check_memory(cfg, 1000, available=64 * 2**30)
    assert check_memory(validated(), 10, available=2**30).total < 2**30
    huge_batch = validated({"batch-size": 10_000_000, "image-size": 8})
    with pytest.raises(ConfigError, match=r"'batch-size' = 10000000 is not allowed here"):  # not 'image-size'
        check_memory(huge_batch, 10, available=2**30)


def test_a_dataset_too_large_at_the_image_size_is_refused_before_it_is_decoded(no_superlink, capsys, monkeypatch):
    """Issue 28 item 1: image-size=1024 model=resnet50 decoded and upsampled the digits (20 GB) before the memory
    check ran, and the kernel killed the launcher. The data is now sized from its image count first."""
    from flcore import datasets, memory

    def forbidden(*args, **kwargs):
        raise AssertionError("the dataset was decoded before the memory check")

    monkeypatch.setattr(datasets, "LOADERS", {name: forbidden for name in datasets.LOADERS})
    err = launch_error(capsys, "image-size=1024 model=resnet50")
    assert "'image-size' = 1024" in err and "digits images decoded at this size hold 10.8 GiB" in err
    monkeypatch.setattr(memory, "physical_memory", lambda: 2**30)  # the model fits, the data does not
    err = launch_error(capsys, "image-size=224 model=resnet50 batch-size=1")
    assert "'image-size' = 224" in err and "hold 0.8 GiB besides, more than this machine's 1.0 GiB" in err


def test_resizing_in_chunks_gives_the_images_resizing_at_once_gives(monkeypatch):
    from flcore import datasets

    images = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    whole = datasets.resize(images, 20)
    monkeypatch.setattr(datasets, "RESIZE_CHUNK_BYTES", 3 * 20 * 20 * 4 * 2)  # two images a chunk
    assert torch.equal(datasets.resize(images, 20), whole)


def test_an_output_dir_that_cannot_take_files_is_refused_before_start(no_superlink, capsys, tmp_path):
    err = launch_error(capsys, "output-dir=/proc/x")
    assert "'output-dir' = '/proc/x' is not allowed: the run cannot write there" in err
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root writes anywhere a mode allows: only /proc speaks for it then
        return
    assert "cannot write there" in launch_error(capsys, f"output-dir={read_only}")


def test_resume_from_a_model_file_names_the_file(tmp_path):
    model = tmp_path / "model.pt"
    torch.save(build_model("resnet8", 8, 10).state_dict(), model)
    cfg = validated({"resume": str(model)})
    with pytest.raises(ConfigError, match=f"'resume': {model} is not a run checkpoint"):
        checkpoint.load(cfg)


# --- 4, 5, 7: dataset files ----------------------------------------------------------------------------


def test_a_test_class_without_a_train_twin_is_refused(tmp_path):
    root = folder_dataset(tmp_path / "data")
    (root / "test" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "bird" / "0.png")
    with pytest.raises(DataNotFound, match=r"\['bird'\].*no twin"):
        load("folder", str(root), 8)


def test_an_empty_class_folder_in_train_is_refused_naming_the_class(no_superlink, capsys, tmp_path):
    """Issue 28 item 9: a train/ class folder without images (its test/ twin has some) ran to the end silently."""
    root = folder_dataset(tmp_path / "data", classes=("bird", "cat", "dog"))
    for image in (root / "train" / "bird").iterdir():
        image.unlink()
    err = launch_error(capsys, f"{FOLDER} data-dir={root}")
    assert "['bird']" in err and "hold no images" in err and str(root / "train") in err


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("kind", ["corrupt", "empty", "bomb"])
def test_unusable_images_stop_the_launcher_naming_the_file(no_superlink, capsys, tmp_path, split, kind):
    root = folder_dataset(tmp_path / "data")
    bad = root / split / "dog" / "0.png"
    if kind == "corrupt":
        bad.write_bytes(bad.read_bytes()[:40])
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        png_claiming(bad, 20_000, 20_000)
    err = launch_error(capsys, f"{FOLDER} data-dir={root} output-dir={tmp_path / 'out'}")
    assert f"image '{bad}'" in err and "'data-dir'" in err


def test_large_image_sets_are_checked_by_a_seeded_sample(tmp_path, monkeypatch):
    from flcore import images

    monkeypatch.setattr(images, "DECODE_ALL", 5)
    monkeypatch.setattr(images, "SAMPLE", 3)
    files = [str(tmp_path / f"{i}.png") for i in range(8)]
    for f in files:
        Image.new("RGB", (4, 4)).save(f)
    assert check_images(files, "data-dir") == "a sample of 3 of 8 (the rest as they are read)"


def test_an_unsampled_bad_image_is_named_when_it_is_read(tmp_path):
    from flcore.batches import Batches
    from flcore.datasets import Dataset, ImageSet

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    images = ImageSet(np.zeros(1, dtype=np.int64), files=(str(bad),))
    dataset = Dataset(images, images, ("a",), (0.5,) * 3, (0.5,) * 3, natural=True)
    with pytest.raises(DataNotFound, match=f"image '{bad}' cannot be decoded"):
        next(Batches(images, dataset, 8, 1).iterate())


@pytest.mark.parametrize("damage", ["empty folder", "truncated batch", "broken dataset_dict.json"])
def test_broken_cifar_copies_say_so_without_download_advice(no_superlink, capsys, tmp_path, damage):
    if damage == "empty folder":
        (tmp_path / "cifar-10-batches-py").mkdir()
    elif damage == "truncated batch":
        (tmp_path / "cifar-10-batches-py").mkdir()
        (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04\x95")
    else:
        (tmp_path / "dataset_dict.json").write_text("{broken")
    err = launch_error(capsys, f"dataset=cifar10 data-dir={tmp_path}")
    assert "incomplete or corrupt" in err and "download=True" not in err


def cluster_error(monkeypatch, capsys, *args: str) -> str:
    """`python -m deploy.local_cluster`'s one-line error for `args` (exit code 2, no process started)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("no SuperLink or SuperNode may start on bad input")

    monkeypatch.setattr(local_cluster, "LocalCluster", forbidden)
    assert local_cluster.main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_the_local_cluster_refuses_bad_input_with_the_launchers_preflight(no_superlink, monkeypatch, capsys, tmp_path):
    """deploy.local_cluster runs the preflight the launcher runs; a bad input ended in an AttributeError."""
    assert "--nodes 0: expected at least 1 SuperNode" in cluster_error(monkeypatch, capsys, "--nodes", "0")
    server = folder_dataset(tmp_path / "server")
    shutil.rmtree(server / "train")  # the server holds the test split only, and D_align would come from train/
    nodes = [arg for i in range(2) for arg in ("--node-data", str(folder_dataset(tmp_path / f"node{i}")))]
    where = f"dataset=folder data-dir={server} output-dir={tmp_path / 'out'}"
    err = cluster_error(monkeypatch, capsys, *nodes, "--run-config", f"strategy=ratioloss {where}")
    assert f"folder dataset needs '{server / 'train'}'" in err
    err = cluster_error(monkeypatch, capsys, *nodes, "--run-config", f"strategy=clip2fl align-teacher=holdout {where}")
    assert "'align-teacher' = 'holdout' is not allowed with strategy 'clip2fl' and client-data 'local'" in err


def bad_cluster_input(rng: np.random.Generator, tmp_path: Path) -> list[str]:
    """One bad input to deploy.local_cluster, drawn from the kinds of mistakes a user makes."""
    word = "x" + "".join(rng.choice(list("abcdefghij"), 5))  # never a TOML number or bool
    key = str(rng.choice(["seed", "batch-size", "local-epochs", "image-size", "lr", "dirichlet-alpha"]))
    kinds = [
        ["--nodes", str(int(rng.integers(-5, 1)))],
        ["--nodes", str(rng.choice(["two", "1.5", "", "3e2", "0x"]))],
        ["--nodes"],
        [f"--{word}"],
        ["--node-data", str(tmp_path / word)],
        ["--node-data", "/etc/passwd"],
        ["--workdir", f"/proc/{word}"],
        ["--workdir", "/etc/passwd"],
        ["--run-config", f"{word}=1"],
        ["--run-config", f"{key}={word}"],
        ["--run-config", f'{key}="{word}'],
        ["--run-config", word],
        ["--run-config", str(tmp_path / f"{word}.toml")],
        ["--run-config", f"{key}=-{int(rng.integers(1, 10**6))}"],
    ]
    return kinds[int(rng.integers(len(kinds)))]


def test_a_fuzz_of_the_local_clusters_inputs_exits_2_with_one_line_each(no_superlink, monkeypatch, capsys, tmp_path):
    """Issue 28 item 2: each bad input to deploy.local_cluster, alone or among good ones, is one line and exit 2,
    no traceback, no process started (argparse's own errors printed a usage block and raised SystemExit)."""
    rng = np.random.default_rng(28)
    good = [["--insecure"], ["--workdir", str(tmp_path / "work")], ["--run-config", "num-server-rounds=2"]]
    kinds = set()
    for _ in range(60):
        args = [*bad_cluster_input(rng, tmp_path)]
        for extra in rng.permutation(len(good))[: int(rng.integers(0, 3))]:
            args = [*good[extra], *args] if rng.random() < 0.5 else [*args, *good[extra]]
        kinds.add(cluster_error(monkeypatch, capsys, *args).split(":")[1])
    assert len(kinds) >= 5  # the draws reached several of the checks


def test_the_launchers_own_argument_errors_are_one_line_too(no_superlink, capsys):
    assert "unrecognized arguments: --bogus" in launch_error_args(capsys, "--bogus")
    assert "expected one argument" in launch_error_args(capsys, "--run-config")


def launch_error_args(capsys, *args: str) -> str:
    assert launch.main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


# --- 6, 7, 10: pretraining data and its cache ------------------------------------------------------------


def chat_file(path: Path, images: list[str]) -> Path:
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A digit."}]
    path.write_text(json.dumps([{"id": str(i), "image": im, "conversations": turns} for i, im in enumerate(images)]))
    return path


def pretrain_cfg(tmp_path: Path, data: Path, **extra) -> dict:
    raw = {"pretrain": True, "pretrain-data": str(data), "pretrain-cache-dir": str(tmp_path / "cache"), **extra}
    return validated(raw)


def test_stage_inputs_that_cannot_work_are_refused_before_start_naming_the_key(no_superlink, capsys, tmp_path):
    """Issue 28 item 4: a pretrain-data folder without images failed late ("no records"), a teacher path that
    does not exist raised the hub's HFValidationError (exit 1), and a text file as align-pretrained failed late
    in torch's unpickler."""
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    err = launch_error(capsys, f"pretrain=true pretrain-data={tmp_path / 'empty'}")
    assert "'pretrain-data'" in err and "no image files" in err
    err = launch_error(capsys, "pretrain=true pretrain-teacher=/nonexistent/llava")
    assert "'pretrain-teacher' = '/nonexistent/llava': no such folder" in err
    err = launch_error(capsys, "align=true align-teacher=RN50 projection-dim=1024 align-pretrained=/etc/passwd")
    assert "'align-pretrained' = '/etc/passwd' is not a checkpoint" in err


def test_checkpoint_files_open_clip_can_load_pass_the_format_check(tmp_path):
    from safetensors.torch import save_file

    from alignment.teacher import checkpoint_format

    weights = {"w": torch.zeros(2)}
    torch.save(weights, tmp_path / "new.pt")
    torch.save(weights, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    save_file(weights, str(tmp_path / "w.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 8 + b"{")
    found = [checkpoint_format(tmp_path / n) for n in ("new.pt", "old.pt", "w.safetensors", "bad.safetensors")]
    assert found == ["zip", "pickle", "safetensors", None]


def test_pretraining_records_outside_the_image_folder_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    data = chat_file(tmp_path / "chat.json", ["../../../../etc/passwd"])
    with pytest.raises(ConfigError, match="'pretrain-data'.*'../../../../etc/passwd', outside the image folder"):
        pretrain_check(pretrain_cfg(tmp_path, data, **{"pretrain-image-dir": str(tmp_path / "images")}))


def test_pretraining_records_whose_images_are_all_missing_are_refused(tmp_path):
    data = chat_file(tmp_path / "chat.json", ["gone-1.png", "gone-2.png"])
    with pytest.raises(ConfigError, match="none of the 2 images checked can be read"):
        pretrain_check(pretrain_cfg(tmp_path, data))


def test_a_malformed_pretraining_file_stops_the_launcher_with_file_and_line(no_superlink, capsys, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text('{"id": "a"}\n')
    err = launch_error(capsys, f"pretrain=true pretrain-data={data} pretrain-cache-dir={tmp_path / 'cache'}")
    assert f"{data}:1: record lacks 'image'" in err


def test_an_image_link_leading_outside_the_folder_is_skipped_as_failed(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (12, 12)).save(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    teacher = tiny_teacher()
    turns = (("human", "<image>\nq"), ("gpt", "a"))
    data = LlavaSamples([Record("0", "link.png", turns)], root, teacher, 16, (0.5,) * 3, (0.5,) * 3)
    assert data.batch([0], need_clip=False) is None and data.failed == {"link.png"}


def test_a_pretraining_that_trains_zero_steps_fails_and_caches_nothing(tmp_path):
    teacher = tiny_teacher()
    turns = (("human", "<image>\nq"), ("gpt", "a"))
    data = LlavaSamples([Record("0", "gone.png", turns)], tmp_path, teacher, 16, (0.5,) * 3, (0.5,) * 3)
    gfl = build_gfl(build_model("resnet8", 16, 10, seed=0), teacher)
    ckpt = Checkpoints(tmp_path / "dwp")
    with pytest.raises(DWPError, match="trained zero steps"):
        train_dwp(teacher, gfl, data, DWPConfig(epochs=1, batch_size=2), ckpt)
    assert list(ckpt.root.iterdir()) == []
    ckpt.save_final(gfl.state_dict(), {"steps": 0})  # as an older version could leave it
    assert ckpt.final() is None


class Planted:
    """A pickle that creates a file when it is loaded (a shell command would do the same)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_cache_file_is_refused_and_never_runs(tmp_path):
    ckpt = Checkpoints(tmp_path / "dwp")
    marker = tmp_path / "pwned"
    torch.save({"gfl": Planted(marker), "meta": {"steps": 5}}, ckpt.final_path)
    with pytest.raises(CacheError, match=f"{ckpt.final_path} is not a pretraining checkpoint"):
        ckpt.final()
    assert not marker.exists()


def test_what_pretraining_saves_loads_with_weights_only(tmp_path):
    teacher = tiny_teacher()
    gfl = build_gfl(build_model("resnet8", 16, 10, seed=0), teacher)
    ckpt = Checkpoints(tmp_path / "dwp")
    opt = torch.optim.AdamW(gfl.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"step": 1, "gfl": gfl.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "losses": [1.0]}
    ckpt.save_epoch(1, state)
    ckpt.save_final(gfl.state_dict(), {"steps": 1, "annotation": {"source": "x", "failed": []}, "loss": [0.5]})
    assert ckpt.latest()["epoch"] == 1 and ckpt.final()["meta"]["steps"] == 1
