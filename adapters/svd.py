"""StableAnimator on ComfyUI's native SVD (comfy/ldm/modules/attention.py SpatialVideoTransformer).

- ID adapter: one ``attn2_replace`` per spatial transformer block (key ``(block_name, block_id, block_index)``).
  The spatial call adds the distribution-aware face attention (``id_to_k``/``id_to_v`` on the 4 face tokens,
  re-normalised to the per-frame mean/std of the image cross-attention output) with a strength; the temporal
  block that shares the key gets plain attention (it only ever sees the CLIP token, which is all ComfyUI's
  SVD context holds). Unconditional chunks (``cond_or_uncond == 1``) get zero face tokens, as upstream.
- PoseNet: an ``input_block_patch`` that adds the pose latents right after the first convolution
  (``block == ("input", 0)``), to conditional chunks only.

Long videos: either the pack's StableAnimator Long Video tiles (upstream's scheme: every tile holds frame 0) or
ComfyUI's Context Windows (Manual) node on dim 0 (frames are SVD's batch axis), not both. Under a context window the
pose latents and per-frame face tokens are taken at the frames that window's model call holds
(adapters/context_windows.py); ``num_video_frames`` is set to that call's frame count (0.33 adds an anchor frame to a
window but tells SVD the window length).

Patches are applied to a clone; patch objects survive ModelPatcher.clone()'s deepcopy as themselves.
"""

import logging

import torch
import torch.nn.functional as F

from .context_windows import window_frames
from ..likeness_blocks.stableanimator import normalized_id_attention, tile_indices, tile_weights

log = logging.getLogger("likeness")

FRAME_INDICES = "likeness_frame_indices"  # transformer_options key: (tile frame indices, total frames)
POSE_CHUNK = 16  # pose frames through PoseNet at once
WINDOW_WRAPPER_KEY = "likeness_svd_context_window_frames"


def _attention_fn():
    from comfy.ldm.modules import attention

    return attention.optimized_attention


def spatial_block_keys(diffusion_model):
    """{module path of each spatial BasicTransformerBlock: (block_name, block_id, block_index)}, read from the
    model (never hard-coded): ``input_blocks.N.x`` -> ("input", N), ``middle_block.x`` -> ("middle", 0),
    ``output_blocks.N.x`` -> ("output", N)."""
    from comfy.ldm.modules.attention import SpatialVideoTransformer

    keys = {}
    for path, mod in diffusion_model.named_modules():
        if not isinstance(mod, SpatialVideoTransformer):
            continue
        parts = path.split(".")
        if parts[0] == "input_blocks":
            block = ("input", int(parts[1]))
        elif parts[0] == "middle_block":
            block = ("middle", 0)
        elif parts[0] == "output_blocks":
            block = ("output", int(parts[1]))
        else:
            continue
        for i in range(len(mod.transformer_blocks)):
            keys[f"{path}.transformer_blocks.{i}"] = block + (i,)
    return keys


def sigma_range(model, start_percent, end_percent):
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in [0, 1].")
    ms = model.get_model_object("model_sampling")
    return ms.percent_to_sigma(start_percent), ms.percent_to_sigma(end_percent)


def _active(extra_options, sigma_start, sigma_end):
    sigmas = extra_options.get("sigmas")
    if sigmas is None:
        return True
    s = float(sigmas.reshape(-1)[0])
    return sigma_end <= s <= sigma_start


def _chunk_flags(extra_options, rows):
    flags = list(extra_options.get("cond_or_uncond") or [0])
    if rows % len(flags):
        raise RuntimeError(f"StableAnimator: batch of {rows} rows does not split into {len(flags)} cond/uncond chunks.")
    return flags, rows // len(flags)


class _Shared:
    """Not copied by ModelPatcher.clone()'s deepcopy (immutable after construction, except caches)."""

    def __deepcopy__(self, memo):
        return self


class IDAttentionPatch(_Shared):
    def __init__(self, key, id_to_k, id_to_v, face_tokens, strength, sigma_start, sigma_end, inner=None):
        self.key = key
        self.id_to_k = id_to_k  # (inner, 1024)
        self.id_to_v = id_to_v
        self.face_tokens = face_tokens  # (1 or F, 4, 1024)
        self.strength = float(strength)
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.inner = inner  # a replace another pack set on this key first, used for the main branch
        self._cache = {}
        self._last_shape = None  # activations_shape list of the last spatial call (ties resolved by call order)
        self.spatial_calls = 0
        self.temporal_calls = 0

    def _is_spatial(self, q, extra_options):
        shape = extra_options.get("activations_shape")
        if shape is None:
            return True
        hw = shape[2] * shape[3]
        spatial_fit = q.shape[0] == shape[0] and q.shape[1] == hw
        temporal_fit = q.shape[0] == (shape[0] // max(q.shape[1], 1)) * hw and q.shape[1] * (q.shape[0] // hw) == shape[0]
        if spatial_fit and not temporal_fit:
            spatial = True
        elif temporal_fit and not spatial_fit:
            spatial = False
        else:  # H*W == frames: the spatial block always runs before its temporal block within one transformer call
            spatial = self._last_shape is not shape
        if spatial:
            self._last_shape = shape
        return spatial

    def _id_kv(self, device, dtype):
        ck = (device, dtype)
        if ck not in self._cache:
            tok = self.face_tokens.to(device=device, dtype=dtype)
            self._cache = {ck: (tok @ self.id_to_k.to(device, dtype).T, tok @ self.id_to_v.to(device, dtype).T)}
        return self._cache[ck]

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        prec = extra_options.get("attn_precision")
        attn = _attention_fn()

        def main(q_, k_, v_, h):
            if self.inner is not None:
                return self.inner(q_, k_, v_, extra_options)
            return attn(q_, k_, v_, h, attn_precision=prec, transformer_options=extra_options)

        if not self._is_spatial(q, extra_options):
            self.temporal_calls += 1
            return main(q, k, v, heads)
        self.spatial_calls += 1
        if self.strength == 0.0 or not _active(extra_options, self.sigma_start, self.sigma_end):
            return main(q, k, v, heads)

        flags, frames = _chunk_flags(extra_options, q.shape[0])
        ik, iv = self._id_kv(q.device, q.dtype)
        tile = extra_options.get(FRAME_INDICES)
        if tile is not None and ik.shape[0] == tile[1]:
            ik, iv = ik[tile[0]], iv[tile[0]]
        elif ik.shape[0] > 1:
            held = window_frames(extra_options, frames, "StableAnimator ID Adapter")
            if held is not None and ik.shape[0] > max(held):  # per-frame face tokens: this window's frames
                ik, iv = ik[held], iv[held]
        if ik.shape[0] == 1:
            ik, iv = ik.expand(frames, -1, -1), iv.expand(frames, -1, -1)
        elif ik.shape[0] != frames:
            raise ValueError(f"StableAnimator ID Adapter: {ik.shape[0]} sets of face tokens for a {frames}-frame video; "
                             "give one set (one reference face) or one per frame.")
        zk, zv = torch.zeros_like(ik), torch.zeros_like(iv)
        id_k = torch.cat([zk if f == 1 else ik for f in flags])
        id_v = torch.cat([zv if f == 1 else iv for f in flags])

        def ours(q_, k_, v_, h):
            if k_ is k:
                return main(q_, k_, v_, h)
            return attn(q_, k_, v_, h, attn_precision=prec, transformer_options=extra_options)

        return normalized_id_attention(q, k, v, id_k, id_v, heads, scale=self.strength, attention=ours)


def apply_id_adapter(model, id_weights, face_tokens, strength=1.0, start_percent=0.0, end_percent=1.0):
    """A clone of ``model`` (native SVD MODEL) with the distribution-aware ID adapter on every spatial
    cross-attention. ``id_weights``: {module path of the spatial BasicTransformerBlock (ComfyUI layout):
    (id_to_k weight, id_to_v weight)}. ``face_tokens``: (1, 4, 1024)."""
    keys = spatial_block_keys(model.get_model_object("diffusion_model"))
    if not keys:
        raise ValueError("StableAnimator ID Adapter needs a native SVD MODEL (one with spatial-video transformers); "
                         "load SVD-xt with ImageOnlyCheckpointLoader.")
    missing = sorted(set(keys) - set(id_weights))
    if missing:
        raise ValueError(f"StableAnimator ID Adapter: no id_to_k/id_to_v weights for {len(missing)} of {len(keys)} "
                         f"spatial cross-attentions (e.g. {missing[0]}); the StableAnimator unet.pth does not match this "
                         "MODEL. Load it with Load StableAnimator on the same SVD-xt MODEL.")
    if face_tokens.ndim != 3:
        raise ValueError(f"FACE_TOKENS must be (B, tokens, 1024); got {tuple(face_tokens.shape)}.")
    sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
    m = model.clone()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    patches = []
    for path, key in keys.items():
        wk, wv = id_weights[path]
        if face_tokens.shape[-1] != wk.shape[1]:
            raise ValueError(f"FACE_TOKENS are {face_tokens.shape[-1]} wide but id_to_k expects {wk.shape[1]}.")
        inner = existing.get(key, existing.get(key[:2]))
        p = IDAttentionPatch(key, wk, wv, face_tokens, strength, sigma_start, sigma_end, inner=inner)
        m.set_model_attn2_replace(p, key[0], key[1], key[2])
        patches.append(p)
    _add_window_frames_wrapper(m)
    return m, patches


class PosePatch(_Shared):
    """Adds PoseNet(pose) * strength after the UNet's first convolution, on conditional chunks only."""

    def __init__(self, pose_net, pose_images, strength=1.0):
        self.pose_net = pose_net
        self.pose_images = pose_images  # IMAGE (F, H, W, 3) in [0, 1]
        self.strength = float(strength)
        self._cache = {}
        self.calls = 0

    def pose_latents(self, size, device, dtype):
        ck = (tuple(size), device, dtype)
        if ck not in self._cache:
            x = self.pose_images[..., :3].movedim(-1, 1).float() * 2.0 - 1.0
            hh, ww = size[0] * 8, size[1] * 8
            if x.shape[-2:] != (hh, ww):
                x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False, antialias=True)
            net = self.pose_net
            dev_net = next(net.parameters()).device
            with torch.no_grad():
                if dev_net != device:
                    net = _moved(net, device)
                # frame by frame network: a chunk's activations at a time, whatever the video length
                lat = torch.cat([net(x[c:c + POSE_CHUNK].to(device)) for c in range(0, x.shape[0], POSE_CHUNK)])
            self._cache = {ck: lat.to(dtype)}
        return self._cache[ck]

    def __call__(self, h, transformer_options):
        if transformer_options.get("block") != ("input", 0) or self.strength == 0.0:
            return h
        self.calls += 1
        flags, frames = _chunk_flags(transformer_options, h.shape[0])
        n = self.pose_images.shape[0]
        tile = transformer_options.get(FRAME_INDICES)
        total = frames if tile is None else tile[1]
        held = window_frames(transformer_options, frames, "StableAnimator PoseNet") if tile is None else None
        if held is not None:  # a context window: the pose frames of the video frames this call holds
            video = getattr(transformer_options["context_window"], "total_frames", 0) or None  # 0.33 knows it
            if n <= max(held) or (video is not None and n != video):
                raise ValueError(f"StableAnimator PoseNet: the pose sequence has {n} frames but the video latent has "
                                 f"{video or 'more than ' + str(max(held))}; give one pose image per video frame "
                                 "(set video_frames to the number of pose frames, or trim the pose frames).")
        elif n != total:
            raise ValueError(f"StableAnimator PoseNet: the pose sequence has {n} frames but the video latent has "
                             f"{total}; give one pose image per video frame (set video_frames to {n}, or trim the "
                             "pose frames).")
        if h.shape[1] != self.pose_net.final_proj.out_channels:
            raise ValueError(f"StableAnimator PoseNet outputs {self.pose_net.final_proj.out_channels} channels but the "
                             f"UNet's first convolution gives {h.shape[1]}; this MODEL is not SVD.")
        lat = self.pose_latents(h.shape[-2:], h.device, h.dtype)
        if tile is not None:
            lat = lat[tile[0]]
        elif held is not None:
            lat = lat[held]
        lat = lat * self.strength
        add = torch.cat([torch.zeros_like(lat) if f == 1 else lat for f in flags])
        return h + add


def _moved(module, device):
    import copy

    return copy.deepcopy(module).to(device)


def apply_pose(model, pose_net, pose_images, strength=1.0):
    if pose_images.ndim != 4 or pose_images.shape[-1] < 3:
        raise ValueError(f"Pose frames must be an IMAGE batch (frames, H, W, 3); got {tuple(pose_images.shape)}.")
    m = model.clone()
    p = PosePatch(pose_net, pose_images, strength)
    m.set_model_input_block_patch(p)
    _add_window_frames_wrapper(m)
    return m, p


_warned_frames = [False]


def window_frames_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                              **kwargs):
    """APPLY_MODEL wrapper: under a context window, SVD's temporal layers are told the frames the call holds.
    ComfyUI 0.33 sets ``num_video_frames`` to the window length even when it adds an anchor frame before the window
    (causal_window_fix), which would fold frames of the two CFG branches together."""
    nvf = kwargs.get("num_video_frames")
    if transformer_options.get("context_window") is not None and isinstance(nvf, int):
        chunks = len(transformer_options.get("cond_or_uncond") or [0])
        held = x.shape[0] // chunks
        if held != nvf and x.shape[0] % chunks == 0:
            if not _warned_frames[0]:
                _warned_frames[0] = True
                log.warning("Likeness StableAnimator: the context window's model call holds %d frames but SVD was told "
                            "%d (ComfyUI's causal_window_fix anchor frame); using %d.", held, nvf, held)
            kwargs["num_video_frames"] = held
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


CONTEXT_WINDOWS_UNSUPPORTED = (
    "StableAnimator: this ComfyUI's Context Windows cannot run SVD, whose frames are on the batch axis: its window "
    "step lookup fails on SVD's per-frame timesteps (ComfyUI 0.3.x). Use the pack's StableAnimator Long Video node "
    "instead of the Context Windows node (or a ComfyUI whose context windows support SVD, e.g. 0.33).")


def context_windows_supported_check(executor, x, timestep, model_options={}, seed=None):
    """PREDICT_NOISE wrapper: a clear message where ComfyUI's own context handler cannot take SVD's per-frame
    timesteps (0.3.75's set_step compares every frame's sigma with the schedule and fails), instead of its error."""
    handler = (model_options or {}).get("context_handler")
    if (handler is not None and getattr(handler, "dim", None) == 0 and torch.is_tensor(timestep)
            and timestep.numel() > 1 and x.shape[0] > getattr(handler, "context_length", x.shape[0])):
        try:
            handler.set_step(timestep, model_options)  # what the handler does first with this step anyway
        except RuntimeError as e:
            raise ValueError(CONTEXT_WINDOWS_UNSUPPORTED) from e
    return executor(x, timestep, model_options, seed)


def _add_window_frames_wrapper(m):
    import comfy.patcher_extension

    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WINDOW_WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WINDOW_WRAPPER_KEY,
                           window_frames_apply_model)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WINDOW_WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WINDOW_WRAPPER_KEY,
                           context_windows_supported_check)


def tiled_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                      tile_size=16, overlap=4, **kwargs):
    """APPLY_MODEL wrapper: StableAnimator's long-video tiling. Every cond/uncond chunk of F frames is run as tiles
    (frame 0 in each), and the per-frame outputs are blended with triangular weights (normalised per frame).
    The model's output is linear in the UNet output at one sigma, so blending it equals blending the UNet output."""
    if transformer_options.get("context_window") is not None:
        raise ValueError("StableAnimator Long Video and ComfyUI's Context Windows both split this video into pieces: "
                         "use one. StableAnimator Long Video keeps frame 0 (the reference) in every tile, as upstream; "
                         "remove the Context Windows node, or remove StableAnimator Long Video to use context windows.")
    flags = list(transformer_options.get("cond_or_uncond") or [0])
    rows = x.shape[0]
    if rows % len(flags):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    frames = rows // len(flags)
    tiles = tile_indices(frames, tile_size, overlap)
    if len(tiles) == 1:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if control is not None:
        raise ValueError("StableAnimator long-video tiles do not support ControlNet inputs; remove the ControlNet or "
                         "set the tile size to the video length.")
    weights = tile_weights(tile_size, device=x.device)
    out = None
    count = torch.zeros(frames, device=x.device)

    def take(v, sel):
        if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == rows:
            return v[sel.to(v.device)]
        return v

    for idx in tiles:
        sel = torch.tensor([c * frames + j for c in range(len(flags)) for j in idx], device=x.device)
        opts = dict(transformer_options)
        opts[FRAME_INDICES] = (idx, frames)
        kw = {k: take(v, sel) for k, v in kwargs.items()}
        kw["num_video_frames"] = len(idx)
        y = executor(x[sel], take(t, sel), take(c_concat, sel), take(c_crossattn, sel), control, opts, **kw)
        w = weights[: len(idx)].to(y.dtype).repeat(len(flags))
        if out is None:
            out = torch.zeros((rows,) + tuple(y.shape[1:]), device=y.device, dtype=y.dtype)
        out.index_add_(0, sel.to(y.device), y * w.view(-1, *([1] * (y.ndim - 1))))
        count.index_add_(0, torch.tensor(idx, device=x.device), weights[: len(idx)])
    count = count.repeat(len(flags)).to(out.device, out.dtype)
    return out / count.view(-1, *([1] * (out.ndim - 1)))


TILE_WRAPPER_KEY = "likeness_stableanimator_tiles"


def apply_tiling(model, tile_size=16, overlap=4):
    import functools

    import comfy.patcher_extension

    tile_indices(tile_size + 1, tile_size, overlap)  # validates the numbers with a clear error
    m = model.clone()
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TILE_WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TILE_WRAPPER_KEY,
                           functools.partial(tiled_apply_model, tile_size=tile_size, overlap=overlap))
    _add_window_frames_wrapper(m)
    return m
