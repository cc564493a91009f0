"""FantasyID's ID-token encoding time, once per generation, at the released sizes with random weights: EVA02-CLIP-L-336
(timm's EVA02, the inputs of blocks 4..20) -> face abstractor (C-Abstractor) -> vertex network (SpiralNet++ over a
FLAME-sized stand-in mesh, fusion transformer) -> reducer -> 115 x 2048 ID tokens. The per-step cost of the injection
itself is bench/fantasyid_cogvideox_step.py.

    .venv/bin/python bench/fantasyid_id_tokens.py              # GPU if available, bf16
    .venv/bin/python bench/fantasyid_id_tokens.py --tiny       # CPU smoke run at tiny shapes
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
    FaceAbstractor, VertexReducer, VertexSpiralNet, encode_id_tokens, extract_spirals,
)
from likeness_blocks.fantasyid.eva_clip import block_inputs, build_eva  # noqa: E402

EVA02_L_336 = dict(img_size=336, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=2730 / 1024,
                   qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
                   ref_feat_shape=(16, 16), global_pool="token", num_classes=768)


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


def measure(tiny=False, repeats=10, device=None):
    """Seconds of the EVA02 face tokens and of the whole ID-token encoding (each the mean of repeats // 2 runs after
    2 warm-up runs)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if tiny:
        kv = 128
        eva = build_eva(dict(EVA02_L_336, embed_dim=64, depth=21, num_heads=2))
        face = FaceAbstractor(dim=32, vision_dim=64, id_dim=40, output_dim=kv, cabs_hidden=16)
        hw, emb_dim, red = (kv, 64, 32), 32, (32, 32, 64, 96, kv)
    else:
        eva = build_eva(EVA02_L_336)
        face = FaceAbstractor()
        hw, emb_dim, red = (2048, 1024, 512, 256, 128), 128, (128, 256, 512, 1024, 2048)
    face.drop_unused()
    v0, f0 = grid(12 if tiny else 71)  # ~FLAME-sized stand-in mesh (5041 vertices)
    v1, f1 = grid(8 if tiny else 35)
    rng = np.random.default_rng(0)
    n_coarse = 20 if tiny else 314
    sizes = [len(v0), len(v1), n_coarse]
    down = [(np.arange(b), rng.choice(a, b, replace=False), np.ones(b, np.float32), (b, a))
            for a, b in zip(sizes[:-1], sizes[1:])]
    up = [(np.repeat(np.arange(a), 3), rng.integers(0, b, 3 * a), np.full(3 * a, 1 / 3, np.float32), (a, b))
          for a, b in zip(sizes[:-1], sizes[1:])]
    t = time.perf_counter()
    spirals = [extract_spirals(f0, vertices=v0), extract_spirals(f1, vertices=v1)]
    t_sp = time.perf_counter() - t
    net = VertexSpiralNet(emb_dim=emb_dim, num_v_coarse=n_coarse, hw_dims=hw)
    net.set_mesh(spirals, down, up)
    face, net = face.to(device, dtype).eval(), net.to(device).eval()
    reducer = VertexReducer(red).to(device, dtype).eval()
    eva = eva.to(device, dtype).eval()
    pixels = torch.randn(1, 3, eva.patch_embed.img_size[0], eva.patch_embed.img_size[1], device=device, dtype=dtype)
    verts = torch.randn(1, len(v0), 3, device=device) * 0.1

    def clip_tokens():
        return list(block_inputs(eva, pixels))

    def id_tokens():
        return encode_id_tokens(face, net, reducer, clip_tokens(), verts)

    reps = max(1, repeats // 2)
    with torch.no_grad():
        t_clip = timed(clip_tokens, device, reps)
        t_id = timed(id_tokens, device, reps)
        shape = tuple(id_tokens().shape)
    return {"device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(), "tiny": tiny,
            "vertices": [len(v0), len(v1)], "spirals_s": round(t_sp, 3), "eva_s": round(t_clip, 4),
            "id_tokens_s": round(t_id, 4), "id_tokens_shape": list(shape)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    r = measure(args.tiny, args.repeats)
    print(f"device {r['device']}, dtype {r['dtype']}, threads {r['threads']}")
    print(f"spirals for {r['vertices'][0]} + {r['vertices'][1]} vertices (once, at load): {r['spirals_s']:.2f} s")
    print(f"EVA02-CLIP face tokens: {r['eva_s'] * 1e3:.1f} ms")
    print(f"ID tokens {tuple(r['id_tokens_shape'])} from the face crop and the vertices: {r['id_tokens_s'] * 1e3:.1f} ms "
          "(once per generation)")


if __name__ == "__main__":
    main()
