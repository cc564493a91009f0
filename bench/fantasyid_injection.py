"""FantasyID costs: (1) per-block overhead of the layer-aware injection at CogVideoX-5B block shapes, as the wall-time
ratio (block + LayerAttention) / block; (2) ID-token encoding time (face abstractor + vertex network + reducer).

The block here is a plain-torch stand-in with CogVideoX-5B's shapes (3072 wide, 48 heads x 64, FF 4x, 226 text +
13x30x45 = 17550 video tokens, SDPA attention); swap in the native CogVideoX block once it exists. LayerAttention is
about 11 % of a block's FLOPs; the goal is <= 13 % wall.

    .venv/bin/python bench/fantasyid_injection.py              # GPU if available, bf16
    .venv/bin/python bench/fantasyid_injection.py --tiny       # CPU smoke run at tiny shapes
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from likeness_blocks.fantasyid import (  # noqa: E402
    FaceAbstractor, LayerAttention, VertexReducer, VertexSpiralNet, encode_id_tokens, extract_spirals,
)


class StandInBlock(nn.Module):
    def __init__(self, dim, heads, temb=512):
        super().__init__()
        self.heads = heads
        self.mod1, self.mod2 = nn.Linear(temb, 6 * dim), nn.Linear(temb, 6 * dim)
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qn, self.kn = nn.LayerNorm(dim // heads), nn.LayerNorm(dim // heads)
        self.out = nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, h, emb):
        s1, b1, g1, *_ = self.mod1(F.silu(emb)).unsqueeze(1).chunk(6, dim=-1)
        s2, b2, g2, *_ = self.mod2(F.silu(emb)).unsqueeze(1).chunk(6, dim=-1)
        x = self.n1(h) * (1 + s1) + b1
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(self.qn(q), self.kn(k), v).transpose(1, 2).reshape(b, n, d)
        h = h + g1 * self.out(a)
        x = self.n2(h) * (1 + s2) + b2
        return h + g2 * self.ff2(F.gelu(self.ff1(x), approximate="tanh"))


def timed(fn, device, repeats):
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def grid(n):
    xs, ys = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float))
    v = np.stack([xs.ravel(), ys.ravel(), np.zeros(n * n)], 1)
    f = [(r * n + c, r * n + c + 1, (r + 1) * n + c + 1) for r in range(n - 1) for c in range(n - 1)]
    f += [(r * n + c, (r + 1) * n + c + 1, (r + 1) * n + c) for r in range(n - 1) for c in range(n - 1)]
    return v, np.array(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        dim, heads, n_text, n_video, n_id, la_heads, la_dh, kv = 192, 3, 16, 600, 115, 4, 32, 128
    else:
        dim, heads, n_text, n_video, n_id, la_heads, la_dh, kv = 3072, 48, 226, 13 * 30 * 45, 115, 16, 128, 2048
    torch.manual_seed(0)
    block = StandInBlock(dim, heads).to(device, dtype).eval()
    la = LayerAttention(dim=dim, dim_head=la_dh, heads=la_heads, kv_dim=kv).to(device, dtype).eval()
    h = torch.randn(2, n_text + n_video, dim, device=device, dtype=dtype)  # CFG batch
    emb = torch.randn(2, 512, device=device, dtype=dtype)
    ids = torch.randn(1, n_id, kv, device=device, dtype=dtype)

    def plain():
        return block(h, emb)

    def injected():
        out = block(h, emb)
        return torch.cat([out[:, :n_text], out[:, n_text:] + la(ids, out[:, n_text:])], dim=1)

    with torch.no_grad():
        t0 = timed(plain, device, args.repeats)
        t1 = timed(injected, device, args.repeats)
    print(f"device {device}, dtype {dtype}, tokens {n_text}+{n_video}, width {dim}")
    print(f"block {t0 * 1e3:.2f} ms, block + LayerAttention {t1 * 1e3:.2f} ms, overhead {100 * (t1 / t0 - 1):.1f} % "
          "(goal <= 13 %)")

    # ID-token encoding
    if args.tiny:
        face = FaceAbstractor(dim=32, vision_dim=32, id_dim=40, output_dim=kv, cabs_hidden=16)
        hw, emb_dim, red = (kv, 64, 32), 32, (32, 32, 64, 96, kv)
    else:
        face = FaceAbstractor()
        hw, emb_dim, red = (2048, 1024, 512, 256, 128), 128, (128, 256, 512, 1024, 2048)
    face.drop_unused()
    v0, f0 = grid(71)  # ~FLAME-sized stand-in mesh (5041 vertices)
    v1, f1 = grid(35)
    rng = np.random.default_rng(0)
    sizes = [len(v0), len(v1), 314]
    down = [(np.arange(b), rng.choice(a, b, replace=False), np.ones(b, np.float32), (b, a))
            for a, b in zip(sizes[:-1], sizes[1:])]
    up = [(np.repeat(np.arange(a), 3), rng.integers(0, b, 3 * a), np.full(3 * a, 1 / 3, np.float32), (a, b))
          for a, b in zip(sizes[:-1], sizes[1:])]
    t = time.perf_counter()
    spirals = [extract_spirals(f0, vertices=v0), extract_spirals(f1, vertices=v1)]
    t_sp = time.perf_counter() - t
    net = VertexSpiralNet(emb_dim=emb_dim, num_v_coarse=314, hw_dims=hw)
    net.set_mesh(spirals, down, up)
    face, net = face.to(device, dtype).eval(), net.to(device).eval()
    reducer = VertexReducer(red).to(device, dtype).eval()
    clip = [torch.randn(1, 577, face.mapping_4[0].in_features, device=device, dtype=dtype)] * 5
    verts = torch.randn(1, len(v0), 3, device=device) * 0.1
    with torch.no_grad():
        t_id = timed(lambda: encode_id_tokens(face, net, reducer, clip, verts), device, max(1, args.repeats // 2))
        shape = tuple(encode_id_tokens(face, net, reducer, clip, verts).shape)
    print(f"spirals for {len(v0)} + {len(v1)} vertices (once, at load): {t_sp:.2f} s")
    print(f"ID tokens {shape}: {t_id * 1e3:.1f} ms per encoding (once per generation)")


if __name__ == "__main__":
    main()
