"""CogVideoX files -> ComfyUI objects.

- Transformer: a diffusers-format folder (config.json + diffusion_pytorch_model*.safetensors, sharded
  or not; a pipeline folder with a transformer/ subfolder works too) or a single diffusers-format
  .safetensors file (config inferred from the weight shapes) -> ModelPatcher around
  adapters.cogvideox.CogVideoXModel. FantasyID's transformer folder loads the same way; its face
  modules (face_abstractor.*, vertex_spiral_net.*, vertex_reducer.*, layer_attention.*) are set
  aside in ``CogVideoXExtras`` (``model.model.likeness_extras``) for the FantasyID nodes.
- VAE: diffusers AutoencoderKLCogVideoX (folder or single file) -> a comfy.sd.VAE subclass, so the
  stock VAEEncode / VAEDecode / VAEDecodeTiled nodes work.
- LoRA: diffusers/PEFT-format (or ComfyUI-format) LoRA -> weight patches on a clone.
"""

import glob
import json
import logging
import math
import os
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

FACE_MODULE_PREFIXES = ("face_abstractor.", "vertex_spiral_net.", "vertex_reducer.", "layer_attention.")
_STRIP_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

WEIGHT_DTYPES = {
    "default": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@dataclass
class CogVideoXExtras:
    """What the loader kept aside, for later nodes (FantasyID reads face_state_dict)."""
    source: str
    face_state_dict: dict = field(default_factory=dict)
    set_aside_prefixes: tuple = ()
    extra_config: dict = field(default_factory=dict)

    def summary(self):
        if not self.face_state_dict:
            return "no extra modules"
        counts = {p.rstrip("."): 0 for p in FACE_MODULE_PREFIXES}
        for k in self.face_state_dict:
            for p in FACE_MODULE_PREFIXES:
                if k.startswith(p):
                    counts[p.rstrip(".")] += 1
        return ", ".join(f"{k}: {v} tensors" for k, v in counts.items() if v)


# ---------------------------------------------------------------- files

def _load_safetensors(path):
    import comfy.utils

    return comfy.utils.load_torch_file(path, safe_load=True)


def _resolve_transformer_dir(path):
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    for sub in ("transformer", "transformer_ema"):
        cand = os.path.join(path, sub)
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    raise ValueError(f"'{path}' is not a diffusers CogVideoX transformer folder: it has no config.json "
                     "(nor transformer/config.json). Point the loader at the folder that holds config.json and "
                     "diffusion_pytorch_model*.safetensors.")


def _load_folder_weights(folder):
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        bins = sorted(glob.glob(os.path.join(folder, "*.bin")))
        if bins:
            raise ValueError(f"'{folder}' holds only .bin weights; convert them to .safetensors "
                             "(pickled .bin files are not loaded, for safety).")
        raise ValueError(f"'{folder}' has no .safetensors weights.")
    sd = {}
    for f in files:
        sd.update(_load_safetensors(f))
    return sd


def _strip_prefix(sd):
    for p in _STRIP_PREFIXES:
        if sd and all(k.startswith(p) for k in sd if not k.startswith(FACE_MODULE_PREFIXES)) \
                and any(k.startswith(p) for k in sd):
            return {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
    return sd


def infer_transformer_config(sd):
    """A diffusers CogVideoXTransformer3DModel config from the weight shapes of a single file."""
    if "patch_embed.proj.weight" not in sd or "proj_out.weight" not in sd:
        raise ValueError("This file is not a diffusers-format CogVideoX transformer (no patch_embed.proj.weight / "
                         "proj_out.weight). Use the diffusers transformer folder or a file saved from it; SAT "
                         "checkpoints need converting first.")
    proj = sd["patch_embed.proj.weight"]
    inner = proj.shape[0]
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    head_dim = sd["transformer_blocks.0.attn1.norm_q.weight"].shape[0]
    cfg = {
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "num_layers": layers,
        "time_embed_dim": sd["time_embedding.linear_1.weight"].shape[0],
        "text_embed_dim": sd["patch_embed.text_proj.weight"].shape[1],
        "attention_bias": "transformer_blocks.0.attn1.to_q.bias" in sd,
        "patch_bias": "patch_embed.proj.bias" in sd,
    }
    if proj.ndim == 4:  # CogVideoX 1.0: Conv2d patchify
        p = proj.shape[-1]
        cfg.update(patch_size=p, in_channels=proj.shape[1], patch_size_t=None)
        cfg["out_channels"] = sd["proj_out.weight"].shape[0] // (p * p)
    else:  # CogVideoX 1.5: Linear over (C, p_t, p, p)
        p, p_t = 2, 2
        cfg.update(patch_size=p, patch_size_t=p_t, in_channels=proj.shape[1] // (p * p * p_t))
        cfg["out_channels"] = sd["proj_out.weight"].shape[0] // (p * p * p_t)
        cfg.update(sample_height=96, sample_width=170, sample_frames=81)
    if "ofs_embedding.linear_1.weight" in sd:
        cfg["ofs_embed_dim"] = sd["ofs_embedding.linear_1.weight"].shape[1]
    # CogVideoX-2B (inner dim 1920) is the released model without RoPE.
    cfg["use_rotary_positional_embeddings"] = inner != 1920
    cfg["use_learned_positional_embeddings"] = "patch_embed.pos_embedding" in sd
    return cfg


def read_transformer(path):
    """(diffusers config, state dict, source description) from a folder or single file."""
    if os.path.isdir(path):
        folder = _resolve_transformer_dir(path)
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        return cfg, _strip_prefix(_load_folder_weights(folder)), folder
    if not os.path.isfile(path):
        raise ValueError(f"CogVideoX transformer '{path}' does not exist.")
    if not path.endswith((".safetensors", ".sft")):
        raise ValueError(f"'{path}': only .safetensors single files are loaded (safe loading).")
    sd = _strip_prefix(_load_safetensors(path))
    side_cfg = os.path.splitext(path)[0] + ".json"
    if os.path.isfile(side_cfg):
        with open(side_cfg, encoding="utf-8") as f:
            cfg = json.load(f)
    else:
        cfg = infer_transformer_config({k: v for k, v in sd.items() if not k.startswith(FACE_MODULE_PREFIXES)})
    return cfg, sd, path


# ---------------------------------------------------------------- transformer

def build_model_patcher(cfg, sd, weight_dtype=None, source="", load_device=None, offload_device=None):
    """Native MODEL (ModelPatcher) from a diffusers config + state dict. Face-module keys are kept aside."""
    import comfy.model_management as mm
    import comfy.model_patcher

    from ..adapters.cogvideox import CogVideoXModelConfig, transformer_init_args

    init_cfg, extra_cfg = transformer_init_args(cfg)
    face_sd = {k: sd.pop(k) for k in [k for k in sd if k.startswith(FACE_MODULE_PREFIXES)]}
    extras = CogVideoXExtras(source=source, face_state_dict=face_sd,
                             set_aside_prefixes=tuple(p for p in FACE_MODULE_PREFIXES if any(k.startswith(p) for k in face_sd)),
                             extra_config=extra_cfg)
    if face_sd:
        log.info("CogVideoX loader: set aside FantasyID face modules (%s)", extras.summary())

    model_config = CogVideoXModelConfig(init_cfg)
    load_device = load_device or mm.get_torch_device()
    offload_device = offload_device or mm.unet_offload_device()
    params = sum(v.numel() for v in sd.values())
    if weight_dtype is None:
        first = next((v.dtype for k, v in sd.items() if k.endswith(".weight") and v.is_floating_point()), None)
        unet_dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(model_config.supported_inference_dtypes),
                                   weight_dtype=first)
    else:
        unet_dtype = weight_dtype
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast)

    model = model_config.get_model(sd, "", device=offload_device)
    dm = model.diffusion_model
    expected = set(dm.state_dict().keys())
    missing = sorted(expected - set(sd.keys()))
    unexpected = sorted(set(sd.keys()) - expected)
    if missing:
        raise ValueError("The CogVideoX weights do not match the config: {} missing keys (e.g. {}). Is config.json from "
                         "the same model?".format(len(missing), ", ".join(missing[:4])))
    for k in expected:
        if tuple(sd[k].shape) != tuple(dm.state_dict()[k].shape):
            raise ValueError(f"CogVideoX weight '{k}' has shape {tuple(sd[k].shape)}, the config expects "
                             f"{tuple(dm.state_dict()[k].shape)}: config.json and weights are from different models.")
    if unexpected:
        log.warning("CogVideoX loader: ignoring %d unknown keys (e.g. %s)", len(unexpected), ", ".join(unexpected[:4]))
        extras.extra_config.setdefault("ignored_keys", unexpected)
    dm.load_state_dict({k: sd[k] for k in expected}, strict=True)
    model.likeness_extras = extras
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    return patcher


def load_transformer(path, weight_dtype="default"):
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got '{weight_dtype}'.")
    cfg, sd, source = read_transformer(path)
    return build_model_patcher(cfg, sd, WEIGHT_DTYPES[weight_dtype], source=source)


def get_extras(model):
    """CogVideoXExtras of a MODEL loaded by this loader (None for other models)."""
    return getattr(getattr(model, "model", None), "likeness_extras", None)


# ---------------------------------------------------------------- VAE

def _vae_module_class():
    class CogVideoXVAEModule(torch.nn.Module):
        """first_stage_model for comfy.sd.VAE: encode -> posterior mode, decode -> pixels in -1..1."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def encode(self, x):
            return self.vae.encode(x).latent_dist.mode()

        def decode(self, z, **_):
            return self.vae.decode(z).sample

    return CogVideoXVAEModule


def _pixels_to_unit_range(image):
    """-1..1 -> 0..1 in place, as newer ComfyUI expects (its decode fills a preallocated buffer and ignores the
    return value). An inference tensor outside inference mode cannot be edited in place (0.3.75's tiled decode
    hands one over and uses the return value), so it gets a new tensor."""
    if image.is_inference() and not torch.is_inference_mode_enabled():
        return ((image + 1.0) / 2.0).clamp_(0.0, 1.0)
    return image.add_(1.0).div_(2.0).clamp_(0.0, 1.0)


class _DropNoWeightsWarning(logging.Filter):
    def filter(self, record):
        return "No VAE weights detected" not in record.getMessage()


def make_vae(diffusers_vae, device=None, dtype=None):
    """A comfy.sd.VAE around a diffusers AutoencoderKLCogVideoX (raw latents, 4x time / 8x space).

    comfy.sd.VAE's own __init__ runs first (with no weights, so it builds no model of its own): every attribute
    this ComfyUI's encode/decode read gets its own default, whatever version; then the CogVideoX specifics."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    class CogVideoXVAE(comfy.sd.VAE):
        def __init__(self, module, device=None, dtype=None):
            quiet = _DropNoWeightsWarning()
            root = logging.getLogger()
            root.addFilter(quiet)
            try:
                super().__init__(sd={}, device=device, dtype=dtype)
            finally:
                root.removeFilter(quiet)
            self.memory_used_encode = lambda shape, dt: (1400 * max(shape[2], 2) * shape[3] * shape[4]) * mm.dtype_size(dt)
            self.memory_used_decode = lambda shape, dt: (2000 * shape[2] * shape[3] * shape[4] * (4 * 8 * 8)) * mm.dtype_size(dt)
            self.upscale_ratio = (lambda a: max(0, a * 4 - 3), 8, 8)
            self.upscale_index_formula = (4, 8, 8)
            self.downscale_ratio = (lambda a: max(0, math.floor((a + 3) / 4)), 8, 8)
            self.downscale_index_formula = (4, 8, 8)
            self.latent_channels = module.vae.config.latent_channels
            self.latent_dim = 3
            self.output_channels = 3
            self.process_input = lambda image: image * 2.0 - 1.0
            self.process_output = _pixels_to_unit_range
            self.working_dtypes = [torch.bfloat16, torch.float16, torch.float32]
            self.first_stage_model = module.eval()
            self.device = device if device is not None else mm.vae_device()
            self.vae_dtype = dtype if dtype is not None else mm.vae_dtype(self.device, self.working_dtypes)
            self.first_stage_model.to(self.vae_dtype)
            self.output_device = mm.intermediate_device()
            # a plain ModelPatcher: diffusers modules are not built from comfy.ops, so no dynamic loading
            self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                            offload_device=mm.vae_offload_device())
            self.size = None
            self.model_size()

    return CogVideoXVAE(_vae_module_class()(diffusers_vae), device=device, dtype=dtype)


def load_vae(path, dtype=None, diffusers_tiling=False):
    from diffusers import AutoencoderKLCogVideoX

    if os.path.isdir(path):
        folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "vae")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"'{path}' is not a diffusers CogVideoX VAE folder (no config.json).")
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        sd = _load_folder_weights(folder)
    else:
        if not path.endswith((".safetensors", ".sft")):
            raise ValueError(f"'{path}': only .safetensors VAE files are loaded (safe loading).")
        sd = _load_safetensors(path)
        side = os.path.splitext(path)[0] + ".json"
        cfg = {}
        if os.path.isfile(side):
            with open(side, encoding="utf-8") as f:
                cfg = json.load(f)
        if "decoder.conv_in.conv.weight" not in sd or "encoder.conv_in.conv.weight" not in sd:
            raise ValueError(f"'{path}' is not a diffusers-format CogVideoX VAE (no encoder/decoder conv_in.conv keys).")
    import inspect

    accepted = inspect.signature(AutoencoderKLCogVideoX.__init__).parameters
    vae = AutoencoderKLCogVideoX(**{k: v for k, v in cfg.items() if k in accepted})
    missing, unexpected = vae.load_state_dict(sd, strict=False)
    if missing:
        raise ValueError("The CogVideoX VAE weights do not match its config ({} missing keys, e.g. {}).".format(
            len(missing), ", ".join(missing[:3])))
    if diffusers_tiling:
        vae.enable_tiling()
    return make_vae(vae, dtype=dtype)


# ---------------------------------------------------------------- LoRA

def apply_lora(model, lora_sd, strength):
    """Clone of `model` with a diffusers/PEFT (or ComfyUI/kohya) LoRA applied; returns (clone, n_patched)."""
    import comfy.lora

    from ..adapters.cogvideox import lora_key_map

    key_map = lora_key_map(model)
    patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=True)
    if not patches:
        raise ValueError("No key of this LoRA matches the CogVideoX transformer: is it a CogVideoX LoRA (keys like "
                         "'transformer.transformer_blocks.0.attn1.to_q.lora_A.weight')?")
    m = model.clone()
    done = m.add_patches(patches, strength)
    return m, len(done)
