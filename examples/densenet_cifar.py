"""A small DenseNet-style network for 32x32 images (a bring-your-own-model example).

Dense blocks in which every layer (BatchNorm -> ReLU -> 1x1 bottleneck conv -> BatchNorm ->
ReLU -> 3x3 conv) sees the concatenation (``torch.cat``) of all earlier feature maps of its
block, transition layers (BN -> ReLU -> 1x1 conv -> 2x2 average pooling) between blocks, global
average pooling and a linear classifier (Huang et al., "Densely Connected Convolutional
Networks", CVPR 2017, "DenseNet-BC"). Pre-activation BatchNorm sits *before* a conv, so pimsim
cannot fold it into that conv: it runs in torch, as the hardware's digital periphery would.
``build(num_classes=10, growth=12, blocks=(4, 4, 4))`` is what ``model.factory:
densenet_cifar.py:build`` calls. Plain torch: pimsim is not imported here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return torch.cat([x, y], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetCifar(nn.Module):
    def __init__(self, num_classes: int = 10, growth: int = 12, blocks=(4, 4, 4)):
        super().__init__()
        c = 2 * growth
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        stages = []
        for i, n in enumerate(blocks):
            for _ in range(n):
                stages.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                stages.append(Transition(c, c // 2))
                c //= 2
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.features(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build(num_classes: int = 10, growth: int = 12, blocks=(4, 4, 4)) -> DenseNetCifar:
    return DenseNetCifar(num_classes=num_classes, growth=growth, blocks=tuple(blocks))
