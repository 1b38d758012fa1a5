"""Resume: checkpoints are complete and pickle-free, and a run killed with -9 continues to the same weights."""

import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvgM

from client_app.faults import fails
from flcore.arrays import to_record
from flcore.config import ConfigError
from flcore.models import run_model
from flcore.reports import read_metrics
from flcore.run_data import prepare
from flcore.seeding import seeded_random
from rounds import checkpoint
from rounds.policy import RoundPolicy
from server_app import launch
from strategies import registry
from strategies.registry import build_strategy
from tests.helpers import (
    GLOBAL,
    TINY,
    ClientAppGrid,
    FlakyGrid,
    RecordingReport,
    launch_run,
    run_config,
    served,
    validated,
)
from tests.procs import kill_tree

pytestmark = pytest.mark.usefixtures("flower_identity")


def test_generic_strategy_state_round_trips_fedavgm_momentum():
    """Flower's FedAvgM keeps a NumPy scalar for a 0-d array (BatchNorm's `num_batches_tracked`): one such
    entry must not make the whole momentum vector unsaveable."""
    strategy = FedAvgM(server_momentum=0.9)
    strategy.current_arrays = ArrayRecord(GLOBAL)
    strategy.momentum_vector = [np.ones(3), np.full(2, 2.0), np.array(5) - np.array(2)]
    assert isinstance(strategy.momentum_vector[2], np.integer)
    state = checkpoint.strategy_state(served(strategy))
    fresh = served(FedAvgM(server_momentum=0.9))
    checkpoint.load_strategy_state(fresh, state)
    assert [v.tolist() for v in fresh.inner.inner.momentum_vector] == [[1.0, 1.0, 1.0], [2.0, 2.0], 3]
    assert fresh.inner.inner.current_arrays["w"].numpy().tolist() == [0.0, 0.0, 0.0]


def cfg_for(tmp_path: Path, **extra) -> dict:
    raw = {"num-clients": 6, "fraction-train": 0.5, "num-server-rounds": 5, "output-dir": str(tmp_path), **extra}
    return validated(raw)


def run_rounds(
    cfg: dict, path: Path, nodes: dict[int, int], stop_after: int | None = None, partitions: int | None = None
) -> ArrayRecord:
    """Drive FedAvgM in-process over a grid whose node IDs we choose, checkpointing every round; `partitions`:
    the server gives nodes their partitions (`partition-assignment=server`), else it asks each node."""
    resumed = checkpoint.load(cfg) if cfg["resume"] else None
    done = resumed.round if resumed else 0
    inner = FedAvgM(server_momentum=0.9, fraction_train=0.5, min_available_nodes=6, fraction_evaluate=0.0)

    def save(rnd, arrays):
        checkpoint.save(path, rnd, arrays, inner, [{"round": rnd}], cfg)

    strategy = served(inner, seed=int(cfg["seed"]), partitions=partitions)
    strategy.round_offset, strategy.on_round_end = done, save
    if resumed:
        resumed.restore(inner)
    total = (stop_after or int(cfg["num-server-rounds"])) - done
    grid = FlakyGrid(nodes, seed=1, rate=0.0)
    return strategy.start(grid, resumed.arrays if resumed else ArrayRecord(GLOBAL), num_rounds=total).arrays


@pytest.mark.parametrize("partitions", [None, 6], ids=["asked", "given"])
def test_resume_with_new_node_ids_and_momentum_matches_uninterrupted(tmp_path, partitions):
    cfg = cfg_for(tmp_path)
    straight = run_rounds(cfg, tmp_path / "a.pt", {100 + i: i for i in range(6)}, partitions=partitions)
    run_rounds(cfg, tmp_path / "b.pt", {900 - i: i for i in range(6)}, stop_after=2, partitions=partitions)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["round"] == 2
    resumed = run_rounds(
        cfg_for(tmp_path, resume=str(tmp_path / "b.pt")),
        tmp_path / "c.pt",
        {5 + 3 * i: i for i in range(6)},
        partitions=partitions,
    )
    for key in GLOBAL:
        assert np.array_equal(resumed[key].numpy(), straight[key].numpy())
    assert not np.array_equal(straight["w"].numpy(), GLOBAL["w"].numpy())


SMALL = {**TINY, "num-clients": 10, "fraction-train": 0.2, "num-server-rounds": 3}  # 2 of 10 small partitions a round
CREFF = {
    **SMALL,
    "strategy": "creff",
    "local-epochs": 1,
    "virtual-per-class": 5,
    "match-epochs": 3,
    "calibration-epochs": 3,
}


def run_method(cfg: dict, path: Path, stop_after: int | None = None) -> ArrayRecord:
    """The configured strategy in-process through the real ClientApp, checkpointing every round as the
    ServerApp does."""
    resumed = checkpoint.load(cfg) if cfg["resume"] else None
    done = resumed.round if resumed else 0
    method = build_strategy(cfg)
    strategy = served(method, seed=int(cfg["seed"]))
    strategy.round_offset = done
    strategy.on_round_end = lambda rnd, arrays: checkpoint.save(path, rnd, arrays, method, [], cfg)
    if resumed:
        resumed.restore(method)
    classes = prepare(cfg).dataset.num_classes
    initial = resumed.arrays if resumed else to_record(run_model(cfg, classes, seed=0))
    total = (stop_after or int(cfg["num-server-rounds"])) - done
    return strategy.start(ClientAppGrid(cfg), initial, num_rounds=total).arrays


def test_creff_resumed_after_round_2_ends_with_the_uninterrupted_weights(tmp_path):
    """CReFF's server state (federated features, the plain aggregate's classifier) must survive a restart."""
    straight = run_method(cfg_for(tmp_path, **CREFF), tmp_path / "a.pt")
    run_method(cfg_for(tmp_path, **CREFF), tmp_path / "b.pt", stop_after=2)
    saved = torch.load(tmp_path / "b.pt", weights_only=True)["strategy"]
    kind, server = saved["calibrate"]
    assert kind == "state" and server["retrained"] and server["features"].shape == (10 * 5, 256)  # CReFF's model: 256-d
    assert saved["trained_classifier"][0] == "arrays"
    resumed = run_method(cfg_for(tmp_path, **CREFF, resume=str(tmp_path / "b.pt")), tmp_path / "c.pt")
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(resumed[k].numpy(), straight[k].numpy()) for k in straight)


FEDAVGM = {**SMALL, "strategy": "fedavgm", "local-epochs": 1}


def test_fedavgm_on_resnet8_resumed_after_round_2_ends_with_the_uninterrupted_weights(tmp_path):
    """FedAvgM's momentum must survive a restart whole, 0-d entries included: ResNet-8's BatchNorm layers
    have 0-d `num_batches_tracked` arrays, with which Flower's FedAvgM momentum could not be saved at all."""
    straight = run_method(cfg_for(tmp_path, **FEDAVGM), tmp_path / "a.pt")
    run_method(cfg_for(tmp_path, **FEDAVGM), tmp_path / "b.pt", stop_after=2)
    momentum = torch.load(tmp_path / "b.pt", weights_only=True)["strategy"]["custom"]["momentum"]
    assert momentum and any(v.abs().sum() > 0 for v in momentum.values())
    resumed = run_method(cfg_for(tmp_path, **FEDAVGM, resume=str(tmp_path / "b.pt")), tmp_path / "c.pt")
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(resumed[k].numpy(), straight[k].numpy()) for k in straight)


def test_resume_refuses_a_missing_file_and_changed_settings(tmp_path):
    with pytest.raises(ConfigError, match="resume"):
        checkpoint.load(cfg_for(tmp_path, resume=str(tmp_path / "nothing")))
    cfg = cfg_for(tmp_path)
    checkpoint.save(tmp_path / checkpoint.CHECKPOINT, 2, ArrayRecord(GLOBAL), build_strategy(cfg), [], cfg)
    with pytest.raises(ConfigError, match="lr = 0.1 there, 0.05 here"):
        checkpoint.load(cfg_for(tmp_path, resume=str(tmp_path), lr=0.05))
    with pytest.raises(ConfigError, match="num-server-rounds"):
        checkpoint.load(cfg_for(tmp_path, resume=str(tmp_path), **{"num-server-rounds": 1}))
    assert checkpoint.load(cfg_for(tmp_path, resume=str(tmp_path))).round == 2
    with pytest.raises(ConfigError, match="that run finished all 2 rounds"):  # before any process starts
        checkpoint.load(cfg_for(tmp_path, resume=str(tmp_path), **{"num-server-rounds": 2}))
    with pytest.raises(ConfigError, match="head = 'auto' there, 'mlp' here"):
        checkpoint.load(cfg_for(tmp_path, resume=str(tmp_path), head="mlp"))


def test_a_checkpoint_from_before_head_resumes_only_with_the_mlp_it_trained(tmp_path):
    old = {k: v for k, v in cfg_for(tmp_path).items() if k != "head"}  # what runs saved before `head` existed
    checkpoint.save(
        tmp_path / checkpoint.CHECKPOINT, 2, ArrayRecord(GLOBAL), build_strategy(cfg_for(tmp_path)), [], old
    )
    with pytest.raises(ConfigError, match="'head' = 'auto'.*before 'head' existed.*has none; set head=mlp"):
        checkpoint.load(cfg_for(tmp_path, resume=str(tmp_path)))
    assert checkpoint.load(cfg_for(tmp_path, resume=str(tmp_path), head="mlp")).round == 2


def saved_round(out: Path) -> int:
    for path in out.glob(f"*/{checkpoint.CHECKPOINT}"):
        try:
            return int(torch.load(path, weights_only=True)["round"])
        except Exception:  # replaced while reading
            return 0
    return 0


def final_weights(out: Path) -> dict:
    (model,) = out.glob("*/model.pt")
    return torch.load(model, weights_only=True)


def expected_failures(seed: int, rounds: int, clients: int, sampled: int, rate: float) -> int:
    """Failures the seeded sampling and the seeded fault injection produce together."""
    total = 0
    for rnd in range(1, rounds + 1):
        with seeded_random(seed, rnd):
            picked = random.sample(range(clients), sampled)
        total += sum(fails(seed, rnd, pid, rate) for pid in picked)
    return total


# Both kill-9 tests: 3 clients, 2 sampled per round, 3 rounds; clients also fail on purpose (fail-rate) to show
# the run goes on.
KILLED = {
    "num-clients": 3,
    "fraction-train": 0.67,
    "num-server-rounds": 3,
    "local-epochs": 1,
    "image-size": 8,
    "dirichlet-alpha": 100.0,
    "imbalance-factor": 2.0,
    "projection-dim": 16,
    "fail-rate": 0.3,
}


def kill_mid_run(out: Path, values: dict) -> tuple[Path, int]:
    """Launch a run in its own process group and kill -9 all of it once a round's checkpoint is on disk; the
    run's folder and the round its checkpoint holds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "server_app.launch", "--run-config", run_config({**values, "output-dir": str(out)})],
        cwd=launch.PROJECT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600  # a bound for a loaded machine, not a wait
        while saved_round(out) < 1 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        kill_tree(proc)
    stopped_at = saved_round(out)
    assert 1 <= stopped_at < 3, f"the run was to be killed mid-way, checkpoint says round {stopped_at}"
    (run_dir,) = out.iterdir()
    return run_dir, stopped_at


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_ends_with_the_uninterrupted_weights(tmp_path, capfd):
    """Full simulations: one uninterrupted, one killed with -9 after a round and resumed."""
    straight_dir = launch_run(tmp_path / "straight", KILLED)
    straight_out = capfd.readouterr().out
    run_dir, stopped_at = kill_mid_run(tmp_path / "killed", KILLED)
    t0 = time.perf_counter()
    resumed_dir = launch_run(tmp_path / "resumed", {**KILLED, "resume": str(run_dir)})
    seconds = time.perf_counter() - t0
    out = capfd.readouterr().out
    assert f"after round {stopped_at} of 3" in out
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows, resumed_rows = read_metrics(straight_dir), read_metrics(resumed_dir)
    assert len(resumed_rows) == 4  # rounds 0..3: the killed run's rows carried over, the rest trained after resuming
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["replies"] + r["failed"] == 2 for r in rows[1:])
    lost = sum(r["failed"] for r in rows[1:])
    assert lost == expected_failures(seed=7, rounds=3, clients=3, sampled=2, rate=0.3) >= 1
    assert "injected failure" in straight_out
    (restored,) = [line for line in out.splitlines() if line.startswith("Resumed ")]
    print(
        f"fail-rate 0.3: 3/3 rounds completed, {lost} of 6 client replies lost; killed after round "
        f"{stopped_at}; resumed run (launch + remaining rounds) took {seconds:.1f} s; {restored}"
    )


@pytest.mark.slow
def test_kill_9_of_a_creff_run_leaves_its_server_state_and_the_resumed_run_finishes(tmp_path, capfd):
    """CReFF adds server state beyond the weights (federated features, the clients' classifier): a run killed
    with -9 must have saved it whole, and a resumed run take it back and finish. The kill and the resume are
    the mechanism the test above checks in full; that CReFF's resumed weights equal the uninterrupted run's is
    checked in-process by `test_creff_resumed_after_round_2_ends_with_the_uninterrupted_weights`."""
    creff = {**KILLED, "strategy": "creff", "match-epochs": 1, "calibration-epochs": 1, "virtual-per-class": 2}
    run_dir, stopped_at = kill_mid_run(tmp_path / "killed", creff)
    saved = torch.load(run_dir / checkpoint.CHECKPOINT, weights_only=True)["strategy"]
    kind, server = saved["calibrate"]
    assert kind == "state" and server["features"].shape == (10 * 2, 256)
    assert saved["trained_classifier"][0] == "arrays"
    resumed_dir = launch_run(tmp_path / "resumed", {**creff, "resume": str(run_dir)})
    out = capfd.readouterr().out
    assert f"Resumed {run_dir} after round {stopped_at} of 3 (server state restored" in out
    assert [r["round"] for r in read_metrics(resumed_dir)] == [0, 1, 2, 3]
    weights = final_weights(tmp_path / "resumed")
    assert weights["classifier.weight"].shape == (10, 256) and all(torch.isfinite(v).all() for v in weights.values())


def test_the_server_bundle_checkpoints_and_restores_its_method(tmp_path, monkeypatch):
    """The ServerApp checkpoints, and restores on resume, the state of `ServerStrategy.method`: the registry
    hands that strategy to the round-end callback, and a fresh bundle takes the saved state back."""

    def momentum(cfg):
        return FedAvgM(server_momentum=0.9, fraction_train=0.5, min_available_nodes=6, fraction_evaluate=0.0)

    monkeypatch.setitem(registry.STRATEGIES, "fedavgm", momentum)
    cfg = cfg_for(tmp_path, strategy="fedavgm")
    saved_with = []

    def save(method, rnd, arrays):
        saved_with.append(method)
        checkpoint.save(tmp_path / checkpoint.CHECKPOINT, rnd, arrays, method, [{"round": rnd}], cfg)

    first = registry.build_server_strategy(cfg, None, RecordingReport(), on_round_end=save)
    assert isinstance(first.method, FedAvgM) and isinstance(first.policy, RoundPolicy)
    first.strategy.start(FlakyGrid({100 + i: i for i in range(6)}, seed=1, rate=0.0), ArrayRecord(GLOBAL), num_rounds=2)
    assert saved_with == [first.method, first.method] and first.method.momentum_vector is not None

    resumed = checkpoint.load(cfg_for(tmp_path, strategy="fedavgm", resume=str(tmp_path)))
    fresh = registry.build_server_strategy(cfg, None, RecordingReport(), round_offset=resumed.round)
    assert resumed.round == 2 and fresh.method.momentum_vector is None
    resumed.restore(fresh.method)
    assert all(
        np.array_equal(a, b) for a, b in zip(fresh.method.momentum_vector, first.method.momentum_vector, strict=True)
    )
    assert fresh.method.current_arrays["w"].numpy().tolist() == first.method.current_arrays["w"].numpy().tolist()
