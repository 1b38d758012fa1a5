"""Stage 1 as a server stage: annotate (if needed), run DWP (or reuse its cached result), and hand the
pretrained g_fl to round 1.

`pretrain_stage(cfg, ctx)` and `check` are registered in `strategies.registry.SERVER_STAGES`. With
`pretrain` off it contributes nothing (random init). With it on, the preflight checks the teacher and the
data before any process starts, and the `before_training` hook replaces entries of the initial global
ArrayRecord with the pretrained ones and hands what it measured (`pretrain.json`) to the run report.
What is handed over depends on the widths (`pretrain.dwp.build_gfl`): with `projection-dim` equal to
LLaVA's vision width DWP trains the FL model's own projection, and `backbone.*` and `projection.*` go
over together; otherwise DWP trains a separate MLP to LLaVA's width, which does not fit the FL model,
and only `backbone.*` goes over (projection fresh). A model without a projection (`head=none`, set
explicitly: `head=auto` is the paper's MLP with `pretrain` on) takes the backbone only, the same way. The
classifier always starts fresh: DWP has none.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from PIL import Image

from flcore.config import ConfigError, Settings
from flcore.datasets import digits_pixels, digits_split
from flcore.device import AMP_DTYPES, compute_of
from flcore.images import image_problem
from flcore.models import PAPER_HEAD, model_head, run_model
from flcore.progress import progress
from flcore.run_data import Prepared, prepare
from pretrain.checkpoints import Checkpoints, cache_key, file_digest
from rounds.stage import Outcome, ServerContext, Stages

log = logging.getLogger(__name__)
DIGITS = "digits"
DIGITS_IMAGE_SIZE = 32
EXISTING = "existing LLaVA-format file"
IMAGE_SAMPLE = 256  # pretraining images decoded by the preflight (each one that fails later is skipped)


def render_digit(scan: np.ndarray) -> Image.Image:
    """One 8x8 digits scan as the RGB image stage 1 reads."""
    return Image.fromarray(scan).resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), Image.BILINEAR).convert("RGB")


def held_out_digits(cfg: Settings) -> np.ndarray:
    """Positions (scikit-learn's order) of the digits that pretraining must not see: the test split, and
    D_align when the run's dataset is digits and D_align is carved from its training split."""
    _, labels = digits_pixels()
    train, test = digits_split(labels)
    if cfg.dataset != DIGITS:
        return test
    split = prepare(cfg).split
    return np.union1d(test, train[split.align]) if split.align_from_train else test


def digits_images(root: Path, held_out: np.ndarray) -> Path:
    """scikit-learn's digits scans as PNG files (labels unused), the offline stand-in for web images,
    without the `held_out` ones: web images never include the scans the run is evaluated or aligned on."""
    scans, _ = digits_pixels()
    keep = np.setdiff1d(np.arange(len(scans)), held_out)
    folder = root / f"digits-images-{hashlib.sha256(keep.astype(np.int64).tobytes()).hexdigest()[:12]}"
    done = folder / ".complete"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for i in keep:
            render_digit(scans[i]).save(folder / f"{i:04d}.png")
        done.touch()
    return folder


def check(cfg: Settings, prepared: Prepared | None = None) -> None:
    """Fail before training when the teacher or the pretraining data is missing (the preflight's check)."""
    from pretrain.footprint import check_teacher_memory
    from pretrain.teacher import TINY, check_available

    if not cfg.pretrain:
        return
    check_available(cfg.pretrain_teacher)
    if cfg.pretrain_teacher != TINY:
        check_teacher_memory(cfg)
    data = cfg.pretrain_data
    path = Path(data).expanduser()
    if data != DIGITS and not path.exists():
        raise ConfigError(f"run-config key 'pretrain-data' = {data!r}: no such file or folder.")
    if data != DIGITS and path.is_file():
        check_records(cfg, path)
    if data != DIGITS and path.is_dir():
        check_folder(path)


def check_folder(path: Path) -> None:
    """A folder to annotate must hold images: an empty one would only fail after the teacher has loaded."""
    from pretrain.annotate import list_images

    if not list_images(path):
        raise ConfigError(
            f"run-config key 'pretrain-data' = {str(path)!r} is a folder with no image files "
            "(.png, .jpg, ... at any depth); expected a folder of images, a LLaVA .json/.jsonl file or 'digits'."
        )


def check_records(cfg: Settings, path: Path) -> None:
    """A LLaVA file: every record well-formed (`file:line` errors), every image inside the image folder, and a
    sample of the images the run would read decodable (one that fails later is skipped and counted)."""
    from pretrain.llava_data import load_annotations, outside_root

    root = Path(cfg.pretrain_image_dir or path.parent).expanduser()
    records = load_annotations(path)
    outside = [r for r in records if outside_root(r.image)]
    if outside:
        raise ConfigError(
            f"run-config key 'pretrain-data' = {str(path)!r}: record {outside[0].id!r} names image "
            f"{outside[0].image!r}, outside the image folder {root} ({len(outside)} such records)."
        )
    limit = cfg.pretrain_max_samples
    used = [str(root / r.image) for r in (records[:limit] if limit else records)]
    if not used:
        raise ConfigError(f"run-config key 'pretrain-data' = {str(path)!r} holds no records.")
    picked = np.random.default_rng(cfg.seed).choice(len(used), min(IMAGE_SAMPLE, len(used)), replace=False)
    checked = progress(sorted(picked), desc="checking pretrain-data images", unit="image")
    problems = {used[i]: image_problem(used[i]) for i in checked}
    bad = {p: why for p, why in problems.items() if why is not None}
    if len(bad) == len(problems):
        first, why = next(iter(bad.items()))
        raise ConfigError(
            f"run-config key 'pretrain-data' = {str(path)!r}: none of the {len(problems)} images checked can be "
            f"read under {root} (e.g. '{first}' {why}); set pretrain-image-dir to the image folder."
        )
    if bad:
        log.warning("%d of %d pretraining images checked cannot be read; they will be skipped", len(bad), len(problems))


def annotations_for(cfg: Settings, teacher, cache: Path) -> tuple[Path, Path, dict]:
    """(annotation file, image root, annotation summary) for `pretrain-data`; annotates folders."""
    from pretrain.annotate import annotate, list_images

    data = cfg.pretrain_data
    path = Path(data).expanduser()
    if data != DIGITS and path.is_file():
        root = Path(cfg.pretrain_image_dir or path.parent).expanduser()
        return path, root, {"source": EXISTING, "file": str(path)}
    root = digits_images(cache, held_out_digits(cfg)) if data == DIGITS else path
    images = list_images(root)
    limit = cfg.pretrain_max_samples
    if limit:
        images = images[:limit]
    key = cache_key(teacher.name, str(root.resolve()), {"seed": cfg.seed, "images": len(images)})
    out = cache / "annotations" / f"{key}.jsonl"
    summary = annotate(teacher, root, out, images, max_new_tokens=cfg.pretrain_max_new_tokens)
    return out, root, summary.as_dict()


def dwp_settings(cfg: Settings) -> dict:
    """The config keys that change what DWP trains. `projection-dim` is one even when the projection is not
        handed over: it decides whether the FL projection is trained at all, and the separate MLP's seeded
        initialisation comes after the FL model's in the same random stream. `amp` is one when it is on (bf16 or
        fp16 training is not float32's); the device is not, since float32 on a GPU differs from the CPU only by
        rounding, and a float32 run keeps the key it had before `amp` existed. The head is one when it is not the
    paper's MLP (it decides whether the FL projection exists, and moves the separate MLP's initialisation)."""
    keys = ("model", "image-size", "seed", "projection-dim") + tuple(
        k for k in cfg if k.startswith("pretrain-") and k != "pretrain-cache-dir"
    )
    amp = {"amp": cfg.amp} if cfg.amp != "off" else {}
    head = model_head(cfg)
    other_head = {"head": head} if head != PAPER_HEAD else {}  # the paper's MLP keeps the key it had before `head`
    return {**{k: cfg[k] for k in keys}, **amp, **other_head}


def handover(shared: bool, width: int, projection_dim: int, head: str = PAPER_HEAD) -> dict:
    """For pretrain.json: which parts of g_fl reach round 1, and why."""
    if head == "none":
        return {
            "handed-over": ["backbone"],
            "handover-note": f"head=none: the FL model has no projection, so DWP trained a separate MLP to LLaVA's "
            f"vision width {width} and only the backbone starts round 1",
        }
    if shared:
        return {
            "handed-over": ["backbone", "projection"],
            "handover-note": f"projection-dim {projection_dim} equals LLaVA's vision width: DWP trained the FL "
            "model's own projection per token, and backbone and projection start round 1",
        }
    return {
        "handed-over": ["backbone"],
        "handover-note": f"projection-dim {projection_dim} differs from LLaVA's vision width {width}: DWP trained "
        "a separate MLP to that width, which does not fit the FL model, so the projection starts fresh (set "
        f"projection-dim={width} to hand it over)",
    }


def pretrained_weights(cfg: Settings, mean, std) -> tuple[dict[str, torch.Tensor], dict]:
    """The FL model's entries pretrained by DWP (`backbone.*`, and `projection.*` when the widths match)
    and a summary; cached per (teacher, data, config)."""
    from pretrain.dwp import DWPConfig, build_gfl, shares_projection, token_width, train_dwp
    from pretrain.llava_data import LlavaSamples, load_annotations
    from pretrain.teacher import load_teacher

    cache = Path(cfg.pretrain_cache_dir).expanduser()
    compute = compute_of(cfg)
    weights = AMP_DTYPES.get(compute.amp)  # the frozen teacher in the amp dtype (halves a 7B LLM's memory), else fp32
    teacher = load_teacher(cfg.pretrain_teacher, dtype=weights, seed=cfg.seed)
    teacher.model.to(compute.device)
    ann, root, ann_summary = annotations_for(cfg, teacher, cache)
    model = run_model(cfg, 2, seed=cfg.seed)
    shared = shares_projection(model, teacher)
    parts = handover(shared, token_width(teacher), cfg.projection_dim, model.head)
    settings = {**dwp_settings(cfg), "mean": list(mean), "std": list(std)}
    ckpt = Checkpoints(cache / "dwp" / cache_key(teacher.name, file_digest(ann) + str(root.resolve()), settings))
    final = ckpt.final()
    if final is not None:
        log.info("reusing pretrained g_fl from %s", ckpt.final_path)
        return _handed_over(final["gfl"], parts), {**final["meta"], **parts, "reused": True}
    records = load_annotations(ann)
    limit = cfg.pretrain_max_samples
    if limit and ann_summary.get("source") == EXISTING:
        records = records[:limit]
    samples = LlavaSamples(records, root, teacher, cfg.image_size, mean, std, cfg.pretrain_max_length)
    gfl = build_gfl(model, teacher)
    dwp = DWPConfig(
        epochs=cfg.pretrain_epochs,
        lr=cfg.pretrain_lr,
        batch_size=cfg.pretrain_batch_size,
        grad_accum=cfg.pretrain_grad_accum,
        gradient_checkpointing=cfg.pretrain_grad_checkpointing,
        seed=cfg.seed,
    )

    def on_epoch(epoch: int, loss: float, alpha: float) -> None:
        print(
            f"[pretrain] epoch {epoch}/{dwp.epochs}: LM loss {loss:.4f}, alpha {alpha:.3f} ({teacher.note})", flush=True
        )

    result = train_dwp(teacher, gfl, samples, dwp, ckpt, on_epoch, compute)
    meta = {
        "teacher": teacher.name,
        "note": teacher.note,
        "annotations": str(ann),
        "annotation": ann_summary,
        "records": len(records),
        "epoch-loss": result.epoch_loss,
        "steps": result.steps,
        "clip-calls": result.clip_calls,
        "failed-images": result.failed_images,
        "resumed-from-epoch": result.resumed_from,
        "cache": str(ckpt.root),
        **parts,
    }
    ckpt.save_final(gfl.state_dict(), meta)
    return _handed_over(gfl.state_dict(), parts), {**meta, "reused": False}


def _handed_over(gfl_state: Mapping[str, torch.Tensor], parts: Mapping) -> dict[str, torch.Tensor]:
    """The g_fl entries that reach round 1 (its keys are the FL model's)."""
    prefixes = tuple(f"{part}." for part in parts["handed-over"])
    return {k: v for k, v in gfl_state.items() if k.startswith(prefixes)}


def with_pretrained(arrays: ArrayRecord, pretrained: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The initial global model with the pretrained entries replaced; everything else unchanged."""
    state = arrays.to_torch_state_dict()
    misfit = sorted(k for k, v in pretrained.items() if k not in state or state[k].shape != v.shape)
    if misfit:
        raise KeyError(f"pretrained g_fl does not fit the FL model: {misfit[:3]}")
    state.update({k: v.detach().cpu().to(state[k].dtype) for k, v in pretrained.items()})
    return ArrayRecord(state)


def pretrain_stage(cfg: Settings, ctx: ServerContext) -> Stages:
    """Stage 1: with `pretrain` on, round 1 starts from the DWP-pretrained backbone (and projection)."""
    if not cfg.pretrain:
        return Stages()

    def load_pretrained(arrays: ArrayRecord) -> Outcome:
        dataset = ctx.data.dataset
        pretrained, meta = pretrained_weights(cfg, dataset.mean, dataset.std)
        return Outcome(with_pretrained(arrays, pretrained), {"pretrain": meta})

    return Stages(before_training=[load_pretrained])
