"""Stage 3: CLIP-supervised global alignment of the aggregated model, as a server stage.

Right after each aggregation (or only the last one) the server fine-tunes the global model on its
class-balanced D_align with

    L = CE(y, p) + beta * T^2 * KL(softmax(q / T) || softmax(p / T)),

where p are the model's logits and q the zero-shot logits of a CLIP teacher; the aligned weights become
the next round's global model. q is computed once per run (or read from a file computed elsewhere) and
cached on disk, so the teacher never runs again across rounds and reruns, and it never exists on a client.
Because the stage only wraps the aggregation output, it works with any strategy in the registry.

Each evaluated round records the model's metrics before alignment (`pre-align-*`) next to the usual
ones (after alignment); the last round writes the paper's Figure 4 (`alignment.png`, `alignment.json`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flwr.app import ArrayRecord, MetricRecord  # noqa: E402
from torch import nn  # noqa: E402

from flcore.config import ConfigError  # noqa: E402
from flcore.data import Batches, Dataset, ImageSet  # noqa: E402
from flcore.experiment import load_record, prepare, seeded_generator, to_record  # noqa: E402
from flcore.reports import write_json  # noqa: E402
from flcore.training import TrainSettings, train  # noqa: E402
from strategies.stages import ServerContext, Stages  # noqa: E402

GROUP_KEYS = ("accuracy", "balanced-accuracy", "many-accuracy", "medium-accuracy", "few-accuracy")
ALIGN_STREAM = 1_000_003  # generator stream of the server's alignment, apart from every client partition
PLACEHOLDER_NAME = re.compile(r"^(class[ _-]?)?\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class AlignSettings:
    """The alignment's optimisation settings; `beta` is the effective one (0 for a random teacher)."""

    steps: int
    lr: float
    batch_size: int
    beta: float
    temperature: float
    loss: str
    when: str
    augment: bool

    @classmethod
    def from_config(cls, cfg: Mapping, beta: float) -> AlignSettings:
        return cls(
            int(cfg["align-steps"]),
            float(cfg["align-lr"]),
            int(cfg["align-batch-size"]),
            beta,
            float(cfg["align-temperature"]),
            str(cfg["align-loss"]),
            str(cfg["align-when"]),
            bool(cfg["augment"]),
        )


class AlignLoss:
    """CE and T^2-scaled KL(q || p) on batches whose labels are D_align positions (to look up y and q)."""

    def __init__(self, labels: torch.Tensor, q: torch.Tensor, settings: AlignSettings) -> None:
        self.labels, self.q, self.s = labels, q, settings
        self.sums = {"align-ce": 0.0, "align-kl": 0.0}
        self.seen = 0

    def __call__(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        s, n = self.s, len(idx)
        loss = logits.new_zeros(())
        if s.loss != "kl":
            ce = F.cross_entropy(logits, self.labels[idx])
            self.sums["align-ce"] += ce.item() * n
            loss = loss + ce
        if s.loss != "ce" and s.beta > 0:
            t = s.temperature
            kl = F.kl_div(
                F.log_softmax(logits / t, 1), F.log_softmax(self.q[idx] / t, 1), reduction="batchmean", log_target=True
            )
            self.sums["align-kl"] += kl.item() * n
            loss = loss + s.beta * t * t * kl
        self.seen += n
        return loss

    def means(self) -> dict[str, float]:
        return {k: v / max(self.seen, 1) for k, v in self.sums.items()}


class StepBatches:
    """The first `steps` batches of D_align's shuffled epochs, one epoch after another (one `train` epoch)."""

    def __init__(self, batches: Batches, steps: int) -> None:
        self.batches, self.steps = batches, steps

    def iterate(
        self, shuffle: bool, augment: bool, gen: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        done = 0
        while done < self.steps:
            for batch in self.batches.iterate(shuffle=shuffle, augment=augment, gen=gen):
                yield batch
                done += 1
                if done == self.steps:
                    return


def fine_tune(
    model: nn.Module,
    align: ImageSet,
    dataset: Dataset,
    image_size: int,
    q: torch.Tensor,
    settings: AlignSettings,
    gen: torch.Generator,
) -> dict[str, float]:
    """SGD on D_align with the alignment loss, through the same loop as local training.

    The batches carry each image's position in D_align instead of its label, so the loss can fetch both
    the label and the teacher's logits; with beta = 0 this is exactly CE fine-tuning on D_align.
    """
    indexed = ImageSet(np.arange(len(align)), align.images, align.files)
    batches = Batches(indexed, dataset, image_size, settings.batch_size)
    loss = AlignLoss(torch.from_numpy(align.labels), q, settings)
    plain = TrainSettings(1, settings.lr, 0.0, 0.0, settings.augment)
    stats = train(model, StepBatches(batches, settings.steps), plain, gen, loss)
    return {"align-loss": stats["train-loss"], **loss.means(), "align-steps": stats["local-steps"]}


# --- teacher logits: from a file, or computed once and cached -------------------------------------


@dataclass
class TeacherLogits:
    """q for D_align, where it came from, and the teacher's own zero-shot test accuracy (None if unknown)."""

    align: torch.Tensor
    source: str
    random: bool
    test_accuracy: float | None


def check_class_names(classes: Sequence[str]) -> None:
    """CLIP prompts need real class names: placeholders ('class 3', '17'), blanks or duplicates are errors."""
    if not classes or any(not str(c).strip() for c in classes) or len(set(classes)) != len(classes):
        raise ConfigError(
            f"align = true needs distinct, non-empty class names for the CLIP prompts; got {list(classes)[:5]}..."
        )
    if all(PLACEHOLDER_NAME.match(str(c).strip()) for c in classes):
        raise ConfigError(
            f"align = true: the dataset's class names are missing (got placeholders like {classes[0]!r}); the CLIP "
            "teacher prompts with class names. Put a classnames.txt (one name per line) in data-dir, or pass "
            "align-logits-file."
        )


def load_logits_file(
    path: str, align_idx: np.ndarray, classes: Sequence[str], test_labels: np.ndarray
) -> TeacherLogits:
    """Logits computed elsewhere: a .npy [|D_align|, C] array, or a .pt tensor or dict.

    A dict holds `logits` and optionally `classes` (must equal the dataset's), `indices` (must equal
    D_align's training-split indices) and `test-logits` (for the teacher's test accuracy).
    """
    key, file = "align-logits-file", Path(path).expanduser()
    if file.suffix == ".npy":
        obj: dict = {"logits": np.load(file)}
    elif file.suffix == ".pt":
        loaded = torch.load(file, map_location="cpu", weights_only=True)
        obj = loaded if isinstance(loaded, dict) else {"logits": loaded}
    else:
        raise ConfigError(f"run-config key '{key}' = {path!r}: expected a .npy or .pt file.")
    if "logits" not in obj:
        raise ConfigError(f"run-config key '{key}' = {path!r}: the dict has no 'logits' entry.")
    logits = torch.as_tensor(np.asarray(obj["logits"]), dtype=torch.float32)
    want = (len(align_idx), len(classes))
    if tuple(logits.shape) != want:
        raise ConfigError(
            f"run-config key '{key}' = {path!r} holds logits of shape {tuple(logits.shape)}: expected {want} "
            f"(|D_align| = {want[0]} images x {want[1]} classes)."
        )
    if "classes" in obj and [str(c) for c in obj["classes"]] != [str(c) for c in classes]:
        raise ConfigError(
            f"run-config key '{key}' = {path!r}: its classes {list(obj['classes'])[:5]}... do not match the "
            f"dataset's {list(classes)[:5]}..."
        )
    if "indices" in obj and not np.array_equal(np.asarray(obj["indices"]), align_idx):
        raise ConfigError(f"run-config key '{key}' = {path!r}: its indices are not this run's D_align.")
    test = obj.get("test-logits")
    acc = None
    if test is not None and len(test) == len(test_labels):
        acc = float((np.asarray(test).argmax(1) == test_labels).mean())
    return TeacherLogits(logits, f"file {file}", False, acc)


def teacher_embed_dim(cfg: Mapping) -> int:
    """The teacher's feature size without loading it (tiny is built at projection-dim)."""
    import open_clip

    name = str(cfg["align-teacher"])
    if name == "tiny":
        return int(cfg["projection-dim"])
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ConfigError(
            f"run-config key 'align-teacher' = {name!r} is not allowed: expected tiny or an open_clip model name "
            "(open_clip.list_models()), e.g. 'ViT-L-14-336'."
        )
    return int(model_cfg["embed_dim"])


def _cache_key(cfg: Mapping, align_idx: np.ndarray, split: str) -> str:
    from flcore.clip_teacher import TEMPLATES, TINY_SEED, tiny_config

    name, pretrained = str(cfg["align-teacher"]), str(cfg["align-pretrained"])
    weights = Path(pretrained).expanduser()
    teacher = (
        {"tiny": tiny_config(int(cfg["projection-dim"])), "seed": TINY_SEED}
        if name == "tiny"
        else {"name": name, "pretrained": pretrained, "bytes": weights.stat().st_size if weights.is_file() else None}
    )
    data = {k: cfg[k] for k in ("dataset", "data-dir", "image-size")}
    body = json.dumps({"teacher": teacher, "data": data, "split": split, "templates": len(TEMPLATES)}, sort_keys=True)
    digest = hashlib.sha256(body.encode() + np.ascontiguousarray(align_idx, dtype=np.int64).tobytes())
    return digest.hexdigest()[:20]


def compute_teacher_logits(cfg: Mapping, dataset: Dataset, align: ImageSet, align_idx: np.ndarray) -> TeacherLogits:
    """q for D_align and test logits, from the disk cache or by one teacher forward over each set."""
    from flcore import clip_teacher

    cache = Path(str(cfg["output-dir"])).expanduser() / "teacher-cache"
    files = {split: cache / f"{_cache_key(cfg, align_idx, split)}.pt" for split in ("align", "test")}
    random_teacher = cfg["align-teacher"] == "tiny"
    source = (
        "tiny open_clip config with RANDOM weights (no knowledge)"
        if random_teacher
        else f"{cfg['align-teacher']} / {cfg['align-pretrained']}"
    )
    if not all(f.is_file() for f in files.values()):
        teacher = clip_teacher.load_teacher(
            str(cfg["align-teacher"]), str(cfg["align-pretrained"]), int(cfg["projection-dim"]), cache / "configs"
        )
        print(f"[align] computing teacher logits once with {teacher.label}", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        for split, images in (("align", align), ("test", dataset.test)):
            tmp = files[split].with_suffix(".tmp")  # write then rename: a crash never leaves half a cache file
            torch.save(clip_teacher.zero_shot_logits(teacher, dataset.classes, images), tmp)
            tmp.replace(files[split])
    q = torch.load(files["align"], weights_only=True)
    test = torch.load(files["test"], weights_only=True)
    acc = float((test.argmax(1).numpy() == dataset.test.labels).mean())
    return TeacherLogits(q, source, random_teacher, acc)


def effective_beta(cfg: Mapping, random_teacher: bool) -> tuple[float, str]:
    """The beta the loss uses, and why it differs from `align-beta` (empty when it does not)."""
    beta, loss = float(cfg["align-beta"]), str(cfg["align-loss"])
    if loss == "kl" and (random_teacher or beta == 0):
        raise ConfigError(
            f"run-config key 'align-loss' = 'kl' has nothing to learn from: align-beta = {beta} and the teacher is "
            f"{'tiny with random weights' if random_teacher else 'unused'}; use a real teacher or align-logits-file "
            "with align-beta > 0."
        )
    if loss == "ce":
        return 0.0, "align-loss = ce (ablation: CE only)"
    if random_teacher and beta > 0:
        return 0.0, (
            "the tiny teacher has random weights and carries no knowledge, so beta is 0 and alignment is CE "
            "fine-tuning on D_align; use align-teacher=ViT-L-14-336 with local weights or align-logits-file"
        )
    return beta, ""


# --- the stage ----------------------------------------------------------------------------------


class AlignmentStage:
    """After-aggregation stage: record pre-alignment metrics, fine-tune on D_align, return the aligned arrays."""

    def __init__(self, ctx: ServerContext, settings: AlignSettings, q: torch.Tensor, info: dict) -> None:
        cfg = ctx.cfg
        self.ctx, self.s, self.q, self.info = ctx, settings, q, info
        self.last = int(cfg["num-server-rounds"])
        self.every = int(cfg["eval-every"])
        self.seed, self.image_size = int(cfg["seed"]), int(cfg["image-size"])

    def __call__(self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> ArrayRecord:
        if self.s.when == "last-round" and server_round != self.last:
            return arrays
        before = None
        if server_round % self.every == 0 or server_round == self.last:  # rounds the report evaluates
            start = time.perf_counter()
            before = self.ctx.evaluate(arrays)
            for key in GROUP_KEYS:
                metrics[f"pre-align-{key}"] = before[key]
            metrics["pre-align-eval-seconds"] = time.perf_counter() - start
        model = load_record(self.ctx.new_model(), arrays)
        data = self.ctx.data
        start = time.perf_counter()
        gen = seeded_generator(self.seed, server_round, ALIGN_STREAM)
        stats = fine_tune(model, data.align, data.dataset, self.image_size, self.q, self.s, gen)
        for key, value in {**stats, "align-seconds": time.perf_counter() - start}.items():
            metrics[key] = float(value)
        aligned = to_record(model)
        if server_round == self.last:
            self.figure4(server_round, before, self.ctx.evaluate(aligned))
        return aligned

    def figure4(self, server_round: int, before: dict, after: dict) -> None:
        """The paper's Figure 4: confusion matrices without and with alignment, and group accuracies."""
        out = self.ctx.report.dir
        self.info["figure-4"] = {
            "round": server_round,
            "without-alignment": {k: before[k] for k in GROUP_KEYS},
            "with-alignment": {k: after[k] for k in GROUP_KEYS},
        }
        write_json(out / "alignment.json", self.info)
        self.ctx.summary["alignment"] = self.info
        plot_pair(
            np.asarray(before["confusion-matrix"]),
            np.asarray(after["confusion-matrix"]),
            before,
            after,
            self.ctx.data.dataset.classes,
            out / "alignment.png",
            self.info["teacher"],
        )


def _normalised(cm: np.ndarray) -> np.ndarray:
    rows = cm.sum(1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)


def plot_pair(
    cm_before: np.ndarray,
    cm_after: np.ndarray,
    before: dict,
    after: dict,
    classes: Sequence[str],
    path: Path,
    teacher: str,
) -> None:
    """Row-normalised confusion matrices side by side, titled with overall and many/medium/few accuracy."""
    n = len(classes)
    side = min(9, 0.4 * n + 3)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side + 0.8))
    for ax, cm, scores, name in ((axes[0], cm_before, before, "without"), (axes[1], cm_after, after, "with")):
        im = ax.imshow(_normalised(cm), vmin=0, vmax=1, cmap="Blues")
        groups = " ".join(
            f"{g} {scores[f'{g}-accuracy']:.2f}"
            for g in ("many", "medium", "few")
            if scores[f"{g}-accuracy"] == scores[f"{g}-accuracy"]
        )
        ax.set(xlabel="predicted", ylabel="true", title=f"{name} alignment: acc {scores['accuracy']:.3f}\n{groups}")
        if n <= 20:
            ax.set_xticks(range(n), classes, rotation=45, ha="right")
            ax.set_yticks(range(n), classes)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"Global alignment (teacher: {teacher})", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_inputs(cfg: Mapping, dataset: Dataset, align_idx: np.ndarray) -> TeacherLogits | None:
    """Every alignment input check that needs no teacher forward, so bad input stops before round 1.

    Returns the logits when they come from `align-logits-file` (reading the file is the check).
    """
    if not cfg["align"]:
        return None
    if cfg["align-logits-file"]:
        return load_logits_file(str(cfg["align-logits-file"]), align_idx, dataset.classes, dataset.test.labels)
    effective_beta(cfg, cfg["align-teacher"] == "tiny")
    dim = teacher_embed_dim(cfg)
    if dim != int(cfg["projection-dim"]):
        raise ConfigError(
            f"run-config key 'projection-dim' = {cfg['projection-dim']} does not match the teacher "
            f"{cfg['align-teacher']}'s feature size {dim}: the model's projection is the teacher's feature "
            f"space; set projection-dim={dim}."
        )
    check_class_names(dataset.classes)
    if cfg["align-teacher"] != "tiny":
        from flcore.clip_teacher import resolve_weights

        resolve_weights(str(cfg["align-teacher"]), str(cfg["align-pretrained"]))
    return None


def alignment_stages(cfg: Mapping, ctx: ServerContext) -> Stages:
    """The registry factory: no stages when `align` is off; else check inputs, get q once, build the stage."""
    if not cfg["align"]:
        return Stages()
    data = ctx.data
    align_idx = prepare(cfg).split.align
    logits = check_inputs(cfg, data.dataset, align_idx) or compute_teacher_logits(
        cfg, data.dataset, data.align, align_idx
    )
    beta, why = effective_beta(cfg, logits.random)
    info = {
        "teacher": logits.source,
        "teacher-random-weights": logits.random,
        "teacher-test-accuracy": logits.test_accuracy,
        "align-beta": float(cfg["align-beta"]),
        "beta-effective": beta,
        "beta-note": why,
        "align-loss": str(cfg["align-loss"]),
        "align-when": str(cfg["align-when"]),
    }
    acc = "n/a" if logits.test_accuracy is None else f"{logits.test_accuracy:.3f}"
    note = f" ({why})" if why else ""
    print(f"[align] teacher {logits.source}: zero-shot test accuracy {acc}; beta {beta}{note}", flush=True)
    ctx.summary["alignment"] = info
    return Stages(after_aggregation=[AlignmentStage(ctx, AlignSettings.from_config(cfg, beta), logits.align, info)])
