"""The LLaVA teacher: `LlavaForConditionalGeneration` + its processor, from local files only.

The real teacher (default `llava-hf/llava-1.5-7b-hf`, or any local folder in the HF layout) loads with
`local_files_only=True`, so nothing is ever downloaded; when it is absent the error names the model id
and the command that fetches it. The `tiny` teacher is the same classes built from small
`LlavaConfig(CLIPVisionConfig, LlamaConfig)` with random weights and a byte-level tokenizer made in code
(no download either); every output made with it carries `TINY_NOTE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flcore.config import ConfigError, WeightsNotFound

DEFAULT_TEACHER = "llava-hf/llava-1.5-7b-hf"
TINY = "tiny"
TEACHER_FORMS = "expected tiny, a folder saved with save_pretrained, or a model id (org/name) in the local HF cache"
TINY_NOTE = "tiny random teacher (random weights, for offline runs and tests; not a trained LLaVA)"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>", IMAGE_TOKEN)

# Sizes of the random teacher: `tiny` for tests and the offline default, `mid` for the step benchmark.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(vis_hidden=32, vis_layers=2, vis_heads=2, image=28, patch=7, txt_hidden=64, txt_layers=2, txt_heads=4),
    "mid": dict(
        vis_hidden=256, vis_layers=4, vis_heads=4, image=112, patch=14, txt_hidden=512, txt_layers=4, txt_heads=8
    ),
}


# HF's default init (std 0.02) gives a random LLM near-uniform logits whatever its input, so no signal
# would reach g_fl; std 0.3 makes the random LLM's next-token distribution depend on the image tokens.
TINY_TEXT_INIT = 0.3


@dataclass
class LlavaTeacher:
    """A loaded LLaVA model with its processor and the facts DWP needs about its vision features."""

    model: nn.Module
    processor: object
    name: str
    tiny: bool

    @property
    def config(self):
        return self.model.config

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def grid(self) -> int:
        """Side of CLIP's patch grid (24 for ViT-L/14 at 336 px)."""
        vision = self.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    @property
    def num_image_tokens(self) -> int:
        """Tokens LLaVA feeds the LLM per image: the patch grid, plus CLS unless the strategy drops it."""
        full = self.config.vision_feature_select_strategy == "full"
        return self.grid * self.grid + int(full)

    @property
    def vision_hidden(self) -> int:
        return int(self.config.vision_config.hidden_size)

    @property
    def note(self) -> str:
        return TINY_NOTE if self.tiny else f"LLaVA teacher {self.name}"


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (256 byte symbols + LLaVA's special tokens), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(byte_chars)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def tiny_teacher(size: str = "tiny", seed: int = 0) -> LlavaTeacher:
    """A random LLaVA of the given size: same classes and code path as the real one, nothing downloaded."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    s = SIZES[size]
    tok = byte_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=s["vis_hidden"],
        intermediate_size=4 * s["vis_hidden"],
        num_hidden_layers=s["vis_layers"],
        num_attention_heads=s["vis_heads"],
        image_size=s["image"],
        patch_size=s["patch"],
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s["txt_hidden"],
        intermediate_size=4 * s["txt_hidden"],
        num_hidden_layers=s["txt_layers"],
        num_attention_heads=s["txt_heads"],
        num_key_value_heads=s["txt_heads"],
        max_position_embeddings=2048,
        initializer_range=TINY_TEXT_INIT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    grid = s["image"] // s["patch"]
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=grid * grid,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": s["image"]}, crop_size={"height": s["image"], "width": s["image"]}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=s["patch"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LlavaTeacher(model.eval(), processor, TINY if size == "tiny" else f"tiny-{size}", tiny=True)


def not_found_message(name: str) -> str:
    return (
        f"LLaVA teacher '{name}' is not available locally (nothing is downloaded at run time). Get it on a machine "
        f"with internet: `huggingface-cli download {name}` (fills the HF cache; copy ~/.cache/huggingface to this "
        f"machine or set HF_HOME), or save it to a folder with `LlavaForConditionalGeneration.from_pretrained('{name}')"
        ".save_pretrained(DIR)` plus the same for `AutoProcessor`, then set pretrain-teacher=DIR. "
        f"Use pretrain-teacher=tiny for the offline {TINY_NOTE}."
    )


def check_available(name: str) -> None:
    """Fail fast (before training) when a real teacher has neither a local folder nor a cached config; a path
    that is no folder, or a name that cannot be a hub id, names the key (the hub's own error would not)."""
    if name == TINY or Path(name).expanduser().is_dir():
        return
    if name.startswith(("/", ".", "~")):
        raise ConfigError(f"run-config key 'pretrain-teacher' = {name!r}: no such folder; {TEACHER_FORMS}.")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError as err:
        raise ConfigError(
            f"run-config key 'pretrain-teacher' = {name!r} is neither a folder nor a model id ({err}); {TEACHER_FORMS}."
        ) from err
    if not isinstance(cached, str):
        raise WeightsNotFound(not_found_message(name))


def load_teacher(name: str = DEFAULT_TEACHER, dtype: torch.dtype | None = None, seed: int = 0) -> LlavaTeacher:
    """`tiny` -> the random teacher; anything else -> a local folder or an id in the local HF cache."""
    if name == TINY:
        teacher = tiny_teacher(seed=seed)
        return LlavaTeacher(teacher.model.to(dtype or torch.float32), teacher.processor, TINY, tiny=True)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
        model = LlavaForConditionalGeneration.from_pretrained(source, local_files_only=True, dtype=dtype)
    except OSError as err:
        raise WeightsNotFound(not_found_message(name)) from err
    return LlavaTeacher(model.eval(), processor, name, tiny=False)


def _part(model: nn.Module, name: str) -> nn.Module:
    """A LLaVA submodule, wherever this transformers version keeps it (`model.model.x` or `model.x`)."""
    inner = getattr(model, "model", None)
    return getattr(inner, name) if inner is not None and hasattr(inner, name) else getattr(model, name)


def vision_tower(teacher: LlavaTeacher) -> nn.Module:
    return _part(teacher.model, "vision_tower")


def projector(teacher: LlavaTeacher) -> nn.Module:
    return _part(teacher.model, "multi_modal_projector")
