"""Mapping networks: one CLIP embedding in, `prefix_length` vectors in the language model's width out.

The prefix is a soft prompt: GPT-2 reads these vectors as if they were the embeddings of words that
describe the image, and continues them with the caption. Both mappers follow ClipCap (Mokady et al.
2021) closely enough that its released weights load into them (see README):

- MLP: Linear(clip_dim, P*D/2) -> Tanh -> Linear(P*D/2, P*D), reshaped to P vectors.
- Transformer: the embedding is projected to `clip_length` tokens, `prefix_length` learned constant
  tokens are appended, `num_layers` pre-norm encoder layers mix them (no causal mask), and the outputs
  at the constant tokens are the prefix. Attention has no bias on queries/keys/values, a bias on the
  output projection; the MLP is `mlp_ratio` x wide with ReLU; there is no final norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPMapper(nn.Module):
    def __init__(self, clip_dim: int, lm_dim: int, prefix_length: int, dropout: float = 0.0):
        super().__init__()
        self.prefix_length, self.lm_dim = prefix_length, lm_dim
        hidden = prefix_length * lm_dim // 2
        # indices 0 and 2 hold the weights, as in ClipCap's checkpoints
        self.model = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Sequential(nn.Tanh(), nn.Dropout(dropout)),
                                   nn.Linear(hidden, prefix_length * lm_dim))

    def forward(self, clip_embed: torch.Tensor) -> torch.Tensor:
        # clip_embed: (B, clip_dim)
        return self.model(clip_embed).view(-1, self.prefix_length, self.lm_dim)  # (B, P, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.to_queries(x).view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, D/H)
        k, v = self.to_keys_values(x).view(B, T, 2, self.num_heads, D // self.num_heads).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D/H)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.project(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2, self.dropout = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerMapper(nn.Module):
    def __init__(self, clip_dim: int, lm_dim: int, prefix_length: int, clip_length: int, num_layers: int = 6,
                 num_heads: int = 8, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        if lm_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the language model's width {lm_dim}")
        self.clip_length = clip_length
        self.linear = nn.Linear(clip_dim, clip_length * lm_dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, lm_dim))
        self.layers = nn.ModuleList(Block(lm_dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers))

    def forward(self, clip_embed: torch.Tensor) -> torch.Tensor:
        # clip_embed: (B, clip_dim)
        B = clip_embed.shape[0]
        x = self.linear(clip_embed).view(B, self.clip_length, -1)  # (B, C, D)
        const = self.prefix_const.unsqueeze(0).expand(B, -1, -1)  # (B, P, D)
        x = torch.cat([x, const.to(x.dtype)], dim=1)  # (B, C + P, D)
        for layer in self.layers:
            x = layer(x)
        return x[:, self.clip_length:]  # (B, P, D)


def build_mapper(kind: str, clip_dim: int, lm_dim: int, prefix_length: int, clip_length: int,
                 num_layers: int, num_heads: int, mlp_ratio: float, dropout: float) -> nn.Module:
    if kind == "mlp":
        return MLPMapper(clip_dim, lm_dim, prefix_length, dropout)
    if kind == "transformer":
        return TransformerMapper(clip_dim, lm_dim, prefix_length, clip_length, num_layers, num_heads, mlp_ratio,
                                 dropout)
    raise ValueError(f"mapper must be 'mlp' or 'transformer', not {kind!r}")
