"""Small models built from configs, for the demo, the tests and the benchmarks: an MLP, a
ViT-style encoder, a LLaMA-style decoder (hand-written RMSNorm, RoPE, SiLU-gated MLP) and a
small CNN. No weights are downloaded; every factory takes its sizes as arguments, so the
benchmarks build the same architectures at realistic widths.

    model, inputs = zoo.build("vit")          # default small size, example inputs (batch 4)
    model = zoo.vit(dim=768, depth=4, heads=12, image_size=224, patch_size=16)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Pre-norm MLP: [LayerNorm -> Linear -> GELU] x depth -> Linear."""

    def __init__(self, in_features: int = 64, hidden: int = 256, depth: int = 2, classes: int = 10):
        super().__init__()
        layers, width = [], in_features
        for _ in range(depth):
            layers += [nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """ViT-style encoder: patch embedding, class token, pre-norm blocks, mean-pooled head."""

    def __init__(self, image_size=32, patch_size=4, channels=3, dim=192, depth=2, heads=3, mlp_ratio=4, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class RMSNorm(nn.Module):
    """RMSNorm as LLaMA's reference code writes it."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_seq: int, theta: float = 10000.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(max_seq).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = self.cos[:n].to(x.dtype), self.sin[:n].to(x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, max_seq: int, eps: float = 1e-6):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = LlamaAttention(dim, heads, max_seq)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = LlamaMLP(dim, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """LLaMA-style decoder: token embedding, blocks, final RMSNorm, LM head (logits)."""

    def __init__(self, vocab=256, dim=128, depth=2, heads=4, hidden=None, max_seq=256, eps=1e-6):
        super().__init__()
        hidden = hidden or 64 * math.ceil(8 * dim / 3 / 64)
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, heads, hidden, max_seq, eps) for _ in range(depth))
        self.norm = RMSNorm(dim, eps)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class SmallCNN(nn.Module):
    """[Conv -> BatchNorm -> SiLU] x 3 with stride 2 after the first, pooled linear head."""

    def __init__(self, channels: int = 3, width: int = 16, classes: int = 10):
        super().__init__()
        layers, c_in = [], channels
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(c_out), nn.SiLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, images):
        return self.head(self.features(images).mean(dim=(2, 3)))


class ChannelsLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's stem and downsampling)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7 conv, LayerNorm over channels, Linear-GELU-Linear MLP
    (channels last), layer scale, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


def mlp(**sizes) -> MLP:
    return MLP(**sizes)


def vit(**sizes) -> ViT:
    return ViT(**sizes)


def llama(**sizes) -> LlamaDecoder:
    return LlamaDecoder(**sizes)


def cnn(**sizes) -> SmallCNN:
    return SmallCNN(**sizes)


BUILTIN = {
    "vit": "ViT-style encoder (2 blocks, width 192) on 32x32 images",
    "llama": "LLaMA-style decoder (2 blocks, width 128, hand-written RMSNorm, SiLU-gated MLP) on 64 tokens",
    "mlp": "pre-norm MLP with GELU on 64 features",
    "cnn": "conv/batch-norm/SiLU network on 32x32 images",
}


def build(name: str, batch: int = 4, seed: int = 0) -> tuple[nn.Module, tuple]:
    """A built-in model at its default size and example inputs for it."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "vit":
        return vit(), (torch.randn(batch, 3, 32, 32, generator=gen),)
    if name == "llama":
        return llama(), (torch.randint(0, 256, (batch, 64), generator=gen),)
    if name == "mlp":
        return mlp(), (torch.randn(batch, 64, generator=gen),)
    if name == "cnn":
        return cnn(), (torch.randn(batch, 3, 32, 32, generator=gen),)
    raise ValueError(f"unknown built-in model {name!r}; the models are: {', '.join(BUILTIN)}")
