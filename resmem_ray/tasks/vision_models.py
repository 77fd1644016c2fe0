"""Base models. Each exposes `embed(x)` (pooled penultimate layer) and `head(z)`
separately; `forward(x) == head(embed(x))`."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from resmem_ray.schema import ModelConfig
from resmem_ray.errors import ResMemError


class EmbedHead(nn.Module):
    """A feature extractor followed by a linear head."""

    def __init__(self, features: nn.Module, embedding_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(embedding_dim, num_classes)
        self.embedding_dim = embedding_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(in_channels: int, num_classes: int, width: int = 16) -> EmbedHead:
    """Three conv blocks and global average pooling; embedding dim = 4 * width."""
    features = nn.Sequential(
        *_conv_bn(in_channels, width), *_conv_bn(width, 2 * width, stride=2),
        *_conv_bn(2 * width, 4 * width, stride=2), nn.AdaptiveAvgPool2d(1))
    return EmbedHead(features, 4 * width, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet(depth: int, in_channels: int, num_classes: int, width: int = 1) -> EmbedHead:
    """ResNet-20/32/56 of He et al. (2016) for 32x32 inputs; `width` multiplies 16/32/64."""
    if (depth - 2) % 6:
        raise ResMemError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    widths = [16 * width, 32 * width, 64 * width]
    layers: list[nn.Module] = _conv_bn(in_channels, widths[0])
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for i in range(n):
            layers.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
            cin = cout
    layers.append(nn.AdaptiveAvgPool2d(1))
    return EmbedHead(nn.Sequential(*layers), widths[-1], num_classes)


def torchvision_resnet(name: str, in_channels: int, num_classes: int) -> EmbedHead:
    """torchvision resnet18/50 (random init: no weights are downloaded), its fc split off as the head."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    model = EmbedHead(nn.Sequential(*list(net.children())[:-1]), net.fc.in_features, num_classes)
    model.head = net.fc
    return model


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> EmbedHead:
    if cfg.name == "small_cnn":
        return small_cnn(in_channels, num_classes, cfg.width)
    if cfg.name in ("resnet20", "resnet32", "resnet56"):
        return cifar_resnet(int(cfg.name[6:]), in_channels, num_classes, cfg.width)
    if cfg.name in ("resnet18", "resnet50"):
        return torchvision_resnet(cfg.name, in_channels, num_classes)
    raise ResMemError(f"unknown model model.name={cfg.name!r}")
