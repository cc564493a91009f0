"""Tiny FantasyID files for tests (random weights in the released layouts; no FantasyID / FLAME data):

- `face_module_state_dict`: face_abstractor.* / vertex_spiral_net.* / vertex_reducer.* / layer_attention.N.* keys at
  tiny widths (real module names), to be stored inside a CogVideoX transformer checkpoint as FantasyID does.
- `transform_dict`: a transform.pkl-shaped dict (vertices / face / adj / down_transform / up_transform, scipy sparse)
  whose level 0 is a given mesh (e.g. the synthetic FLAME's 5023 vertices).
- `eva_clip_state_dict`: a tiny EVA02-CLIP state dict in the original EVA-CLIP naming (visual.* with q_bias/v_bias,
  inner_attn_ln, w1/w2/w3, ffn_ln, rope buffers, plus text-tower keys), built from timm's EVA02 with a renaming
  written here (the inverse of what the loader maps).
"""

import numpy as np
import torch
import torch.nn as nn

EVA_TINY = dict(img_size=56, patch_size=14, embed_dim=64, depth=21, num_heads=1, mlp_ratio=4 * 2 / 3,
                qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
                ref_feat_shape=(16, 16), global_pool="token", num_classes=32)


def _randomize(module, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


def face_module_state_dict(inner_dim, n_layers, seed=0, num_v_coarse=16, vision_dim=64, kv_dim=64):
    from likeness_blocks.fantasyid import FaceAbstractor, LayerAttention, VertexReducer, VertexSpiralNet

    torch.manual_seed(seed)
    c = nn.Module()
    c.face_abstractor = FaceAbstractor(dim=32, vision_dim=vision_dim, depth=10, num_scales=5, num_queries=4,
                                       num_id_token=5, id_dim=40, output_dim=kv_dim, ff_mult=4, num_input_tokens=16,
                                       cabs_hidden=16)
    c.vertex_spiral_net = VertexSpiralNet(emb_dim=16, num_v_coarse=num_v_coarse, hw_dims=(kv_dim, 32, 16), depth=6,
                                          heads=4, mlp_mult=2)
    c.vertex_reducer = VertexReducer((16, 16, 24, 32, kv_dim))
    c.layer_attention = nn.ModuleList(LayerAttention(dim=inner_dim, dim_head=4, heads=16, kv_dim=kv_dim)
                                      for _ in range(n_layers))
    _randomize(c, seed + 1)
    return {k: v.detach().contiguous() for k, v in c.state_dict().items()}


def _grid(n, seed):
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float), indexing="xy")
    verts = np.stack([xs.ravel(), ys.ravel(), rng.uniform(-0.2, 0.2, n * n)], axis=1)
    faces = []
    for r in range(n - 1):
        for col in range(n - 1):
            a, b, d, e = r * n + col, r * n + col + 1, (r + 1) * n + col, (r + 1) * n + col + 1
            faces += [(a, b, e), (a, e, d)]
    return verts, np.array(faces, dtype=np.int64)


def transform_dict(v0, f0, seed=0, sides=(7, 4, 2)):
    """Levels: the given mesh, then n x n grids (49 -> 16 -> 4 vertices by default)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    levels = [(np.asarray(v0, np.float64), np.asarray(f0, np.int64))] + [_grid(n, seed + i) for i, n in enumerate(sides)]
    down, up = [], []
    for (va, _), (vb, _) in zip(levels[:-1], levels[1:]):
        a, b = len(va), len(vb)
        sel = rng.choice(a, size=b, replace=False)
        down.append(sp.csc_matrix((np.ones(b, np.float32), (np.arange(b), sel)), shape=(b, a)))
        rows = np.repeat(np.arange(a), 3)
        cols = np.concatenate([rng.choice(b, 3, replace=False) for _ in range(a)])
        w = rng.uniform(0.1, 1, (a, 3))
        up.append(sp.csc_matrix(((w / w.sum(1, keepdims=True)).ravel().astype(np.float32), (rows, cols)), shape=(a, b)))
    return {
        "vertices": [v for v, _ in levels],
        "face": [f for _, f in levels],
        "adj": [sp.coo_matrix((len(v), len(v))) for v, _ in levels],
        "down_transform": down,
        "up_transform": up,
    }


# timm name -> EVA-CLIP name (written from the EVA-CLIP module names)
_TO_EVA_CLIP = (
    (".attn.q_proj.bias", ".attn.q_bias"),
    (".attn.v_proj.bias", ".attn.v_bias"),
    (".attn.norm.", ".attn.inner_attn_ln."),
    (".mlp.norm.", ".mlp.ffn_ln."),
    (".mlp.fc1_g.", ".mlp.w1."),
    (".mlp.fc1_x.", ".mlp.w2."),
    (".mlp.fc2.", ".mlp.w3."),
)


def tiny_eva(seed=0):
    from timm.models.eva import Eva

    torch.manual_seed(seed)
    return _randomize(Eva(**EVA_TINY), seed, scale=0.05).eval()


def eva_clip_state_dict(model):
    out = {}
    for k, v in model.state_dict().items():
        for a, b in _TO_EVA_CLIP:
            k = k.replace(a, b)
        out["visual." + k] = v.detach().clone()
    head_dim = EVA_TINY["embed_dim"] // EVA_TINY["num_heads"]
    out["visual.rope.freqs_cos"] = torch.randn(16, head_dim)  # fixed tables in the original file; recomputed
    out["visual.rope.freqs_sin"] = torch.randn(16, head_dim)
    out["text.token_embedding.weight"] = torch.randn(10, 8)
    out["logit_scale"] = torch.tensor(4.6)
    return out
