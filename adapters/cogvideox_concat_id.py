"""Concat-ID's CogVideoX-5B variant on the pack's native CogVideoX MODEL (adapters/cogvideox.py).

What the released CogVideoX model does with the references (notes §3.3): each reference is one clean
VAE latent frame appended after the T video latent frames; the whole sequence goes through the
unchanged MM-DiT (same AdaLN and timestep for every image token, joint attention with the text), the
3D RoPE table is the one of a T + n frame video (flattened t, h, w), so the references get temporal
indices T, T+1 with the video's own (h, w) grid (no spatial shift); the model output for the
reference frames is cut off before the sampler step.

Here that is a DIFFUSION_MODEL wrapper on a clone: it takes the reference latents (``time_dim_concat``
in the conditioning, scaled by CogVideoX's latent factor in ``CogVideoXModel.extra_conds``, present on
both CFG branches), concatenates them on the frame axis of the (c_in-scaled) model input without
noising or scaling them, runs the network (whose RoPE table then covers T + n frames) and crops the
output back to T frames.
"""

import logging

import torch

import comfy.patcher_extension

from .cogvideox import refuse_comfy_native_cogvideox

WRAPPER_KEY = "likeness_concat_id_cogvideox"
TRAINED_MAX_REFS = 2  # the released checkpoints: single-identity (1) and two-identities (2)
_warned = [False]


def _cogvideox_model(model_patcher):
    from .cogvideox import dit_class

    dm = model_patcher.get_model_object("diffusion_model")
    if not isinstance(dm, dit_class()):
        raise ValueError(
            f"Concat-ID (CogVideoX) needs a CogVideoX MODEL from the pack's CogVideoX loaders (got {type(dm).__name__}). "
            "For Wan 2.1 use 'Concat-ID Model Patch (Wan)'."
        )
    cfg = dm.config
    if (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
        raise ValueError("Concat-ID (CogVideoX) works on text-to-video CogVideoX models; this one is image-to-video "
                         f"(in_channels {cfg.in_channels}). Load Concat-ID's CogVideoX-5B T2V checkpoint.")
    if cfg.patch_size_t is not None:
        raise ValueError("Concat-ID (CogVideoX) was released for CogVideoX-5B (one latent frame per patch); this is a "
                         "CogVideoX 1.5 model that patchifies two frames at once, so a single reference frame cannot "
                         "be appended. Use a CogVideoX-5B T2V model.")
    return dm


def concat_references(x, refs):
    """[B, C, T, H, W] video input + [B or 1, C, n, H, W] reference latents -> [B, C, T + n, H, W]."""
    if refs.ndim != 5 or refs.shape[1] != x.shape[1] or refs.shape[3:] != x.shape[3:]:
        raise ValueError(
            f"Concat-ID reference latents have shape {tuple(refs.shape)} but the video latent is {tuple(x.shape)}: "
            "encode the references at the video's width and height (same width/height in the Concat-ID conditioner "
            "as in the latent) with the CogVideoX VAE."
        )
    refs = refs.to(device=x.device, dtype=x.dtype)
    if refs.shape[0] != x.shape[0]:
        if refs.shape[0] != 1:
            raise ValueError(f"{refs.shape[0]} reference batches for a batch of {x.shape[0]} videos.")
        refs = refs.expand(x.shape[0], -1, -1, -1, -1)
    return torch.cat([x, refs], dim=2)


def make_wrapper(sigma_start=None, sigma_end=None):
    def active(transformer_options):
        sigmas = transformer_options.get("sigmas")
        if sigmas is None or sigma_start is None:
            return True
        sigma = float(torch.as_tensor(sigmas).flatten().max())
        return sigma_end <= sigma <= sigma_start

    def concat_id_cogvideox_wrapper(executor, x, timestep, context, transformer_options={}, **kwargs):
        refs = kwargs.pop("time_dim_concat", None)
        if refs is None or refs.shape[2] == 0 or not active(transformer_options):
            return executor(x, timestep, context, transformer_options, **kwargs)
        n = refs.shape[2]
        if n > TRAINED_MAX_REFS and not _warned[0]:
            _warned[0] = True
            logging.warning("Likeness Concat-ID (CogVideoX): %d references; the released checkpoints were trained "
                            "with 1 (single-identity) or 2 (two-identities).", n)
        t = x.shape[2]
        out = executor(concat_references(x, refs), timestep, context, transformer_options, **kwargs)
        return out[:, :, :t]

    return concat_id_cogvideox_wrapper


def apply_concat_id_cogvideox(model_patcher, start_percent=0.0, end_percent=1.0):
    """A clone of a native CogVideoX MODEL that runs Concat-ID's reference frames (see module doc)."""
    refuse_comfy_native_cogvideox(model_patcher, "Concat-ID Model Patch (CogVideoX)")
    _cogvideox_model(model_patcher)
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in 0..1.")
    sigma_start = sigma_end = None
    if start_percent > 0.0 or end_percent < 1.0:
        ms = model_patcher.get_model_object("model_sampling")
        sigma_start = float(ms.percent_to_sigma(start_percent))
        sigma_end = float(ms.percent_to_sigma(end_percent))
    m = model_patcher.clone()
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                           make_wrapper(sigma_start, sigma_end))
    return m
