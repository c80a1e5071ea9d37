"""A small CIFAR-style CNN: the model file of examples/tiny_cnn.yaml (``model.factory:
tiny_cnn.py:build``). pimsim imports this file and calls ``build(**model.kwargs)``; any function
returning an ``nn.Module`` works the same way."""

import torch.nn as nn


class TinyCNN(nn.Module):
    """conv-BN-ReLU x 3 (the last two with stride 2), global average pooling, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def build(num_classes: int = 10, width: int = 16) -> TinyCNN:
    """The model pimsim runs: ``TinyCNN(num_classes, width)``."""
    return TinyCNN(num_classes=num_classes, width=width)
