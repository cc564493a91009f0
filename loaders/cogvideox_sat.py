"""CogVideoX SAT checkpoints (Concat-ID's single-identity / two-identities models) -> the diffusers
CogVideoXTransformer3DModel layout used by the pack's native CogVideoX MODEL.

SAT layout (keys under ``model.diffusion_model.``; a DeepSpeed ``mp_rank_00_model_states.pt`` keeps
the state dict under ``module``), and where each goes:

====================================================  =================================================
SAT                                                   diffusers
====================================================  =================================================
mixins.patch_embed.proj / .text_proj                  patch_embed.proj / patch_embed.text_proj
time_embed.0 / time_embed.2                           time_embedding.linear_1 / linear_2
transformer.layers.N.input_layernorm                  transformer_blocks.N.norm1.norm
transformer.layers.N.attention.query_key_value        ...attn1.to_q / to_k / to_v (thirds along dim 0)
transformer.layers.N.attention.dense                  ...attn1.to_out.0
transformer.layers.N.post_attention_layernorm         ...norm2.norm
transformer.layers.N.mlp.dense_h_to_4h / dense_4h_to_h ...ff.net.0.proj / ff.net.2
mixins.adaln_layer.adaLN_modulations.N.1              ...norm1.linear + norm2.linear: 12 chunks of the
                                                      output (image shift/scale/gate msa, mlp, then the
                                                      text ones); norm1 = chunks 0-2 + 6-8, norm2 = 3-5 + 9-11
mixins.adaln_layer.query_layernorm_list.N             ...attn1.norm_q  (key_layernorm_list -> norm_k)
transformer.final_layernorm                           norm_final
mixins.final_layer.norm_final / .linear               norm_out.norm / proj_out
mixins.final_layer.adaLN_modulation.1                 norm_out.linear
====================================================  =================================================

mixins.pos_embed.pos_embedding (learned, 5B-I2V)       patch_embed.pos_embedding (as THUDM's converter)

Dropped on purpose (no weights in diffusers): RoPE tables (``freqs_sin``/``freqs_cos``), the unused
``transformer.position_embeddings``, token embeddings. Both the dropped keys and anything else that did not map
are reported by name (log and key report), never silently.
"""

import logging
import os
import re

import torch

log = logging.getLogger(__name__)

SAT_PREFIX = "model.diffusion_model."
_DIRECT = (
    ("mixins.patch_embed.proj.", "patch_embed.proj."),
    ("mixins.patch_embed.text_proj.", "patch_embed.text_proj."),
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("transformer.final_layernorm.", "norm_final."),
    ("mixins.final_layer.norm_final.", "norm_out.norm."),
    ("mixins.final_layer.linear.", "proj_out."),
    ("mixins.final_layer.adaLN_modulation.1.", "norm_out.linear."),
)
_LAYER = {
    "input_layernorm": "norm1.norm",
    "attention.dense": "attn1.to_out.0",
    "post_attention_layernorm": "norm2.norm",
    "mlp.dense_h_to_4h": "ff.net.0.proj",
    "mlp.dense_4h_to_h": "ff.net.2",
}
_EXACT = {"mixins.pos_embed.pos_embedding": "patch_embed.pos_embedding"}
_DROPPED = ("freqs_sin", "freqs_cos", "transformer.position_embeddings", "embed_tokens", "word_embeddings")
_RE_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_RE_ADALN = re.compile(r"^mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)$")
_RE_QKNORM = re.compile(r"^mixins\.adaln_layer\.(query|key)_layernorm_list\.(\d+)\.(weight|bias)$")


class SatMapping:
    """Result of map_sat_to_diffusers: the diffusers state dict, the keys that did not map and the
    keys dropped on purpose."""

    def __init__(self, state_dict, unmapped, dropped):
        self.state_dict = state_dict
        self.unmapped = unmapped
        self.dropped = dropped

    def report(self):
        lines = [f"mapped {len(self.state_dict)} diffusers tensors"]
        lines.append(f"dropped on purpose ({len(self.dropped)}): " + (", ".join(self.dropped) or "none"))
        lines.append(f"did not map ({len(self.unmapped)}): " + (", ".join(self.unmapped) or "none"))
        return "\n".join(lines)


def unwrap_checkpoint(obj, name="This file"):
    """The state dict inside a SAT / DeepSpeed checkpoint dict ('module', 'model' or 'state_dict')."""
    for key in ("module", "model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{name} does not hold a CogVideoX SAT state dict (expected tensors under 'module'): pick "
                         "Concat-ID's mp_rank_00_model_states.pt or its .safetensors re-save.")
    return obj


def map_sat_to_diffusers(sat_sd):
    """SAT CogVideoX keys -> diffusers CogVideoXTransformer3DModel keys (see module doc)."""
    out, unmapped, dropped = {}, [], []
    for full, v in sat_sd.items():
        if not full.startswith(SAT_PREFIX):
            unmapped.append(full)
            continue
        k = full[len(SAT_PREFIX):]
        if k in _EXACT:
            out[_EXACT[k]] = v
            continue
        done = False
        for src, dst in _DIRECT:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                done = True
                break
        if done:
            continue
        m = _RE_LAYER.match(k)
        if m:
            n, mod, p = m.groups()
            base = f"transformer_blocks.{n}."
            if mod == "attention.query_key_value":
                q, kk, vv = v.chunk(3, dim=0)
                out[base + f"attn1.to_q.{p}"] = q.contiguous()
                out[base + f"attn1.to_k.{p}"] = kk.contiguous()
                out[base + f"attn1.to_v.{p}"] = vv.contiguous()
                continue
            if mod in _LAYER:
                out[base + f"{_LAYER[mod]}.{p}"] = v
                continue
        m = _RE_ADALN.match(k)
        if m:
            n, p = m.groups()
            c = v.chunk(12, dim=0)
            out[f"transformer_blocks.{n}.norm1.linear.{p}"] = torch.cat(c[0:3] + c[6:9], 0)
            out[f"transformer_blocks.{n}.norm2.linear.{p}"] = torch.cat(c[3:6] + c[9:12], 0)
            continue
        m = _RE_QKNORM.match(k)
        if m:
            which, n, p = m.groups()
            out[f"transformer_blocks.{n}.attn1.norm_{'q' if which == 'query' else 'k'}.{p}"] = v
            continue
        if any(d in k for d in _DROPPED):
            dropped.append(full)
            continue
        unmapped.append(full)
    return SatMapping(out, sorted(unmapped), sorted(dropped))


def read_sat_checkpoint(path):
    """State dict of a SAT checkpoint: a .pt (torch.load with weights_only=True; the numpy RNG state SAT saves
    next to the weights is read through an allow-list of exactly numpy's RNG-state types), a .safetensors
    file, or a SAT folder (``latest`` names the iteration folder holding mp_rank_00_model_states.pt)."""
    from .model_folders import check_name, display_path
    from .safe_files import load_state_dict

    what = "Concat-ID CogVideoX checkpoint"
    if os.path.isdir(path):
        latest = os.path.join(path, "latest")
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as f:
                path = os.path.join(path, check_name(f.read().strip(), f"{what} ('latest' file)"))
        cand = os.path.join(path, "mp_rank_00_model_states.pt")
        if not os.path.isfile(cand):
            raise ValueError(f"'{display_path(path)}' is not a SAT checkpoint folder (no 'latest' file / "
                             "mp_rank_00_model_states.pt).")
        path = cand
    obj = load_state_dict(path, what, "Use Concat-ID's mp_rank_00_model_states.pt or its 'module' state dict "
                          "re-saved as .safetensors.", allow_numpy_rng=True)
    return unwrap_checkpoint(obj, f"'{display_path(path)}'")


def load_sat_transformer(path, weight_dtype="default"):
    """(ModelPatcher, SatMapping) for a CogVideoX SAT checkpoint; the diffusers config is inferred from the
    shapes (CogVideoX-5B: 480x720 base grid) or read from a ``<name>.json`` next to the file."""
    import json

    from .cogvideox import WEIGHT_DTYPES, build_model_patcher, infer_transformer_config

    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got '{weight_dtype}'.")
    mapping = map_sat_to_diffusers(read_sat_checkpoint(path))
    sd = dict(mapping.state_dict)
    if "patch_embed.proj.weight" not in sd:
        from .model_folders import display_path

        raise ValueError(f"'{display_path(path)}' has no 'model.diffusion_model.mixins.patch_embed.proj.weight': it is not a CogVideoX "
                         "SAT transformer checkpoint.")
    side = os.path.splitext(path.rstrip("/\\"))[0] + ".json"
    if os.path.isfile(side):
        with open(side, encoding="utf-8") as f:
            cfg = json.load(f)
    else:
        cfg = infer_transformer_config(sd)
    if mapping.unmapped:
        log.warning("CogVideoX SAT loader: %d keys did not map: %s", len(mapping.unmapped),
                    ", ".join(mapping.unmapped[:20]))
    if mapping.dropped:
        log.info("CogVideoX SAT loader: dropped on purpose (no diffusers weight): %s", ", ".join(mapping.dropped[:20]))
    mp = build_model_patcher(cfg, sd, WEIGHT_DTYPES[weight_dtype], source=path)
    extras = mp.model.likeness_extras
    if extras is not None:
        extras.extra_config["sat_unmapped_keys"] = list(mapping.unmapped)
        extras.extra_config["sat_dropped_keys"] = list(mapping.dropped)
    return mp, mapping
