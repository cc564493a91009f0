"""Identity methods on ComfyUI's native Wan 2.1 MODEL (comfy/ldm/wan/model.py).

Concat-ID: the references arrive as ``time_dim_concat`` in the conditioning (one clean latent frame
per reference, see nodes/concat_id.py). The patch is made of public extension points on a clone:

* a DIFFUSION_MODEL wrapper that appends the references itself (instead of WanModel._forward), gives
  them Concat-ID's RoPE slots, computes the AdaLN-variant reference modulation from the same
  timestep, runs ``forward_orig`` and crops the reference frames off the output;
* a ``("dit", ("double_block", i))`` replacement per block that runs the block with the reference
  tokens excluded from the text cross-attention (and modulated by ``modulation_ref`` in the AdaLN
  variant).

Outside the start/end range (or with strength 0) the references are left out of the model call
entirely, i.e. the model runs as plain text-to-video.

Under ComfyUI's context windows (Context Windows (Manual) / WAN Context Windows after this patch) every window's
model call comes through the wrapper with that window's frames only: the references are appended after them and get
their RoPE slot relative to the window (time = the number of frames in the call), so each window is anchored on the
same reference as a short clip would be; the reference output is cut off before the windows are fused. The clone
also keeps ``time_dim_concat`` out of the windows' slicing (adapters/context_windows.py), on both ComfyUI versions.
"""

import logging
import math

import torch
import torch.nn.functional as F

import comfy.ldm.common_dit
import comfy.model_management
import comfy.patcher_extension
from comfy.ldm.flux.math import apply_rope1
from comfy.ldm.modules.attention import optimized_attention
from comfy.ldm.wan.model import WanModel, sinusoidal_embedding_1d

from .context_windows import keep_conds_whole
from ..likeness_blocks.concat_id import (
    PLACEMENTS,
    attention_key_bias_pad,
    concat_id_block,
    concat_id_positions,
)

RUNTIME_KEY = "likeness_concat_id"
WRAPPER_KEY = "likeness_concat_id"

_warned_multi = [False]


class ConcatIdAdaLNWeights:
    """The AdaLN variant's extra parameters: ``time_projection_ref.1`` (6*dim, dim) + bias and one
    ``modulation_ref`` (1, 6, dim) per block. Device copies are cached per (device, dtype)."""

    def __init__(self, proj_weight, proj_bias, modulation_ref):
        self.proj_weight = proj_weight
        self.proj_bias = proj_bias
        self.modulation_ref = list(modulation_ref)
        self._cache = {}

    @property
    def dim(self):
        return self.proj_weight.shape[1]

    @property
    def num_blocks(self):
        return len(self.modulation_ref)

    def on(self, device, dtype):
        key = (str(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            self._cache.clear()
            hit = (
                self.proj_weight.to(device=device, dtype=dtype),
                self.proj_bias.to(device=device, dtype=dtype),
                [m.to(device=device, dtype=dtype) for m in self.modulation_ref],
            )
            self._cache[key] = hit
        return hit

    def __deepcopy__(self, memo):  # shared, read-only: never duplicated by ModelPatcher.clone()
        return self


def _wan_model(model_patcher):
    dm = model_patcher.get_model_object("diffusion_model")
    if not isinstance(dm, WanModel):
        raise ValueError(
            f"Concat-ID needs a Wan 2.1 model (got {type(dm).__name__}). Load a Wan 2.1 T2V model "
            "(e.g. Concat-ID's first_stage.pt or second_stage_adaln.pt) and connect it to 'model'."
        )
    return dm


def _self_attention_with_key_bias(sa, x, freqs, n_ref, log_strength, transformer_options):
    """WanSelfAttention.forward with log(strength) added to every logit of the reference keys."""
    b, s = x.shape[:2]
    n, d = sa.num_heads, sa.head_dim
    q = apply_rope1(sa.norm_q(sa.q(x)).view(b, s, n, d), freqs)
    k = apply_rope1(sa.norm_k(sa.k(x)).view(b, s, n, d), freqs)
    v = sa.v(x).view(b, s, n, d)
    bias = torch.zeros(1, s, device=x.device, dtype=torch.float32)
    bias[:, s - n_ref:] = log_strength
    q2, k2, v2 = attention_key_bias_pad(q, k, v, bias)
    dp = q2.shape[-1]
    out = optimized_attention(q2.reshape(b, s, n * dp), k2.reshape(b, s, n * dp), v2.reshape(b, s, n * dp),
                              heads=n, transformer_options=transformer_options)
    out = out.view(b, s, n, dp)[..., :d].reshape(b, s, n * d)
    return sa.o(out)


def make_block_patch(index):
    def concat_id_double_block(args, extra):
        to = args["transformer_options"]
        rt = to.get(RUNTIME_KEY)
        if rt is None:
            return extra["original_block"](args)
        block = rt["model"].blocks[index]
        x, context, e0, freqs = args["img"], args["txt"], args["vec"], args["pe"]
        mod = comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device)
        if e0.ndim < 4:
            e = (mod + e0).chunk(6, dim=1)
        else:
            e = (mod.unsqueeze(0) + e0).unbind(2)
        e_ref = None
        if rt["e0_ref"] is not None:
            m_ref = rt["modulation_ref"][index]
            e_ref = (m_ref.unsqueeze(0) + rt["e0_ref"]).unbind(2)
        n_ref = rt["n_ref_tokens"]
        log_s = rt["log_strength"]

        def self_attn(h):
            if log_s == 0.0:
                return block.self_attn(h, freqs, transformer_options=to)
            return _self_attention_with_key_bias(block.self_attn, h, freqs, n_ref, log_s, to)

        def cross_attn(h):
            return block.cross_attn(h, context, context_img_len=rt["context_img_len"], transformer_options=to)

        x = concat_id_block(x.contiguous(), n_ref, e, e_ref, self_attn, cross_attn, block.ffn,
                            block.norm1, block.norm2, block.norm3)
        return {"img": x}

    return concat_id_double_block


def make_diffusion_model_wrapper(adaln=None, strength=1.0, sigma_start=None, sigma_end=None, placement="next_frames"):
    log_strength = math.log(strength) if strength > 0 else None

    def active(transformer_options):
        if log_strength is None:
            return False
        sigmas = transformer_options.get("sigmas")
        if sigmas is None or sigma_start is None:
            return True
        sigma = float(torch.as_tensor(sigmas).flatten().max())
        return sigma_end <= sigma <= sigma_start

    def concat_id_wrapper(executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                          transformer_options={}, **kwargs):
        if time_dim_concat is None:
            return executor(x, timestep, context, clip_fea, None, transformer_options, **kwargs)
        if not active(transformer_options):
            # references not attended in this part of the sampling: plain text-to-video
            return executor(x, timestep, context, clip_fea, None, transformer_options, **kwargs)
        model = executor.class_obj
        if model.ref_conv is not None and "reference_latent" in kwargs:
            raise RuntimeError("The Concat-ID patch does not combine with a Wan model that takes 'reference_latent' "
                               "(ref_conv); use a plain Wan 2.1 T2V model.")
        bs, c, t, h, w = x.shape
        pt, ph, pw = model.patch_size
        xp = comfy.ldm.common_dit.pad_to_patch_size(x, model.patch_size)
        refs = comfy.ldm.common_dit.pad_to_patch_size(time_dim_concat.to(device=x.device, dtype=x.dtype), model.patch_size)
        if refs.shape[3:] != xp.shape[3:] or refs.shape[1] != xp.shape[1]:
            raise ValueError(
                f"Concat-ID reference latents have shape {tuple(time_dim_concat.shape)} but the video latent is "
                f"{tuple(x.shape)}: the references must be encoded at the video's width and height. Use the Concat-ID "
                "conditioner with the same width/height as the video."
            )
        if refs.shape[0] != xp.shape[0]:
            refs = refs[:1].expand(xp.shape[0], -1, -1, -1, -1) if refs.shape[0] == 1 else refs
        n_refs = refs.shape[2] // pt
        if n_refs > 1 and not _warned_multi[0]:
            _warned_multi[0] = True
            logging.warning("Likeness Concat-ID: %d references in one video. The released Concat-ID Wan weights were "
                            "trained with exactly one reference; several identities are an untrained extension.", n_refs)
        gt, gh, gw = xp.shape[2] // pt, xp.shape[3] // ph, xp.shape[4] // pw
        xin = torch.cat([xp, refs], dim=2)

        ids = concat_id_positions(gt, gh, gw, n_refs, placement).to(device=x.device, dtype=torch.float32)
        freqs = model.rope_embedder(ids[None]).movedim(1, 2)

        e0_ref = None
        mod_ref = None
        if adaln is not None:
            if adaln.num_blocks != len(model.blocks) or adaln.dim != model.dim:
                raise ValueError(
                    f"The Concat-ID AdaLN weights are for {adaln.num_blocks} blocks of width {adaln.dim}, the model has "
                    f"{len(model.blocks)} blocks of width {model.dim}. Load the model and the AdaLN weights from the same "
                    "second_stage_adaln.pt."
                )
            dtype = x.dtype
            wgt, bias, mod_ref = adaln.on(x.device, dtype)
            e = model.time_embedding(sinusoidal_embedding_1d(model.freq_dim, timestep.flatten()).to(dtype=dtype))
            e = e.reshape(timestep.shape[0], -1, e.shape[-1])
            e0_ref = F.linear(F.silu(e), wgt, bias).unflatten(2, (6, model.dim))

        to = dict(transformer_options)
        to[RUNTIME_KEY] = {
            "model": model,
            "n_ref_tokens": n_refs * gh * gw,
            "e0_ref": e0_ref,
            "modulation_ref": mod_ref,
            "log_strength": log_strength,
            "context_img_len": None if clip_fea is None else clip_fea.shape[-2],
        }
        out = model.forward_orig(xin, timestep, context, clip_fea=clip_fea, freqs=freqs, transformer_options=to, **kwargs)
        return out[:, :, :t, :h, :w]

    return concat_id_wrapper


def apply_concat_id(model_patcher, adaln=None, strength=1.0, start_percent=0.0, end_percent=1.0,
                    placement="next_frames"):
    """Returns a clone of ``model_patcher`` (a native Wan 2.1 MODEL) with the Concat-ID patch."""
    dm = _wan_model(model_patcher)
    if placement not in PLACEMENTS:
        raise ValueError(f"Unknown reference placement {placement!r}; use one of {PLACEMENTS}.")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in 0..1.")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}.")
    if adaln is not None and (adaln.num_blocks != len(dm.blocks) or adaln.dim != dm.dim):
        raise ValueError(
            f"The Concat-ID AdaLN weights are for {adaln.num_blocks} blocks of width {adaln.dim}, the model has "
            f"{len(dm.blocks)} blocks of width {dm.dim}. Load the model and the AdaLN weights from the same "
            "second_stage_adaln.pt."
        )
    sigma_start = sigma_end = None
    if start_percent > 0.0 or end_percent < 1.0:
        ms = model_patcher.get_model_object("model_sampling")
        sigma_start = float(ms.percent_to_sigma(start_percent))
        sigma_end = float(ms.percent_to_sigma(end_percent))
    m = model_patcher.clone()
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
        make_diffusion_model_wrapper(adaln, strength, sigma_start, sigma_end, placement),
    )
    for i in range(len(dm.blocks)):
        m.set_model_patch_replace(make_block_patch(i), "dit", "double_block", i)
    keep_conds_whole(m, ("time_dim_concat",))  # the references are the same for every context window
    return m
