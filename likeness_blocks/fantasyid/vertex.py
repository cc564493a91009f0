"""FantasyID 3D path: coarse pooling, depth encoding, fusion transformer, SpiralNet++ decoder, ResConv1D reducer.

Names of modules/parameters follow the released checkpoint (`vertex_spiral_net.*`, `vertex_reducer.*`). Spiral
indices and sampling matrices are mesh data (FantasyID's `transform.pkl`), not weights: they live in non-persistent
buffers, so they follow `.to(device)` but never enter the state dict.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------------
# depth encoding and sparse pooling
# ---------------------------------------------------------------------------------------------------------------------
def depth_sin_encoding(depth: torch.Tensor, dim: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """(B, N, 1) depth -> (B, N, dim): d*2pi / 10000^(2*floor(i/2)/dim), sin on even channels, cos on odd ones."""
    if depth.shape[-1] != 1:
        raise ValueError(f"depth must end in a size-1 axis (B, N, 1), got shape {tuple(depth.shape)}.")
    d = depth.float() * (2.0 * math.pi)
    idx = torch.arange(dim, dtype=torch.float32, device=depth.device)
    dim_t = temperature ** (2.0 * torch.div(idx, 2, rounding_mode="floor") / dim)
    pos = d / dim_t
    out = torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=-1)
    return out.flatten(-2)


def sparse_pool(x: torch.Tensor, row: torch.Tensor, col: torch.Tensor, value: torch.Tensor, n_out: int) -> torch.Tensor:
    """out[:, r] = sum over nnz (r, c, w) of w * x[:, c]  (x: (B, V_in, C) -> (B, n_out, C))."""
    gathered = x.index_select(1, col) * value.to(x.dtype).view(1, -1, 1)
    out = x.new_zeros(x.shape[0], n_out, x.shape[2])
    return out.index_add_(1, row, gathered)


class _SparseMatrix(nn.Module):
    """A (rows x cols) sparse matrix in COO form, held in non-persistent buffers."""

    def __init__(self, row, col, value, shape: Tuple[int, int]):
        super().__init__()
        self.register_buffer("row", torch.as_tensor(row, dtype=torch.long), persistent=False)
        self.register_buffer("col", torch.as_tensor(col, dtype=torch.long), persistent=False)
        self.register_buffer("value", torch.as_tensor(value, dtype=torch.float32), persistent=False)
        self.shape = (int(shape[0]), int(shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.shape[1]:
            raise ValueError(
                f"sampling matrix expects {self.shape[1]} vertices, got {x.shape[1]}; the vertices do not match the "
                "mesh of transform.pkl (FLAME has 5023 vertices)."
            )
        return sparse_pool(x, self.row, self.col, self.value, self.shape[0])


# ---------------------------------------------------------------------------------------------------------------------
# fusion transformer (ViT style, pre-norm, residual)
# ---------------------------------------------------------------------------------------------------------------------
class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        if heads == 1 and dim_head == dim:
            self.to_out = nn.Identity()
        else:
            self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class MlpBlock(nn.Module):
    """fc1 -> exact GELU -> fc2 (key names as timm's Mlp)."""

    def __init__(self, in_features: int, out_features: int, hidden_features: Optional[int] = None):
        super().__init__()
        hidden = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TokenFeedForward(nn.Module):
    """net = Linear -> exact GELU -> Dropout -> Linear -> Dropout (dropout 0)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class FusionTransformer(nn.Module):
    """`layers.N.0` = PreNorm(attention), `layers.N.1` = PreNorm(Linear-GELU-Linear); x += each."""

    def __init__(self, dim: int = 128, depth: int = 6, heads: int = 4, dim_head: int = 32, mlp_dim: int = 256):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(
                nn.ModuleList(
                    [PreNorm(dim, SelfAttention(dim, heads, dim_head)), PreNorm(dim, TokenFeedForward(dim, mlp_dim))]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


# ---------------------------------------------------------------------------------------------------------------------
# SpiralNet++ decoder
# ---------------------------------------------------------------------------------------------------------------------
class SpiralConv(nn.Module):
    """Gather each vertex's spiral (seq_length neighbours, itself first), flatten, one Linear."""

    def __init__(self, in_channels: int, out_channels: int, seq_length: int = 9, indices=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.seq_length = seq_length
        self.layer = nn.Linear(in_channels * seq_length, out_channels)
        self.register_buffer("indices", torch.zeros(0, seq_length, dtype=torch.long), persistent=False)
        if indices is not None:
            self.set_indices(indices)

    def set_indices(self, indices) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.ndim != 2 or idx.shape[1] != self.seq_length:
            raise ValueError(f"spiral indices must be (V, {self.seq_length}), got shape {tuple(idx.shape)}.")
        self.indices = idx.to(self.layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.indices.shape[0]
        if n == 0:
            raise RuntimeError(
                "SpiralConv has no spiral indices: build the vertex network with FantasyID's transform.pkl "
                "(VertexSpiralNet.set_mesh) before running it."
            )
        if x.shape[1] != n:
            raise ValueError(f"SpiralConv expects {n} vertices, got {x.shape[1]}.")
        g = x.index_select(1, self.indices.reshape(-1)).reshape(x.shape[0], n, -1)
        return self.layer(g)


class SpiralDeblock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, seq_length: int = 9):
        super().__init__()
        self.conv = SpiralConv(in_channels, out_channels, seq_length)

    def forward(self, x: torch.Tensor, up: nn.Module) -> torch.Tensor:
        return F.elu(self.conv(up(x)))


class SpiralDecoder(nn.Module):
    """de_layers.k (k < L): up-sample by level L-1-k then ELU(SpiralConv on that level); de_layers.L: SpiralConv level 0."""

    def __init__(self, emb_dim: int = 128, num_levels: int = 2, seq_length: int = 9):
        super().__init__()
        self.num_levels = num_levels
        self.de_layers = nn.ModuleList([SpiralDeblock(emb_dim, emb_dim, seq_length) for _ in range(num_levels)])
        self.de_layers.append(SpiralConv(emb_dim, emb_dim, seq_length))
        self.up = nn.ModuleList()  # no parameters, non-persistent buffers only

    def set_mesh(self, spirals: Sequence, up: Sequence[Tuple]) -> None:
        """spirals[l]: (V_l, seq) for level l; up[l]: (row, col, value, shape) mapping level l+1 -> level l."""
        if len(spirals) < self.num_levels or len(up) < self.num_levels:
            raise ValueError(f"the decoder needs {self.num_levels} mesh levels of spirals and up-sampling matrices.")
        for k in range(self.num_levels):
            self.de_layers[k].conv.set_indices(spirals[self.num_levels - 1 - k])
        self.de_layers[self.num_levels].set_indices(spirals[0])
        self.up = nn.ModuleList([_SparseMatrix(*u) for u in up[: self.num_levels]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.num_levels):
            x = self.de_layers[k](x, self.up[self.num_levels - 1 - k])
        return self.de_layers[self.num_levels](x)


# ---------------------------------------------------------------------------------------------------------------------
# vertex network
# ---------------------------------------------------------------------------------------------------------------------
class VertexSpiralNet(nn.Module):
    """FLAME vertices (B, V, 3) + face tokens (B, Nf, hw_dims[0]) -> per-vertex descriptors (B, V, emb_dim)."""

    def __init__(
        self,
        emb_dim: int = 128,
        num_v_coarse: int = 314,
        hw_dims: Sequence[int] = (2048, 1024, 512, 256, 128),
        depth: int = 6,
        heads: int = 4,
        mlp_mult: int = 2,
        seq_length: int = 9,
        num_levels: int = 2,
    ):
        super().__init__()
        if hw_dims[-1] != emb_dim:
            raise ValueError("hw_dims must end at emb_dim (the face tokens are reduced to the vertex token width).")
        self.emb_dim = emb_dim
        self.num_v_coarse = num_v_coarse
        self.num_levels = num_levels
        self.vtx_query = nn.Parameter(torch.zeros(1, num_v_coarse, emb_dim))
        self.vtx_upsampler = SpiralDecoder(emb_dim, num_levels, seq_length)
        self.transformer = FusionTransformer(emb_dim, depth, heads, emb_dim // heads, emb_dim * mlp_mult)
        self.vtx_descriptor_head = nn.Sequential(nn.Linear(emb_dim, emb_dim))
        self.hw_down = nn.ModuleList(MlpBlock(a, b) for a, b in zip(hw_dims[:-1], hw_dims[1:]))
        self.down = nn.ModuleList()

    # mesh data -------------------------------------------------------------------------------------------------------
    def set_mesh(self, spirals: Sequence, down: Sequence[Tuple], up: Sequence[Tuple]) -> None:
        """Attach mesh data: spirals per level, and (row, col, value, shape) down/up sampling matrices per level."""
        if len(down) < self.num_levels:
            raise ValueError(f"need {self.num_levels} down-sampling matrices, got {len(down)}.")
        self.down = nn.ModuleList([_SparseMatrix(*d) for d in down[: self.num_levels]])
        if self.down[-1].shape[0] != self.num_v_coarse:
            raise ValueError(
                f"the mesh's coarse level has {self.down[-1].shape[0]} vertices but the network expects "
                f"{self.num_v_coarse}; transform.pkl does not match this checkpoint."
            )
        self.vtx_upsampler.set_mesh(spirals, up)
        self.to(self.vtx_query.device)

    @property
    def has_mesh(self) -> bool:
        return len(self.down) == self.num_levels

    # steps -----------------------------------------------------------------------------------------------------------
    def coarse_vertices(self, vertices: torch.Tensor) -> torch.Tensor:
        if not self.has_mesh:
            raise RuntimeError("VertexSpiralNet has no mesh data: call set_mesh with FantasyID's transform.pkl first.")
        if vertices.ndim != 3 or vertices.shape[-1] != 3:
            raise ValueError(f"vertices must be (B, V, 3), got shape {tuple(vertices.shape)}.")
        x = vertices
        for d in self.down:
            x = d(x)
        return x

    def vertex_tokens(self, vertices: torch.Tensor) -> torch.Tensor:
        """3D tokens: learnable query + depth encoding of 0.5*z + 0.5 of the coarse vertices -> (B, Vc, emb)."""
        coarse = self.coarse_vertices(vertices.float())
        enc = depth_sin_encoding(0.5 * coarse[:, :, 2:] + 0.5, self.emb_dim)
        return self.vtx_query.float() + enc

    def reduce_face_tokens(self, face_tokens: torch.Tensor) -> torch.Tensor:
        x = face_tokens
        for block in self.hw_down:
            x = block(x)
        return x

    def fuse(self, vertex_tokens: torch.Tensor, face_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        """Fusion transformer over [vertex tokens, reduced face tokens]; returns the vertex part (B, Vc, emb)."""
        tokens = vertex_tokens
        if face_tokens is not None:
            hw = self.reduce_face_tokens(face_tokens.to(vertex_tokens.dtype))
            if hw.shape[0] != tokens.shape[0]:
                if hw.shape[0] == 1:
                    hw = hw.expand(tokens.shape[0], -1, -1)
                elif tokens.shape[0] == 1:
                    tokens = tokens.expand(hw.shape[0], -1, -1)
                else:
                    raise ValueError(
                        f"batch sizes of vertex tokens ({tokens.shape[0]}) and face tokens ({hw.shape[0]}) differ."
                    )
            tokens = torch.cat([tokens, hw], dim=1)
        tokens = self.transformer(tokens)
        return tokens[:, : self.num_v_coarse]

    def decode(self, fused: torch.Tensor) -> torch.Tensor:
        return self.vtx_descriptor_head(self.vtx_upsampler(fused))

    def forward(self, vertices: torch.Tensor, face_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.decode(self.fuse(self.vertex_tokens(vertices), face_tokens))


# ---------------------------------------------------------------------------------------------------------------------
# ResConv1D reducer
# ---------------------------------------------------------------------------------------------------------------------
class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm(8) -> Mish."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, groups: int = 8):
        super().__init__()
        self.conv1d = nn.Conv1d(cin, cout, kernel_size, stride=stride, padding=padding)
        self.group_norm = nn.GroupNorm(groups, cout)
        self.mish = nn.Mish()

    def forward(self, x):
        return self.mish(self.group_norm(self.conv1d(x)))


class ResidualBlock1D(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv_in = Conv1dBlock(cin, cout, kernel_size, stride, padding)
        self.conv_out = Conv1dBlock(cout, cout, 3, 1, 1)
        self.residual_conv = nn.Conv1d(cin, cout, kernel_size, stride=stride, padding=padding)

    def forward(self, x):
        return self.conv_out(self.conv_in(x)) + self.residual_conv(x)


class VertexReducer(nn.Module):
    """(B, V, C0) per-vertex descriptors -> (B, L, C4) tokens; 5023 x 128 -> 79 x 2048 at the released size."""

    SPECS = ((5, 4, 2), (5, 4, 2), (3, 2, 1), (3, 2, 1))  # kernel, stride, padding per block

    def __init__(self, channels: Sequence[int] = (128, 256, 512, 1024, 2048)):
        super().__init__()
        if len(channels) != 5:
            raise ValueError("VertexReducer needs 5 channel widths (input + 4 blocks).")
        for i, (k, s, p) in enumerate(self.SPECS):
            setattr(self, f"conv_block{i + 1}", ResidualBlock1D(channels[i], channels[i + 1], k, s, p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        for i in range(4):
            x = getattr(self, f"conv_block{i + 1}")(x)
        return x.transpose(1, 2)


def fuse_id_tokens(face_tokens: torch.Tensor, vertex_tokens: torch.Tensor) -> torch.Tensor:
    """ID tokens = concat([face tokens (B, 36, C), vertex tokens (B, 79, C)]) along tokens -> (B, 115, C)."""
    if face_tokens.shape[-1] != vertex_tokens.shape[-1]:
        raise ValueError(
            f"face tokens ({face_tokens.shape[-1]}) and vertex tokens ({vertex_tokens.shape[-1]}) differ in width."
        )
    if face_tokens.shape[0] != vertex_tokens.shape[0]:
        b = max(face_tokens.shape[0], vertex_tokens.shape[0])
        if min(face_tokens.shape[0], vertex_tokens.shape[0]) != 1:
            raise ValueError("face tokens and vertex tokens have different batch sizes.")
        face_tokens = face_tokens.expand(b, -1, -1)
        vertex_tokens = vertex_tokens.expand(b, -1, -1)
    return torch.cat([face_tokens, vertex_tokens.to(face_tokens.dtype)], dim=1)
