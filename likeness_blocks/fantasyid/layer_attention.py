"""FantasyID LayerAttention: video tokens attend to the ID tokens (one module per DiT block)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerAttention(nn.Module):
    """norm1 = LN(kv_dim) on ID tokens, norm2 = LN(dim) on video tokens; bias-free to_q / to_kv / to_out.

    Upstream scales q and k each by dim_head^-1/4 and takes the softmax in float32 (see forward). Called as (id_tokens, hidden_states);
    returns the update (B, N, dim) to be added to the video tokens.
    """

    def __init__(self, dim: int = 3072, dim_head: int = 128, heads: int = 16, kv_dim: int = 2048):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, id_tokens: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        x = self.norm1(id_tokens.to(hidden_states.dtype))
        lat = self.norm2(hidden_states)
        q = self.to_q(lat)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        if k.shape[0] != b:
            if k.shape[0] != 1:
                raise ValueError(f"ID tokens batch ({k.shape[0]}) must be 1 or match the video batch ({b}).")
            k, v = k.expand(b, -1, -1), v.expand(b, -1, -1)
        q = q.view(b, n, self.heads, -1).transpose(1, 2)
        k = k.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
        v = v.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
        # Upstream scales q and k by dim_head^-1/4 each and takes the softmax in float32: the same logits as one
        # dim_head^-1/2 scale. The fused kernel never materialises the (video tokens x ID tokens) weights and
        # accumulates in float32, so it is as exact in fp32 and no less exact in half precision.
        out = F.scaled_dot_product_attention(q, k, v, scale=self.dim_head ** -0.5)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)
