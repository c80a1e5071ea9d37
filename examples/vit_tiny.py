"""A small Vision Transformer for 32x32 images (a bring-your-own-model example).

Patch embedding by a strided conv, a class token and learned position embeddings, pre-norm
encoder blocks (LayerNorm -> multi-head self-attention written out with ``nn.Linear``
projections -> residual; LayerNorm -> MLP with GELU -> residual) and a linear head on the class
token (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021). pimsim maps the patch
conv and every ``nn.Linear`` (on token inputs: one column per token) onto arrays; the
attention products ``q kᵀ`` and ``softmax(.) v`` multiply two activations, so they run
digitally and are listed in ``digital_layers``. ``build(num_classes=10, dim=64, depth=2,
heads=4, patch=4)`` is what ``model.factory: vit_tiny.py:build`` calls. Plain torch.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        qkv = self.qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        y = att.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, num_classes: int = 10, dim: int = 64, depth: int = 2, heads: int = 4,
                 patch: int = 4, image: int = 32):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def build(num_classes: int = 10, dim: int = 64, depth: int = 2, heads: int = 4,
          patch: int = 4, image: int = 32) -> ViT:
    return ViT(num_classes=num_classes, dim=dim, depth=depth, heads=heads, patch=patch, image=image)
