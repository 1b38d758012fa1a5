"""ServerApp: check the run config, hold the test split and D_align, run the strategy, write reports.

Its models (the global model, centralized evaluation, the server stages) live on the device `device`
resolves to in the ServerApp's own process (`flcore.device`), whatever GPUs the clients get from Ray.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from flcore.arrays import NON_FINITE, load_record, non_finite, to_record
from flcore.config import Settings
from flcore.device import Compute
from flcore.loggers import open_loggers
from flcore.metrics import summarize
from flcore.models import FLModel
from flcore.reports import RunReport
from flcore.run_model import new_model
from flcore.server_data import ServerData, client_classes, server_data
from flcore.training import NonFiniteLogits, predict
from rounds import checkpoint
from rounds.restarts import ActorRestarts
from rounds.stage import NonFiniteModel, ServerContext
from server_app.preflight import preflight, validated
from strategies.registry import build_server_strategy, client_workload

app = ServerApp()

TRAIN_KEYS = ("local-epochs", "lr", "momentum", "weight-decay", "augment")


class Evaluator:
    """Centralized evaluation on the balanced test split (Flower's `evaluate_fn`), feeding the report.

    The last weights it evaluated and their metrics are kept: a server stage that evaluates the model it
    hands on (alignment's last step) and Flower's evaluation right after it then cost one pass over the test
    split, not two. Stages and strategies return new ArrayRecords rather than changing one in place, so the
    same object means the same weights. Weights or logits with NaN or Inf raise `NonFiniteModel` before
    anything is recorded; `strategies.wrapper.ServerStages` names the round and the step that made them.
    """

    def __init__(
        self, model: FLModel, data: ServerData, report: RunReport, every: int, last_round: int, compute: Compute
    ) -> None:
        self.model, self.data, self.report = model, data, report
        self.every, self.last_round, self.compute = every, last_round, compute
        self._last: tuple[ArrayRecord, dict] | None = None

    def metrics(self, arrays: ArrayRecord) -> dict:
        if self._last is None or self._last[0] is not arrays:
            self._last = (arrays, self._score(arrays))
        return dict(self._last[1])

    def _score(self, arrays: ArrayRecord) -> dict:
        """The test metrics, or `NonFiniteModel`: NaN weights or logits are never scored (as class 0)."""
        bad = non_finite(arrays)
        if bad:
            raise NonFiniteModel(arrays, f"its weights hold {NON_FINITE} in {bad[:3]} ({len(bad)} arrays)")
        try:
            preds, labels = predict(load_record(self.model, arrays), self.data.test, self.compute)
        except NonFiniteLogits as err:
            raise NonFiniteModel(arrays, f"it gives {err}") from err
        return summarize(preds, labels, self.data.dataset.num_classes, self.data.groups)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round % self.every and server_round != self.last_round:
            return None
        full = self.metrics(arrays)
        self.report.record_eval(server_round, full)
        return MetricRecord({k: v for k, v in full.items() if isinstance(v, float)})


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Torch's intra-op threads set to `threads` for the block (0 leaves torch's default), then restored.

    The server's per-round work is small (a ResNet-8 over the test split, a few SGD steps on D_align): with
    one thread per core, every operator waits at a barrier for threads that other processes (the clients,
    other jobs) have descheduled. Measured in 40-round runs on a shared 2-core CPU: alignment's 2 SGD steps
    took 0.08 to 2.6 s per round (median 1.1) with 2 threads, 0.11 to 0.4 s (median 0.16) with 1.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(grid: Grid, cfg: Settings, run_id: int | str) -> dict:
    """The whole server side of one run, on `server-threads` torch threads; returns the summary."""
    with torch_threads(cfg.server_threads):
        return serve(grid, cfg, run_id)


def serve(grid: Grid, cfg: Settings, run_id: int | str) -> dict:
    """Checks, data, report, the wrapped strategy's rounds, and the summary."""
    t0 = time.perf_counter()
    checked = preflight(cfg)
    resumed = checked.resumed
    check_seconds = time.perf_counter() - t0
    random.seed(cfg.seed)  # Flower samples nodes with the global `random` module
    torch.manual_seed(cfg.seed)
    data = server_data(cfg)
    report = RunReport.create(cfg, run_id, data.dataset.classes)
    if resumed is not None:
        report.restore(resumed.rows)
    report.log_to(open_loggers(cfg, report.dir, run_id))  # TensorBoard, W&B: ended by report.finish, or at exit
    local = cfg.local_data
    if not local:  # nodes holding their own data report it with their updates (RunReport.record_nodes)
        report.write_partition(data.client_histogram, data.pool_counts, data.groups, reserve=data.reserve)
    rounds = cfg.num_server_rounds

    make_model = partial(new_model, cfg)
    model = make_model(seed=cfg.seed)
    evaluator = Evaluator(make_model(), data, report, cfg.eval_every, rounds, checked.compute)
    ctx = ServerContext(cfg, data, make_model, evaluator.metrics)
    done = resumed.round if resumed is not None else 0
    restarts = ActorRestarts.of(cfg.actor_restarts, rounds, report.dir, cfg.resume)

    def save_state(method: Strategy, server_round: int, arrays: ArrayRecord) -> None:
        checkpoint.save(report.dir / checkpoint.CHECKPOINT, server_round, arrays, method, report.rows, cfg)
        report.round_ended(server_round)
        restarts.after_round(server_round, server.policy.deaths.get(server_round, ()))  # fresh actors for the rest

    server = build_server_strategy(cfg, ctx, report, round_offset=done, on_round_end=save_state)
    initial = to_record(model)
    if resumed is not None:
        initial = resumed.arrays
        load_record(model, initial)
        resumed.restore(server.method)
        print(
            f"Resumed {cfg.resume} after round {done} of {rounds} (server state restored in "
            f"{time.perf_counter() - t0:.2f} s, checks and checkpoint read in {check_seconds:.3f} s)",
            flush=True,
        )
    result = server.strategy.start(
        grid,
        initial,
        num_rounds=rounds - done,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({**{k: cfg[k] for k in TRAIN_KEYS}, **client_classes(cfg)}),
        evaluate_fn=evaluator,
    )
    server.policy.require_an_update()  # a run that aggregated nothing has failed
    final = load_record(model, result.arrays if len(result.arrays) else to_record(model))
    return report.finish(
        final.state_dict(),
        {
            "run-id": str(run_id),
            "output-dir": str(report.dir),
            "pool-size": _reported_size(report) if local else int(data.pool_counts.sum()),
            "align-size": len(data.align),
            "actor-restarts": restarts.summary(),
            **client_workload(cfg),
        },
    )


def _reported_size(report: RunReport) -> int:
    """The images the nodes holding their own data reported, each node's latest count."""
    return sum(int(node["num-examples"]) for node in report.node_data().values())


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = validated(context.run_config)
    summary = run(grid, cfg, context.run_id)
    print(
        f"Run {context.run_id} finished: accuracy {summary['final']['accuracy']:.4f}, "
        f"reports in {summary['output-dir']}",
        flush=True,
    )
