"""StableAnimator building blocks in plain torch (no ComfyUI imports).

- ``FaceEncoder``: the content-aware face encoder (released as ``face_encoder.pth``). ArcFace identity
  embedding (B, 512) + CLIP image embedding (B, 1, 1024) -> 4 face tokens (B, 4, 1024). Module names follow
  the released state dict: ``proj.{0,2}``, ``norm``, ``fusion_model.{proj_in,proj_out,norm_out}``,
  ``fusion_model.layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}``, ``fusion_model.layers.{i}.1.{0,1,3}``.
- ``PoseNet``: pose frames in [-1, 1] (N, 3, H, W) -> (N, 320, H/8, W/8), multiplied by the learned ``scale``.
- ``normalized_id_attention``: the distribution-aware ID attention math (face attention re-normalised to the
  statistics of the image cross-attention output, per sample over tokens and channels).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_FACE_TOKENS = 4
ID_EMBED_DIM = 512
CLIP_EMBED_DIM = 1024
POSE_LATENT_CHANNELS = 320
ID_NORM_EPS = 1e-5


# --------------------------------------------------------------------------------------------- face encoder


class PerceiverAttention(nn.Module):
    """Latents attend to [context, latents]; q and k are each scaled by dim_head ** -0.25."""

    def __init__(self, dim=1024, dim_head=64, heads=16):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = nn.LayerNorm(dim)  # context
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, context, latents):
        context = self.norm1(context)
        latents = self.norm2(latents)
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([context, latents], dim=1)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        s = self.dim_head ** -0.25
        w = torch.matmul(q * s, (k * s).transpose(-1, -2))
        w = torch.softmax(w.float(), dim=-1).to(w.dtype)
        out = torch.matmul(w, v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


def _feed_forward(dim, mult):
    inner = int(dim * mult)
    # indices 0 (LayerNorm), 1 (Linear), 2 (GELU, exact), 3 (Linear) match the released keys .1.{0,1,3}
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class FacePerceiver(nn.Module):
    def __init__(self, dim=1024, depth=4, dim_head=64, heads=16, embedding_dim=1024, output_dim=1024, ff_mult=4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    def forward(self, latents, context):
        context = self.proj_in(context)
        for attn, ff in self.layers:
            latents = latents + attn(context, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class FaceEncoder(nn.Module):
    """Content-aware face encoder: identity tokens from ArcFace, refined by the CLIP image embedding."""

    def __init__(self, cross_attention_dim=1024, id_embeddings_dim=512, clip_embeddings_dim=1024, num_tokens=4,
                 depth=4, dim_head=64, heads=16, ff_mult=4):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(
            nn.Linear(id_embeddings_dim, id_embeddings_dim * 2),
            nn.GELU(),
            nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.fusion_model = FacePerceiver(dim=cross_attention_dim, depth=depth, dim_head=dim_head, heads=heads,
                                          embedding_dim=clip_embeddings_dim, output_dim=cross_attention_dim,
                                          ff_mult=ff_mult)

    def forward(self, id_embeds, clip_embeds, shortcut=False, scale=1.0):
        if id_embeds.ndim != 2 or id_embeds.shape[-1] != self.proj[0].in_features:
            raise ValueError(f"The face encoder needs ArcFace embeddings of shape (B, {self.proj[0].in_features}), "
                             f"got {tuple(id_embeds.shape)}.")
        if clip_embeds.ndim == 2:
            clip_embeds = clip_embeds[:, None]
        if clip_embeds.shape[-1] != self.fusion_model.proj_in.in_features:
            raise ValueError(f"The face encoder needs a CLIP image embedding {self.fusion_model.proj_in.in_features} "
                             f"wide (ViT-H image_embeds), got {tuple(clip_embeds.shape)}.")
        x = self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        x = self.norm(x)
        out = self.fusion_model(x, clip_embeds)
        if shortcut:
            out = x + scale * out
        return out


# --------------------------------------------------------------------------------------------- PoseNet


class PoseNet(nn.Module):
    """8 convs (3->3->16->16->32->32->64->64->128, stride 2 on the 2nd, 4th and 6th, each followed by SiLU),
    a 1x1 projection to the UNet's first feature width and a learned scalar ``scale``."""

    def __init__(self, noise_latent_channels=POSE_LATENT_CHANNELS):
        super().__init__()
        layers = []
        # (in, out, kernel, stride)
        spec = [(3, 3, 3, 1), (3, 16, 4, 2), (16, 16, 3, 1), (16, 32, 4, 2),
                (32, 32, 3, 1), (32, 64, 4, 2), (64, 64, 3, 1), (64, 128, 3, 1)]
        for cin, cout, k, s in spec:
            layers.append(nn.Conv2d(cin, cout, kernel_size=k, stride=s, padding=1))
            layers.append(nn.SiLU())
        self.conv_layers = nn.Sequential(*layers)
        self.final_proj = nn.Conv2d(128, noise_latent_channels, kernel_size=1)
        self.scale = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, pose):
        if pose.ndim == 5:
            pose = pose.flatten(0, 1)
        if pose.ndim != 4 or pose.shape[1] != 3:
            raise ValueError(f"PoseNet needs pose frames (N, 3, H, W) in [-1, 1], got {tuple(pose.shape)}.")
        return self.final_proj(self.conv_layers(pose)) * self.scale


# --------------------------------------------------------------------------------------------- ID attention


def _sdpa_heads(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c)


def renormalize_to(h_id, h_ref, eps=ID_NORM_EPS):
    """Re-normalise ``h_id`` to the mean and (unbiased) std of ``h_ref``, per sample over tokens and channels.
    eps is added to std(h_id) outside the square root; none on std(h_ref)."""
    dims = tuple(range(1, h_id.ndim))
    mu_id = h_id.mean(dim=dims, keepdim=True)
    sd_id = h_id.std(dim=dims, keepdim=True)
    mu_ref = h_ref.mean(dim=dims, keepdim=True)
    sd_ref = h_ref.std(dim=dims, keepdim=True)
    return (h_id - mu_id) * sd_ref / (sd_id + eps) + mu_ref


def normalized_id_attention(q, k, v, id_k, id_v, heads, scale=1.0, attention=None):
    """Distribution-aware ID attention before the output projection.

    q: (B, N, C) from to_q; k, v: (B, L, C) from to_k/to_v of the image (CLIP) token(s);
    id_k, id_v: (B, 4, C) from id_to_k/id_to_v of the face tokens. Returns (B, N, C):
    ``h_txt + scale * renormalize_to(h_id, h_txt)``. ``attention(q, k, v, heads)`` defaults to SDPA."""
    attention = attention or _sdpa_heads
    h_txt = attention(q, k, v, heads)
    if scale == 0:
        return h_txt
    h_id = attention(q, id_k, id_v, heads)
    return h_txt + scale * renormalize_to(h_id.float(), h_txt.float()).to(h_txt.dtype)


# --------------------------------------------------------------------------------------------- long video


def tile_indices(num_frames, tile_size=16, overlap=4):
    """StableAnimator's long-video tiles (frame index lists). Tile starts step by ``tile_size - overlap``; each tile
    is frame 0 followed by the ``tile_size - 1`` frames after its start; when the last tile stops short of the end,
    one more tile (frame 0 + the last ``tile_size - 1`` frames) is added. Videos no longer than a tile: one tile."""
    if tile_size < 3:
        raise ValueError(f"Tile size must be at least 3 frames, got {tile_size}.")
    if not 1 <= overlap < tile_size - 1:
        # with overlap 0 the frame at each later tile's start would be in no tile
        raise ValueError(f"Tile overlap must be at least 1 and below tile size - 1; got {overlap} for tile size "
                         f"{tile_size}.")
    if num_frames <= tile_size:
        return [list(range(num_frames))]
    tiles = []
    for start in range(0, num_frames - tile_size + 1, tile_size - overlap):
        tiles.append([0] + list(range(start + 1, min(start + tile_size, num_frames))))
    if tiles[-1][-1] < num_frames - 1:
        tiles.append([0] + list(range(num_frames - tile_size + 1, num_frames)))
    return tiles


def tile_weights(tile_size, device=None, dtype=torch.float32):
    """Triangular blending weights over a tile's positions: min(w, 2 - w) with w = (j + 0.5) * 2 / tile_size."""
    w = (torch.arange(tile_size, device=device, dtype=dtype) + 0.5) * 2.0 / tile_size
    return torch.minimum(w, 2.0 - w)
