"""ClientApp: train the received global model on this node's own partition and send back the weights.

A client uploads only its model arrays and scalar metrics (with `num-examples` for weighting); it
never loads CLIP or the LLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.faults import inject_failure, partition_reply
from client_app.limits import check_global
from flcore.config import validate
from flcore.experiment import client_batches, load_state, prepare, seeded_generator, to_record
from flcore.metrics import summarize
from flcore.models import FLModel, build_model
from flcore.training import TrainSettings, predict, train

app = ClientApp()


@lru_cache(maxsize=2)
def _model(name: str, projection_dim: int, num_classes: int) -> FLModel:
    """One model object per process, refilled with the global weights every round."""
    return build_model(name, projection_dim, num_classes)


def _setup(msg: Message, context: Context) -> tuple[dict, int, FLModel]:
    cfg = validate(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", cfg["num-clients"]))
    if num_partitions != cfg["num-clients"]:
        raise ValueError(
            f"this node has num-partitions={num_partitions} but run-config num-clients="
            f"{cfg['num-clients']}: start the federation with num-supernodes = num-clients."
        )
    classes = prepare(cfg).dataset.num_classes
    model = _model(str(cfg["model"]), int(cfg["projection-dim"]), classes)
    load_state(model, check_global(msg, model.state_dict(), float(cfg["max-message-mb"])))
    return cfg, partition_id, model


def _settings(cfg: Mapping, server_config: Mapping) -> TrainSettings:
    return TrainSettings.from_config({**cfg, **server_config})


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    cfg, partition_id, model = _setup(msg, context)
    server_config = dict(msg.content["config"])
    batches = client_batches(cfg, partition_id)
    gen = seeded_generator(int(cfg["seed"]), int(server_config.get("server-round", 0)), partition_id)
    inject_failure(cfg, int(server_config.get("server-round", 0)), partition_id)
    metrics = train(model, batches, _settings(cfg, server_config), gen)
    reply = RecordDict(
        {"arrays": to_record(model), "metrics": MetricRecord({**metrics, "num-examples": len(batches.data)})}
    )
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    cfg, partition_id, model = _setup(msg, context)
    batches = client_batches(cfg, partition_id)
    preds, labels = predict(model, batches)
    scores = summarize(preds, labels, prepare(cfg).dataset.num_classes, {})
    reply = MetricRecord({"accuracy": scores["accuracy"], "num-examples": len(labels)})
    return Message(RecordDict({"metrics": reply}), reply_to=msg)


@app.query()
def query_fn(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition, so it samples and orders nodes independently of node IDs."""
    return partition_reply(msg, context)
