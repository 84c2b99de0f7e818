"""Small vision transformers (plain nn.Modules, no timm): the model family in which N:M
sparsity has Linear layers to speed up (prune.structure=2:4 with prune.include_linear=true).

vit_cifar: 32x32 inputs, patches of 4 (64 tokens + a class token), width 192, depth 6,
3 heads, MLP 768 (about 2.7 M parameters, 24 prunable Linear layers, every one of which has
an input dimension divisible by 8, as the semi-structured kernels need).
vit_digits: the 8x8 digits of the tests, patches of 2 (16 tokens), width 32, depth 2.
Pre-norm blocks (LayerNorm -> attention / MLP -> residual), learned position embeddings,
classification from the class token; the head is the model's last Linear, so
models.classifier_of finds it and pruning leaves it dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTShape:
    image_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int


VIT_SHAPES = {
    "vit_cifar": ViTShape(image_size=32, patch_size=4, dim=192, depth=6, heads=3, mlp_dim=768),
    "vit_digits": ViTShape(image_size=8, patch_size=2, dim=32, depth=2, heads=2, mlp_dim=64),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written so that torch.fx traces it (no unpacking of shapes or of tensors), as
        # perf.fold_batchnorm's tracer does to every model.
        batch, tokens = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.dim // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, batch, heads, tokens, head dim)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    def __init__(self, shape: ViTShape, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if shape.image_size % shape.patch_size or shape.dim % shape.heads:
            raise ValueError(f"inconsistent ViT shape {shape}")
        self.shape = shape
        patches = (shape.image_size // shape.patch_size) ** 2
        # A convolution with stride = kernel = patch: one Linear map of every flattened patch.
        self.patch_embed = nn.Conv2d(in_channels, shape.dim, shape.patch_size,
                                     stride=shape.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, shape.dim))
        self.blocks = nn.Sequential(*[Block(shape.dim, shape.heads, shape.mlp_dim)
                                      for _ in range(shape.depth)])
        self.norm = nn.LayerNorm(shape.dim)
        self.head = nn.Linear(shape.dim, num_classes)  # last: models.classifier_of's pick
        self._initialise()

    def _initialise(self) -> None:
        # As timm's ViT: truncated normal (std 0.02) for embeddings and Linear weights.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.shape.dim, -1))
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.shape.image_size
        # torch._assert, not `if ... raise`: symbolic tracing (perf.fold_batchnorm's) passes it.
        torch._assert((x.shape[-1] == size) & (x.shape[-2] == size),
                      f"this ViT takes {size}x{size} images (its position embeddings)")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = self.blocks(tokens + self.pos_embed)
        return self.head(self.norm(tokens[:, 0]))


def vision_transformer(name: str, num_classes: int, in_channels: int = 3) -> VisionTransformer:
    return VisionTransformer(VIT_SHAPES[name], num_classes, in_channels)
