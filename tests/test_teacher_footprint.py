"""The stage teachers at their real sizes, random weights on the `meta` device: the parameter counts the preflight's
memory checks use (a formula over the config) against what PyTorch builds, and the refusals they give."""

import pytest
import torch

from alignment.teacher import clip_parameters
from flcore.config import ConfigError
from flcore.memory import check_teacher_fits, teacher_bytes
from pretrain.footprint import LLAVA_15_7B, check_teacher_memory, llava_config, llava_parameters
from pretrain.teacher import tiny_teacher
from tests.helpers import validated

GIB = 2**30


def built_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_llava_15_7b_builds_on_meta_and_the_estimate_is_within_10_percent_of_its_parameter_bytes():
    from transformers import LlavaForConditionalGeneration

    config = llava_config(LLAVA_15_7B)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    built = built_parameters(model)
    assert next(model.parameters()).device.type == "meta"
    assert 7.0e9 < built < 7.1e9  # LLaVA-1.5-7B: Vicuna-7B + ViT-L/14-336 + the projector
    assert llava_parameters(config) == built
    estimate = teacher_bytes(llava_parameters(config), torch.bfloat16)
    assert 1.0 <= estimate / (built * 2) <= 1.1


def test_the_formula_counts_the_tiny_teacher_too():
    model = tiny_teacher().model
    assert llava_parameters(model.config) == built_parameters(model)


def test_clip_vit_l_14_336_builds_on_meta_and_the_formula_counts_it():
    import open_clip

    model = open_clip.create_model("ViT-L-14-336", pretrained=None, device="meta")
    built = built_parameters(model)
    assert 4.2e8 < built < 4.3e8
    assert clip_parameters("ViT-L-14-336") == built
    assert 1.0 <= teacher_bytes(built, torch.float32) / (built * 4) <= 1.1


def test_a_teacher_the_device_cannot_hold_is_refused_naming_its_key(tmp_path):
    llava_config(LLAVA_15_7B).save_pretrained(tmp_path)  # config.json only: no weights are needed to refuse
    cfg = validated(pretrain_teacher=str(tmp_path), device="cpu")
    with pytest.raises(
        ConfigError, match=r"'pretrain-teacher' = .*7,063,427,072 parameters in float32 need about 27\.6"
    ):
        check_teacher_memory(cfg, available=16 * GIB)
    check_teacher_memory(cfg, available=32 * GIB)  # fits: no error
    with pytest.raises(ConfigError, match=r"'align-teacher' = 'ViT-L-14-336'.* bfloat16 need about 0\.8 GiB"):
        check_teacher_fits("align-teacher", "ViT-L-14-336", 427_944_193, torch.bfloat16, torch.device("cpu"), GIB // 2)


def test_stage_1s_preflight_check_refuses_a_7b_teacher_in_float32_on_a_16_gib_machine(tmp_path, monkeypatch):
    from flcore import memory
    from flcore.config import validate
    from pretrain import stage

    llava_config(LLAVA_15_7B).save_pretrained(tmp_path)
    monkeypatch.setattr(memory, "physical_memory", lambda: 16 * GIB)
    cfg = validate({"pretrain": True, "pretrain-teacher": str(tmp_path), "device": "cpu"})
    with pytest.raises(ConfigError, match="'pretrain-teacher'.*more than the 16.0 GiB of cpu"):
        stage.check(cfg)
    monkeypatch.setattr(memory, "physical_memory", lambda: 64 * GIB)
    stage.check(cfg)
