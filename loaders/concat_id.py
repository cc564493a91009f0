"""Concat-ID Wan checkpoints: ``first_stage.pt`` and ``second_stage_adaln.pt`` (HF yongzhong/Concat-ID-Wan).

Each is a full Wan 2.1 T2V state dict with the official key names (patch_embedding, text_embedding,
time_embedding, time_projection, blocks.N.*, head.*); the AdaLN file adds
``time_projection_ref.1.{weight,bias}`` and ``blocks.N.modulation_ref``. The Wan part loads through
ComfyUI's own diffusion-model loader (the same path as the stock UNETLoader, which also accepts these
files and ignores the extra keys); the extra keys become :class:`ConcatIdAdaLNWeights`.
Loading is safe: ``torch.load(weights_only=True)`` or safetensors, via comfy.utils.load_torch_file.
"""

import re

import torch

import comfy.sd

from ..adapters.wan import ConcatIdAdaLNWeights

_MOD_REF = re.compile(r"^blocks\.(\d+)\.modulation_ref$")
_PROJ_REF = ("time_projection_ref.1.weight", "time_projection_ref.1.bias")
_WRAPPER_PREFIXES = ("module.", "model.", "dit.")


class ConcatIdWeights:
    """What the loader node hands to the patch node: the variant and, for AdaLN, its extra params."""

    def __init__(self, variant, adaln=None, source=""):
        self.variant = variant  # "first_stage" or "adaln"
        self.adaln = adaln
        self.source = source

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return f"ConcatIdWeights({self.variant}, {self.source})"


def _strip_wrapper_prefix(sd):
    for p in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


def split_concat_id_state_dict(sd):
    """(wan_state_dict, ConcatIdAdaLNWeights or None). Raises a clear error for a half AdaLN file."""
    sd = _strip_wrapper_prefix(dict(sd))
    mod_ref = {}
    wan = {}
    for k, v in sd.items():
        m = _MOD_REF.match(k)
        if m:
            mod_ref[int(m.group(1))] = v
        elif k.startswith("time_projection_ref."):
            continue
        else:
            wan[k] = v
    has_proj = all(k in sd for k in _PROJ_REF)
    if not mod_ref and not any(k.startswith("time_projection_ref.") for k in sd):
        return wan, None
    if not has_proj or not mod_ref:
        raise ValueError(
            "This Concat-ID file has only part of the AdaLN parameters (it needs time_projection_ref.1.weight/bias and "
            "blocks.N.modulation_ref for every block). Re-download second_stage_adaln.pt."
        )
    n_blocks = 1 + max(int(k.split(".")[1]) for k in wan if k.startswith("blocks.")) if any(k.startswith("blocks.") for k in wan) else 0
    missing = [i for i in range(n_blocks) if i not in mod_ref]
    if missing or len(mod_ref) != n_blocks:
        raise ValueError(f"The Concat-ID AdaLN file lacks blocks.N.modulation_ref for blocks {missing}; re-download it.")
    w, b = sd[_PROJ_REF[0]], sd[_PROJ_REF[1]]
    dim = w.shape[1]
    if w.shape != (6 * dim, dim) or b.shape != (6 * dim,):
        raise ValueError(f"time_projection_ref.1 has shapes {tuple(w.shape)}/{tuple(b.shape)}, expected ({6 * dim}, {dim})/({6 * dim},).")
    mods = []
    for i in range(n_blocks):
        m = mod_ref[i]
        if tuple(m.shape) != (1, 6, dim):
            raise ValueError(f"blocks.{i}.modulation_ref has shape {tuple(m.shape)}, expected (1, 6, {dim}).")
        mods.append(m.float())
    return wan, ConcatIdAdaLNWeights(w.float(), b.float(), mods)


def load_concat_id(path, model_options=None):
    """Loads a Concat-ID Wan file → (MODEL ModelPatcher, ConcatIdWeights)."""
    from .model_folders import display_path
    from .safe_files import load_state_dict, require_state_dict

    what = "Concat-ID Wan Loader: concat_id_name"
    fix = "Use Concat-ID's first_stage.pt or second_stage_adaln.pt (HF yongzhong/Concat-ID-Wan)."
    sd = require_state_dict(load_state_dict(path, what, fix), path, what, fix)
    for key in ("state_dict", "module"):  # training wrappers around the state dict
        if isinstance(sd.get(key), dict) and len(sd) <= 4:
            sd = sd[key]
    wan, adaln = split_concat_id_state_dict(sd)
    if "head.modulation" not in wan or "patch_embedding.weight" not in wan:
        raise ValueError(
            f"{what}: '{display_path(path)}' is not a Wan 2.1 state dict (no head.modulation / patch_embedding.weight); "
            "it is a different model. " + fix
        )
    model = comfy.sd.load_diffusion_model_state_dict(wan, model_options=model_options or {})
    if model is None:
        raise RuntimeError(f"{what}: ComfyUI could not detect the Wan model in '{display_path(path)}'.")
    variant = "adaln" if adaln is not None else "first_stage"
    return model, ConcatIdWeights(variant, adaln, source=display_path(path))
