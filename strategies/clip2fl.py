"""CLIP2FL (Shi et al., AAAI 2024): CReFF plus CLIP knowledge distillation on every client and a text
contrast on the server.

The server is CReFF's (`strategies.creff`: federated features matched to client class gradients,
classifier re-trained on them) with one term added to the feature matching, as CLIP2FL's `main.py`
(`update_feature_syn`, its Eq. 8) does: `contrast-weight` times a supervised contrastive loss that pulls
each federated feature towards the CLIP text feature of its class ("a photo of a {}", `clip2fl-prompt`)
and away from the others' (`text_contrast_loss`, CLIP2FL's `SupConLoss_text`). The text features come
from the `align-teacher` CLIP, computed once on the server at the first matching; they live in the
teacher's embedding space, so the federated features' width (the classifier's input: `projection-dim` under
CLIP2FL's Linear head, `head=linear`, which `head=auto` picks) must equal it: the preflight checks that
(`check`). `contrast-weight` 0 is CReFF's server, bit for bit.

`RoundConfig` adds `kd-weight` and `kd-temperature` to every round's train config; their presence is
what makes a client run its CLIP teacher (`client_app.distill`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flcore.config import ConfigError, Settings
from flcore.device import compute_of
from flcore.models import classifier_width
from flcore.run_data import Prepared, prepare
from rounds.delegate import Delegating
from strategies.creff import CReFFServer, with_server

KD_KEYS = ("kd-weight", "kd-temperature")


class RoundConfig(Delegating):
    """Any strategy, with fixed entries added to every round's train config."""

    def __init__(self, inner: Strategy, entries: Mapping[str, float]) -> None:
        super().__init__(inner)
        self.entries = dict(entries)

    def configure_train(self, server_round: int, arrays, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, ConfigRecord({**config, **self.entries}), grid)


def with_distillation(inner: Strategy, cfg: Settings) -> Strategy:
    """`inner` (CReFF) whose clients also distil from CLIP with the configured weight and temperature."""
    return RoundConfig(inner, {key: cfg[key] for key in KD_KEYS})


def text_contrast_loss(
    features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float
) -> torch.Tensor:
    """CLIP2FL's server contrast (`SupConLoss_text`), computed per class instead of per pair of rows.

    CLIP2FL gives every row j the text feature t_{y_j} of its class and, for each anchor i, contrasts
    s_ij = f_i . t_{y_j} / temperature over all rows j != i (features not normalised, text unit-norm);
    the positives are the other rows of i's class, and anchors alone in their class are left out:

        loss_i = -[s_i,y_i - log sum_c (n_c - [c = y_i]) exp(f_i . t_c / temperature)]

    with n_c the rows of class c. That is the same number as CLIP2FL's N x N form without the N x N
    matrix (10^8 entries for CIFAR-100's 10,000 features). Returns the mean over the anchors kept.
    """
    num_classes = text.shape[0]
    counts = torch.bincount(labels, minlength=num_classes)
    keep = counts[labels] > 1
    if not bool(keep.any()):
        return features.sum() * 0.0
    feats, own = features[keep], labels[keep]
    logits = feats @ text.to(feats).T / temperature  # [K, C]
    others = counts.to(feats.dtype).expand_as(logits) - F.one_hot(own, num_classes).to(feats.dtype)
    log_denominator = torch.logsumexp(logits + others.log(), dim=1)
    return -(logits.gather(1, own[:, None]).squeeze(1) - log_denominator).mean()


class TextContrast:
    """`weight` x `text_contrast_loss` towards class text features made once, on first use, by `make_text`."""

    def __init__(self, make_text: Callable[[], torch.Tensor], weight: float, temperature: float) -> None:
        self.make_text, self.weight, self.temperature = make_text, weight, temperature
        self.text: torch.Tensor | None = None

    def __call__(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.text is None:
            self.text = self.make_text().detach()
        if self.text.shape[1] != features.shape[1]:
            raise ValueError(
                f"CLIP2FL: the text features are {self.text.shape[1]}-d but the federated features "
                f"{features.shape[1]}-d; projection-dim must equal the align-teacher's embedding size."
            )
        return self.weight * text_contrast_loss(features, labels, self.text, self.temperature)


def class_text_features(cfg: Settings) -> torch.Tensor:
    """The align-teacher CLIP's unit-norm text features [C, D] of the dataset's classes under `clip2fl-prompt`.

    The offline stand-in (`align-teacher=holdout`) has no text tower: its classifier rows, unit-norm, take
    their place, as CLIP's text features are its zero-shot classifier (both live in the space the
    classifier reads, `projection-dim` wide).
    """
    from alignment import holdout
    from alignment import teacher as clip

    if cfg.holdout_teacher:
        model, source = holdout.load_or_train(cfg)
        print(f"[clip2fl] server takes class features from the classifier of the {source}", flush=True)
        return F.normalize(model.classifier.weight.detach().float(), dim=1)
    classes = prepare(cfg).dataset.classes
    config_dir = Path(tempfile.gettempdir()) / "clip2fl-configs"
    name, pretrained, dim = cfg.align_teacher, cfg.align_pretrained, cfg.projection_dim
    model = clip.load_teacher(name, pretrained, dim, config_dir, compute_of(cfg).device)
    print(f"[clip2fl] server computes class text features once with {model.label}", flush=True)
    return clip.text_features(model, classes, clip.prompt_templates(cfg.clip2fl_prompt)).float()


def contrast_term(cfg: Settings) -> TextContrast | None:
    """The server's text contrast, or None when `contrast-weight` is 0 (CReFF's server)."""
    weight = cfg.contrast_weight
    if weight == 0:
        return None
    return TextContrast(lambda: class_text_features(cfg), weight, cfg.contrast_temperature)


def clip2fl(cfg: Settings) -> Strategy:
    """CReFF's server with the text contrast, plus CLIP distillation on the clients (`client_app.distill`)."""
    return with_distillation(with_server(cfg, CReFFServer(cfg, contrast_term(cfg))), cfg)


def check(cfg: Settings, prepared: Prepared) -> None:
    """The preflight's CLIP2FL checks: class names to prompt with and, for the server contrast, the
    teacher's embedding size equal to `projection-dim` and its weights on this machine."""
    from alignment import holdout
    from alignment.logits import check_class_names, check_teacher

    width = classifier_width(cfg)
    if cfg.contrast_weight > 0 and width != cfg.projection_dim:
        raise ConfigError(
            f"run-config key 'head' = {cfg.head!r} is not allowed with strategy clip2fl: its classifier reads "
            f"{width}-d features, but CLIP2FL's server contrasts the federated features with the teacher's "
            f"{cfg.projection_dim}-d (projection-dim) class features; expected auto or linear (CLIP2FL's model), "
            "mlp, or contrast-weight=0."
        )
    if cfg.holdout_teacher:  # no prompts; its feature space is projection-dim wide
        holdout.check(cfg, prepared)
        return
    check_class_names(prepared.dataset.classes, who="strategy = clip2fl", escape="")
    if cfg.contrast_weight == 0:
        return
    check_teacher(
        cfg,
        "CLIP2FL's server contrasts the federated features (projection-dim wide) with its text features, "
        "unless contrast-weight=0",
    )
