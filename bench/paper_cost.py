"""What the paper's settings cost on this device: a few rounds of the CIFAR-10-LT preset, measured, then projected.

1. Data. CIFAR-10 from `--data-dir` when it holds a copy the `cifar10` loader reads; otherwise CIFAR-shaped
   random images (50,000 train and 10,000 test 32x32 RGB images, 5,000 and 1,000 per class, pixels uniform
   in 0..255), and the output says so: training costs the same whatever the pixels are. The same images
   are written once under `--data-root` as two copies: an HF `save_to_disk` copy, which the `cifar10`
   loader decodes into memory (the in-memory path), and a `folder` copy, one PNG per image, which the
   `folder` loader reads and decodes batch by batch (the file path; where the schema has `num-workers`,
   a DataLoader's workers do that). With a real `--data-dir` only the folder copy is written.
2. Runs. For each path in `--paths`, one real run: `python -m server_app.launch` with `conf/cifar10-lt.toml`,
   `num-server-rounds=--rounds` and `--run-config` (where `device`, `amp`, `num-workers` go when the schema
   has them). Round 1 is left out of the figures (the ClientApp actors load the dataset in it). A run that
   already finished in `--out` with the same settings is reported again, not rerun.
3. Figures, from each run's metrics.jsonl: seconds per round; the wait for the clients' training
   (`train-wait-seconds`) and the share of the round outside it (aggregation, evaluation of the test split,
   sampling, messaging set-up); training images per second per client (`train-images-per-second`, the
   clients' own loop) and of the whole device during the wait; each against its limit: what the device
   reaches on a large matmul of the run's dtype (the fastest of many products, before and after the
   runs; on a CPU with one client's threads, and with all, at least the threads times one thread's rate),
   divided by the FLOPs of one training image (`torch.utils.flop_counter`: forward and backward of the
   preset's model, per image).
4. Projection: 200 rounds of the preset, and the paper's Table 2 grid (CIFAR-10-LT and CIFAR-100-LT, IF 100,
   50 and 10, the 12 baselines and the method, `--seeds` seeds). A cell's round costs the measured time
   outside client training plus the measured wait scaled by the images its clients train per round (its
   long-tailed pool differs). Every method is costed at FedAvg's round: the server-side work of CCVR,
   CReFF, CLIP2FL, FedDF and FedBE and the stages' one-time costs come on top, so the grid is a lower bound.

Usage: python -m bench.paper_cost [--rounds 3] [--paths memory,folder] [--data-dir DIR] [--run-config "k=v ..."]
                                 [--federation-config "client-resources-num-gpus=0.125"]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.compare import METHODS
from bench.limits import device_and_dtype, flops_per_image, limit_ratio, matmul_flops_per_second
from bench.runs import LOG, ROOT, failure, launch_run, run_dirs
from flcore.batches import Batches
from flcore.config import ConfigError, Settings, validate
from flcore.datasets import DataNotFound
from flcore.datasets import load as load_dataset
from flcore.partition import make_split
from flcore.reports import read_metrics
from flcore.run_config import parse_overrides, read_toml
from server_app import launch

PRESET = ROOT / "conf" / "cifar10-lt.toml"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PATHS = ("memory", "folder")
COPY_MARKER = "copy.json"  # in --data-root: what the copies there hold; only a folder with it is rewritten
# The paper's Table 2: two datasets (preset, classes, training images per class), three IFs, twelve
# baselines (the first twelve of bench/compare.py's METHODS) and the method itself.
TABLE2_DATASETS = {"CIFAR-10-LT": ("cifar10-lt.toml", 10, 5000), "CIFAR-100-LT": ("cifar100-lt.toml", 100, 500)}
TABLE2_IFS = (100.0, 50.0, 10.0)
TABLE2_METHODS = (*list(METHODS)[:12], "ours")


@dataclass(frozen=True)
class RoundCost:
    """One run's mean round: wall seconds, seconds waiting for client training, images trained in it."""

    seconds: float
    wait: float
    images: float

    @property
    def outside(self) -> float:
        """Seconds of the round outside client training (server work, evaluation, messaging set-up)."""
        return self.seconds - self.wait


def steady_rows(rows: Sequence[Mapping]) -> list[Mapping]:
    """The trained rounds without round 1 (actors load the data in it), unless it is the only one."""
    trained = [r for r in rows if r["round"] > 0]
    return trained[1:] or trained


def mean(rows: Sequence[Mapping], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def round_cost(rows: Sequence[Mapping], images_per_round: float) -> RoundCost:
    """The mean steady round of a run (`rows` from its metrics.jsonl)."""
    steady = steady_rows(rows)
    return RoundCost(mean(steady, "seconds"), mean(steady, "train-wait-seconds"), images_per_round)


def images_per_round(client_sizes: Sequence[int], sampled: int, epochs: int) -> float:
    """Images the sampled clients train in one round: equal-sized clients (CReFF's split), so the mean size."""
    return float(np.mean(client_sizes)) * sampled * epochs


def projected_round_seconds(measured: RoundCost, images: float) -> float:
    """A round that trains `images`: the measured time outside client training plus the wait, scaled."""
    return measured.outside + measured.wait * images / measured.images


def grid_hours(measured: RoundCost, cell_images: Sequence[float], rounds: int, methods: int, seeds: int) -> float:
    """Hours of a grid whose cells (one per dataset and IF) train `cell_images` per round, for every method
    and seed, each cell `rounds` rounds long."""
    per_method = sum(projected_round_seconds(measured, n) * rounds for n in cell_images)
    return per_method * methods * seeds / 3600


def random_cifar(train_per_class: int, test_per_class: int, num_classes: int, seed: int) -> dict[str, tuple]:
    """CIFAR-shaped random images (uint8 NHWC) with balanced labels in shuffled order, per split."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
        out[split] = (rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels)
    return out


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_folder_copy(root: Path, splits: Mapping[str, tuple], classes: Sequence[str]) -> list[list[bytes]]:
    """root/<split>/<class>/<position>.png for every image; returns each split's PNG bytes in order."""
    encoded = []
    for split, (images, labels) in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        pngs = [png_bytes(img) for img in images]
        for i, (data, label) in enumerate(zip(pngs, labels, strict=True)):
            (root / split / classes[label] / f"{i:06d}.png").write_bytes(data)
        encoded.append(pngs)
    return encoded


def write_hf_copy(root: Path, splits: Mapping[str, tuple], classes: Sequence[str], pngs: Sequence[list]) -> None:
    """The same images as an HF `save_to_disk` copy with CIFAR-10's columns (`img`, `label`)."""
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))})
    parts = {}
    for (split, (_, labels)), encoded in zip(splits.items(), pngs, strict=True):
        rows = {"img": [{"bytes": b, "path": None} for b in encoded], "label": [int(v) for v in labels]}
        parts[split] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(root))


def prepare_data(args: argparse.Namespace) -> tuple[dict[str, str], str]:
    """data-dir per path and a line saying what the images are; copies are written once and reused."""
    root = Path(args.data_root).expanduser().resolve()
    if args.data_dir:
        source = {"data-dir": str(Path(args.data_dir).expanduser().resolve())}
    else:
        source = {"random": [args.train_per_class, args.test_per_class, args.seed]}
    marker = root / COPY_MARKER
    if not (marker.is_file() and json.loads(marker.read_text()) == source):
        shutil.rmtree(root, ignore_errors=True)  # ours: `main` refuses a folder without the marker
        root.mkdir(parents=True)
        marker.write_text(json.dumps({"writing": source}))  # an interrupted copy is still known as ours
        start = time.perf_counter()
        if args.data_dir:
            real = load_dataset("cifar10", source["data-dir"], 32)
            splits = {
                s: (x.images.permute(0, 2, 3, 1).numpy(), x.labels)
                for s, x in (("train", real.train), ("test", real.test))
            }
            write_folder_copy(root / "folder", splits, real.classes)
        else:
            splits = random_cifar(args.train_per_class, args.test_per_class, 10, args.seed)
            pngs = write_folder_copy(root / "folder", splits, CIFAR10_CLASSES)
            write_hf_copy(root / "hf", splits, CIFAR10_CLASSES, pngs)
        marker.write_text(json.dumps(source))
        print(f"data copies written under {root} in {time.perf_counter() - start:.1f} s", flush=True)
    if args.data_dir:
        what = f"CIFAR-10 from {source['data-dir']} (folder copy under {root})"
        return {"memory": source["data-dir"], "folder": str(root / "folder")}, what
    n_train, n_test = 10 * args.train_per_class, 10 * args.test_per_class
    what = (
        f"CIFAR-shaped RANDOM images (no CIFAR-10 given: {n_train} train / {n_test} test, 32x32 RGB, 10 classes; "
        f"training costs the same, accuracy means nothing), copies under {root}"
    )
    return {"memory": str(root / "hf"), "folder": str(root / "folder")}, what


def finished_rows(cell: Path, expected: Mapping) -> list[dict] | None:
    """The metrics of a run in `cell` that finished with the `expected` settings (a rerun reports it again)."""
    for run in run_dirs(cell, finished=True):
        config = json.loads((run / "config.json").read_text())
        if all(config.get(k) == v for k, v in expected.items()):
            return read_metrics(run)
    return None


def run_path(path: str, data_dir: str, rounds: int, extra: str, out: Path, federation: str = "") -> list[dict]:
    """One real launch of the preset on this data path (or its finished run in `out`); its metrics.jsonl rows."""
    cell = out / path
    pairs = {
        "dataset": "cifar10" if path == "memory" else "folder",
        "data-dir": data_dir,
        "num-server-rounds": rounds,
        "output-dir": str(cell),
    }
    done = finished_rows(cell, {**pairs, **parse_overrides([extra])})
    if done is not None:
        print(f"[{path}] reporting the finished run in {cell}", flush=True)
        return done
    print(f"[{path}] running {rounds} round(s) of {PRESET.name}; log: {cell / LOG}", flush=True)
    load = os.getloadavg()[0]
    if not launch_run(cell, PRESET, pairs, extra, federation=federation):
        raise SystemExit(failure(cell, f"the {path} run"))
    (cell / "load.json").write_text(json.dumps([load, os.getloadavg()[0]]))
    return finished_rows(cell, pairs) or []


def split_images(cfg: Settings, labels: np.ndarray, num_classes: int) -> float:
    """Images trained per round under `cfg` (a run's or a preset's settings) on a training split with `labels`."""
    split = make_split(
        labels,
        num_classes,
        cfg.imbalance_factor,
        cfg.align_per_class,
        cfg.num_clients,
        cfg.dirichlet_alpha,
        cfg.min_partition_size,
        cfg.seed,
        partitioner=cfg.partitioner,
    )
    return images_per_round([len(c) for c in split.clients], cfg.clients_per_round, cfg.local_epochs)


def table2_cells(defaults: Mapping) -> dict[tuple[str, float], float]:
    """Images trained per round in each Table 2 cell: each dataset's preset, its IFs, labels alone."""
    cells = {}
    for name, (preset, classes, per_class) in TABLE2_DATASETS.items():
        preset_cfg = validate({**defaults, **read_toml(ROOT / "conf" / preset)}, paths=False)
        labels = np.repeat(np.arange(classes), per_class)
        for factor in TABLE2_IFS:
            cells[name, factor] = split_images(preset_cfg.with_(imbalance_factor=factor), labels, classes)
    return cells


@dataclass(frozen=True)
class Limits:
    """FLOPs of one training image and the matmul rates of one client's share and of the whole device."""

    flops_per_image: float
    client_flops_per_second: float
    device_flops_per_second: float


def batching_seconds_per_image(data_dirs: Mapping[str, str], image_size: int, batch: int, images: int) -> dict:
    """Seconds per image to batch (and augment) the same `images` training images from each path, no model:
    the two paths timed back to back, five times, the fastest kept, so other load does not tilt the
    comparison as it can between two runs an hour apart."""
    sets = {}
    for path, data_dir in data_dirs.items():
        dataset = load_dataset("cifar10" if path == "memory" else "folder", data_dir, image_size)
        order = np.argsort(dataset.train.labels, kind="stable")[:: max(1, len(dataset.train) // images)][:images]
        sets[path] = Batches(dataset.train.subset(order), dataset, image_size, batch)
    best = dict.fromkeys(sets, float("inf"))
    for _ in range(5):
        for path, batches in sets.items():
            start = time.perf_counter()
            for _ in batches.iterate(shuffle=True, augment=True, gen=torch.Generator().manual_seed(0)):
                pass
            best[path] = min(best[path], (time.perf_counter() - start) / len(batches.data))
    return best


def path_figures(rows: Sequence[Mapping], images: float, limits: Limits, cells: Mapping, seeds: int) -> dict:
    """One run's figures: round time and its parts, throughput against the limits, projected hours."""
    steady = steady_rows(rows)
    cost = round_cost(rows, images)
    client_rate = mean(steady, "train-images-per-second")
    device_rate = images / cost.wait
    rounds = int(read_toml(PRESET)["num-server-rounds"])
    preset_round = projected_round_seconds(cost, cells["CIFAR-10-LT", float(read_toml(PRESET)["imbalance-factor"])])
    return {
        "rounds-measured": [r["round"] for r in steady],
        "seconds-per-round": cost.seconds,
        "train-wait-seconds": cost.wait,
        "outside-client-training-share": cost.outside / cost.seconds,
        "images-per-round": images,
        "clients-per-round": mean(steady, "replies"),
        "client-train-seconds": mean(steady, "train-seconds"),
        "clients-training-at-once": mean(steady, "train-seconds") * mean(steady, "replies") / cost.wait,
        "images-per-second-per-client": client_rate,
        "client-limit-ratio": limit_ratio(client_rate, limits.flops_per_image, limits.client_flops_per_second),
        "images-per-second-device": device_rate,
        "device-limit-ratio": limit_ratio(device_rate, limits.flops_per_image, limits.device_flops_per_second),
        "preset-hours": preset_round * rounds / 3600,
        "table2-hours": grid_hours(cost, list(cells.values()), rounds, len(TABLE2_METHODS), seeds),
    }


def print_report(report: Mapping, seeds: int) -> None:
    """The figures of every path side by side, then what they rest on."""
    paths = report["paths"]
    lines = [
        ("seconds per round", "seconds-per-round", "{:.1f}"),
        ("  waiting for client training", "train-wait-seconds", "{:.1f}"),
        ("  share outside client training", "outside-client-training-share", "{:.1%}"),
        ("clients per round / training at once", None, None),
        ("images/s per client (client loop)", "images-per-second-per-client", "{:.1f}"),
        ("  of the one-client matmul limit", "client-limit-ratio", "{:.1%}"),
        ("images/s of the device (during the wait)", "images-per-second-device", "{:.1f}"),
        ("  of the whole-device matmul limit", "device-limit-ratio", "{:.1%}"),
        ("batching alone (back to back), microseconds per image", "batching-seconds-per-image", "{:.0f}"),
        ("load average at the run's start / end", "run-load-average", "{}"),
        ("200 rounds of the preset, hours", "preset-hours", "{:.1f}"),
        (f"Table 2 grid ({len(TABLE2_METHODS)} methods x 6 cells x {seeds} seed), hours", "table2-hours", "{:,.0f}"),
    ]
    print(f"\n{'':<52}" + "".join(f"{p:>14}" for p in paths))
    for label, key, fmt in lines:
        if key is None:
            cells = [f"{f['clients-per-round']:.0f} / {f['clients-training-at-once']:.2f}" for f in paths.values()]
        elif key == "batching-seconds-per-image":
            cells = [f"{f[key] * 1e6:.0f}" for f in paths.values()]
        elif key == "run-load-average":
            cells = ["n/a" if f[key] is None else "{:.1f} / {:.1f}".format(*f[key]) for f in paths.values()]
        else:
            cells = [fmt.format(f[key]) for f in paths.values()]
        print(f"{label:<52}" + "".join(f"{c:>14}" for c in cells))
    flops, peak = report["flops-per-image"], report["matmul-flops-per-second"]
    print(
        f"\ndevice {report['device']}, {report['dtype']}; load average now {report['load-average-at-report']:.2f}\n"
        f"model FLOPs per image: forward {flops['forward'] / 1e6:.1f} M, training step {flops['train'] / 1e6:.1f} M\n"
        f"matmul {peak['size']}x{peak['size']}: {peak['client'] / 1e9:.1f} GFLOP/s with one client's threads, "
        f"{peak['device'] / 1e9:.1f} GFLOP/s on the whole device\n"
        f"images per round in the Table 2 cells: "
        + ", ".join(f"{k} {v:,.0f}" for k, v in report["table2-images-per-round"].items())
    )


def matmul_size(device: str) -> int:
    return 1024 if device == "cpu" else 8192


def matmul_rates(device: str, dtype: torch.dtype, per_client: int, threads: int) -> tuple[float, float]:
    """One client's and the whole device's matmul rate. On a CPU the whole device is at least its threads
    times one client's rate: a shared CPU rarely frees every core at once for the all-thread product."""
    one = matmul_flops_per_second(device, dtype, per_client, matmul_size(device))
    every = matmul_flops_per_second(device, dtype, threads, matmul_size(device))
    return one, (max(every, one * threads / per_client) if device == "cpu" else every)


def checked_settings(run_config: str, defaults: Mapping) -> Settings:
    """The preset with the overrides, validated before any data is written (on digits: the copy the runs
    read does not exist yet, and the dataset's own checks run in each launch)."""
    overrides = parse_overrides([str(PRESET), run_config])
    cfg, _ = launch.resolve({**overrides, "dataset": "digits", "data-dir": ""}, defaults)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.paper_cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (round 1 is left out of the figures)")
    parser.add_argument("--paths", default=",".join(PATHS), help="memory, folder or both (comma-separated)")
    parser.add_argument("--data-dir", default="", help="a real CIFAR-10 copy (default: random CIFAR-shaped images)")
    parser.add_argument("--data-root", default=str(ROOT / "outputs" / "paper-cost-data"), help="where copies go")
    parser.add_argument("--train-per-class", type=int, default=5000)
    parser.add_argument("--test-per-class", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per Table 2 cell in the projection")
    parser.add_argument("--batching-images", type=int, default=640, help="images per path in the batching timing")
    parser.add_argument("--run-config", default="", help="overrides for every run (e.g. device, amp, num-workers)")
    parser.add_argument(
        "--federation-config",
        default="",
        help="client resources of each run, e.g. 'client-resources-num-gpus=0.125' to put the clients on a GPU",
    )
    parser.add_argument("--out", default="", help="folder for the runs and paper-cost.json (default: a temp folder)")
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if not paths or set(paths) - set(PATHS):
        parser.error(f"--paths {args.paths!r}: expected memory, folder or both, comma-separated")
    if args.rounds < 1 or min(args.train_per_class, args.test_per_class, args.seeds) < 1:
        parser.error("--rounds, --train-per-class, --test-per-class and --seeds must be >= 1")
    root = Path(args.data_root).expanduser()
    if root.is_dir() and any(root.iterdir()) and not (root / COPY_MARKER).is_file():
        parser.error(f"--data-root {str(root)!r} holds files this bench did not write; name a new or empty folder")
    defaults, simulation = launch.project_settings()
    try:
        cfg = checked_settings(args.run_config, defaults)
        data_dirs, what = prepare_data(args)
    except (ConfigError, DataNotFound) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"data: {what}", flush=True)
    out = Path(args.out or tempfile.mkdtemp(prefix="paper-cost-")).resolve()
    device, dtype = device_and_dtype(cfg)
    per_class = 5000 if args.data_dir else args.train_per_class
    measured_images = split_images(cfg, np.repeat(np.arange(10), per_class), 10)
    cells = table2_cells(defaults)
    flops = flops_per_image(cfg.model, cfg.projection_dim, 10, cfg.image_size, cfg.batch_size)
    threads = len(os.sched_getaffinity(0))
    per_client = max(1, int(simulation["client-resources-num-cpus"])) if device == "cpu" else threads
    before = matmul_rates(device, dtype, per_client, threads)
    runs = {
        path: run_path(path, data_dirs[path], args.rounds, args.run_config, out, args.federation_config)
        for path in paths
    }
    after = matmul_rates(device, dtype, per_client, threads)  # the better of the two: other load slows each
    peaks = {"client": max(before[0], after[0]), "device": max(before[1], after[1]), "size": matmul_size(device)}
    limits = Limits(flops["train"], peaks["client"], peaks["device"])
    results = {path: path_figures(rows, measured_images, limits, cells, args.seeds) for path, rows in runs.items()}
    batching = batching_seconds_per_image(
        {p: data_dirs[p] for p in paths}, cfg.image_size, cfg.batch_size, args.batching_images
    )
    for path, figures in results.items():
        figures["batching-seconds-per-image"] = batching[path]
        load_file = out / path / "load.json"
        figures["run-load-average"] = json.loads(load_file.read_text()) if load_file.is_file() else None
    report = {
        "data": what,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "load-average-at-report": os.getloadavg()[0],
        "flops-per-image": flops,
        "matmul-flops-per-second": peaks,
        "table2-images-per-round": {f"{k[0]} IF {k[1]:g}": v for k, v in cells.items()},
        "paths": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper-cost.json").write_text(json.dumps(report, indent=2))
    print_report(report, args.seeds)
    print(f"\nfigures: {out / 'paper-cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
