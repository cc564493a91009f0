"""StableAnimator files -> objects: Animation/unet.pth (a full SVD UNet in diffusers key names plus the ID
adapter's ``attn2.processor.id_to_k/id_to_v``) mapped onto ComfyUI's native SVD layout; face_encoder.pth;
pose_net.pth. Safe loading only (comfy.utils.load_torch_file: safetensors or torch.load(weights_only=True))."""

import logging
import os
import re
from dataclasses import dataclass, field

import torch

from ..likeness_blocks.stableanimator import FaceEncoder, PoseNet

log = logging.getLogger("likeness.stableanimator")

_ID_KEY = re.compile(r"^(.*)\.attn2\.processor\.(id_to_k|id_to_v)\.weight$")


@dataclass
class StableAnimatorWeights:
    """What Load StableAnimator hands to the other StableAnimator nodes (STABLEANIMATOR socket)."""

    id_weights: dict  # ComfyUI path of a spatial BasicTransformerBlock -> (id_to_k, id_to_v) weights
    face_encoder: FaceEncoder
    pose_net: PoseNet
    report: str = ""
    unmapped: list = field(default_factory=list)
    missing: list = field(default_factory=list)


def load_file(path, what):
    from .safe_files import load_state_dict, require_state_dict

    what = f"StableAnimator {what}"
    fix = ("Use the released .pth from FrancisRing/StableAnimator (Animation/) or a .safetensors conversion of it.")
    if not os.path.isfile(path):
        from .model_folders import display_path

        raise FileNotFoundError(f"{what}: file not found: {display_path(path)}")
    return require_state_dict(load_state_dict(path, what, fix), path, what, fix)


# --------------------------------------------------------------------------------------------- UNet keys


def diffusers_svd_key_map(unet_config):
    """{diffusers key (UNetSpatioTemporalConditionModel): ComfyUI key (openaimodel UNetModel, SVD)}.
    Built on ComfyUI's own image-UNet map (comfy.utils.unet_to_diffusers) with the video parts added:
    resnets.N.{spatial_res_block,temporal_res_block,time_mixer} and attentions.N.{temporal_transformer_blocks,
    time_pos_embed.linear_1/2, time_mixer}."""
    import comfy.utils

    base = comfy.utils.unet_to_diffusers(unet_config)
    resnet_suffix = {v: k for k, v in comfy.utils.UNET_MAP_RESNET.items()}  # diffusers -> comfy suffix
    out = {}
    res_prefixes = {}
    attn_prefixes = {}
    for dk, ck in base.items():
        m = re.match(r"^((?:down_blocks|up_blocks)\.\d+\.resnets\.\d+|mid_block\.resnets\.\d+)\.(.+)$", dk)
        if m and m.group(2) in resnet_suffix:
            cpre = ck[: -len(resnet_suffix[m.group(2)])]
            res_prefixes[m.group(1)] = cpre
            out[f"{m.group(1)}.spatial_res_block.{m.group(2)}"] = ck
            if m.group(2) != "conv_shortcut.weight" and m.group(2) != "conv_shortcut.bias":
                out[f"{m.group(1)}.temporal_res_block.{m.group(2)}"] = f"{cpre}time_stack.{resnet_suffix[m.group(2)]}"
            continue
        m = re.match(r"^((?:down_blocks|up_blocks|mid_block)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)\."
                     r"(norm\.weight)$", dk)
        if m:
            attn_prefixes[m.group(1)] = ck[: -len("norm.weight")]
        out[dk] = ck
    for dpre, cpre in res_prefixes.items():
        out[f"{dpre}.time_mixer.mix_factor"] = f"{cpre}time_mixer.mix_factor"
    for dpre, cpre in attn_prefixes.items():
        out[f"{dpre}.time_mixer.mix_factor"] = f"{cpre}time_mixer.mix_factor"
        for i, j in ((1, 0), (2, 2)):
            for w in ("weight", "bias"):
                out[f"{dpre}.time_pos_embed.linear_{i}.{w}"] = f"{cpre}time_pos_embed.{j}.{w}"
    return out, attn_prefixes


def _temporal_block_key(dk, attn_prefixes):
    for dpre, cpre in attn_prefixes.items():
        head = f"{dpre}.temporal_transformer_blocks."
        if dk.startswith(head):
            rest = dk[len(head):]
            return f"{cpre}time_stack.{rest}"
    return None


def convert_unet(sd, unet_config):
    """diffusers-layout state dict -> (ComfyUI-layout state dict, id weights {comfy block path: (k, v)},
    unmapped diffusers keys)."""
    key_map, attn_prefixes = diffusers_svd_key_map(unet_config)
    comfy_sd, id_parts, unmapped = {}, {}, []
    for dk, t in sd.items():
        m = _ID_KEY.match(dk)
        if m:
            block = key_map.get(f"{m.group(1)}.norm1.weight")
            if block is None:
                unmapped.append(dk)
                continue
            id_parts.setdefault(block[: -len(".norm1.weight")], {})[m.group(2)] = t
            continue
        ck = key_map.get(dk) or _temporal_block_key(dk, attn_prefixes)
        if ck is None:
            unmapped.append(dk)
            continue
        comfy_sd[ck] = t
    id_weights = {}
    for path, kv in id_parts.items():
        if set(kv) != {"id_to_k", "id_to_v"}:
            raise ValueError(f"StableAnimator unet: {path} has only {sorted(kv)} of id_to_k/id_to_v.")
        id_weights[path] = (kv["id_to_k"], kv["id_to_v"])
    return comfy_sd, id_weights, unmapped


def apply_unet(model, sd, dtype=None):
    """A clone of the native SVD MODEL with the StableAnimator UNet weights set (weight patches of type "set"),
    plus the id weights and a report. Raises on a file that is not a StableAnimator/SVD diffusers UNet."""
    if "conv_in.weight" not in sd or not any(k.startswith("down_blocks.") for k in sd):
        raise ValueError("StableAnimator unet: this file is not a UNet in diffusers key names (no conv_in.weight / "
                         "down_blocks.*). Pick Animation/unet.pth from FrancisRing/StableAnimator.")
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    if not unet_config or not unet_config.get("use_temporal_attention"):
        raise ValueError("Load StableAnimator needs a native SVD MODEL (ImageOnlyCheckpointLoader with svd_xt).")
    comfy_sd, id_weights, unmapped = convert_unet(sd, unet_config)
    if not id_weights:
        raise ValueError("StableAnimator unet: no attn2.processor.id_to_k/id_to_v weights in this file; it is a plain "
                         "SVD UNet, not StableAnimator's Animation/unet.pth.")
    target = model.model.diffusion_model.state_dict()
    bad = [(k, tuple(t.shape), tuple(target[k].shape)) for k, t in comfy_sd.items() if k in target and
           t.shape != target[k].shape]
    if bad:
        k, got, want = bad[0]
        raise ValueError(f"StableAnimator unet: {len(bad)} weights do not fit this MODEL (e.g. {k}: file {got}, "
                         f"model {want}). Load the SVD-xt checkpoint StableAnimator was trained on.")
    extra = sorted(k for k in comfy_sd if k not in target)
    missing = sorted(k for k in target if k not in comfy_sd)
    unmapped = sorted(unmapped) + extra
    m = model.clone()
    patches = {f"diffusion_model.{k}": ("set", (t.to(dtype) if dtype is not None else t,))
               for k, t in comfy_sd.items() if k in target}
    m.add_patches(patches, 1.0, 1.0)
    lines = [f"StableAnimator unet: {len(patches)} of {len(target)} UNet weights set, "
             f"{len(id_weights)} ID adapter layers (id_to_k/id_to_v)."]
    if missing:
        lines.append(f"{len(missing)} MODEL weights not in the file (kept from the base): " + ", ".join(missing[:20]))
    if unmapped:
        lines.append(f"{len(unmapped)} file keys did not map: " + ", ".join(unmapped[:20]))
    report = "\n".join(lines)
    if missing or unmapped:
        log.warning(report)
    return m, id_weights, report, unmapped, missing


# --------------------------------------------------------------------------------------------- face / pose


def build_face_encoder(sd):
    need = ("proj.0.weight", "proj.2.weight", "norm.weight", "fusion_model.proj_in.weight")
    if not all(k in sd for k in need):
        raise ValueError("StableAnimator face encoder: this file is not face_encoder.pth (no proj.0 / norm / "
                         "fusion_model.* weights). Pick Animation/face_encoder.pth.")
    id_dim = sd["proj.0.weight"].shape[1]
    dim = sd["norm.weight"].shape[0]
    tokens = sd["proj.2.weight"].shape[0] // dim
    clip_dim = sd["fusion_model.proj_in.weight"].shape[1]
    depth = len({k.split(".")[2] for k in sd if k.startswith("fusion_model.layers.")})
    inner = sd["fusion_model.layers.0.0.to_q.weight"].shape[0]
    ff_mult = sd["fusion_model.layers.0.1.1.weight"].shape[0] / dim
    dim_head = 64
    if inner % dim_head:
        raise ValueError(f"StableAnimator face encoder: attention width {inner} is not a multiple of 64.")
    enc = FaceEncoder(cross_attention_dim=dim, id_embeddings_dim=id_dim, clip_embeddings_dim=clip_dim,
                      num_tokens=tokens, depth=depth, dim_head=dim_head, heads=inner // dim_head, ff_mult=ff_mult)
    _strict_load(enc, sd, "face encoder")
    return enc.eval()


def build_pose_net(sd):
    if "final_proj.weight" not in sd or "conv_layers.0.weight" not in sd or "scale" not in sd:
        raise ValueError("StableAnimator PoseNet: this file is not pose_net.pth (no conv_layers / final_proj / scale). "
                         "Pick Animation/pose_net.pth.")
    net = PoseNet(noise_latent_channels=sd["final_proj.weight"].shape[0])
    _strict_load(net, sd, "PoseNet")
    return net.eval()


def _strict_load(module, sd, what):
    sd = {k: v.float() for k, v in sd.items()}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"StableAnimator {what}: the file does not match the released layout "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}).")
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"StableAnimator {what}: weight shapes do not match the released layout ({exc}).") from exc


def load_stableanimator(model, unet_path, face_encoder_path, pose_net_path):
    """-> (patched MODEL clone, StableAnimatorWeights)."""
    import comfy.model_management

    dtype = model.model.get_dtype() if hasattr(model.model, "get_dtype") else None
    unet_sd = load_file(unet_path, "unet")
    m, id_weights, report, unmapped, missing = apply_unet(model, unet_sd, dtype=dtype)
    del unet_sd
    face = build_face_encoder(load_file(face_encoder_path, "face encoder"))
    pose = build_pose_net(load_file(pose_net_path, "PoseNet"))
    comfy.model_management.soft_empty_cache()
    return m, StableAnimatorWeights(id_weights=id_weights, face_encoder=face, pose_net=pose, report=report,
                                    unmapped=unmapped, missing=missing)
