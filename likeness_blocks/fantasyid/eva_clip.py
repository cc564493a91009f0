"""EVA02-CLIP-L-14-336 visual tower for FantasyID's face tokens, on timm's EVA02 architecture.

FantasyID feeds the aligned face crop (÷255, bicubic resize to the model's input size, OpenAI CLIP mean/std) through
the EVA02-CLIP visual tower and keeps the **inputs of blocks 4, 8, 12, 16, 20** (each (B, 577, 1024), CLS first).

Weights: the original EVA-CLIP file (`EVA02_CLIP_L_336_psz14_s6B.pt`, a full CLIP state dict whose visual tower is
under `visual.`) or a visual-only state dict in either EVA-CLIP or timm naming. EVA-CLIP names are mapped to timm's:
  attn.q_bias / attn.v_bias -> attn.q_proj.bias / attn.v_proj.bias, attn.inner_attn_ln -> attn.norm,
  mlp.w1 / w2 / w3 -> mlp.fc1_g (gate) / fc1_x / fc2, mlp.ffn_ln -> mlp.norm; rotary buffers are recomputed.
The architecture (sizes) is read from the tensor shapes; the head count assumes head width 64 (EVA02-L: 16 x 64).
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FANTASYID_BLOCK_INPUTS = (4, 8, 12, 16, 20)

_RENAMES = (
    (".attn.q_bias", ".attn.q_proj.bias"),
    (".attn.v_bias", ".attn.v_proj.bias"),
    (".attn.inner_attn_ln.", ".attn.norm."),
    (".mlp.ffn_ln.", ".mlp.norm."),
    (".mlp.w1.", ".mlp.fc1_g."),
    (".mlp.w2.", ".mlp.fc1_x."),
    (".mlp.w3.", ".mlp.fc2."),
)


def visual_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """EVA-CLIP (full CLIP or visual-only) or timm state dict -> timm Eva keys of the visual tower."""
    for wrap in ("state_dict", "module", "model"):
        if isinstance(sd.get(wrap), dict):
            sd = sd[wrap]
    if "visual.pos_embed" in sd:
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    elif "visual.trunk.pos_embed" in sd:
        sd = {k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")}
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError(
            "this file is not an EVA02-CLIP visual tower (no pos_embed / patch_embed.proj.weight); use FantasyID's "
            "face_encoder/EVA02_CLIP_L_336_psz14_s6B.pt."
        )
    out = {}
    for k, v in sd.items():
        if "rope" in k:  # fixed rotary tables: recomputed by timm
            continue
        for a, b in _RENAMES:
            if a in k:
                k = k.replace(a, b)
        out[k] = v
    return out


def infer_eva_config(sd: Dict[str, torch.Tensor]) -> dict:
    w = sd["patch_embed.proj.weight"]
    dim, _, patch, _ = w.shape
    n_tokens = sd["pos_embed"].shape[1] - 1
    grid = int(round(n_tokens ** 0.5))
    if grid * grid != n_tokens:
        raise ValueError(f"EVA02 pos_embed has {n_tokens} patch tokens, not a square grid.")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hidden = sd["blocks.0.mlp.fc1_g.weight"].shape[0]
    cfg = dict(
        img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=max(1, dim // 64),
        mlp_ratio=hidden / dim, qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
        use_rot_pos_emb=True, ref_feat_shape=(16, 16), global_pool="token",
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
    )
    return cfg


def build_eva(cfg: dict):
    from timm.models.eva import Eva

    return Eva(**cfg)


def load_eva_visual(sd: Dict[str, torch.Tensor], dtype=torch.float32):
    """(timm Eva in eval mode, its config) from an EVA-CLIP / timm state dict; strict key check."""
    vsd = visual_state_dict(sd)
    cfg = infer_eva_config(vsd)
    model = build_eva(cfg)
    missing, unexpected = model.load_state_dict(vsd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"EVA02-CLIP weights do not match timm's EVA02 layout: missing {missing[:6]}, unexpected {unexpected[:6]}. "
            "Use the EVA02-CLIP-L-14-336 visual tower file."
        )
    return model.to(dtype).eval(), cfg


def preprocess_face(images: torch.Tensor, size: int) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, 3) in 0..1 -> (B, 3, size, size) normalised with OpenAI CLIP mean/std (bicubic)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"face image must be an IMAGE batch (B, H, W, 3), got shape {tuple(images.shape)}.")
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def block_inputs(model, pixels: torch.Tensor, indices: Sequence[int] = FANTASYID_BLOCK_INPUTS) -> torch.Tensor:
    """Inputs of the given blocks (= outputs after that many blocks), stacked: (len(indices), B, 1 + N, C)."""
    depth = len(model.blocks)
    if max(indices) >= depth:
        raise ValueError(f"EVA02 model has {depth} blocks; FantasyID reads the inputs of blocks {list(indices)}.")
    x = model.patch_embed(pixels)
    x, rope = model._pos_embed(x)
    x = model.norm_pre(x)
    want = set(indices)
    out = {}
    for i, blk in enumerate(model.blocks[: max(indices)]):
        if i in want:
            out[i] = x
        x = blk(x, rope=rope)
    out[max(indices)] = x
    return torch.stack([out[i] for i in indices])
