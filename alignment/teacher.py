"""The zero-shot CLIP teacher: stage 3 on the server, and CLIP2FL's client distillation (imported lazily there).

`load_teacher` builds an open_clip model, its eval transform and tokenizer through
`open_clip.create_model_and_transforms` for either a real model (LLaVA-1.5's vision tower, ViT-L-14-336
with OpenAI weights, by default) or `tiny`: a small open_clip config with random weights, registered with
`open_clip.add_model_config` and built by the same call, for tests and offline runs. Real weights come
from a checkpoint file or the local Hugging Face / open_clip cache only; nothing is downloaded.
Zero-shot logits use the prompt-template ensemble of CLIP's paper (or the templates a caller passes, e.g.
CLIP2FL's single "a photo of a {}") and the model's own logit scale. The teacher runs on the run's device
in float32 (once per run: its logits are cached); images are read and preprocessed on the CPU.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torch import nn

from flcore.config import ConfigError, WeightsNotFound
from flcore.datasets import ImageSet
from flcore.progress import progress

TINY = "tiny"
REAL_DEFAULT = ("ViT-L-14-336", "openai")  # the CLIP vision tower of LLaVA-1.5
TEMPLATES: tuple[Callable[[str], str], ...] = open_clip.OPENAI_IMAGENET_TEMPLATES
TINY_SEED = 0
IMAGE_BATCH = 64
ENSEMBLE = "ensemble"  # a prompt setting that means TEMPLATES
PICKLE_PROTO = b"\x80"  # the opcode a pickle of protocol 2 or later starts with (torch's legacy format)


@dataclass
class ClipTeacher:
    """A loaded CLIP model with its eval transform and tokenizer; `random` marks the tiny untrained one."""

    name: str
    pretrained: str
    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    embed_dim: int
    random: bool

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def label(self) -> str:
        if self.random:
            return f"{self.name} (tiny open_clip config, RANDOM weights: no knowledge)"
        return f"{self.name} / {self.pretrained}"


def tiny_config(embed_dim: int) -> dict:
    """A CLIP with 2-layer, 64-wide towers at 32 px: the real architecture, small enough for a test."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def _register_tiny(embed_dim: int, config_dir: Path) -> str:
    """Write the tiny config as an open_clip model JSON and register it; returns its model name."""
    name = f"tiny-random-clip-{embed_dim}"
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / f"{name}.json"
    path.write_text(json.dumps(tiny_config(embed_dim)))
    open_clip.add_model_config(path)
    return name


def _cached_weights(name: str, tag: str) -> str | None:
    """The local file of a pretrained tag from the HF hub cache or open_clip's URL cache, without network."""
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)  # a trailing "/" means the repo's default file name
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for candidate in candidates:
            hit = try_to_load_from_cache(repo, candidate)
            if isinstance(hit, str):
                return hit
    url = cfg.get("url", "")
    if url:
        path = Path("~/.cache/clip").expanduser() / Path(url).name
        if path.is_file():
            return str(path)
    return None


def checkpoint_format(path: Path) -> str | None:
    """What open_clip can load from `path`: a safetensors file (an 8-byte header length, then its JSON header),
    a torch zip archive (torch.save, TorchScript) or a legacy pickle; None for anything else."""
    with path.open("rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors" and len(head) == 8:
            try:
                json.loads(f.read(int.from_bytes(head, "little")))
                return "safetensors"
            except (ValueError, MemoryError, OverflowError):
                return None
    if zipfile.is_zipfile(path):
        return "zip"
    return "pickle" if head[:1] == PICKLE_PROTO else None


def check_checkpoint_file(path: Path) -> str:
    """`path`, refused unless it can be a checkpoint: a text file there failed deep in torch's unpickler."""
    if checkpoint_format(path) is None:
        raise ConfigError(
            f"run-config key 'align-pretrained' = {str(path)!r} is not a checkpoint: expected a .safetensors file, "
            "a file saved with torch.save (a zip archive or a pickle), or an open_clip tag."
        )
    return str(path)


def _tower_parameters(width: int, layers: int, mlp_ratio: float) -> int:
    """One open_clip transformer: per block two LayerNorms, fused qkv and output projections, and the MLP."""
    hidden = int(width * mlp_ratio)
    block = 4 * width + 3 * width * width + 3 * width + width * width + width
    return layers * (block + width * hidden + hidden + hidden * width + width)


def clip_parameters(name: str) -> int:
    """Parameters of open_clip's ViT CLIP `name` from its config alone (towers, embeddings, projections, the
    logit scale), for the preflight's memory check of a real teacher before its weights load."""
    model_cfg = open_clip.get_model_config(name)
    embed, v, t = int(model_cfg["embed_dim"]), model_cfg["vision_cfg"], model_cfg["text_cfg"]
    vw, tw, patch = int(v["width"]), int(t["width"]), int(v["patch_size"])
    grid = int(v["image_size"]) // patch
    vision = 3 * patch * patch * vw + vw + (grid * grid + 1) * vw + 4 * vw + vw * embed
    vision += _tower_parameters(vw, int(v["layers"]), float(v.get("mlp_ratio", 4.0)))
    text = int(t["vocab_size"]) * tw + int(t["context_length"]) * tw + 2 * tw + tw * embed
    text += _tower_parameters(tw, int(t["layers"]), float(t.get("mlp_ratio", 4.0)))
    return vision + text + 1


def resolve_weights(name: str, pretrained: str) -> tuple[str, dict]:
    """A local checkpoint for `pretrained` (a file path or a tag) and the tag's preprocessing settings."""
    if Path(pretrained).expanduser().is_file():
        return check_checkpoint_file(Path(pretrained).expanduser()), {}
    if name not in open_clip.list_models():
        raise ConfigError(
            f"run-config key 'align-teacher' = {name!r} is not an open_clip model name; "
            f"use 'tiny' or one of open_clip.list_models(), e.g. {REAL_DEFAULT[0]!r}."
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ConfigError(
            f"run-config key 'align-pretrained' = {pretrained!r} is neither a checkpoint file nor a tag of "
            f"{name}; tags: {', '.join(tags) or 'none'}."
        )
    path = _cached_weights(name, pretrained)
    if path is None:
        hub = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub", "")
        raise WeightsNotFound(
            f"CLIP teacher {name} / {pretrained} is not in the local cache and nothing is downloaded here. "
            f"On a machine with internet run `python -c \"import open_clip; open_clip.create_model('{name}', "
            f"pretrained='{pretrained}')\"` (fills the Hugging Face cache with {hub or 'the checkpoint'}) and copy "
            "~/.cache/huggingface to this machine, or pass align-pretrained=/path/to/checkpoint.pt "
            "(or align-logits-file with logits computed elsewhere)."
        )
    return path, open_clip.get_pretrained_cfg(name, pretrained)


def load_teacher(
    name: str, pretrained: str, tiny_embed_dim: int, config_dir: Path, device: torch.device | None = None
) -> ClipTeacher:
    """Build the teacher on `device`; `tiny` is seeded (on the CPU) so its random weights (and cached logits) are
    reproducible."""
    random_weights = name == TINY
    if random_weights:
        model_name, checkpoint, tag_cfg = _register_tiny(tiny_embed_dim, config_dir), None, {}
    else:
        model_name = name
        checkpoint, tag_cfg = resolve_weights(name, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=checkpoint,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            image_mean=tag_cfg.get("mean"),
            image_std=tag_cfg.get("std"),
        )
    model.to(device).eval()
    embed_dim = int(open_clip.get_model_config(model_name)["embed_dim"])
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipTeacher(
        model_name, "random" if random_weights else pretrained, model, preprocess, tokenizer, embed_dim, random_weights
    )


def _pil_images(images: ImageSet, idx: Sequence[int]) -> list[Image.Image]:
    """Originals from files when the set has them (CLIP sees full resolution), else the decoded tensors."""
    if images.files is not None:
        out = []
        for i in idx:
            with Image.open(images.files[i]) as img:
                out.append(img.convert("RGB"))
        return out
    return [Image.fromarray(images.images[i].permute(1, 2, 0).numpy()) for i in idx]


def prompt_templates(prompt: str) -> Sequence[Callable[[str], str] | str]:
    """`ensemble` -> CLIP's 80 ImageNet templates; anything else is one template with `{}` for the class name."""
    return TEMPLATES if prompt == ENSEMBLE else (prompt,)


def text_features(
    teacher: ClipTeacher, classes: Sequence[str], templates: Sequence[Callable[[str], str] | str] = TEMPLATES
) -> torch.Tensor:
    """Unit-norm class text embeddings [C, D]: the mean over templates of each class's normalised embedding."""
    return open_clip.build_zero_shot_classifier(
        teacher.model, teacher.tokenizer, list(classes), templates, device=teacher.device
    ).T


@torch.no_grad()
def zero_shot_logits(
    teacher: ClipTeacher,
    classes: Sequence[str],
    images: ImageSet,
    templates: Sequence[Callable[[str], str] | str] = TEMPLATES,
) -> torch.Tensor:
    """CLIP zero-shot logits [N, C]: logit_scale * cos(image, mean prompt embedding of each class), computed on the
    teacher's device and returned on the CPU (they are cached)."""
    text = text_features(teacher, classes, templates).T
    scale = teacher.model.logit_scale.exp()
    out = []
    for start in progress(range(0, len(images), IMAGE_BATCH), desc="teacher logits", unit="batch"):
        idx = range(start, min(start + IMAGE_BATCH, len(images)))
        batch = torch.stack([teacher.preprocess(img) for img in _pil_images(images, idx)]).to(teacher.device)
        feats = teacher.model.encode_image(batch, normalize=True)
        out.append(scale * feats @ text)
    return torch.cat(out).float().cpu()
