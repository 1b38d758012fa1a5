"""What the LLaVA teacher costs in memory, from its config alone: checked before start, built at full size in tests.

Stage 1 loads a frozen LLaVA (LLaVA-1.5-7B by default) onto the run's device. Its weights dominate what the
stage holds (g_fl and its MLP are a few million parameters), so the preflight reads the teacher's
`config.json` (no weights), counts its parameters with `llava_parameters` and refuses a device that cannot
hold them at the dtype the stage would load them in (`amp`'s, else float32), naming the key. The count is a
formula over the config, so it costs nothing at start; a test builds LLaVA-1.5-7B from `LLAVA_15_7B` on the
`meta` device (shapes only) and checks the formula against the parameters PyTorch counts there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flcore.config import Settings
from flcore.device import AMP_DTYPES, compute_of
from flcore.memory import check_teacher_fits

# llava-hf/llava-1.5-7b-hf's config.json: CLIP ViT-L/14 at 336 px, a 2-layer GELU MLP projector, Vicuna-7B.
LLAVA_15_7B: dict[str, Any] = {
    "vision": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    "text": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llava": dict(
        image_token_index=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    ),
}


def llava_config(spec: Mapping[str, Any] = LLAVA_15_7B):
    """A `LlavaConfig` from a spec like `LLAVA_15_7B` (vision, text and LLaVA keyword arguments)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision, text = CLIPVisionConfig(**spec["vision"]), LlamaConfig(**spec["text"])
    return LlavaConfig(vision_config=vision, text_config=text, **spec["llava"])


def clip_vision_parameters(v) -> int:
    """HF's CLIPVisionModel: patch and position embeddings, pre/post LayerNorms, and the encoder layers."""
    h, i, patches = v.hidden_size, v.intermediate_size, (v.image_size // v.patch_size) ** 2
    embeddings = h + 3 * v.patch_size**2 * h + (patches + 1) * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    return embeddings + 2 * h + v.num_hidden_layers * layer + 2 * h


def llama_parameters(t) -> int:
    """HF's Llama: embeddings, layers of grouped-query attention and a gated MLP, the final norm and the LM head."""
    h, i = t.hidden_size, t.intermediate_size
    head_dim = getattr(t, "head_dim", None) or h // t.num_attention_heads
    kv = t.num_key_value_heads * head_dim
    bias = h + 2 * kv + h if t.attention_bias else 0
    layer = 2 * h * h + 2 * h * kv + bias + 3 * h * i + (3 * i if t.mlp_bias else 0) + 2 * h
    head = 0 if t.tie_word_embeddings else t.vocab_size * h
    return t.vocab_size * h + t.num_hidden_layers * layer + h + head


def llava_parameters(config) -> int:
    """Parameters of `LlavaForConditionalGeneration(config)`: vision tower, projector and language model."""
    v, t = config.vision_config, config.text_config
    bias = getattr(config, "multimodal_projector_bias", True)
    projector = v.hidden_size * t.hidden_size + t.hidden_size * t.hidden_size + (2 * t.hidden_size if bias else 0)
    return clip_vision_parameters(v) + projector + llama_parameters(t)


def check_teacher_memory(cfg: Settings, available: int | None = None) -> None:
    """Refuse a real teacher the run's device cannot hold (the `tiny` one always fits), before anything loads."""
    from transformers import LlavaConfig

    name = cfg.pretrain_teacher
    source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    config = LlavaConfig.from_pretrained(source, local_files_only=True)
    compute = compute_of(cfg)
    dtype = AMP_DTYPES.get(compute.amp, torch.float32)
    check_teacher_fits("pretrain-teacher", name, llava_parameters(config), dtype, compute.device, available)
