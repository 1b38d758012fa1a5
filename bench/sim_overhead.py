"""Flower simulation vs. a plain in-process PyTorch FedAvg loop on the same rounds.

Both sides use the same config, client partitions, model, local epochs, seeds and per-round
centralized evaluation. Every client trains every round (fraction-train = 1.0) so both do exactly the
same work; Flower's own node sampling cannot be replayed outside Flower. Prints the wall time of each
and the ratios: the round loop alone (from the ServerApp's own clock, round 0 evaluation to the last
round) and end to end (including SuperLink and Ray start-up).

Usage: python -m bench.sim_overhead [--rounds 10] [--run-config "k=v ..."]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.runs import failure, launch_run, run_dirs
from flcore.arrays import load_state
from flcore.config import Settings
from flcore.metrics import summarize
from flcore.models import run_model
from flcore.reports import read_metrics
from flcore.run_config import parse_overrides
from flcore.run_data import client_batches
from flcore.seeding import seeded_generator
from flcore.server_data import server_data
from flcore.training import TrainSettings, predict, train
from server_app.launch import project_settings, resolve


def plain_fedavg(cfg: Settings) -> tuple[float, float]:
    """The same rounds as the ServerApp/ClientApp, in one process, no Flower. Returns (seconds, accuracy)."""
    start = time.perf_counter()
    data = server_data(cfg)
    classes = data.dataset.num_classes
    model = run_model(cfg, classes, seed=cfg.seed)
    local = run_model(cfg, classes)
    settings = TrainSettings.from_config(cfg)

    def evaluate() -> float:
        preds, labels = predict(model, data.test)
        return summarize(preds, labels, classes, data.groups)["accuracy"]

    acc = evaluate()
    for rnd in range(1, cfg.num_server_rounds + 1):
        total, summed = 0, None
        for pid in range(cfg.num_clients):
            local.load_state_dict(model.state_dict())
            batches = client_batches(cfg, pid)
            train(local, batches, settings, seeded_generator(cfg.seed, rnd, pid))
            n = len(batches.data)
            total += n
            update = {k: v.double() * n for k, v in local.state_dict().items()}
            summed = update if summed is None else {k: summed[k] + update[k] for k in summed}
        load_state(model, {k: v / total for k, v in summed.items()})
        acc = evaluate()
    return time.perf_counter() - start, acc


def flower_run(overrides: dict, out: Path) -> tuple[float, float, float]:
    """The launcher (`flwr run` on a local SuperLink, Ray backend). Returns (wall s, round-loop s, accuracy)."""
    start = time.perf_counter()
    if not launch_run(out, overrides):
        raise SystemExit(failure(out, "the Flower run"))
    wall = time.perf_counter() - start
    last = read_metrics(run_dirs(out, finished=True)[-1])[-1]
    return wall, last["elapsed"], last["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sim_overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    overrides = {
        **parse_overrides([args.run_config]),
        "num-server-rounds": args.rounds,
        "fraction-train": 1.0,
        "eval-every": 1,
    }
    defaults, simulation = project_settings()
    cfg, _ = resolve(overrides, defaults)
    torch.manual_seed(cfg.seed)
    plain, plain_acc = plain_fedavg(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        wall, loop, fl_acc = flower_run(overrides, Path(tmp))
    print(
        f"settings: {cfg.dataset} {cfg.num_clients} clients x {cfg.num_server_rounds} rounds, "
        f"{cfg.local_epochs} local epochs, image {cfg.image_size}px; plain loop: 1 process, "
        f"{torch.get_num_threads()} torch threads; Flower: Ray actors of {simulation['client-resources-num-cpus']} CPU"
    )
    print(f"plain PyTorch FedAvg loop : {plain:7.1f} s  (accuracy {plain_acc:.3f})")
    print(f"Flower round loop         : {loop:7.1f} s  (accuracy {fl_acc:.3f})")
    print(f"Flower end to end         : {wall:7.1f} s  (SuperLink + Ray start-up included)")
    print(f"ratio Flower/plain, rounds     : {loop / plain:.3f}")
    print(f"ratio Flower/plain, end to end : {wall / plain:.3f}")


if __name__ == "__main__":
    main()
