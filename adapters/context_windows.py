"""How the pack's patches meet ComfyUI's context windows (comfy/context_windows.py; the Context Windows (Manual)
and WAN Context Windows nodes), on 0.3.75 and 0.33.0.

The sampler's context handler splits the latent into windows along time, slices the conditioning for each window,
runs the model once per window and fuses the outputs. Before each window's model call it sets
``transformer_options["context_window"]`` (an ``IndexListContextWindow``: ``index_list`` = the window's frames in the
whole video). 0.33 may also put one frame before the window into the call (``causal_window_fix``, on by default):
``causal_anchor_index`` names it, and the model sees ``[anchor] + index_list``. :func:`window_frames` returns exactly
the frames a call sees, so per-frame inputs of a patch (pose frames, per-frame face tokens, face boxes) follow them.

Clean reference latents that ride in the conditioning (Concat-ID's ``time_dim_concat``) are not video frames: they
must reach every window whole. 0.3.75 never slices a 5-D model condition along time; 0.33 slices any model condition
whose time axis happens to have the video's length (e.g. two references in a two-latent-frame video). 0.33 asks the
model first (``BaseModel.resize_cond_for_context_window``); :func:`keep_conds_whole` answers it through an object patch
on the clone, so those conditions pass unchanged on both versions.
"""

import functools
import logging

log = logging.getLogger("likeness")

WINDOW_KEY = "context_window"
RESIZE_HOOK = "resize_cond_for_context_window"


def window_frames(transformer_options, n_frames, what="this patch"):
    """Indices (into the whole video) of the ``n_frames`` frames one model call sees, or None when the call is not
    one of ComfyUI's context windows."""
    window = (transformer_options or {}).get(WINDOW_KEY)
    if window is None or not hasattr(window, "index_list"):
        return None
    idx = [int(i) for i in window.index_list]
    anchor = getattr(window, "causal_anchor_index", None)
    if anchor is not None and anchor >= 0:
        idx = [int(anchor)] + idx
    if len(idx) != n_frames:
        raise RuntimeError(
            f"{what}: the context window covers {len(idx)} frames but the model call has {n_frames}. This context "
            "window setup is not supported; use one Context Windows node with its default options, or no context "
            "windows.")
    return idx


def keep_conds_whole(model_patcher, cond_keys):
    """Object-patches ``resize_cond_for_context_window`` on ``model_patcher`` (a clone) so that the model conditions
    named ``cond_keys`` reach every context window unsliced; every other condition goes to what was there before.
    ComfyUI without that hook (0.3.75) never slices them: nothing to do there."""
    base = model_patcher.model
    if not hasattr(type(base), RESIZE_HOOK):
        return False
    # an earlier object patch on this clone, else the model class's own method (never a patch another clone left
    # on the shared model while it is loaded)
    inner = model_patcher.object_patches.get(RESIZE_HOOK) or functools.partial(getattr(type(base), RESIZE_HOOK), base)
    keys = frozenset(cond_keys)

    def resize_cond_for_context_window(cond_key, cond_value, window, x_in, device, *args, **kwargs):
        if cond_key in keys:
            return cond_value  # references, not frames: the same for every window
        return inner(cond_key, cond_value, window, x_in, device, *args, **kwargs)

    model_patcher.add_object_patch(RESIZE_HOOK, resize_cond_for_context_window)
    return True
