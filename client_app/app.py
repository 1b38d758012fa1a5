"""ClientApp: train the received global model on this node's data and send back the weights.

A node's data is its partition of the run's pool or, with client-data=local, its own folder (`client_app.shard`).
A client uploads its model arrays and scalar metrics (with `num-examples` for weighting, and its
`upload-bytes` and `peak-rss-mb`; a node holding its own data adds its `class-counts`, images per class,
so the server can report the federation's data without seeing it, and `skipped-images`, how many image
files it left out as unusable; its errors reach the server as one line naming no file,
`client_app.private_errors`); only when the server's round config asks (`upload`, CReFF) it adds
class statistics of the received model in an `uploads` record. Its loss is the run config's `loss`
(FedLC and FedRS read the client's own label counts, which stay here) unless the round config names
one (`loss`, the Ratio Loss with the server's class weights); FedLoGe trains it through its own objective
(`flcore.losses.CLIENT_OBJECTIVES`). A `query.upload` message (CCVR, after
the last aggregation) asks for such statistics of the model it carries alone, with no training; a
`query.personalize` message (FedETF, FedLoGe, after the last aggregation) asks it to fine-tune the model it carries the
method's own way (`flcore.personalize`) and send the result back, with its images per class, for scoring; a
`query.effective_numbers` message (FedYoYo, before each round's training) asks for its C effective numbers under
the model it carries (`flcore.yoyo`), and with FedYoYo's loss it trains on a weak and a strong view of every batch.
It never loads the LLM, and loads CLIP only when the round config asks for CLIP2FL's distillation (`kd-weight`).
It trains on the device `device` resolves to in this process (under Ray, the GPU share of
`client-resources-num-gpus`, if any): its model and partition stay there across rounds.

The partition it trains is the one the server's message names (`partition-assignment=server`: simulated
nodes are virtual clients), else its node config's own (`client_app.shard`). Its data is built on first
use for the partitions this process serves, and only for those (`flcore.run_data.client_batches`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import lru_cache

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.faults import identity_reply, inject_failure
from client_app.limits import check_global
from client_app.private_errors import private_errors
from client_app.shard import Shard, shard
from flcore.arrays import load_state, to_record
from flcore.class_statistics import RECORD as UPLOADS_RECORD
from flcore.class_statistics import UPLOAD_ACTION, UPLOAD_KEY, client_upload
from flcore.config import Settings, validate
from flcore.costs import cost_metrics
from flcore.device import Compute, compute_of
from flcore.local_data import CLASS_COUNTS_KEY, SKIPPED_KEY
from flcore.losses import LossInputs, build_loss, max_grad_norm, objective
from flcore.metrics import summarize
from flcore.models import FLModel, build_model, model_classifier, model_head
from flcore.personalize import PERSONALIZE_ACTION, PERSONALIZERS
from flcore.seeding import seeded_generator
from flcore.training import ExtraLoss, TrainSettings, predict, train
from flcore.yoyo import EFFECTIVE_ACTION, EFFECTIVE_KEY, effective_numbers, training_batches

app = ClientApp()
UPLOAD_STREAM = 1  # generator stream of a client's upload draws (CReFF's DSA), apart from its training stream
PERSONALIZE_STREAM = 2  # generator stream of its personalisation after the last round (FedETF)
EFFECTIVE_STREAM = 3  # generator stream of the shuffle its effective numbers are computed in (FedYoYo)


@lru_cache(maxsize=2)
def _model(name: str, projection_dim: int, num_classes: int, compute: Compute, head: str, classifier: str) -> FLModel:
    """One model object per process, on its device, refilled with the global weights every round."""
    return build_model(name, projection_dim, num_classes, device=compute.device, head=head, classifier=classifier)


def _setup(msg: Message, context: Context) -> tuple[dict, dict, Shard, FLModel]:
    """The run config (its server-side paths are not this node's to check), the request's config, this node's
    data, and the model holding the received global weights, on this process's device."""
    cfg = validate(context.run_config, paths=False)
    server_config = dict(msg.content["config"]) if "config" in msg.content else {}
    data = shard(cfg, context, server_config)
    head, classifier = model_head(cfg), model_classifier(cfg)
    model = _model(cfg.model, cfg.projection_dim, data.num_classes, compute_of(cfg), head, classifier)
    load_state(model, check_global(msg, model.state_dict(), message_limit(cfg, context.node_config)))
    return cfg, server_config, data, model


def message_limit(cfg: Settings, node_config: Mapping) -> float:
    """The largest server message this node reads: the run's `max-message-mb`, lowered by the node operator's own
    `--node-config "max-message-mb=..."` (the run config is the server's to set, so it cannot protect from it)."""
    own = node_config.get("max-message-mb")
    run = cfg.max_message_mb
    return run if own is None else min(run, float(own))


def _settings(cfg: Settings, server_config: Mapping) -> TrainSettings:
    """Run config overlaid with the server's round config; the proximal term only when the server sends it,
    gradient clipping only when the loss comes with it."""
    settings = TrainSettings.for_round(cfg, server_config)
    return replace(settings, max_grad_norm=max_grad_norm(cfg, server_config))


def _kd(cfg: Settings, server_config: Mapping, data: Shard) -> ExtraLoss | None:
    """CLIP2FL's distillation term, only when the round config asks; only then is open_clip imported."""
    if "kd-weight" not in server_config:
        return None
    from client_app.distill import distillation

    return distillation(cfg, server_config, data.stream, data.classes, data.batches.data)


def _uploads(cfg: Settings, server_config: Mapping, data: Shard, model: FLModel) -> dict:
    """The `uploads` record the round config asks for (CReFF's class gradients), with this client's draws seeded
    by (seed, round, partition) apart from its training."""
    if UPLOAD_KEY not in server_config:
        return {}
    draws = seeded_generator(cfg.seed, int(server_config.get("server-round", 0)), data.stream, UPLOAD_STREAM)
    upload = client_upload(server_config, model, data.batches, data.num_classes, draws, cfg.creff_dsa)
    return {UPLOADS_RECORD: upload}


@app.train()
@private_errors
def train_fn(msg: Message, context: Context) -> Message:
    cfg, server_config, data, model = _setup(msg, context)
    batches, classes = data.batches, data.num_classes
    gen = seeded_generator(cfg.seed, int(server_config.get("server-round", 0)), data.stream)
    inject_failure(cfg, int(server_config.get("server-round", 0)), data.stream)
    extra = _uploads(cfg, server_config, data, model)  # CReFF: of the received global model, before training
    counts = np.bincount(batches.data.labels, minlength=classes)
    bias = getattr(model.classifier, "bias", None)  # FedRS's authors' logits leave it out; FedETF's ETF has none
    trained, loss = objective(cfg, model, build_loss(LossInputs(cfg, counts, server_config, bias)))
    settings, kd = _settings(cfg, server_config), _kd(cfg, server_config, data)
    metrics = train(trained, training_batches(server_config, batches), settings, gen, loss, kd, compute_of(cfg))
    arrays, record = to_record(model), MetricRecord({**metrics, "num-examples": len(batches.data)})
    if data.local:
        record[CLASS_COUNTS_KEY] = data.class_counts()
        record[SKIPPED_KEY] = data.skipped
    record.update(cost_metrics(arrays, record, *extra.values()))
    reply = RecordDict({"arrays": arrays, "metrics": record, **extra})
    return Message(reply, reply_to=msg)


@app.evaluate()
@private_errors
def evaluate_fn(msg: Message, context: Context) -> Message:
    cfg, _, data, model = _setup(msg, context)
    preds, labels = predict(model, data.batches, compute_of(cfg))
    scores = summarize(preds, labels, data.num_classes, {})
    reply = MetricRecord({"accuracy": scores["accuracy"], "num-examples": len(labels)})
    return Message(RecordDict({"metrics": reply}), reply_to=msg)


@app.query()
def query_fn(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition (or name), so it samples and orders nodes independently of node IDs."""
    return identity_reply(msg, context)


@app.query(UPLOAD_ACTION)
@private_errors
def upload_fn(msg: Message, context: Context) -> Message:
    """CCVR: the class statistics the config asks for, of the model the message carries; no training."""
    cfg, server_config, data, model = _setup(msg, context)
    batches = data.batches
    upload = client_upload(server_config, model, batches, data.num_classes)
    record = MetricRecord({"num-examples": len(batches.data)})
    record.update(cost_metrics(ArrayRecord(), record, upload))
    return Message(RecordDict({"metrics": record, UPLOADS_RECORD: upload}), reply_to=msg)


@app.query(PERSONALIZE_ACTION)
def personalize_fn(msg: Message, context: Context) -> Message:
    """The method's local fine-tuning of the model the message carries, sent back with this client's images per
    class, which the server weighs the test classes by to score it."""
    cfg, server_config, data, model = _setup(msg, context)
    gen = seeded_generator(cfg.seed, int(server_config.get("server-round", 0)), data.stream, PERSONALIZE_STREAM)
    counts = np.bincount(data.batches.data.labels, minlength=data.num_classes)
    personalize = PERSONALIZERS[cfg.strategy]
    local = personalize(model, data.batches, cfg, counts, gen, compute_of(cfg))
    arrays = to_record(local)
    record = MetricRecord({"num-examples": int(counts.sum()), CLASS_COUNTS_KEY: counts.astype(float).tolist()})
    record.update(cost_metrics(arrays, record))
    return Message(RecordDict({"arrays": arrays, "metrics": record}), reply_to=msg)


@app.query(EFFECTIVE_ACTION)
@private_errors
def effective_fn(msg: Message, context: Context) -> Message:
    """FedYoYo: this client's effective number per class under the model the message carries; no training."""
    cfg, server_config, data, model = _setup(msg, context)
    draws = seeded_generator(cfg.seed, int(server_config.get("server-round", 0)), data.stream, EFFECTIVE_STREAM)
    effective = effective_numbers(model, data.batches, data.num_classes, draws, compute_of(cfg))
    record = MetricRecord({"num-examples": len(data.batches.data), EFFECTIVE_KEY: effective.astype(float).tolist()})
    record.update(cost_metrics(ArrayRecord(), record))
    return Message(RecordDict({"metrics": record}), reply_to=msg)
