"""FantasyID's layer-aware ID injection on the pack's native CogVideoX MODEL (adapters/cogvideox.py).

After DiT block i (diffusers' CogVideoXBlock returns (video tokens, text tokens)), on blocks where
i % cross_attn_interval == 0, the video tokens only are updated:

    h_video <- h_video + strength * LayerAttention_{i // interval}(ID tokens, h_video)

How it is patched: a DIFFUSION_MODEL wrapper on a clone of the MODEL registers forward hooks on the transformer
blocks for the duration of that model call only and removes them afterwards (the shared network is never changed
outside the call, so other branches using the same weights are unaffected). The LayerAttention modules travel as an
additional model of the clone, so ComfyUI's model management moves them to the GPU together with the transformer.

Both CFG branches get the same ID tokens (upstream broadcasts batch-1 ID tensors against the batch-2 CFG input).
start/end percent use ComfyUI's sigma convention; outside the window the model runs unpatched.

Beyond 49 frames: put Context Windows (Manual) on dim 2 after this node. The ID tokens belong to the video, not to
frames, so every window's model call gets them. ComfyUI 0.3.75 does not slice the I2V image condition (``c_concat``,
5-D) for a window; an APPLY_MODEL wrapper on the clone takes it at the frames the window holds (0.33 slices it itself,
and the wrapper then has nothing to do).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

import comfy.model_patcher
import comfy.patcher_extension

from .cogvideox import refuse_comfy_native_cogvideox
from .context_windows import window_frames
from .layer_injection import LayerInjector

WRAPPER_KEY = "likeness_fantasyid_layer_injection"
WINDOW_CONCAT_KEY = "likeness_fantasyid_window_concat"
log = logging.getLogger("likeness")
_warned_concat = [False]


def window_concat_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                              **kwargs):
    """The I2V image condition at the frames of a context window's call, where ComfyUI left it whole (0.3.75)."""
    if (c_concat is not None and c_concat.ndim == 5 and x.ndim == 5 and c_concat.shape[2] != x.shape[2]
            and transformer_options.get("context_window") is not None):
        held = window_frames(transformer_options, x.shape[2], "FantasyID (CogVideoX I2V)")
        if max(held) < c_concat.shape[2]:
            if not _warned_concat[0]:
                _warned_concat[0] = True
                log.warning("Likeness FantasyID: this ComfyUI did not slice the I2V image condition for the context "
                            "window; taking it at the window's frames here.")
            c_concat = c_concat[:, :, held]
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _cog_dit(model_patcher):
    from .cogvideox import CogVideoXModel

    model = getattr(model_patcher, "model", None)
    if not isinstance(model, CogVideoXModel):
        raise ValueError(
            "FantasyID's Layer-Aware Injector works on the CogVideoX MODEL from 'Load CogVideoX' (FantasyID's "
            f"transformer/ folder); got {type(model).__name__}. Load the model with the pack's CogVideoX loader."
        )
    return model.diffusion_model


def resolve_interval(num_blocks: int, num_modules: int, configured=None) -> int:
    """cross_attn_interval: the released config's value when known, else num_blocks // number of LayerAttention."""
    if configured is not None:
        interval = int(configured)
    else:
        if num_modules < 1:
            raise ValueError("FantasyID has no layer_attention modules; the face modules are incomplete.")
        interval = max(1, num_blocks // num_modules)
    if interval < 1 or num_blocks // interval != num_modules:
        raise ValueError(
            f"FantasyID has {num_modules} layer_attention modules but the CogVideoX model has {num_blocks} blocks "
            f"(cross_attn_interval {interval} would need {num_blocks // max(interval, 1)}): load the FantasyID face "
            "modules that belong to this transformer."
        )
    return interval


class _InjectionState:
    """What the wrapper needs; shared (not deep-copied) between clones of the patched MODEL."""

    def __init__(self, layer_attention, id_tokens, strength, sigma_start, sigma_end, block_start, block_end, interval):
        self.layer_attention = layer_attention
        self.id_tokens = id_tokens
        self.strength = strength
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.block_start = block_start
        self.block_end = block_end
        self.interval = interval

    def __deepcopy__(self, memo):
        return self

    def active(self, transformer_options) -> bool:
        if self.strength == 0.0:
            return False
        if self.sigma_start is None:
            return True
        sig = transformer_options.get("sigmas")
        if sig is None:
            return True
        s = float(sig.reshape(-1)[0])
        return self.sigma_end <= s <= self.sigma_start

    def ids_for(self, batch: int, transformer_options) -> torch.Tensor:
        ids = self.id_tokens
        if ids.shape[0] in (1, batch):
            return ids
        n_branches = len(transformer_options.get("cond_or_uncond", [])) or 1
        if ids.shape[0] * n_branches == batch:  # one ID per video, the same for every CFG branch
            return ids.repeat(n_branches, 1, 1)
        raise ValueError(
            f"ID tokens have batch {ids.shape[0]} but the sampler runs batch {batch}; use one ID (batch 1) or one "
            "per latent in the batch."
        )


def _run_modules(state, device, dtype):
    """The LayerAttention modules on the compute device, run in their own weight dtype."""
    la = state.layer_attention
    w = la[0].to_q.weight
    if w.device != device:
        la.to(device)
    return la


class _CastLA(nn.Module):
    """LayerAttention in its weight dtype, result cast back to the hidden-state dtype."""

    def __init__(self, la):
        super().__init__()
        self.la = la

    def forward(self, ids, h):
        wd = self.la.to_q.weight.dtype
        return self.la(ids.to(wd), h.to(wd)).to(h.dtype)


def make_wrapper(state: _InjectionState):
    def fantasyid_wrapper(executor, x, timestep, context, transformer_options, *args, **kwargs):
        if not state.active(transformer_options):
            return executor(x, timestep, context, transformer_options, *args, **kwargs)
        dit = executor.class_obj
        la = _run_modules(state, x.device, x.dtype)
        ids = state.ids_for(x.shape[0], transformer_options).to(x.device)
        injector = LayerInjector(
            [_CastLA(m) for m in la], ids, strength=state.strength, block_start=state.block_start,
            block_end=state.block_end, interval=state.interval,
        )
        handles = injector.register(dit.transformer_blocks, output_index=0)
        try:
            return executor(x, timestep, context, transformer_options, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    return fantasyid_wrapper


def apply_layer_injection(model_patcher, layer_attention, id_tokens, strength=1.0, start_percent=0.0,
                          end_percent=1.0, block_start=0, block_end=-1, cross_attn_interval=None):
    """Clone of a CogVideoX MODEL with FantasyID's layer-aware injection. `layer_attention`: nn.ModuleList (one per
    injection point); `id_tokens`: (B, N, kv_dim). block_end -1 = through the last block (exclusive end otherwise)."""
    refuse_comfy_native_cogvideox(model_patcher, "Layer-Aware Injector (FantasyID)")
    dit = _cog_dit(model_patcher)
    n_blocks = len(dit.transformer_blocks)
    if not isinstance(layer_attention, nn.ModuleList):
        layer_attention = nn.ModuleList(layer_attention)
    if not isinstance(id_tokens, torch.Tensor) or id_tokens.ndim != 3:
        raise ValueError("id_tokens must be a (B, N, C) tensor from FantasyID's 'Vertex ID Tokens' node.")
    interval = resolve_interval(n_blocks, len(layer_attention), cross_attn_interval)
    inner = dit.config.num_attention_heads * dit.config.attention_head_dim
    la0 = layer_attention[0]
    if la0.to_q.in_features != inner:
        raise ValueError(
            f"The FantasyID layer_attention modules are for a transformer of width {la0.to_q.in_features}, this "
            f"CogVideoX model has width {inner}: use the face modules of the same FantasyID checkpoint."
        )
    if la0.to_kv.in_features != id_tokens.shape[-1]:
        raise ValueError(
            f"ID tokens have width {id_tokens.shape[-1]} but the layer_attention expects {la0.to_kv.in_features}: "
            "make the ID tokens with the same FantasyID face modules."
        )
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in 0..1.")
    end = n_blocks if block_end is None or block_end < 0 else int(block_end)
    if not 0 <= block_start <= end <= n_blocks:
        raise ValueError(f"block range {block_start}..{block_end} is outside the model's 0..{n_blocks} blocks.")
    sigma_start = sigma_end = None
    if start_percent > 0.0 or end_percent < 1.0:
        ms = model_patcher.get_model_object("model_sampling")
        sigma_start = float(ms.percent_to_sigma(start_percent))
        sigma_end = float(ms.percent_to_sigma(end_percent))
    state = _InjectionState(layer_attention, id_tokens.detach(), float(strength), sigma_start, sigma_end,
                            int(block_start), end, interval)
    m = model_patcher.clone()
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, make_wrapper(state))
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WINDOW_CONCAT_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WINDOW_CONCAT_KEY, window_concat_apply_model)
    la_patcher = comfy.model_patcher.ModelPatcher(layer_attention, load_device=model_patcher.load_device,
                                                  offload_device=model_patcher.offload_device)
    m.set_additional_models(WRAPPER_KEY, [la_patcher])
    return m
