"""Dynamic Weighted Pretraining (DWP): train the FL backbone through a frozen LLaVA.

Inside LLaVA the vision features fed to the projector are replaced by

    Z = (1 - alpha) * g(x) + alpha * g_fl(x)

g is LLaVA's own CLIP feature selection (hidden states of `vision_feature_layer`, CLS dropped under the
`default` strategy: 576 x 1024 for LLaVA-1.5). g_fl is the FL backbone plus a per-token projection that
gives its output g's shape: the backbone's last spatial feature map (the input of its final average
pool: 256 x 4 x 4 for ResNet-8 at 16 px, 2048 x 7 x 7 for ResNet-50 at 224 px) is resized bilinearly to
CLIP's patch grid (24 x 24), each grid cell becomes a token, and an MLP (Linear-GELU-Linear) maps each
token's channels to CLIP's hidden size; under the `full` strategy the pooled feature is prepended as the
CLS token. That MLP has the shape of the FL model's projection (`FLModel.projection`, backbone features ->
`projection-dim`), so when `projection-dim` equals LLaVA's vision width the FL model's own projection is the
one trained, and backbone and projection go to round 1 together ("ResNet + an MLP to CLIP's feature size");
otherwise, or when the FL model has no projection (`head=none`), a separate MLP to LLaVA's width is trained
and only the backbone goes over (`build_gfl`). The loss is LLaVA's language-model loss on the answer tokens.
Only g_fl trains: CLIP, projector and LLM have requires_grad False (no gradient buffers) and gradients flow
through them to Z. alpha follows a cosine from 0 to 1 over the first half of the optimizer steps, then stays
1; from then on the CLIP forward (and CLIP's image preprocessing) is skipped entirely. Training runs on the
teacher's device under the run's mixed precision (`flcore.device.Compute`: bf16, or fp16 with a gradient
scaler).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flcore.device import CPU, Compute
from flcore.models import FLModel
from flcore.progress import progress
from pretrain.checkpoints import Checkpoints
from pretrain.llava_data import Batch, LlavaSamples
from pretrain.teacher import LlavaTeacher, projector, vision_tower


class DWPError(RuntimeError):
    """Pretraining could not train at all; the message says why."""


def alpha_at(step: int, total_steps: int) -> float:
    """Cosine ramp 0 -> 1 over the first half of training, then 1."""
    half = total_steps / 2
    if half <= 0 or step >= half:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * step / half))


@dataclass
class AlphaClock:
    """The optimizer-step counter that alpha (and whether CLIP is needed at all) follows."""

    total: int
    step: int = 0

    @property
    def alpha(self) -> float:
        return alpha_at(self.step, self.total)

    def needs_clip(self) -> bool:
        return self.alpha < 1.0


def mlp(in_dim: int, width: int) -> nn.Sequential:
    """Linear-GELU-Linear: the FL model's projection shape (and LLaVA's mlp2x_gelu)."""
    return nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))


class GFL(nn.Module):
    """The FL backbone with a per-token projection: images -> tokens in CLIP's feature shape (see module doc).

    Its state dict keys (`backbone.*`, `projection.*`) are the FL model's, so the trained weights drop
    into the initial global model as they are.
    """

    def __init__(self, backbone: nn.Module, projection: nn.Module, grid: int, with_cls: bool = False) -> None:
        super().__init__()
        self.backbone, self.projection, self.grid, self.with_cls = backbone, projection, grid, with_cls
        pools = [m for m in backbone.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
        if not pools:
            raise ValueError("g_fl needs a backbone that ends in nn.AdaptiveAvgPool2d (its input is the feature map)")
        self._fmap: torch.Tensor | None = None
        pools[-1].register_forward_hook(self._keep_map)

    def _keep_map(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._fmap = inputs[0]

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        self.backbone(x)
        fmap, self._fmap = self._fmap, None
        return fmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(x)
        size = fmap.shape[-1]
        grid = F.interpolate(
            fmap, size=(self.grid, self.grid), mode="bilinear", align_corners=False, antialias=size > self.grid
        )
        tokens = grid.flatten(2).transpose(1, 2)
        if self.with_cls:
            tokens = torch.cat([fmap.mean((2, 3)).unsqueeze(1), tokens], dim=1)
        return self.projection(tokens)


def token_width(teacher: LlavaTeacher) -> int:
    """Width of LLaVA's vision features g(x): the hidden size, times the layers when several are concatenated."""
    layer = teacher.config.vision_feature_layer
    return teacher.vision_hidden * (1 if isinstance(layer, int) else len(layer))


def shares_projection(model: FLModel, teacher: LlavaTeacher) -> bool:
    """Whether the FL model has a projection (`head` mlp or linear) that outputs LLaVA's vision width, so DWP can
    train it as g_fl's; a model without one (`head=none`) never shares."""
    return model.head != "none" and model.embed_dim == token_width(teacher)


def build_gfl(model: FLModel, teacher: LlavaTeacher) -> GFL:
    """g_fl on the FL model's backbone, with the FL model's own projection when its width is LLaVA's
    (the same modules: training g_fl trains them), else with a fresh MLP to LLaVA's width."""
    full = teacher.config.vision_feature_select_strategy == "full"
    width = token_width(teacher)
    projection = model.projection if shares_projection(model, teacher) else mlp(model.backbone.out_dim, width)
    return GFL(model.backbone, projection, teacher.grid, with_cls=full)


def freeze(teacher: LlavaTeacher, hygiene: bool = True) -> None:
    """Eval mode; with hygiene, requires_grad False on every teacher parameter so no gradient is allocated."""
    teacher.model.eval()
    teacher.model.requires_grad_(not hygiene)


def clip_features(teacher: LlavaTeacher, pixel_values: torch.Tensor) -> torch.Tensor:
    """g(x): LLaVA's CLIP feature selection, exactly as `LlavaModel.get_image_features` does it."""
    tower = vision_tower(teacher)
    dtype = next(tower.parameters()).dtype
    hidden = tower(pixel_values.to(teacher.model.device, dtype), output_hidden_states=True)
    layer = teacher.config.vision_feature_layer
    layers = [layer] if isinstance(layer, int) else list(layer)
    drop_cls = teacher.config.vision_feature_select_strategy == "default"
    picked = [hidden.hidden_states[i][:, 1:] if drop_cls else hidden.hidden_states[i] for i in layers]
    return torch.cat(picked, dim=-1)


def mixed_features(teacher: LlavaTeacher, gfl: GFL, batch: Batch, alpha: float, hygiene: bool = True) -> torch.Tensor:
    """Z = (1 - alpha) g(x) + alpha g_fl(x); at alpha = 1 CLIP is never called."""
    z = gfl(batch.fl_pixels)
    if alpha >= 1.0:
        return z
    with torch.no_grad() if hygiene else nullcontext():
        g = clip_features(teacher, batch.clip_pixels)
    return (1.0 - alpha) * g.to(z.dtype) + alpha * z


def lm_loss(teacher: LlavaTeacher, features: torch.Tensor, batch: Batch) -> torch.Tensor:
    """LLaVA's LM loss with `features` projected into the image-token slots (labels -100 off the answers)."""
    model = teacher.model
    device = model.device
    ids = batch.input_ids.to(device)
    embeds = model.get_input_embeddings()(ids)
    proj = projector(teacher)
    image = proj(features.to(device, next(proj.parameters()).dtype)).to(embeds.dtype)
    mask = (ids == teacher.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, image)
    out = model(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(device), labels=batch.labels.to(device))
    return out.loss


@dataclass(frozen=True)
class DWPConfig:
    """The paper's defaults: 4 epochs, lr 2e-3, batch 128, cosine lr schedule."""

    epochs: int = 4
    lr: float = 2e-3
    batch_size: int = 128
    grad_accum: int = 1
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch size {self.batch_size} is not divisible by grad accumulation {self.grad_accum}")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


@dataclass
class DWPResult:
    epoch_loss: list[float] = field(default_factory=list)
    steps: int = 0
    clip_calls: int = 0
    failed_images: int = 0
    resumed_from: int = 0


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation checkpointing in the frozen LLM (transformers 5 name, or the older gradient_* one)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _count_calls(module: nn.Module, result: DWPResult):
    def hook(*_):
        result.clip_calls += 1

    return module.register_forward_pre_hook(hook)


def train_dwp(
    teacher: LlavaTeacher,
    gfl: GFL,
    samples: LlavaSamples,
    cfg: DWPConfig,
    checkpoints: Checkpoints | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    compute: Compute = CPU,
) -> DWPResult:
    """Train g_fl (backbone + projection) for `cfg.epochs` on the teacher's device, in `compute`'s precision;
    resumes from the last epoch checkpoint if any."""
    device = teacher.model.device
    freeze(teacher)
    if cfg.gradient_checkpointing:
        _checkpointing(teacher.model, True)
        teacher.model.train()  # HF checkpoints only in train mode; LLaVA has no dropout or batch norm to change
    gfl.to(device).train()
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(gfl.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    scaler = compute.scaler()
    result = DWPResult()
    clock = AlphaClock(total)
    start = 0
    state = checkpoints.latest() if checkpoints else None
    if state is not None:
        gfl.load_state_dict(state["gfl"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, clock.step, result.epoch_loss = state["epoch"], state["step"], list(state["losses"])
        result.resumed_from = start
    handle = _count_calls(vision_tower(teacher), result)
    bar = progress(total=total, initial=clock.step, desc="dwp", unit="step")
    try:
        for epoch in range(start, cfg.epochs):
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            total_loss, seen = 0.0, 0
            micro = []
            for batch in samples.iterate(cfg.micro_batch, gen, need_clip=clock.needs_clip):
                micro.append(batch)
                if len(micro) < cfg.grad_accum:
                    continue
                total_loss += _step(teacher, gfl, micro, clock.alpha, opt, sched, scaler, compute)
                seen, micro, clock.step = seen + 1, [], clock.step + 1
                bar.update()
            if micro:
                total_loss += _step(teacher, gfl, micro, clock.alpha, opt, sched, scaler, compute)
                seen, clock.step = seen + 1, clock.step + 1
                bar.update()
            if not seen:  # every image failed: nothing trained, so nothing may be checkpointed or cached
                raise DWPError(
                    f"DWP epoch {epoch + 1} trained zero steps: none of the {len(samples)} records' images could be "
                    f"read under {samples.image_root} (e.g. {sorted(samples.failed)[:3]})"
                )
            result.epoch_loss.append(total_loss / seen)
            if checkpoints:
                checkpoints.save_epoch(
                    epoch + 1,
                    {
                        "step": clock.step,
                        "gfl": gfl.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "losses": result.epoch_loss,
                    },
                )
            if on_epoch:
                on_epoch(epoch + 1, result.epoch_loss[-1], clock.alpha)
    finally:
        bar.close()
        handle.remove()
        if cfg.gradient_checkpointing:
            _checkpointing(teacher.model, False)
        teacher.model.eval()
    result.steps, result.failed_images = clock.step, len(samples.failed)
    return result


def _step(teacher, gfl, micro: list[Batch], alpha: float, opt, sched, scaler, compute: Compute) -> float:
    """One optimizer step over `micro`-batches (gradient accumulation); returns the mean loss."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for batch in micro:
        if alpha < 1.0 and batch.clip_pixels is None:
            raise RuntimeError("alpha < 1 needs CLIP pixels in the batch")
        batch.fl_pixels = batch.fl_pixels.to(teacher.model.device)
        with compute.autocast():
            loss = lm_loss(teacher, mixed_features(teacher, gfl, batch, alpha), batch) / len(micro)
        scaler.scale(loss).backward()
        total += float(loss.detach())
    scaler.step(opt)
    scaler.update()
    sched.step()
    return total
