"""What several test modules share, imported by name: the tiny run's settings, a validated config, a client's
train reply and round, in-process Grids (nodes answering in this process, the real ClientApp among them), the
ServerApp's strategy stack, and a run launched through the real apps or faked on disk. Fixtures stay in conftest.

One tiny run (2 rounds, 4 clients, 8 px images, a 16-d projection) keeps every test that trains cheap; a test
that needs another value says so where it calls, so what it depends on stays visible.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from flcore.config import Settings
from flcore.reports import METRICS, SUMMARY
from flcore.run_config import format_overrides

PROJECT = Path(__file__).resolve().parent.parent

TINY: Mapping[str, Any] = MappingProxyType(
    {
        "num-server-rounds": 2,
        "num-clients": 4,
        "fraction-train": 0.5,
        "local-epochs": 1,
        "image-size": 8,
        "projection-dim": 16,
    }
)

# The tiny run for tests of one client's round: partition 0 of ten (a few dozen images), no augmentation.
ONE_CLIENT: Mapping[str, Any] = MappingProxyType({**TINY, "num-clients": 10, "augment": False})


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread inside: small models on a shared 2-core machine run about 8x faster than with two
    threads contending. Every test runs so (conftest); a fixture of wider scope, which runs before it, says so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dashed(values: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword names as run-config keys: `num_clients` -> `num-clients`."""
    return {key.replace("_", "-"): value for key, value in values.items()}


def validated(raw: Mapping[str, Any] = MappingProxyType({}), /, **overrides: Any) -> Settings:
    """`raw` and `overrides` (underscores read as dashes) checked as a run's config, the registry's strategies
    allowed: what the server's and the clients' functions take."""
    from flcore.config import validate
    from strategies.registry import STRATEGIES

    return validate({**raw, **dashed(overrides)}, choices={"strategy": STRATEGIES})


def run_config(values: Mapping[str, Any]) -> str:
    """`values` as one `--run-config` argument, written by the project's own formatter (quotes where needed)."""
    return format_overrides(values)


def launch_run(out: Path, values: Mapping[str, Any], *launcher_args: str) -> Path:
    """One run through the launcher (a SuperLink, Ray and the real apps) writing under `out`; it must succeed.
    Returns the run's folder."""
    from server_app import launch

    argv = [*launcher_args, "--run-config", run_config({**values, "output-dir": str(out)})]
    assert launch.main(argv) == 0
    return run_folder(out)


def make_run_plan(tmp_path: Path, *variables: str) -> str:
    """What `make -n run VAR=value ...` would run, from the project root. The install stamp is a fresh file, newer
    than pyproject.toml, so make plans no install: with the Makefile as the stamp, make remakes a makefile even
    under -n, so a Makefile older than pyproject.toml (a fresh clone) ran pip install -e of this checkout into
    the shared venv, and took seconds."""
    import subprocess

    stamp = tmp_path / "installed-stamp"
    stamp.touch()
    command = ["make", "-n", "run", *variables, f"STAMP={stamp}"]
    plan = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, check=True).stdout
    assert "pip install" not in plan, plan
    return plan


def run_folder(out: Path) -> Path:
    """The one run folder under an `output-dir` (caches written beside it, such as a teacher's, are not runs)."""
    (run,) = [path for path in Path(out).iterdir() if (path / METRICS).is_file()]
    return run


def write_run(run: Path, rows: Iterable[Mapping[str, Any]], summary: Mapping[str, Any]) -> Path:
    """A finished run on disk as `RunReport` leaves one: metrics.jsonl rows and summary.json."""
    run.mkdir(parents=True, exist_ok=True)
    (run / METRICS).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run / SUMMARY).write_text(json.dumps(summary))
    return run


def train_reply(
    state: Mapping[str, Any], n: int = 1, *, node: int = 1, metrics: Mapping[str, Any] | None = None
) -> Message:
    """A ClientApp's reply to a train message for `node`: the weights `state`, `n` examples and `metrics`."""
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    metrics = MetricRecord({"num-examples": n, **(metrics or {})})
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
    return Message(content, reply_to=request)


GLOBAL = {"w": torch.zeros(3), "b": torch.zeros(2)}  # a two-tensor global model for strategy arithmetic


class InProcessGrid:
    """A Grid whose nodes answer in this process: `push_messages` calls `answer` on each message at once.

    Message ids are assigned on push, as Flower's own InMemoryGrid does, so the server's reply
    bookkeeping (`PromptGrid`) runs unchanged. Subclasses define `get_node_ids` and `answer`.
    """

    def __init__(self):
        self.pushed, self.outbox = 0, []

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.pushed}"
            self.outbox.append(self.answer(msg))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        ready = [r for r in self.outbox if r.metadata.reply_to_message_id in wanted]
        self.outbox = [r for r in self.outbox if r.metadata.reply_to_message_id not in wanted]
        return ready


class ClientAppGrid(InProcessGrid):
    """Nodes 0..num-clients-1 run the real ClientApp, routed by message type as Flower routes it.

    `configs` records every train config sent, `requests` every message other than the partition query.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.configs, self.requests = cfg, [], []

    def get_node_ids(self):
        return list(range(int(self.cfg["num-clients"])))

    def answer(self, msg):
        from flwr.app import Context, RecordDict

        from client_app.app import app

        node = msg.metadata.dst_node_id
        context = Context(
            1, node, {"partition-id": node, "num-partitions": self.cfg["num-clients"]}, RecordDict(), dict(self.cfg)
        )
        if msg.metadata.message_type != "query":
            self.requests.append(msg)
        if msg.metadata.message_type == "train":
            self.configs.append(dict(msg.content["config"]))
        return app(msg, context)


class RecordingReport:
    """Stands in for `RunReport` where a test drives the strategy wrapper: keeps what it is handed."""

    def __init__(self):
        self.train, self.outcomes, self.nodes = {}, [], {}

    def record_train(self, server_round, metrics):
        self.train[server_round] = dict(metrics)

    def record_nodes(self, server_round, nodes):
        self.nodes[server_round] = dict(nodes)

    def take(self, outcome):
        self.outcomes.append(outcome)


def served(strategy, after_aggregation=(), report=None, **policy):
    """The ServerApp's stack around `strategy`: the round policy (with `policy` options), then the stages."""
    from rounds.policy import RoundPolicy
    from rounds.stage import Stages
    from strategies.wrapper import ServerStages

    stages = Stages(after_aggregation=list(after_aggregation))
    return ServerStages(RoundPolicy(strategy, **policy), stages, report or RecordingReport())


class FlakyGrid(InProcessGrid):
    """An in-process federation: each node adds its partition id + 1 to the weights; failures as injected."""

    def __init__(self, nodes: dict[int, int], seed: int, rate: float) -> None:
        super().__init__()
        self.nodes, self.seed, self.rate = nodes, seed, rate
        self.sent = self.failed = 0

    def get_node_ids(self):
        return list(self.nodes)

    def answer(self, msg: Message) -> Message:
        from client_app.faults import fails

        pid = self.nodes[msg.metadata.dst_node_id]
        if msg.metadata.message_type == "query":
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)
        rnd = int(msg.content["config"]["server-round"])
        pid = int(msg.content["config"].get("partition-id", pid))  # the one the server names, as the ClientApp does
        self.sent += 1
        if fails(self.seed, rnd, pid, self.rate):
            self.failed += 1
            return Message(Error(code=1, reason="injected"), reply_to=msg)
        state = {k: v + pid + 1 for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)


class IdleNodes:
    """A Grid of `count` connected nodes that answer no query: all a strategy's `configure_train` needs."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return []


def begin_round(strategy, arrays: ArrayRecord, nodes: int = 20, server_round: int = 1) -> list[Message]:
    """`strategy`'s train messages of `server_round` to `nodes` connected nodes, as a run sends them before any
    reply arrives: from then on the strategy holds the round's global model and knows how many it sent."""
    return list(strategy.configure_train(server_round, arrays, ConfigRecord(), IdleNodes(nodes)))


def client_train(
    cfg: Mapping[str, Any], server_config: Mapping[str, Any] | None = None, model_seed: int = 0
) -> Message:
    """One ClientApp train call on partition 0, from the run's model seeded with `model_seed`, under the run's
    training settings without weight decay or augmentation (`server_config` adds to or replaces them); the reply."""
    from flwr.app import Context

    from client_app.app import train_fn
    from flcore.arrays import to_record
    from flcore.models import run_model
    from flcore.run_data import prepare

    arrays = to_record(run_model(cfg, prepare(cfg).dataset.num_classes, seed=model_seed))
    config = ConfigRecord({"server-round": 1, **{key: cfg[key] for key in ("local-epochs", "lr", "momentum")}})
    config.update({"weight-decay": 0.0, "augment": False, **(server_config or {})})
    request = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type="train")
    context = Context(1, 1, {"partition-id": 0, "num-partitions": cfg["num-clients"]}, RecordDict(), dict(cfg))
    return train_fn(request, context)
