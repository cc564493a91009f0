"""Concat-ID building blocks in plain torch (no ComfyUI imports).

Concat-ID (ML-GSAI/Concat-ID, Wan 2.1 T2V 1.3B version) appends the VAE latent of a prepared
reference face as one extra, clean latent frame after the video frames. Facts used here (see
shared/reference/upstream-methods.md §3):

* reference preparation: the face is aligned to 448 px with the 5 keypoints (ArcFace template scaled
  by 448/112), the background may be blanked, then the image is resized so that it fits the video
  size while keeping its aspect ratio (bicubic), padded with black (half before, half after, the odd
  pixel after) and centre cropped to the video size;
* RoPE of the reference tokens: temporal index T (right after the last of the T video latent frames),
  rows 0..h-1, columns w..2w-1 (placed to the right of the video frame);
* block forward: the reference tokens join self-attention, skip the text cross-attention and, in
  the AdaLN variant, are modulated by their own parameters (``modulation_ref``, ``t_mod_ref``);
  the released model feeds the reference tokens' FFN with the *self-attention* shift/scale of the
  reference modulation (and gates the FFN output with the FFN gate). That quirk is reproduced.

Several references (not trained upstream): each reference is its own latent frame and its own
RoPE slot; see :func:`concat_id_positions` for the two placements offered.
"""

import math

import torch
import torch.nn.functional as F

# ArcFace 112x112 five-point template (left eye, right eye, nose, left/right mouth corner), pixels.
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

CONCAT_ID_FACE_SIZE = 448

PLACEMENTS = ("next_frames", "side_by_side")


# --------------------------------------------------------------------------------------------
# Reference preparation
# --------------------------------------------------------------------------------------------

def arcface_template(size=CONCAT_ID_FACE_SIZE):
    """The ArcFace template for a square crop of ``size`` px (a multiple of 112: scaled, no shift)."""
    if size % 112 != 0:
        raise ValueError(f"Face crop size must be a multiple of 112 (got {size}); Concat-ID uses 448.")
    return torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64) * (size / 112.0)


def similarity_transform(src, dst):
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping the points
    ``src`` (N, 2) onto ``dst`` (N, 2), closed form after Umeyama (1991). Returns a (2, 3) float64
    matrix M with dst ~= M[:, :2] @ src + M[:, 2]."""
    src = torch.as_tensor(src, dtype=torch.float64)
    dst = torch.as_tensor(dst, dtype=torch.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"Keypoints must be two (N, 2) arrays of equal shape, got {tuple(src.shape)} and {tuple(dst.shape)}.")
    n = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / n
    u, sig, vh = torch.linalg.svd(cov)
    d = torch.ones(2, dtype=torch.float64)
    if torch.det(cov) < 0:
        d[1] = -1.0
    if float(sig.max()) < 1e-12:
        raise ValueError("Face keypoints are degenerate (all at one point); cannot align the face.")
    r = u @ torch.diag(d) @ vh
    var_s = (sc ** 2).sum() / n
    scale = (sig * d).sum() / var_s
    m = torch.zeros(2, 3, dtype=torch.float64)
    m[:, :2] = scale * r
    m[:, 2] = mu_d - scale * (r @ mu_s)
    return m


def warp_affine(image, m, out_h, out_w):
    """Bilinear warp of ``image`` (C, H, W) with the forward affine ``m`` (2, 3) (source pixel ->
    output pixel, pixel centres at integer coordinates); outside the source is 0 (black)."""
    c, h, w = image.shape
    m = torch.as_tensor(m, dtype=torch.float64)
    a = torch.cat([m, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)], 0)
    inv = torch.linalg.inv(a)[:2]
    ys, xs = torch.meshgrid(torch.arange(out_h, dtype=torch.float64), torch.arange(out_w, dtype=torch.float64), indexing="ij")
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    # align_corners=True: -1 and 1 are the centres of the first and last pixel
    gx = sx * 2.0 / max(w - 1, 1) - 1.0
    gy = sy * 2.0 / max(h - 1, 1) - 1.0
    grid = torch.stack([gx, gy], -1)[None].to(torch.float32)
    out = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].to(image.dtype)


def align_face(image, kps, size=CONCAT_ID_FACE_SIZE, mask=None):
    """Aligns one face. ``image`` (H, W, C) in 0..1, ``kps`` (5, 2) in image pixels (ArcFace order),
    optional ``mask`` (H, W) in the same pixels. Returns (aligned (size, size, C), aligned mask or None)."""
    kps = torch.as_tensor(kps, dtype=torch.float64)
    if kps.shape != (5, 2):
        raise ValueError(f"Face keypoints must have shape (5, 2), got {tuple(kps.shape)}.")
    m = similarity_transform(kps, arcface_template(size))
    out = warp_affine(image.movedim(-1, 0), m, size, size).movedim(0, -1)
    out_mask = None
    if mask is not None:
        out_mask = warp_affine(mask[None], m, size, size)[0]
    return out, out_mask


def resize_pad_crop(images, height, width):
    """Concat-ID's resize-pad-crop of (N, H, W, C) images (0..1) to (N, height, width, C):
    bicubic resize (antialiased) so that the image fits the target with its aspect ratio kept
    (height matched when h/w >= height/width, else width matched; the other side truncated to an
    integer), black padding split evenly (the extra pixel after), then a centre crop."""
    if images.ndim != 4:
        raise ValueError(f"Expected an IMAGE batch (N, H, W, C), got shape {tuple(images.shape)}.")
    n, h, w, c = images.shape
    x = images.movedim(-1, 1).float()
    if h / w >= height / width:
        nh, nw = height, int(w * height / h)
    else:
        nh, nw = int(h * width / w), width
    nh, nw = max(nh, 1), max(nw, 1)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    dh, dw = max(height - nh, 0), max(width - nw, 0)
    top, left = dh // 2, dw // 2
    x = F.pad(x, (left, dw - left, top, dh - top), mode="constant", value=0.0)
    hh, ww = x.shape[2], x.shape[3]
    t0, l0 = max(0, hh - height) // 2, max(0, ww - width) // 2
    x = x[:, :, t0:t0 + height, l0:l0 + width]
    return x.clamp(0.0, 1.0).movedim(1, -1).to(images.dtype)


# --------------------------------------------------------------------------------------------
# RoPE positions
# --------------------------------------------------------------------------------------------

def reference_slot(k, t, h, w, placement="next_frames"):
    """(t0, row0, col0) of reference ``k`` (0-based) after ``t`` video latent frames of h x w tokens.

    Reference 0 always gets Concat-ID's trained slot: t = T, rows 0..h-1, columns w..2w-1.
    Beyond it (not trained upstream):
      * ``next_frames``: reference k at t = T + k, same rows/columns as reference 0 (each identity
        one more step in time, like Concat-ID's two-identity CogVideoX model, which uses t = 13, 14);
      * ``side_by_side``: reference k at t = T, columns (k+1)w..(k+2)w-1 (identities next to each
        other to the right of the frame).
    """
    if placement == "next_frames":
        return t + k, 0, w
    if placement == "side_by_side":
        return t, 0, (k + 1) * w
    raise ValueError(f"Unknown reference placement {placement!r}; use one of {PLACEMENTS}.")


def concat_id_positions(t, h, w, n_refs=1, placement="next_frames"):
    """Integer RoPE positions (L, 3) = (frame, row, column) for t*h*w video tokens in (t, h, w)
    order followed by n_refs*h*w reference tokens (each reference in (h, w) order)."""
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    parts = [torch.stack([tt, hh, ww], -1).reshape(-1, 3)]
    rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for k in range(n_refs):
        t0, r0, c0 = reference_slot(k, t, h, w, placement)
        ref = torch.stack([torch.full_like(rr, t0), rr + r0, cc + c0], -1).reshape(-1, 3)
        parts.append(ref)
    return torch.cat(parts, 0)


# --------------------------------------------------------------------------------------------
# Block forward
# --------------------------------------------------------------------------------------------

def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def concat_id_block(x, n_ref, e, e_ref, self_attn, cross_attn, ffn, norm1, norm2, norm3):
    """One Wan block with Concat-ID's handling of the last ``n_ref`` tokens of ``x`` (B, L, C).

    ``e``: the video modulation, six tensors broadcastable to (B, 1, C): shift/scale/gate for
    self-attention, then shift/scale/gate for the FFN. ``e_ref``: the reference modulation
    (AdaLN variant) or None (first stage: reference tokens share ``e``).
    ``self_attn(h)`` runs the block's self-attention (with RoPE) over all tokens; ``cross_attn(h)``
    the text cross-attention; ``ffn``, ``norm1``/``norm2``/``norm3`` the block's layers.
    """
    lv = x.shape[1] - n_ref
    if n_ref <= 0:
        raise ValueError("concat_id_block needs at least one reference token.")
    if e_ref is None:
        y = self_attn(_modulate(norm1(x), e[0], e[1]))
        x = x + y * e[2]
        xv = x[:, :lv]
        xv = xv + cross_attn(norm3(xv))
        x = torch.cat([xv, x[:, lv:]], 1)
        y = ffn(_modulate(norm2(x), e[3], e[4]))
        return x + y * e[5]

    xv, xr = x[:, :lv], x[:, lv:]
    h = torch.cat([_modulate(norm1(xv), e[0], e[1]), _modulate(norm1(xr), e_ref[0], e_ref[1])], 1)
    y = self_attn(h)
    xv = xv + y[:, :lv] * e[2]
    xr = xr + y[:, lv:] * e_ref[2]
    xv = xv + cross_attn(norm3(xv))
    # released-model quirk: the reference tokens' FFN input uses the self-attention shift/scale
    h = torch.cat([_modulate(norm2(xv), e[3], e[4]), _modulate(norm2(xr), e_ref[0], e_ref[1])], 1)
    y = ffn(h)
    xv = xv + y[:, :lv] * e[5]
    xr = xr + y[:, lv:] * e_ref[5]
    return torch.cat([xv, xr], 1)


def attention_key_bias_pad(q, k, v, key_bias, pad=8):
    """Rewrites multi-head q, k, v (B, L, heads, d) so that plain scaled-dot-product attention over
    the result adds ``key_bias`` (B or 1, Lk) to every logit of each key, exactly:
    q' = [q * sqrt((d+pad)/d), sqrt(d+pad), 0...], k' = [k, bias, 0...], v' = [v, 0...]; the
    attention scale becomes (d+pad)^-1/2, so q'.k' / sqrt(d+pad) = q.k / sqrt(d) + bias.
    Slice the first d channels of each head of the output. Used for the reference strength
    (bias = log(strength) on the reference keys)."""
    b, lq, n, d = q.shape
    lk = k.shape[1]
    dp = d + pad
    qx = q.new_zeros(b, lq, n, pad)
    qx[..., 0] = math.sqrt(dp)
    kx = k.new_zeros(b, lk, n, pad)
    kx[..., 0] = key_bias.to(k.dtype).reshape(-1, lk, 1).expand(b, lk, n)
    q2 = torch.cat([q * math.sqrt(dp / d), qx], -1)
    k2 = torch.cat([k, kx], -1)
    v2 = torch.cat([v, v.new_zeros(b, lk, n, pad)], -1)
    return q2, k2, v2
