"""Client models: backbone -> MLP projection to the teacher's feature size -> linear classifier.

The backbone's pooled features (`features`) and the projected features (`embed`) are separate methods
because the server stages need them: pretraining maps the backbone into CLIP's feature space and
alignment distils into the classifier.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


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
    return ResNet8()


def resnet50() -> nn.Module:
    """torchvision's ResNet-50 without pretrained weights; its 2048-d pooled output is the feature."""
    from torchvision.models import resnet50 as tv_resnet50

    net = tv_resnet50(weights=None)
    net.fc = nn.Identity()
    net.out_dim = 2048
    return net


BACKBONES: dict[str, Callable[[], nn.Module]] = {"resnet8": resnet8, "resnet50": resnet50}


class FLModel(nn.Module):
    """backbone -> projection (Linear-GELU-Linear, LLaVA's mlp2x_gelu shape) -> classifier."""

    def __init__(self, backbone: nn.Module, projection_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        feat = backbone.out_dim
        self.projection = nn.Sequential(
            nn.Linear(feat, projection_dim), nn.GELU(), nn.Linear(projection_dim, projection_dim)
        )
        self.classifier = nn.Linear(projection_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (256-d ResNet-8, 2048-d ResNet-50)."""
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features in the teacher's width (`projection-dim`)."""
        return self.projection(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def build_model(
    name: str, projection_dim: int, num_classes: int, seed: int | None = None, device: torch.device | None = None
) -> FLModel:
    """One factory for every client model; `seed` makes the initial weights reproducible. They are drawn on the
    CPU and then moved to `device`, so every device starts from the same weights."""
    if seed is not None:
        torch.manual_seed(seed)
    model = FLModel(BACKBONES[name](), projection_dim, num_classes)
    return model.to(device=device, memory_format=torch.channels_last)


def buffer_names(name: str, projection_dim: int) -> frozenset[str]:
    """State-dict entries of the model that SGD does not train: its buffers (BatchNorm's running mean and
    variance and batch count). Asked of the model itself, built on the meta device (no memory, no weights),
    so it holds for any backbone and any normalisation layer."""
    with torch.device("meta"):
        model = FLModel(BACKBONES[name](), projection_dim, num_classes=1)
    return frozenset(key for key, _ in model.named_buffers())
