"""FedYoYo's client side (arXiv 2503.06916; code github:shanss132/FedYoYo, `main_fedyoyo.py`): the two views a
client trains on, its loss, and the per-class effective numbers it reports before training.

Every batch goes through the model twice, as a weak view (crop, flip, a rotation of up to 15 degrees) and a strong
view (crop, flip, AutoAugment's CIFAR-10 policy, Cutout), in one forward pass (`TwoViews`). The logits of both are
adjusted by the log of a class prior raised to tau; the prior starts each round as the server's and moves towards
the client's own class distribution by gamma at every step (`YoYoLoss`), so the adjustment drifts from the
federation's prior to the client's. The loss is the cross-entropy of both views plus a self-distillation term, the
KL divergence at temperature T from the weak view's softmax (detached) to the strong view's, over the examples whose
weak view is already classified right, weighted by lambda * min(round / warmup, 1).

The server's prior comes from effective numbers (`effective_numbers`): before each round's training every sampled
client passes its data (test transform, no augmentation) through the received global model, takes each class's
features minus that class's mean, and over every batch of its shuffled data adds, per class in the batch, one over
the mean pairwise cosine of those features (a class's images that all look alike count as one image, a varied class
as many). The server keeps an EMA of their sums (`strategies.fedyoyo`).

Nothing here is CLIP or an LLM: a client uploads its weights and, to the server's query, its C effective numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flcore.batches import Batches
from flcore.config import Settings
from flcore.device import CPU, Compute

YOYO_LOSS = "fedyoyo"  # its name in `flcore.losses.SERVER_LOSSES`, which the server's round config names
PRIOR_KEY = "yoyo-prior"  # round config: the server's class prior, C floats summing to one
EFFECTIVE_KEY = "yoyo-effective"  # metrics of a client's query reply: its effective number per class, C floats
EFFECTIVE_ACTION = "effective_numbers"  # the ClientApp's query action: `query.effective_numbers`
EPS = 1e-6  # main_fedyoyo.py's EPS: the smallest mean cosine (an effective number of at most 1e6)
PRIOR_EPS = 1e-9  # log(prior^tau + 1e-9), as local_train adjusts the logits
ROTATION_DEGREES = 15.0  # the weak view's RandomRotation(15)
CUTOUT_FRACTION = 0.5  # Cutout(n_holes=1, length=16) on CIFAR's 32 pixels: half the side
AUTOAUGMENT_FILL = 128  # their CIFAR10Policy's fillcolor (128, 128, 128)


def distillation_weight(server_round: int, lam: float, warmup: int) -> float:
    """lambda * min(r / warmup, 1): the self-distillation term grows over the first `warmup` rounds."""
    return lam * min(server_round / warmup, 1.0)


def yoyo_loss(
    logits: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor, tau: float, temperature: float, weight: float
) -> torch.Tensor:
    """One step of FedYoYo's loss on the logits of a batch's weak view followed by its strong view (`labels` twice).

    Cross-entropy of the logits + log(prior^tau + 1e-9) over both views, plus `weight` times
    KL(softmax(weak / T) || softmax(strong / T)) over the examples whose adjusted weak logits predict their label,
    averaged over them (none: no term), without T^2, as the authors' `local_train`.
    """
    adjusted = logits + torch.log(prior.to(logits).pow(tau) + PRIOR_EPS)
    half = len(labels) // 2
    teacher, student = adjusted[:half], adjusted[half:]
    loss = F.cross_entropy(adjusted, labels)
    right = teacher.argmax(1) == labels[:half]
    if weight == 0 or not bool(right.any()):
        return loss
    target = F.softmax(teacher[right].detach() / temperature, dim=1)
    log_student = F.log_softmax(student[right] / temperature, dim=1)
    return loss + weight * F.kl_div(log_student, target, reduction="batchmean")


class YoYoLoss:
    """FedYoYo's client loss over one round of local training: before every step the prior moves a fraction gamma
    of the way from where it is to the client's class distribution (`local_train`'s cumulative prior)."""

    def __init__(
        self, prior: torch.Tensor, local: torch.Tensor, gamma: float, tau: float, temperature: float, weight: float
    ) -> None:
        self.prior, self.local = prior.float(), local.float()
        self.gamma, self.tau, self.temperature, self.weight = gamma, tau, temperature, weight

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.prior = (1 - self.gamma) * self.prior + self.gamma * self.local
        return yoyo_loss(logits, labels, self.prior, self.tau, self.temperature, self.weight)


def server_prior(server_config: Mapping, classes: int) -> torch.Tensor:
    """The round config's prior, checked to be `classes` positive finite numbers."""
    if PRIOR_KEY not in server_config:
        raise ValueError(f"the server asked for FedYoYo's loss but sent no '{PRIOR_KEY}' in the round config")
    prior = np.asarray(server_config[PRIOR_KEY], dtype=np.float64)
    if prior.shape != (classes,) or not np.isfinite(prior).all() or (prior <= 0).any():
        raise ValueError(f"the server's '{PRIOR_KEY}' must be {classes} positive numbers, got shape {prior.shape}")
    return torch.from_numpy(prior).float()


def yoyo_client_loss(cfg: Settings, label_counts: np.ndarray, server_config: Mapping) -> YoYoLoss:
    """This client's FedYoYo loss for the round the config names, from its own label counts and the server's prior."""
    counts = torch.as_tensor(np.asarray(label_counts, np.float64)).float()
    weight = distillation_weight(int(server_config.get("server-round", 0)), cfg.fedyoyo_lambda, cfg.fedyoyo_warmup)
    prior = server_prior(server_config, len(counts))
    local = counts / counts.sum()
    return YoYoLoss(prior, local, cfg.fedyoyo_gamma, cfg.fedyoyo_tau, cfg.fedyoyo_temperature, weight)


def rotate(x: torch.Tensor, gen: torch.Generator, degrees: float = ROTATION_DEGREES) -> torch.Tensor:
    """Each image turned about its centre by an angle drawn uniformly in [-degrees, degrees], nearest pixel, zeros
    outside (torchvision's RandomRotation defaults), all in one `grid_sample`."""
    n = x.shape[0]
    angles = ((torch.rand(n, generator=gen) * 2 - 1) * degrees * torch.pi / 180).to(x.device)
    cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    turned = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return turned.to(x.dtype)


def autoaugment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """AutoAugment's CIFAR-10 policy on each uint8 image separately (torchvision's, grey fill as theirs; on a batch it
    would draw one sub-policy for all), its random choices drawn from one seed per batch taken from `gen`. It runs on
    the CPU, whatever the batch's device: many small per-image operations, and the same result on every device."""
    from torchvision.transforms import v2

    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=AUTOAUGMENT_FILL)
    seed = int(torch.randint(2**62, (1,), generator=gen))
    images = x.cpu()
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(images.shape[0]):
            out[i] = policy(images[i])
    return out.to(x.device)


def cutout_mask(height: int, width: int, ys: torch.Tensor, xs: torch.Tensor, length: int) -> torch.Tensor:
    """[n, height, width], False inside each image's hole: rows y - length//2 .. y + length//2 - 1 and the same
    columns around x, clipped to the image (their `Cutout`)."""
    half = length // 2
    rows = torch.arange(height, device=ys.device)
    cols = torch.arange(width, device=xs.device)
    in_rows = (rows >= (ys[:, None] - half).clamp(0, height)) & (rows < (ys[:, None] + half).clamp(0, height))
    in_cols = (cols >= (xs[:, None] - half).clamp(0, width)) & (cols < (xs[:, None] + half).clamp(0, width))
    return ~(in_rows[:, :, None] & in_cols[:, None, :])


def cutout(x: torch.Tensor, gen: torch.Generator, length: int) -> torch.Tensor:
    """One square hole of side `length` per image, at a centre drawn uniformly over the image, set to 0 before
    normalisation (as their Cutout zeroes the 0..1 tensor before Normalize)."""
    n, _, height, width = x.shape
    ys = torch.randint(0, height, (n,), generator=gen).to(x.device)
    xs = torch.randint(0, width, (n,), generator=gen).to(x.device)
    return x * cutout_mask(height, width, ys, xs, length)[:, None].to(x.dtype)


class TwoViews:
    """A client's batches as FedYoYo trains on them: every batch's weak view, then its strong view, as one batch of
    twice the size with the labels twice (the authors' `torch.cat([img1, img2])`). `augment` switches the crop, flip
    and rotation; AutoAugment and Cutout make the strong view and always apply."""

    def __init__(self, batches: Batches) -> None:
        self.batches, self.data = batches, batches.data
        self.cutout = max(1, round(CUTOUT_FRACTION * batches.image_size))

    def __len__(self) -> int:
        return len(self.batches)

    def _weak(self, x: torch.Tensor, augment: bool, gen: torch.Generator) -> torch.Tensor:
        return rotate(self.batches.augment(x, gen), gen) if augment else x

    def _strong(self, x: torch.Tensor, augment: bool, gen: torch.Generator) -> torch.Tensor:
        cropped = self.batches.augment(x, gen) if augment else x
        return cutout(autoaugment(cropped, gen), gen, self.cutout)

    def iterate(
        self, shuffle: bool = False, augment: bool = False, gen: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        for _, x, y in self.batches.iterate_indexed(shuffle, False, gen, raw=True):
            views = torch.cat([self._weak(x, augment, gen), self._strong(x, augment, gen)])
            yield self.batches.normalise(views), torch.cat([y, y])


def training_batches(server_config: Mapping, batches: Batches) -> Batches | TwoViews:
    """What a client trains on: the two views when the round config names FedYoYo's loss, else its batches."""
    return TwoViews(batches) if server_config.get("loss") == YOYO_LOSS else batches  # flcore.losses.LOSS_KEY


def mean_cosine(centred: torch.Tensor) -> torch.Tensor:
    """a^T R a with a = 1/n: the mean of the pairwise cosines of the rows, self-pairs included, a zero row's 0."""
    gram = centred @ centred.T
    norms = centred.pow(2).sum(1).sqrt()[:, None]
    lengths = norms @ norms.T
    lengths[lengths == 0] = EPS
    return (gram / lengths).mean()


def class_means(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, D]: each class's mean feature, zeros for a class the client lacks (their `get_feature_mean`)."""
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, labels, feats)
    return sums / counts.clamp(min=1)[:, None]


def effective_numbers_of(batches: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> torch.Tensor:
    """Per class, the sum over `batches` (features, labels) of 1 / max(mean cosine, EPS) of the class's features in
    the batch minus the class's mean over all batches (1 for a class with one image in the batch); the authors'
    `get_feature_mean` and `calculate_eff_weight`."""
    feats = torch.cat([f for f, _ in batches]).float()
    means = class_means(feats, torch.cat([y for _, y in batches]), num_classes)
    effective = torch.zeros(num_classes, device=feats.device)
    for f, y in batches:
        centred = f.float() - means[y]
        for c in torch.unique(y).tolist():
            group = centred[y == c]
            effective[c] += 1.0 if len(group) == 1 else 1.0 / mean_cosine(group).clamp(min=EPS)
    return effective


@torch.no_grad()
def effective_numbers(
    model: nn.Module, batches: Batches, num_classes: int, gen: torch.Generator, compute: Compute = CPU
) -> np.ndarray:
    """This client's effective numbers (`effective_numbers_of`) under `model` (eval mode), over its data in a
    shuffled order drawn from `gen`, test transform, the classifier's input as the features."""
    model.eval()
    seen = []
    for x, y in batches.iterate(shuffle=True, gen=gen):
        with compute.autocast():
            feats = model.embed(x)
        seen.append((feats.float(), y))
    return effective_numbers_of(seen, num_classes).cpu().numpy()
