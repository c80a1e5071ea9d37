"""A small MobileNetV2-style network for 32x32 images (a bring-your-own-model example).

Inverted residual blocks (1x1 expand -> 3x3 depthwise -> 1x1 project, BatchNorm, ReLU6, an
identity shortcut where shapes allow), adaptive average pooling and a linear classifier: the
depthwise convolutions (``groups = channels``) are what makes it differ from the zoo ResNets.
``build(num_classes=10, width=1.0)`` is what ``model.factory: mobilenet_cifar.py:build`` calls
with ``model.kwargs``. Plain torch: pimsim is not imported here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# (expansion t, output channels c, blocks n, stride of the first block s): MobileNetV2's table
# cut to CIFAR size (32x32 stem, then 16x16, 8x8 and 4x4 stages: small enough to train on a CPU)
STAGES = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2), (4, 96, 1, 1))


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        layers = [] if t == 1 else [_conv_bn(cin, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),   # depthwise
                   _conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetCifar(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, last: int = 256):
        super().__init__()
        ch = lambda c: max(8, int(round(c * width / 8)) * 8)  # noqa: E731
        cin = ch(32)
        layers = [_conv_bn(3, cin, 3)]
        for t, c, n, s in STAGES:
            for i in range(n):
                layers.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t))
                cin = ch(c)
        layers.append(_conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def build(num_classes: int = 10, width: float = 1.0) -> MobileNetCifar:
    return MobileNetCifar(num_classes=num_classes, width=width)
