"""ClientApp: train the received global model on this node's own partition and send back the weights.

A client uploads its model arrays and scalar metrics (with `num-examples` for weighting, and its
`upload-bytes` and `peak-rss-mb`); only when the server's round config asks (`upload`, CReFF) it adds
class statistics of the received model in an `uploads` record. Its loss is the run config's `loss`
(FedLC and FedRS read the client's own label counts, which stay here) unless the round config names
one (`loss`, the Ratio Loss with the server's class weights). A `query.upload` message (CCVR, after
the last aggregation) asks for such statistics of the model it carries alone, with no training. It never
loads the LLM, and loads CLIP only when the round config asks for CLIP2FL's distillation (`kd-weight`).

The partition it trains is the one the server's message names (`partition-assignment=server`: simulated
nodes are virtual clients), else its node config's own. Its data is built on first use for the partitions
this process serves, and only for those (`flcore.experiment.client_batches`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.faults import inject_failure, partition_reply
from client_app.limits import check_global
from flcore.class_statistics import RECORD as UPLOADS_RECORD
from flcore.class_statistics import UPLOAD_ACTION, UPLOAD_KEY, client_upload
from flcore.config import validate
from flcore.costs import cost_metrics
from flcore.experiment import PARTITION_KEY, client_batches, load_state, prepare, seeded_generator, to_record
from flcore.losses import LossInputs, build_loss
from flcore.metrics import summarize
from flcore.models import FLModel, build_model
from flcore.training import ExtraLoss, TrainSettings, predict, train

app = ClientApp()


@lru_cache(maxsize=2)
def _model(name: str, projection_dim: int, num_classes: int) -> FLModel:
    """One model object per process, refilled with the global weights every round."""
    return build_model(name, projection_dim, num_classes)


def _setup(msg: Message, context: Context) -> tuple[dict, int, FLModel]:
    cfg = validate(context.run_config)
    partition_id = served_partition(cfg, msg, context.node_config)
    num_partitions = int(context.node_config.get("num-partitions", cfg["num-clients"]))
    if num_partitions != cfg["num-clients"]:
        raise ValueError(
            f"this node has num-partitions={num_partitions} but run-config num-clients="
            f"{cfg['num-clients']}: start the federation with num-supernodes = num-clients."
        )
    classes = prepare(cfg).dataset.num_classes
    model = _model(str(cfg["model"]), int(cfg["projection-dim"]), classes)
    load_state(model, check_global(msg, model.state_dict(), message_limit(cfg, context.node_config)))
    return cfg, partition_id, model


def served_partition(cfg: Mapping, msg: Message, node_config: Mapping) -> int:
    """The partition this message is for: the one the server names, else this node's own (its node config).

    With `partition-assignment=node` the node serves its own partition only, so another one named is refused.
    """
    config = msg.content.config_records.get("config")
    named = None if config is None else config.get(PARTITION_KEY)
    if named is None:
        return int(node_config[PARTITION_KEY])
    if not isinstance(named, int) or isinstance(named, bool):
        raise ValueError(f"the server's message names partition {named!r}; expected an integer.")
    own = node_config.get(PARTITION_KEY)
    if cfg["partition-assignment"] == "node" and named != own:
        raise ValueError(
            f"the server's message is for partition {named}, but this node serves partition {own} (its node config) "
            "and the run has partition-assignment=node."
        )
    return named


def message_limit(cfg: Mapping, node_config: Mapping) -> float:
    """The largest server message this node reads: the run's `max-message-mb`, lowered by the node operator's own
    `--node-config "max-message-mb=..."` (the run config is the server's to set, so it cannot protect from it)."""
    own = node_config.get("max-message-mb")
    run = float(cfg["max-message-mb"])
    return run if own is None else min(run, float(own))


def _settings(cfg: Mapping, server_config: Mapping) -> TrainSettings:
    """Run config overlaid with the server's round config; the proximal term only when the server sends it."""
    local = {k: v for k, v in cfg.items() if k != "proximal-mu"}
    return TrainSettings.from_config({**local, **server_config})


def _kd(cfg: Mapping, server_config: Mapping, partition_id: int) -> ExtraLoss | None:
    """CLIP2FL's distillation term, only when the round config asks; only then is open_clip imported."""
    if "kd-weight" not in server_config:
        return None
    from client_app.distill import distillation

    dataset = prepare(cfg).dataset
    return distillation(cfg, server_config, partition_id, dataset.classes, client_batches(cfg, partition_id).data)


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    cfg, partition_id, model = _setup(msg, context)
    server_config = dict(msg.content["config"])
    batches = client_batches(cfg, partition_id)
    gen = seeded_generator(int(cfg["seed"]), int(server_config.get("server-round", 0)), partition_id)
    inject_failure(cfg, int(server_config.get("server-round", 0)), partition_id)
    classes = prepare(cfg).dataset.num_classes
    extra = {}
    if UPLOAD_KEY in server_config:  # CReFF: computed on the received global model, before training
        extra[UPLOADS_RECORD] = client_upload(server_config, model, batches, classes)
    loss = build_loss(LossInputs(cfg, np.bincount(batches.data.labels, minlength=classes), server_config))
    metrics = train(model, batches, _settings(cfg, server_config), gen, loss, _kd(cfg, server_config, partition_id))
    arrays, record = to_record(model), MetricRecord({**metrics, "num-examples": len(batches.data)})
    record.update(cost_metrics(arrays, record, *extra.values()))
    reply = RecordDict({"arrays": arrays, "metrics": record, **extra})
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


@app.query(UPLOAD_ACTION)
def upload_fn(msg: Message, context: Context) -> Message:
    """CCVR: the class statistics the config asks for, of the model the message carries; no training."""
    cfg, partition_id, model = _setup(msg, context)
    batches = client_batches(cfg, partition_id)
    upload = client_upload(dict(msg.content["config"]), model, batches, prepare(cfg).dataset.num_classes)
    record = MetricRecord({"num-examples": len(batches.data)})
    record.update(cost_metrics(ArrayRecord(), record, upload))
    return Message(RecordDict({"metrics": record, UPLOADS_RECORD: upload}), reply_to=msg)
