"""Client models: a backbone -> a head from its pooled features to the classifier's input -> a linear classifier.

One factory, `build_model`, builds every model from data: a backbone by name (`BACKBONES`, run-config key
`model`) and a head by name (`HEADS`, key `head`). The heads are the ones the compared methods' reference
code trains, so each row of a comparison trains its own model:

- `mlp`: Linear-GELU-Linear to `projection-dim` (LLaVA's mlp2x_gelu shape), the paper's model: stage 1 maps
  backbone and projection into LLaVA's feature space (`pretrain.dwp`).
- `linear`: one Linear to `projection-dim`, CLIP2FL's `add_mlp` (256 -> 512 in its `Model/Resnet8_256.py`).
- `none`: the classifier reads the backbone's pooled features (256-d ResNet-8, 2048-d ResNet-50): CReFF's
  ResNet-8 and every baseline in CReFF's code base.

`head = auto` (`model_head`) is `mlp` when stage 1 or stage 3 is on (the paper's method), else the model of
the strategy's reference code, `METHOD_HEADS`. The classifier is a linear layer, except for the methods whose
classifier is part of the method (`METHOD_CLASSIFIERS`: FedETF's fixed simplex ETF, `ETFClassifier`), which
read the same classifier input, so every head and both server stages compose with them (FedLoGe's SSE-C with its
global head, `flcore.fedloge.FedLoGeClassifier`, too). The backbone's pooled
features (`features`) and the classifier's input (`embed`: the head's output, the features themselves with
`none`) are separate methods because the server stages and the class statistics of CCVR and CReFF read them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from flcore.config import ConfigError, Settings
from flcore.fedloge import FedLoGeClassifier

PAPER_HEAD = "mlp"  # the paper's model: what stage 1 pretrains and stage 3 aligns

# The model each method's reference code trains (what `head = auto` picks without stage 1 or 3), by `strategy`:
# CReFF's code base (github:shangxinyi/CReFF-FL) trains ResNet-8 with a linear classifier on its 256-d features
# for CReFF and for its baselines (FedAvg, FedProx, FedAvgM, FedNova, Fed-Focal, tau-norm, CCVR; the Ratio Loss,
# FedLC, FedRS, FedDF and FedBE are compared on the same model); CLIP2FL (github:shijiangming1/CLIP2FL) adds one
# Linear 256 -> 512 before its classifier. A loss (`loss=focal/fedlc/fedrs`) or tau-norm rides on its strategy's
# model. Every strategy of the registry has an entry (a test checks).
METHOD_HEADS: dict[str, str] = {
    "fedavg": "none",
    "fedprox": "none",
    "fedavgm": "none",
    "fednova": "none",
    "ccvr": "none",
    "creff": "none",
    "clip2fl": "linear",
    "fedmedian": "none",
    "fedtrimmedavg": "none",
    "feddf": "none",
    "fedbe": "none",
    "ratioloss": "none",
    "fedetf": "none",  # its authors' linear_proto reads the pooled features: here the ETF classifier's projection
    "fedloge": "none",  # its authors' heads (SSE-C, g_aux, l_head) read the backbone's pooled features
    "fedyoyo": "none",  # its authors' ResNet_cifar (resnet8): the classifier reads the pooled features
}


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (two 3x3 convs, identity or 1x1 projection shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    """CReFF / CLIP2FL ResNet-8: 3x3 stem to 64 channels, one BasicBlock per stage at 64/128/256."""

    out_dim = 256

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(64, 64, 1)
        self.layer2 = BasicBlock(64, 128, 2)
        self.layer3 = BasicBlock(128, 256, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return torch.flatten(self.pool(x), 1)


def resnet8() -> nn.Module:
    """ResNet-8 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) as CReFF (Shang et al.,
    IJCAI 2022) and CLIP2FL (Shi et al., AAAI 2024) train it on CIFAR: `ResNet_cifar(resnet_size=8, scaling=4)`."""
    return ResNet8()


def resnet50() -> nn.Module:
    """ResNet-50 (He et al., CVPR 2016), torchvision's, without pretrained weights; its 2048-d pooled output is the
    feature (CReFF's ImageNet-LT backbone)."""
    from torchvision.models import resnet50 as tv_resnet50

    net = tv_resnet50(weights=None)
    net.fc = nn.Identity()
    net.out_dim = 2048
    return net


BACKBONES: dict[str, Callable[[], nn.Module]] = {"resnet8": resnet8, "resnet50": resnet50}


def mlp_head(in_dim: int, dim: int) -> nn.Module:
    """Linear-GELU-Linear to `dim`: LLaVA-1.5's mlp2x_gelu projector (Liu et al., "Improved Baselines with Visual
    Instruction Tuning", CVPR 2024), the paper's projection of the FL model into the teacher's feature space."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))


def linear_head(in_dim: int, dim: int) -> nn.Module:
    """One Linear to `dim`: CLIP2FL's `add_mlp` (Shi et al., "CLIP-Guided Federated Learning on Heterogeneous and
    Long-Tailed Data", AAAI 2024), 256 -> 512, CLIP ViT-B/32's width."""
    return nn.Sequential(nn.Linear(in_dim, dim))


def no_head(in_dim: int, dim: int) -> nn.Module:
    """Nothing: the classifier reads the backbone's features, as in CReFF's ResNet-8 (Shang et al., IJCAI 2022)."""
    return nn.Identity()


# head name -> fn(backbone width, projection-dim) -> module; `HEAD_WIDTHS` says how wide its output is.
HEADS: dict[str, Callable[[int, int], nn.Module]] = {"mlp": mlp_head, "linear": linear_head, "none": no_head}
HEAD_WIDTHS: dict[str, Callable[[int, int], int]] = {
    "mlp": lambda feat, dim: dim,
    "linear": lambda feat, dim: dim,
    "none": lambda feat, dim: feat,
}


def orthonormal_basis(draw: torch.Tensor) -> torch.Tensor:
    """The Q of the QR decomposition of `draw` [d, C] (d >= C): C orthonormal columns, computed in float64 and
    returned in float32, as FedETF's `generate_random_orthogonal_matrix` does with NumPy."""
    return torch.linalg.qr(draw.double())[0].float()


def simplex_etf(basis: torch.Tensor) -> torch.Tensor:
    """The simplex equiangular tight frame [d, C] on `basis`'s C orthonormal columns: sqrt(C/(C-1)) P (I - 11^T/C),
    C unit columns with pairwise cosine -1/(C-1) (Papyan et al., 2020; FedETF's `Proto_Classifier`)."""
    classes = basis.shape[1]
    if classes < 2:
        raise ValueError(f"a simplex ETF needs at least 2 classes, got {classes}")
    centring = torch.eye(classes, dtype=basis.dtype, device=basis.device) - 1.0 / classes
    return math.sqrt(classes / (classes - 1)) * basis @ centring


class ETFClassifier(nn.Module):
    """FedETF's classifier (Li et al., "No Fear of Classifier Biases: Neural Collapse Inspired Federated Learning
    with Synthetic and Fixed Classifier", ICCV 2023): a learnable linear projection of the classifier's input to C
    dimensions, L2-normalised, times a fixed simplex ETF [C, C] and a learnable scale (init 1). The ETF is a buffer:
    SGD and the server stages never move it, it travels with the model so every client holds the server's, and
    FedAvg's mean of identical copies leaves it where it is. Drawn from torch's generator when the model is built
    (the run's seed on the server), as FedETF draws it from NumPy's seeded one."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, num_classes)  # FedETF's `linear_proto`
        self.scale = nn.Parameter(torch.tensor(1.0))  # FedETF's `scaling_train`
        self.register_buffer("etf", simplex_etf(orthonormal_basis(torch.rand(num_classes, num_classes))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (F.normalize(self.projection(x), dim=1, eps=1e-12) @ self.etf)


# classifier name -> fn(input width, classes) -> module; every strategy not in `METHOD_CLASSIFIERS` uses `linear`.
CLASSIFIERS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": nn.Linear,
    "etf": ETFClassifier,
    "sse-c": FedLoGeClassifier,  # FedLoGe's SSE-C and global head g_aux (`flcore.fedloge`)
}
METHOD_CLASSIFIERS: dict[str, str] = {"fedetf": "etf", "fedloge": "sse-c"}


class FLModel(nn.Module):
    """backbone -> projection (a head of `HEADS`, nothing for `none`) -> classifier (linear, or a method's own)."""

    def __init__(
        self,
        backbone: nn.Module,
        projection_dim: int,
        num_classes: int,
        head: str = PAPER_HEAD,
        classifier: str = "linear",
    ) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        feat = backbone.out_dim
        self.projection = HEADS[head](feat, projection_dim)
        self.embed_dim = HEAD_WIDTHS[head](feat, projection_dim)  # the classifier's input width
        self.classifier = CLASSIFIERS[classifier](self.embed_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (256-d ResNet-8, 2048-d ResNet-50)."""
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input (`embed_dim` wide): the projection's output, the backbone features without one."""
        return self.projection(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def build_model(
    name: str,
    projection_dim: int,
    num_classes: int,
    seed: int | None = None,
    device: torch.device | None = None,
    head: str = PAPER_HEAD,
    classifier: str = "linear",
) -> FLModel:
    """One factory for every client model: backbone `name`, head `head` (`HEADS`), classifier `classifier`
    (`CLASSIFIERS`); `seed` makes the initial weights reproducible. They are drawn on the CPU and then moved to
    `device`, so every device starts from the same weights."""
    if seed is not None:
        torch.manual_seed(seed)
    model = FLModel(BACKBONES[name](), projection_dim, num_classes, head, classifier)
    return model.to(device=device, memory_format=torch.channels_last)


def buffer_names(name: str, projection_dim: int, head: str = PAPER_HEAD, classifier: str = "linear") -> frozenset[str]:
    """State-dict entries of the model that SGD does not train: its buffers (BatchNorm's running mean and
    variance and batch count). Asked of the model itself, built on the meta device (no memory, no weights),
    so it holds for any backbone, head, classifier (FedETF's fixed ETF) and normalisation layer."""
    with torch.device("meta"):
        model = FLModel(BACKBONES[name](), projection_dim, num_classes=2, head=head, classifier=classifier)
    return frozenset(key for key, _ in model.named_buffers())


def model_head(cfg: Settings) -> str:
    """The run's head: `head`, with `auto` resolved to the paper's MLP when stage 1 or stage 3 is on (stage 1
    pretrains the projection into LLaVA's width, and the 'ours' rows are the paper's model), else to the model of
    the strategy's reference code (`METHOD_HEADS`)."""
    head = cfg.head
    if head != "auto":
        return head
    if cfg.pretrain or cfg.align:
        return PAPER_HEAD
    strategy = cfg.strategy
    if strategy not in METHOD_HEADS:
        raise ConfigError(
            f"run-config key 'head' = 'auto' is not allowed with strategy {strategy!r}: flcore.models.METHOD_HEADS "
            f"names no reference model for it; set head to one of {', '.join(HEADS)}."
        )
    return METHOD_HEADS[strategy]


def model_classifier(cfg: Settings) -> str:
    """The run's classifier: the strategy's own (`METHOD_CLASSIFIERS`), else linear."""
    return METHOD_CLASSIFIERS.get(cfg.strategy, "linear")


@lru_cache(maxsize=8)
def feature_width(name: str) -> int:
    """The pooled feature size of backbone `name`, from a meta-device copy (no memory, no weights)."""
    with torch.device("meta"):
        return int(BACKBONES[name]().out_dim)


def classifier_width(cfg: Settings) -> int:
    """The width of the classifier's input under the run's model (`embed`): CCVR's and CReFF's feature size."""
    return HEAD_WIDTHS[model_head(cfg)](feature_width(cfg.model), cfg.projection_dim)


def run_buffer_names(cfg: Settings) -> frozenset[str]:
    """`buffer_names` of the run's model (`model`, `head` resolved, `projection-dim`): what server steps that
    move trained parameters (FedAvgM, FedNova) average plainly instead."""
    return buffer_names(cfg.model, cfg.projection_dim, model_head(cfg), model_classifier(cfg))


def run_model(cfg: Settings, num_classes: int, seed: int | None = None, device: torch.device | None = None) -> FLModel:
    """The run's model (`model`, `head` resolved, `projection-dim`, the strategy's classifier) for `num_classes`
    classes."""
    return build_model(cfg.model, cfg.projection_dim, num_classes, seed, device, model_head(cfg), model_classifier(cfg))
