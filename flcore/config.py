"""Run-config schema, defaults and validation.

Every setting of a run is one kebab-case key of Flower's run config (`[tool.flwr.app.config]` in
`pyproject.toml`, overridable with `flwr run . --run-config "k=v"`). The schema below is the single
source of truth: docs/configuration.md, the pyproject defaults and the validation all follow it, and tests
check that they agree. Validation runs before any data is read or Ray is started, and names the key,
the value and what is allowed.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, make_dataclass, replace
from pathlib import Path
from typing import Any, Self

Scalar = bool | int | float | str

DATASETS_WITH_FILES = ("cifar10", "cifar100", "imagenet-lt", "folder")
ALIGN_WHEN = ("every-round", "last-round")
ALIGN_LOSSES = ("ce+kl", "ce", "kl")
FEDRS_VARIANTS = ("authors", "paper")
DISTILL_ON_ALIGN = "align"  # distill-data: D_align's images, labels dropped
DISTILL_ON_UNHELD = "unused-train"  # distill-data: the training images neither D_align nor any client holds
DISTILL_SOURCES = (DISTILL_ON_UNHELD, DISTILL_ON_ALIGN)
ALIGN_SOURCES = ("auto", "train", "val")
CLIENT_DATA = ("partition", "local")
LOCAL = "local"  # client-data: every SuperNode trains on its own folder (node config `data-dir`)
HOLDOUT = "holdout"  # align-teacher: the offline stand-in for CLIP, trained on held-out server images
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
PARTITION_ASSIGNMENTS = ("server", "node")
LOG_TARGETS = ("none", "tensorboard", "wandb")  # log-to: flcore.loggers.LOGGERS, and none


MAX_SEED = 2**31 - 1  # every seed consumer accepts it (torch, NumPy, Flower), also as seed * 1000 + epoch
MAX_INT = 2**63 - 1  # Flower sends run-config integers as signed 64-bit


class ConfigError(ValueError):
    """A run-config value is not allowed; the message names key, value and what is allowed."""


class WeightsNotFound(ConfigError):
    """A model's weights (LLaVA, CLIP) are not on this machine and nothing is downloaded: the message says
    what to download and where to put it."""


@dataclass(frozen=True)
class Option:
    """One run-config key: its default, a description, and the rule a value must satisfy."""

    default: Scalar
    help: str
    allowed: str = ""
    check: Callable[[Any], bool] | None = None
    choices: Sequence[str] = ()
    kinds: tuple[type, ...] = ()  # the types a value may have, where they are not just the default's


def _number(low: float, high: float = math.inf, low_open: bool = False, integer: bool = False):
    """A range rule for numeric keys, with the text shown when a value falls outside it."""

    def check(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if integer and not float(value).is_integer():
            return False
        above = value > low if low_open else value >= low
        return above and value <= high and math.isfinite(value)

    kind = "an integer" if integer else "a number"
    bounds = f"> {low}" if low_open else f">= {low}"
    text = f"{kind} {bounds}" + ("" if high == math.inf else f" and <= {high}")
    return text, check


def _opt(default: Scalar, help: str, rule: tuple[str, Callable[[Any], bool]] | None = None) -> Option:
    allowed, check = rule if rule else ("", None)
    return Option(default, help, allowed, check)


def _prompt_ok(value: Any) -> bool:
    """A CLIP prompt setting: `ensemble`, or one format template with a single `{}` for the class name."""
    if not isinstance(value, str):
        return False
    return value == "ensemble" or (value.count("{}") == 1 and value.count("{") == value.count("}") == 1)


def _choice(default: str, help: str, choices: Sequence[str]) -> Option:
    return Option(default, help, choices=choices)


class RegistryNames(Sequence[str]):
    """The names of a registry dict in another module (`flcore.models.BACKBONES`), after `first`: the registry is
    the one list of names. Read when first needed, so importing this module stays free of torch; only registries of
    modules every process importing the schema's users loads anyway belong here, or of modules as light as
    `flcore.partitioners` (which imports `datasets` only when a split is drawn)."""

    def __init__(self, module: str, registry: str, first: tuple[str, ...] = ()) -> None:
        self.module, self.registry, self.first = module, registry, first

    def _names(self) -> tuple[str, ...]:
        return (*self.first, *getattr(importlib.import_module(self.module), self.registry))

    def __getitem__(self, index):  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"RegistryNames({self.module}.{self.registry}, first={self.first})"


DATASETS = RegistryNames("flcore.datasets", "LOADERS")
MODELS = RegistryNames("flcore.models", "BACKBONES")
HEAD_NAMES = RegistryNames("flcore.models", "HEADS", first=("auto",))
LOSSES = RegistryNames("flcore.losses", "LOSSES")
AMP_MODES = RegistryNames("flcore.device", "AMP_DTYPES", first=("off",))
PARTITIONER_NAMES = RegistryNames("flcore.partitioners", "PARTITIONERS")


def _device_ok(value: Any) -> bool:
    return isinstance(value, str) and DEVICE_PATTERN.fullmatch(value) is not None


def _per_class_ok(value: Any) -> bool:
    """`auto`, or a whole number of images per class, at least one."""
    if isinstance(value, str):
        return value == "auto"
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def log_targets(value: str) -> list[str]:
    """`log-to` as the loggers it names, in order, without repeats; `none` names none."""
    names = [name.strip() for name in value.split(",")]
    return [name for i, name in enumerate(names) if name != "none" and name not in names[:i]]


def _log_to_ok(value: Any) -> bool:
    """`none`, or one or more of the loggers, comma-separated (`tensorboard,wandb`)."""
    if not isinstance(value, str):
        return False
    names = [name.strip() for name in value.split(",")]
    return all(name in LOG_TARGETS for name in names) and (names == ["none"] or "none" not in names)


def _workers_ok(value: Any) -> bool:
    """`auto`, or a whole number of loader processes (0 = decode in the training process)."""
    if isinstance(value, str):
        return value == "auto"
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The keys by topic, in the order docs/configuration.md lists them; SCHEMA is their union.
SECTIONS: dict[str, dict[str, Option]] = {
    "Data": {
        "dataset": _choice(
            "digits", "Dataset: digits (offline default), cifar10, cifar100, imagenet-lt, folder.", DATASETS
        ),
        "data-dir": _opt("", "Local data root (required for every dataset but digits; nothing is downloaded)."),
        "client-data": _choice(
            "partition",
            "Where each client's images come from: partition (every node cuts its share of the long-tailed pool "
            "from dataset/data-dir: the simulation, or SuperNodes sharing one copy) or local (every SuperNode "
            "trains on its own folder, --node-config \"data-dir='...'\", and the server reads only its test split "
            "and D_align; the split keys do not apply; docs/deployment.md).",
            CLIENT_DATA,
        ),
        "image-size": _opt(
            16, "Side of the model input in pixels (digits are upsampled to it).", _number(8, 1024, integer=True)
        ),
        "imbalance-factor": _opt(
            10.0,
            "Long-tail imbalance factor IF = n_max / n_min (1 = balanced; imagenet-lt must be 1: it ships "
            "long-tailed).",
            _number(1),
        ),
        "partitioner": _choice(
            "creff",
            "Client split: creff (the paper's, CReFF's Dirichlet split re-cut into equal client sizes) or dirichlet "
            "(flwr-datasets' DirichletPartitioner, unequal sizes).",
            PARTITIONER_NAMES,
        ),
        "dirichlet-alpha": _opt(
            0.5, "Dirichlet concentration over clients (smaller = more heterogeneous).", _number(0, low_open=True)
        ),
        "num-clients": _opt(20, "Number of clients the long-tailed pool is split across.", _number(1, integer=True)),
        "min-partition-size": _opt(
            2,
            "Smallest client partition allowed: dirichlet redraws a split with a smaller one; creff's clients all "
            "hold pool / num-clients images, so a pool too small for it is refused.",
            _number(0, integer=True),
        ),
        "align-per-class": _opt(
            10,
            "Images per class in the server's class-balanced set D_align (disjoint from clients).",
            _number(1, integer=True),
        ),
        "align-data": _opt(
            "auto",
            "Where D_align comes from: train (carved from the training split before the long tail), val "
            "(imagenet-lt's published ImageNet_LT_val.txt), a folder with one subfolder per class (the server's own "
            "images), or auto (val for imagenet-lt, train otherwise).",
        ),
        "many-threshold": _opt(
            100, "Classes with more training images than this are 'many'.", _number(0, integer=True)
        ),
        "few-threshold": _opt(20, "Classes with fewer training images than this are 'few'.", _number(0, integer=True)),
        "augment": _opt(True, "Random-crop (and flip, for natural images) augmentation in local training."),
    },
    "Model": {
        "model": _choice("resnet8", "Client model backbone: resnet8 (32x32 inputs) or resnet50.", MODELS),
        "projection-dim": _opt(
            512,
            "Width of the projection after the backbone, head mlp or linear (teacher feature size: 512 ViT-B/32, "
            "768 ViT-L/14; equal to LLaVA's vision width, 1024 or tiny's 32, stage 1 pretrains the projection "
            "too); unused with head none.",
            _number(1, integer=True),
        ),
        "head": _choice(
            "auto",
            "What maps the backbone's pooled features to the classifier: mlp (Linear-GELU-Linear to projection-dim, "
            "the paper's model), linear (one Linear to projection-dim, CLIP2FL's 256 -> 512), none (the classifier "
            "reads the 256-d ResNet-8 / 2048-d ResNet-50 features, CReFF's model and its baselines'), or auto: mlp "
            "when pretrain or align is on, else the strategy's reference model (linear for clip2fl, none for every "
            "other; flcore.models.METHOD_HEADS).",
            HEAD_NAMES,
        ),
    },
    "Federation": {
        "strategy": _choice("fedavg", "Server strategy, from the registry in strategies/registry.py.", ()),
        "num-server-rounds": _opt(40, "Federated rounds.", _number(1, integer=True)),
        "fraction-train": _opt(0.4, "Fraction of clients sampled per round.", _number(0, 1, low_open=True)),
        "partition-assignment": _choice(
            "server",
            "Which partition a node trains. server: the server gives nodes partitions 0..num-clients-1 in node-ID "
            "order and names one in every message it sends (simulation, where every SuperNode is a virtual "
            "client; nothing is asked before round 1). node: each node trains the partition-id of its own node "
            "config, which the server asks each new node once (deployment). Not used with client-data=local: such "
            "nodes hold no partition.",
            PARTITION_ASSIGNMENTS,
        ),
        "round-timeout": _opt(
            3600.0,
            "Seconds the server waits for client replies per round (and for CCVR's statistics after the last).",
            _number(0, low_open=True),
        ),
        "server-threads": _opt(
            1,
            "Torch intra-op threads of the ServerApp (evaluation, server stages, server-side methods); 0 = torch's "
            "default, one per core. 1 suits small models on a shared CPU: each simulated client has its own.",
            _number(0, integer=True),
        ),
    },
    "Local training": {
        "local-epochs": _opt(5, "Local epochs per round.", _number(1, integer=True)),
        "batch-size": _opt(32, "Local batch size.", _number(1, integer=True)),
        "lr": _opt(0.1, "Local SGD learning rate.", _number(0, low_open=True)),
        "momentum": _opt(0.0, "Local SGD momentum.", _number(0, 1)),
        "weight-decay": _opt(0.0, "Local SGD weight decay.", _number(0)),
        "seed": _opt(
            7, "Seed for data split, sampling, initialisation and training.", _number(0, MAX_SEED, integer=True)
        ),
    },
    "Compute: device, precision, data loading": {
        "device": Option(
            "auto",
            "Where every model computes (client training and evaluation, the server's evaluation, stages 1 and 3, "
            "calibration, the teachers): auto (the GPU this process sees, else the CPU; a client actor sees the GPU "
            "share Ray gives it), cpu, cuda or cuda:N.",
            "auto, cpu, cuda or cuda:N",
            _device_ok,
        ),
        "amp": _choice(
            "off",
            "Mixed precision on a GPU for client training, evaluation and the server stages: off, bf16, or fp16 "
            "(with a gradient scaler). Needs a CUDA device.",
            AMP_MODES,
        ),
        "num-workers": Option(
            "auto",
            "Loader processes that decode image files (imagenet-lt, folder) while the model trains: a number (0 = "
            "in the training process) or auto (the process's CPU share minus one).",
            "auto or an integer >= 0",
            _workers_ok,
            kinds=(str, int),
        ),
    },
    "Evaluation and reports": {
        "eval-every": _opt(
            1, "Centralized evaluation every N rounds (the last round is always evaluated).", _number(1, integer=True)
        ),
        "eval-batch-size": _opt(500, "Batch size of centralized evaluation.", _number(1, integer=True)),
        "output-dir": _opt("outputs", "Folder that receives outputs/<run-id>/ reports."),
    },
    "Logging to TensorBoard and Weights & Biases": {
        "log-to": Option(
            "none",
            "Where the server also logs every metrics.jsonl row (per-class lists as one scalar per class), the run "
            "config as hyperparameters and the figures: none, tensorboard (event files in <run>/tensorboard/), "
            "wandb (files in <run>/wandb/; offline unless you ran `wandb login` or set WANDB_MODE), or both, "
            "comma-separated (tensorboard,wandb). Needs `pip install .[logging]`.",
            "none, or tensorboard and/or wandb comma-separated",
            _log_to_ok,
        ),
        "log-group": _opt(
            "", "Name that groups runs in the loggers: the W&B group (bench.compare sets the grid's); empty = none."
        ),
        "log-name": _opt("", "Name of the run in the loggers (bench.compare sets the cell's); empty = the run id."),
        "wandb-project": _opt("mllm-llava-fl", "W&B project the runs are logged to (log-to=wandb)."),
    },
    "Stage 3: CLIP-supervised global alignment after aggregation": {
        "align": _opt(False, "Stage 3: fine-tune the aggregated model on D_align with CE + beta*KL(q||p) each round."),
        "align-teacher": _opt(
            "tiny",
            "Teacher of stage 3 and of CLIP2FL's clients: an open_clip model name (paper: ViT-L-14-336), tiny (random "
            "weights) or holdout (offline stand-in for CLIP: a model trained on held-out server images).",
        ),
        "align-pretrained": _opt(
            "openai", "Teacher weights: an open_clip tag found in the local cache, or a file path."
        ),
        "holdout-model": _choice(
            "resnet8", "Architecture of the holdout stand-in teacher (align-teacher=holdout).", MODELS
        ),
        "holdout-epochs": _opt(
            30, "Epochs of the holdout teacher's centralized training (SGD, momentum 0.9).", _number(1, integer=True)
        ),
        "holdout-lr": _opt(0.05, "Learning rate of the holdout teacher's training.", _number(0, low_open=True)),
        "holdout-per-class": Option(
            "auto",
            "Training images per class of the holdout teacher (align-teacher=holdout): a class-balanced reserve "
            "drawn after D_align and before the long-tailed cut, so the pool's head gives them up (partition.json "
            "says how many); auto = a tenth of the training split's smallest class. Other teachers reserve none.",
            "auto or an integer >= 1",
            _per_class_ok,
            kinds=(str, int),
        ),
        "align-logits-file": _opt("", "Teacher logits q for D_align computed elsewhere (.pt or .npy, [|D_align|, C])."),
        "align-beta": _opt(
            1.0, "Weight beta of the KL term (0 = CE only; forced to 0 for the random tiny teacher).", _number(0)
        ),
        "align-temperature": _opt(
            3.0, "Distillation temperature T (KL on softmax(./T), scaled by T^2).", _number(0, low_open=True)
        ),
        "align-steps": _opt(
            2, "SGD steps on D_align per alignment (shuffled batches, cycling over D_align).", _number(1, integer=True)
        ),
        "align-lr": _opt(0.01, "SGD learning rate of the alignment fine-tuning.", _number(0, low_open=True)),
        "align-batch-size": _opt(32, "Batch size of the alignment fine-tuning.", _number(1, integer=True)),
        "align-when": _choice("every-round", "Align after every aggregation or only after the last one.", ALIGN_WHEN),
        "align-eval-every": _opt(
            0,
            "Test metrics of the aggregated model right before its alignment (pre-align-*) every N rounds: a second "
            "test-set evaluation each time. 0 = the last round only (always done: alignment.json reports it); N "
            "must be a multiple of eval-every.",
            _number(0, integer=True),
        ),
        "align-loss": _choice("ce+kl", "Alignment loss: ce+kl (the paper), ce (beta = 0), kl (KL only).", ALIGN_LOSSES),
    },
    "Stage 1: server-side global multimodal pretraining": {
        "pretrain": _opt(
            False,
            "Stage 1: start round 1 from g_fl (backbone, and projection if it has LLaVA's width) pretrained with DWP.",
        ),
        "pretrain-teacher": _opt(
            "tiny", "LLaVA teacher: 'tiny' (random, offline) or a model id in the local HF cache or a local folder."
        ),
        "pretrain-data": _opt(
            "digits",
            "Pretraining images: 'digits' (offline stand-in), a folder of images to annotate, or a LLaVA "
            "chat.json/.jsonl.",
        ),
        "pretrain-image-dir": _opt(
            "", "Image folder of a chat.json/.jsonl pretrain-data (default: the file's folder)."
        ),
        "pretrain-max-samples": _opt(
            64, "Images annotated (or records read from a file) for pretraining; 0 = all.", _number(0, integer=True)
        ),
        "pretrain-max-new-tokens": _opt(
            24, "Tokens the teacher may write per annotation answer.", _number(1, integer=True)
        ),
        "pretrain-max-length": _opt(
            1024, "Longest tokenized conversation (image tokens included) in DWP.", _number(8, integer=True)
        ),
        "pretrain-epochs": _opt(4, "DWP epochs (alpha ramps 0 -> 1 over the first half).", _number(1, integer=True)),
        "pretrain-lr": _opt(2e-3, "DWP AdamW learning rate (cosine schedule).", _number(0, low_open=True)),
        "pretrain-batch-size": _opt(128, "DWP batch size per optimizer step.", _number(1, integer=True)),
        "pretrain-grad-accum": _opt(
            1, "Micro-batches per DWP step (must divide pretrain-batch-size).", _number(1, integer=True)
        ),
        "pretrain-grad-checkpointing": _opt(
            False, "Gradient checkpointing in the frozen LLM during DWP (less memory)."
        ),
        "pretrain-cache-dir": _opt(
            "outputs/pretrain-cache", "Annotations, DWP checkpoints and cached pretrained g_fl weights."
        ),
    },
    "Fault tolerance, resume, limits": {
        "max-empty-rounds": _opt(
            3,
            "Rounds in a row without one valid client update after which the run stops with the clients' errors "
            "(0 = never).",
            _number(0, integer=True),
        ),
        "min-replies": _opt(
            1,
            "Valid client updates a round needs to be aggregated; with fewer the global model is kept as it was.",
            _number(1, integer=True),
        ),
        "resume": _opt(
            "",
            "Continue a stopped run from its last finished round: its output folder or its checkpoint.pt ('' = "
            "new run).",
        ),
        "actor-restarts": _opt(
            3,
            "Times a simulation restarts from its last round with fresh Ray actors after a ClientApp process died "
            "(0 = go on with the dead actor, whose later messages fail).",
            _number(0, integer=True),
        ),
        "fail-rate": _opt(
            0.0,
            "Fault injection for tests: probability that a client's train call raises (seeded by seed, round, client).",
            _number(0, 1),
        ),
        "fail-mode": _choice(
            "raise",
            "How an injected failure (fail-rate) ends a client's train call: it raises (raise), or its process "
            "ends at once (exit), as when the OOM killer ends a Ray actor.",
            ("raise", "exit"),
        ),
        "max-message-mb": _opt(
            1024.0, "Largest global model (MB of arrays) a client accepts from the server.", _number(0, low_open=True)
        ),
        "max-upload-mb": _opt(
            1024.0,
            "Largest extra upload (MB of CCVR/CReFF statistics per reply) the server reads; larger replies are "
            "rejected before they are decoded.",
            _number(0, low_open=True),
        ),
        "max-examples": _opt(
            10_000_000,
            "Most num-examples one client's update may weigh in an average, whatever it reports.",
            _number(1, integer=True),
        ),
        "max-weight-ratio": _opt(
            10.0,
            "A client whose data size the server does not know weighs at most this times the round's lower "
            "median num-examples.",
            _number(1),
        ),
        "weighting": _choice(
            "examples",
            "What a client's update weighs in the average: its reported num-examples under the caps above "
            "(examples), that capped at the round's lower median claim (capped-median), or 1 whatever it "
            "reports (uniform); see docs/deployment.md.",
            ("examples", "capped-median", "uniform"),
        ),
        "max-update-ratio": _opt(
            10.0,
            "An update (its weights minus the global model's) whose L2 norm exceeds this times the round's lower "
            "median update norm is clipped to that norm, under every strategy.",
            _number(1),
        ),
    },
    "Strategies and long-tail baselines": {
        "proximal-mu": _opt(0.01, "FedProx proximal weight mu (strategy=fedprox; CReFF's baseline 0.01).", _number(0)),
        "server-momentum": _opt(
            0.9,
            "FedAvgM server momentum beta over the trained parameters (strategy=fedavgm; FL-bench's default 0.9).",
            _number(0, 0.999),
        ),
        "server-lr": _opt(
            1.0,
            "FedAvgM server learning rate (strategy=fedavgm; FL-bench's default 1.0, Hsu et al.).",
            _number(0, 10, low_open=True),
        ),
        "server-nesterov": _opt(
            True,
            "FedAvgM: Nesterov momentum (FL-bench's default); false gives plain heavy-ball momentum (Hsu et al.).",
        ),
        "trim-fraction": _opt(
            0.2,
            "Fraction of updates cut from each tail of every coordinate (strategy=fedtrimmedavg; Yin et al.).",
            _number(0, 0.49),
        ),
        "loss": _choice(
            "ce",
            "Client loss: ce (cross-entropy), focal (Fed-Focal; focal with gamma 0 is ce), fedlc (FedLC's logit "
            "calibration) or fedrs (FedRS's restricted softmax); strategy=ratioloss, fedetf and fedyoyo set their own.",
            LOSSES,
        ),
        "focal-gamma": _opt(2.0, "Focusing parameter gamma of the focal loss (loss=focal).", _number(0, 10)),
        "tau-norm": _opt(
            0.0,
            "Post-hoc tau-normalisation of the final classifier, w_c / ||w_c||^tau (0 = off, Kang et al. use 0..1).",
            _number(0, 2),
        ),
        "virtual-per-class": _opt(
            100,
            "Features per class the server re-trains the classifier on (CReFF's federated features; CCVR's "
            "virtual ones).",
            _number(1, 10000, integer=True),
        ),
        "calibration-epochs": _opt(
            300,
            "Epochs of server-side classifier re-training (strategy=ccvr/creff; CReFF 300).",
            _number(1, integer=True),
        ),
        "calibration-lr": _opt(
            0.01, "SGD learning rate of that re-training (CReFF's lr_net 0.01).", _number(0, low_open=True)
        ),
        "match-epochs": _opt(
            100,
            "Gradient-matching steps on the federated features per round (strategy=creff; CReFF 100).",
            _number(1, integer=True),
        ),
        "feature-lr": _opt(
            0.1, "Learning rate of the federated features (strategy=creff; CReFF 0.1).", _number(0, low_open=True)
        ),
        "creff-dsa": _opt(
            True,
            "Differentiable siamese augmentation (Zhao and Bilen, ICML 2021) of the images behind the clients' class "
            "gradients (strategy=creff/clip2fl): each of 10 draws of up to 32 images per class gets one of color, "
            "crop, cutout, flip, scale, rotate, shared by the draw, as CReFF's and CLIP2FL's code do; seeded by "
            "seed, round and client.",
        ),
    },
    "FedDF and FedBE (server-side ensemble distillation on unlabeled server images)": {
        "distill-data": _opt(
            DISTILL_ON_UNHELD,
            "Unlabeled images the server distils the clients' ensemble on (strategy=feddf/fedbe): unused-train (the "
            "training images the recipe gives neither D_align nor any client: those the long tail cuts away; FedDF "
            "and FedBE distil on a large unlabeled set), align (D_align's images, labels dropped) or a folder of "
            "images (searched recursively).",
        ),
        "distill-lr": _opt(
            0.001,
            "Learning rate of the server distillation (FedDF: Adam 1e-3 with cosine annealing; FedBE: SGD, "
            "momentum 0.9, 1e-3).",
            _number(0, 10, low_open=True),
        ),
        "distill-batch-size": _opt(
            128, "Batch size of the server distillation (FedDF's and FedBE's 128).", _number(1, integer=True)
        ),
        "feddf-steps": _opt(
            10000,
            "Most distillation steps per round, also the cosine schedule's length (strategy=feddf; FedDF's 10^4).",
            _number(1, integer=True),
        ),
        "feddf-eval-every": _opt(
            100,
            "Steps between two measurements of the student's accuracy on D_align, FedDF's labelled validation set "
            "(strategy=feddf; FedDF's 100).",
            _number(1, integer=True),
        ),
        "feddf-patience": _opt(
            1000,
            "Steps without a higher D_align accuracy after which FedDF stops distilling (strategy=feddf; FedDF's "
            "10^3).",
            _number(1, integer=True),
        ),
        "fedbe-samples": _opt(
            10,
            "Models sampled from the Gaussian over the client weights per round (strategy=fedbe; FedBE's M 10).",
            _number(0, 1000, integer=True),
        ),
        "fedbe-var-scale": _opt(
            0.1,
            "Factor on the standard deviation of FedBE's Gaussian over the normalised client updates (strategy=fedbe; "
            "FedBE's var_scale 0.1).",
            _number(0),
        ),
        "fedbe-epochs": _opt(
            20,
            "Epochs of SGD + SWA distillation over the unlabeled images per round (strategy=fedbe; FedBE's 20).",
            _number(1, integer=True),
        ),
    },
    "Ratio Loss, FedLC, FedRS (client losses against label skew)": {
        "ratio-alpha": _opt(
            1.0,
            "Ratio Loss class weight alpha + beta * Ra_c: alpha (strategy=ratioloss; Wang et al.'s 1.0).",
            _number(0, 100),
        ),
        "ratio-beta": _opt(
            0.1,
            "Ratio Loss class weight alpha + beta * Ra_c: beta (strategy=ratioloss; Wang et al.'s 0.1).",
            _number(0, 100),
        ),
        "fedlc-tau": _opt(
            1.0,
            "FedLC calibration strength tau in f_c - tau * n_c^(-1/4) (loss=fedlc; the paper tunes it, FL-bench's "
            "default 1.0).",
            _number(0, 100),
        ),
        "fedrs-alpha": _opt(
            0.5,
            "FedRS scale of the logits of classes a client lacks (loss=fedrs; the paper's alpha 0.5; with "
            "fedrs-variant=paper, 1 = ce).",
            _number(0, 1),
        ),
        "fedrs-variant": _choice(
            "authors",
            "FedRS form (loss=fedrs): authors (FedRepo's code: every class's logit w_c.h, without the bias, scaled "
            "by alpha + (1 - alpha) * n_c / max n, gradient norm clipped at 100) or paper (the logits of absent "
            "classes times alpha).",
            FEDRS_VARIANTS,
        ),
    },
    "FedETF (fixed simplex-ETF classifier; its clients' personalisation after the last round)": {
        "fedetf-finetune-rounds": _opt(
            20,
            "Alternations of ETF and projection fine-tuning in each client's personalisation after the last round "
            "(strategy=fedetf; FedETF's 20; 0 = no personalisation, no personalized-accuracy).",
            _number(0, 1000, integer=True),
        ),
        "fedetf-finetune-epochs": _opt(
            3,
            "Epochs of each half of one alternation, the ETF's and the projection's (strategy=fedetf; FedETF's 3).",
            _number(1, 1000, integer=True),
        ),
        "fedetf-etf-lr": _opt(
            0.1,
            "Learning rate of plain SGD on the ETF during personalisation (strategy=fedetf; FedETF's 0.1).",
            _number(0, 10, low_open=True),
        ),
        "fedetf-projection-lr": _opt(
            0.05,
            "Learning rate of SGD on the ETF classifier's projection during personalisation, with the run's "
            "momentum and weight decay (strategy=fedetf; FedETF's 0.05).",
            _number(0, 10, low_open=True),
        ),
    },
    "FedLoGe (static sparse ETF classifier, realigned global head; its clients' local heads after the last round)": {
        "fedloge-sparsity": _opt(
            0.6,
            "Fraction of the simplex ETF's entries the SSE-C zeroes before its remaining ones are optimised "
            "(strategy=fedloge; FedLoGe's beta 0.6).",
            _number(0, 0.95),
        ),
        "fedloge-etf-steps": _opt(
            10000,
            "Adam steps (lr 1e-4) that spread the SSE-C's class vectors apart at norm 0.1, run once on the server "
            "(strategy=fedloge; FedLoGe's 10000).",
            _number(0, 100000, integer=True),
        ),
        "fedloge-local-epochs": _opt(
            5,
            "Epochs of each client's local head on the final backbone's features in its personalisation after the "
            "last round, at the run's lr, momentum and weight decay (strategy=fedloge; FedLoGe's local_ep 5; 0 = no "
            "personalisation, no personalized-accuracy).",
            _number(0, 1000, integer=True),
        ),
    },
    "FedYoYo (weak and strong views, a drifting logit-adjustment prior, self-distillation; a server EMA of effective "
    "numbers)": {
        "fedyoyo-lambda": _opt(
            4.0,
            "Weight lambda of the self-distillation term, times min(round / fedyoyo-warmup, 1) (strategy=fedyoyo; "
            "fedyoyo.sh's lamda 4.0, main_fedyoyo.py's default 1.5).",
            _number(0, 100),
        ),
        "fedyoyo-warmup": _opt(
            50,
            "Rounds over which the self-distillation weight grows linearly to fedyoyo-lambda (strategy=fedyoyo; "
            "FedYoYo's warmup 50).",
            _number(1, 100000, integer=True),
        ),
        "fedyoyo-gamma": _opt(
            0.1,
            "Step of the client's prior towards its own class distribution at every local step, prior <- (1 - gamma) "
            "prior + gamma local (strategy=fedyoyo; FedYoYo's gamma 0.1; 0 = the server's prior throughout).",
            _number(0, 1),
        ),
        "fedyoyo-tau": _opt(
            1.5,
            "Exponent tau of the logit adjustment, logits + log(prior^tau + 1e-9) (strategy=fedyoyo; FedYoYo's 1.5; "
            "0 = no adjustment).",
            _number(0, 10),
        ),
        "fedyoyo-temperature": _opt(
            1.5,
            "Temperature T of the self-distillation from the weak view to the strong one, without T^2 "
            "(strategy=fedyoyo; FedYoYo's T 1.5).",
            _number(0, 100, low_open=True),
        ),
    },
    "CLIP2FL (CReFF + client-side distillation from the align-teacher CLIP + a server-side text contrast)": {
        "kd-weight": _opt(
            1.0,
            "Weight of the client's CLIP distillation term (strategy=clip2fl; CLIP2FL's alpha 1; 0 = CReFF's client).",
            _number(0, 100),
        ),
        "kd-temperature": _opt(
            3.0,
            "Distillation temperature T; the KL term is scaled by T^2 (strategy=clip2fl; CLIP2FL's T 3).",
            _number(0, 100, low_open=True),
        ),
        "clip2fl-prompt": Option(
            "a photo of a {}",
            "CLIP prompt of the class text features (strategy=clip2fl: client distillation and server contrast): "
            "one template with {} for the class name (CLIP2FL's 'a photo of a {}') or ensemble (CLIP's 80 "
            "ImageNet templates).",
            "ensemble or a text with exactly one {} and no other braces",
            _prompt_ok,
        ),
        "contrast-weight": _opt(
            0.001,
            "Weight of the server's contrastive term between the federated features and the CLIP text features "
            "of their classes while matching them (strategy=clip2fl; CLIP2FL's contrast_alpha 0.001; 0 = CReFF's "
            "server).",
            _number(0, 100),
        ),
        "contrast-temperature": _opt(
            0.1,
            "Temperature of that contrastive term (strategy=clip2fl; CLIP2FL's ins_temp 0.1).",
            _number(0, 100, low_open=True),
        ),
    },
}
SCHEMA: dict[str, Option] = {key: option for part in SECTIONS.values() for key, option in part.items()}


def _type_ok(option: Option, value: Any) -> bool:
    if option.kinds:
        return isinstance(value, option.kinds) and not isinstance(value, bool)
    default = option.default
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int | float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def _check_key(key: str, value: Any, option: Option, choices: Sequence[str]) -> None:
    if not _type_ok(option, value):
        kind = " or ".join(t.__name__ for t in option.kinds) or type(option.default).__name__
        raise ConfigError(f"run-config key '{key}' = {value!r} has the wrong type: expected {kind}.")
    if choices and value not in choices:
        raise ConfigError(f"run-config key '{key}' = {value!r} is not allowed: choose one of {', '.join(choices)}.")
    if option.check and not option.check(value):
        raise ConfigError(f"run-config key '{key}' = {value!r} is not allowed: expected {option.allowed}.")
    if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
        raise ConfigError(
            f"run-config key '{key}' = {value!r} is not allowed: Flower's run config holds 64-bit integers."
        )


def _check_folders(cfg: Settings) -> None:
    """Folders the run writes to: never '' (that would be the working directory), never an existing file."""
    keys = ("output-dir", "pretrain-cache-dir") if cfg.pretrain else ("output-dir",)
    for key in keys:
        value = cfg[key]
        if not value.strip():
            raise ConfigError(f"run-config key '{key}' is empty: expected a folder to write into, e.g. 'outputs'.")
        path = Path(value).expanduser()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run-config key '{key}' = {value!r} is an existing file: expected a folder.")


def _check_paths(cfg: Settings) -> None:
    """Files and folders the server reads or writes must exist where it runs (a SuperNode holding its own data
    does not have them, so its ClientApp skips these checks)."""
    _check_folders(cfg)
    if cfg.dataset in DATASETS_WITH_FILES:
        root = cfg.data_dir
        if not root:
            raise ConfigError(f"run-config key 'data-dir' is empty: dataset '{cfg.dataset}' needs a local data root.")
        if not Path(root).expanduser().is_dir():
            raise ConfigError(f"run-config key 'data-dir' = {root!r} is not an existing folder.")
    source = cfg.align_data
    if source not in ALIGN_SOURCES and not Path(source).expanduser().is_dir():
        raise ConfigError(
            f"run-config key 'align-data' = {source!r} is not allowed: expected {', '.join(ALIGN_SOURCES)} or an "
            "existing folder with one subfolder per class."
        )
    if cfg.align and cfg.align_logits_file and not Path(cfg.align_logits_file).expanduser().is_file():
        raise ConfigError(f"run-config key 'align-logits-file' = {cfg.align_logits_file!r} is not an existing file.")
    if cfg.pretrain and cfg.pretrain_data != "digits" and not Path(cfg.pretrain_data).expanduser().exists():
        raise ConfigError(
            f"run-config key 'pretrain-data' = {cfg.pretrain_data!r} is not allowed: expected 'digits', a folder "
            "of images or a LLaVA chat.json/.jsonl file that exists."
        )
    distill = cfg.distill_data
    if distill not in DISTILL_SOURCES and not Path(distill).expanduser().is_dir():
        raise ConfigError(
            f"run-config key 'distill-data' = {distill!r} is not allowed: expected {', '.join(DISTILL_SOURCES)} or "
            "an existing folder of images."
        )


def _check_relations(cfg: Settings) -> None:
    """Rules that tie several keys together."""
    if cfg.dataset == "imagenet-lt" and cfg.imbalance_factor != 1:
        raise ConfigError(
            f"run-config key 'imbalance-factor' = {cfg.imbalance_factor!r} is not allowed for imagenet-lt: "
            "expected 1 (ImageNet-LT's published index is already long-tailed)."
        )
    if cfg.holdout_teacher and cfg.dataset == "imagenet-lt":
        raise ConfigError(
            "run-config key 'align-teacher' = 'holdout' is not allowed for dataset 'imagenet-lt': the stand-in "
            "teacher's class-balanced reserve comes from the training split, which is already long-tailed, so it "
            "would take the tail classes' few images from the clients; expected an open_clip model name or tiny "
            "(with q from align-logits-file)."
        )
    _check_align_data(cfg)
    if cfg.few_threshold > cfg.many_threshold:
        raise ConfigError(
            f"run-config key 'few-threshold' = {cfg.few_threshold!r} is not allowed: expected <= many-threshold "
            f"({cfg.many_threshold!r})."
        )
    if cfg.align and cfg.align_eval_every % cfg.eval_every:
        raise ConfigError(
            f"run-config key 'align-eval-every' = {cfg.align_eval_every!r} is not allowed: expected 0 or a multiple "
            f"of eval-every ({cfg.eval_every!r}); pre-alignment metrics are kept only on evaluated rounds."
        )
    if cfg.pretrain_batch_size % cfg.pretrain_grad_accum:
        raise ConfigError(
            f"run-config key 'pretrain-grad-accum' = {cfg.pretrain_grad_accum!r} is not allowed: expected a "
            f"divisor of pretrain-batch-size ({cfg.pretrain_batch_size!r})."
        )
    if cfg.strategy == "ratioloss" and cfg.loss != "ce":
        raise ConfigError(
            f"run-config key 'loss' = {cfg.loss!r} is not allowed with strategy 'ratioloss': the Ratio Loss is "
            "that method's client loss; expected ce (the default)."
        )
    _check_own_client_loss(cfg)
    per_round = cfg.clients_per_round
    if cfg.min_replies > per_round:
        raise ConfigError(
            f"run-config key 'min-replies' = {cfg.min_replies!r} is not allowed: expected <= the clients sampled "
            f"per round ({per_round} = num-clients x fraction-train)."
        )
    if cfg.amp != "off" and cfg.device == "cpu":
        raise ConfigError(
            f"run-config key 'amp' = {cfg.amp!r} is not allowed with device = 'cpu': mixed precision runs on a "
            "CUDA device; expected off, or device auto / cuda."
        )
    if cfg.model == "resnet8" and cfg.image_size > 64:
        raise ConfigError(
            f"run-config key 'image-size' = {cfg.image_size!r} is not allowed for resnet8: expected <= 64."
        )
    if cfg.local_data and cfg.strategy == "clip2fl" and cfg.holdout_teacher:
        raise ConfigError(
            "run-config key 'align-teacher' = 'holdout' is not allowed with strategy 'clip2fl' and client-data "
            "'local': CLIP2FL's clients would train the stand-in teacher from the run's dataset, which nodes holding "
            "their own data do not have; expected an open_clip teacher, or client-data = partition."
        )


OWN_CLIENT_LOSS = {  # strategy -> (why another `loss` is refused, why `tau-norm` is; None: tau-norm applies)
    "fedetf": (
        "its balanced softmax is that method's client loss",
        "its classifier is a fixed ETF, with no class weights to normalise",
    ),
    "fedloge": (
        "its clients train the SSE-C and the global head with cross-entropy, as its authors' do",
        "its global head is realigned to equal row norms already",
    ),
    "fedyoyo": ("its logit-adjusted loss with self-distillation is that method's client loss", None),
}


def _check_own_client_loss(cfg: Settings) -> None:
    """FedETF, FedLoGe and FedYoYo bring their own client loss (another would be ignored), and the first two their
    own classifier, whose weights tau-norm must not touch."""
    if cfg.strategy not in OWN_CLIENT_LOSS:
        return
    loss_reason, tau_reason = OWN_CLIENT_LOSS[cfg.strategy]
    if cfg.loss != "ce":
        raise ConfigError(
            f"run-config key 'loss' = {cfg.loss!r} is not allowed with strategy {cfg.strategy!r}: {loss_reason}; "
            "expected ce (the default)."
        )
    if tau_reason and cfg.tau_norm != 0:
        raise ConfigError(
            f"run-config key 'tau-norm' = {cfg.tau_norm!r} is not allowed with strategy {cfg.strategy!r}: "
            f"{tau_reason}; expected 0."
        )


def _check_align_data(cfg: Settings) -> None:
    if cfg.align_data == "val" and cfg.dataset != "imagenet-lt":
        raise ConfigError(
            f"run-config key 'align-data' = 'val' is not allowed for dataset '{cfg.dataset}': only imagenet-lt "
            "has a published val split; expected auto, train or a folder with one subfolder per class."
        )
    if cfg.align_data == "train" and cfg.dataset == "imagenet-lt":
        raise ConfigError(
            "run-config key 'align-data' = 'train' is not allowed for dataset 'imagenet-lt': its training split is "
            "already long-tailed, so a class-balanced D_align carved from it would take the tail classes' few "
            "images from the clients; expected auto or val (ImageNet_LT_val.txt), or a folder with one subfolder "
            "per class."
        )


# The settings that determine the data split: equal values give identical partitions (`SettingsView.data_key`).
DATA_KEYS = (
    "dataset",
    "data-dir",
    "client-data",
    "image-size",
    "imbalance-factor",
    "partitioner",
    "dirichlet-alpha",
    "num-clients",
    "min-partition-size",
    "align-per-class",
    "align-data",
    "seed",
)


def field_name(key: str) -> str:
    """The `Settings` attribute of a run-config key: `num-server-rounds` is `cfg.num_server_rounds`."""
    return key.replace("-", "_")


def _typed(option: Option, value: Any) -> Scalar:
    """A checked value as the option's type: TOML's `10` is 10.0 for a float key, 1.0 is 1 for an integer key."""
    if option.kinds or isinstance(option.default, bool | str):
        return value
    return int(value) if isinstance(option.default, int) else float(value)


def _field_type(option: Option) -> Any:
    if option.kinds:
        return option.kinds[0] if len(option.kinds) == 1 else option.kinds[0] | option.kinds[1]
    return type(option.default)


class SettingsView(Mapping[str, Scalar]):
    """What `Settings` adds to its fields: the facts several modules derive from the same keys, and a read-only
    mapping keyed by run-config key (`cfg["seed"]`, `dict(cfg)`) for Flower's `Context` and the reports.

    A base class, because `Settings` itself is made from the schema (`make_dataclass`): its fields are the schema's
    keys, so adding a key to the schema adds the attribute.
    """

    __slots__ = ()

    def __getitem__(self, key: str) -> Scalar:
        if key not in SCHEMA:
            raise KeyError(key)
        return getattr(self, field_name(key))

    def __iter__(self) -> Iterator[str]:
        return iter(SCHEMA)

    def __len__(self) -> int:
        return len(SCHEMA)

    def __hash__(self) -> int:
        return hash(tuple(self.values()))

    def to_dict(self) -> dict[str, Scalar]:
        """A plain dict keyed by run-config key: what Flower's `Context(run_config=...)` and JSON take."""
        return dict(self.items())

    def with_(self, **changes: Scalar) -> Self:
        """A copy with some fields changed (`cfg.with_(proximal_mu=0.0)`), each value checked and typed like its
        key's; the rules between keys are not re-checked (a changed copy is the caller's own variant)."""
        by_field = {field_name(key): (key, option) for key, option in SCHEMA.items()}
        unknown = sorted(set(changes) - set(by_field))
        if unknown:
            raise ConfigError(f"unknown Settings field(s): {', '.join(unknown)}.")
        typed = {}
        for name, value in changes.items():
            key, option = by_field[name]
            _check_key(key, value, option, option.choices)
            typed[name] = _typed(option, value)
        return replace(self, **typed)  # type: ignore[type-var]

    def overlay(self, entries: Mapping[str, Any]) -> Self:
        """A copy with the run-config keys among `entries` (a round's config from the server) taking their values
        there, checked like `with_`; entries that are not run-config keys are not settings and are left out."""
        return self.with_(**{field_name(key): value for key, value in entries.items() if key in SCHEMA})

    @property
    def local_data(self) -> bool:
        """Every SuperNode trains on its own folder (client-data = local): no partition, no split keys."""
        return self.client_data == LOCAL

    @property
    def holdout_teacher(self) -> bool:
        """The teacher is the offline stand-in for CLIP trained on held-out server images (align-teacher)."""
        return self.align_teacher == HOLDOUT

    @property
    def align_source(self) -> str:
        """`align-data` with `auto` resolved: val for imagenet-lt (whose tail classes are too small to give up
        images), train for every other dataset."""
        source = self.align_data
        if source != "auto":
            return source
        return "val" if self.dataset == "imagenet-lt" else "train"

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round: num-clients x fraction-train, at least one (Flower's FedAvg rounds down)."""
        return max(1, int(self.num_clients * self.fraction_train))

    @property
    def data_key(self) -> tuple:
        """The settings that determine the data split: equal keys give identical partitions. `holdout-per-class`
        counts only with the holdout teacher (0 otherwise: no reserve), so every other run keeps one split."""
        reserve = self.holdout_per_class if self.holdout_teacher else 0
        return (*((k, self[k]) for k in DATA_KEYS), ("holdout-per-class", reserve))


# One frozen field per schema key, typed as its option; `validate` is the way to build one.
Settings = make_dataclass(
    "Settings",
    [(field_name(key), _field_type(option)) for key, option in SCHEMA.items()],
    bases=(SettingsView,),
    frozen=True,
    eq=False,
)
Settings.__module__ = __name__  # pickles by name (Ray, loader workers)
Settings.__doc__ = (
    "A checked run config: one attribute per schema key (`cfg.num_server_rounds`), typed as the key's option, "
    "frozen; also a read-only mapping keyed by run-config key. Built by `validate`."
)


def validate(
    raw: Mapping[str, Any],
    choices: Mapping[str, Iterable[str]] | None = None,
    *,
    paths: bool = True,
) -> Settings:
    """Return the complete, checked settings: defaults filled in, every key and relation validated, each
    value typed as its option.

    `choices` supplies allowed values that live in other packages (the strategy registry), so this
    module depends on none of them. `paths=False` skips the checks of the server's files and folders
    (`_check_paths`), for a ClientApp on a machine that does not hold them.
    """
    unknown = sorted(set(raw) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}; known keys: {', '.join(SCHEMA)}.")
    extra = {k: tuple(v) for k, v in (choices or {}).items()}
    values: dict[str, Scalar] = {}
    for key, option in SCHEMA.items():
        value = raw.get(key, option.default)
        _check_key(key, value, option, extra.get(key, option.choices))
        values[field_name(key)] = _typed(option, value)
    cfg = Settings(**values)
    if paths:
        _check_paths(cfg)
    _check_relations(cfg)
    return cfg
