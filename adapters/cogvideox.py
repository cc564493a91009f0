"""CogVideoX (T2V and I2V) as a native ComfyUI model, built on diffusers' CogVideoXTransformer3DModel.

What ComfyUI sees:
- ``CogVideoXModelConfig`` (a ``supported_models_base.BASE``) and ``CogVideoXModel`` (a
  ``model_base.BaseModel``): v-prediction on CogVideoX's discrete schedule (scaled-linear betas
  0.00085 -> 0.012 over 1000 steps, the SNR shift of the variant, rescaled to zero terminal SNR).
  KSampler's ``ddim``/``euler`` sampler with the ``simple`` scheduler walks exactly the timesteps of
  diffusers' ``CogVideoXDDIMScheduler`` with ``timestep_spacing="trailing"`` (the released configs)
  whenever the step count divides 1000 (the default 50 does).
- The network is the diffusers transformer itself (subclassed only to take ComfyUI's call
  signature); its Linear/LayerNorm/Conv2d layers are swapped for ComfyUI's ops so that weight dtype
  choices (fp8 storage with manual cast), low-VRAM partial loading and LoRA weight patches work as
  for native models. State-dict keys stay the diffusers keys.
- Latents: ComfyUI layout [B, 16, T, H/8, W/8] (frames on the time axis); the LATENT dict holds raw
  VAE latents, ``process_in`` multiplies by the variant's scaling factor (0.7 for 5B models,
  1.15258426 for 2B), the transformer sees [B, T, C, H, W].
- I2V (in_channels = 2 x out_channels): the scaled first-frame image latent followed by zero frames
  is concatenated on channels (``concat_latent_image`` in the conditioning, set by the pack's
  "CogVideoX I2V Conditioning" node).

ComfyUI 0.3.75 has no native CogVideoX. Newer ComfyUI ships its own implementation with its own
key layout; this one keeps diffusers' layout and modules, so diffusers-format checkpoints, LoRAs and
FantasyID's transformer load unchanged.
"""

import functools
import inspect
import logging
import math

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models_base

log = logging.getLogger(__name__)

# ComfyUI's own zero-SNR rescale (comfy.model_sampling.rescale_zero_terminal_snr_sigmas) keeps the
# last alpha_bar at this value so the largest sigma stays finite; we do the same.
TERMINAL_ALPHA_BAR = 4.8973451890853435e-08

SCALE_FACTOR_2B = 1.15258426
SCALE_FACTOR_5B = 0.7


def variant_facts(cfg):
    """(vae scaling factor, snr_shift_scale) for a diffusers transformer config.
    CogVideoX-2B is the released model without RoPE (scheduler snr_shift_scale 3.0, VAE scaling
    1.15258426); the 5B models (T2V, I2V, 1.5) use RoPE, snr_shift_scale 1.0 and scaling 0.7."""
    if cfg.get("use_rotary_positional_embeddings", False):
        return SCALE_FACTOR_5B, 1.0
    return SCALE_FACTOR_2B, 3.0


def cogvideox_alphas_cumprod(snr_shift_scale=1.0, timesteps=1000, beta_start=0.00085, beta_end=0.012):
    """alpha_bar_t of CogVideoX's training schedule, float64: scaled-linear betas, SNR shift
    alpha_bar / (s + (1 - s) alpha_bar), then zero terminal SNR (sqrt(alpha_bar) shifted so the last
    is 0 and rescaled so the first is unchanged)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    ac = ac / (snr_shift_scale + (1.0 - snr_shift_scale) * ac)
    s = ac.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * (s0 / (s0 - sT))
    return s ** 2


class CogVideoXLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 16
    latent_dimensions = 3

    def __init__(self, scale_factor=SCALE_FACTOR_5B):
        self.scale_factor = scale_factor


def make_model_sampling(snr_shift_scale):
    class ModelSamplingCogVideoX(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    ms = ModelSamplingCogVideoX(None)
    ac = cogvideox_alphas_cumprod(snr_shift_scale).clone()
    ac[-1] = max(float(ac[-1]), TERMINAL_ALPHA_BAR)
    ms.set_sigmas(((1.0 - ac) / ac) ** 0.5)
    ms.snr_shift_scale = snr_shift_scale
    return ms


def grid_crop_region(grid_h, grid_w, base_w, base_h):
    """Where a (grid_h x grid_w) token grid sits inside the base grid the model was trained on,
    keeping its aspect ratio and centred: ((top, left), (bottom, right))."""
    if grid_h / grid_w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rw, rh = base_w, int(round(base_w / grid_w * grid_h))
    top = int(round((base_h - rh) / 2.0))
    left = int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


_OPS_SWAP = ("Linear", "LayerNorm", "Conv2d", "Conv3d")


def _swap_to_comfy_ops(module, operations, device, dtype):
    """Replaces torch.nn Linear/LayerNorm/Conv layers by ComfyUI's ops (same parameter names),
    allocated empty on `device` in `dtype` (weights are loaded right after)."""
    for name, child in list(module.named_children()):
        kind = type(child).__name__
        if kind == "Linear" and type(child) is torch.nn.Linear:
            new = operations.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=device, dtype=dtype)
        elif kind == "LayerNorm" and type(child) is torch.nn.LayerNorm:
            new = operations.LayerNorm(child.normalized_shape, eps=child.eps,
                                       elementwise_affine=child.elementwise_affine,
                                       bias=child.bias is not None if child.elementwise_affine else True,
                                       device=device, dtype=dtype)
        elif kind in ("Conv2d", "Conv3d") and type(child) in (torch.nn.Conv2d, torch.nn.Conv3d):
            cls = operations.Conv2d if kind == "Conv2d" else operations.Conv3d
            new = cls(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                      padding=child.padding, dilation=child.dilation, groups=child.groups,
                      bias=child.bias is not None, padding_mode=child.padding_mode, device=device, dtype=dtype)
        else:
            _swap_to_comfy_ops(child, operations, device, dtype)
            continue
        setattr(module, name, new)


@functools.lru_cache(maxsize=None)
def dit_class():
    """The network class, created on first use so that importing the pack does not import diffusers."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.models.modeling_utils import no_init_weights

    class CogVideoXDiT(CogVideoXTransformer3DModel):
        """diffusers' CogVideoX transformer with ComfyUI's call signature and layout
        (x: [B, C, T, H, W], timestep: [B] in 0..999, context: [B, 226, 4096])."""

        def __init__(self, diffusers_config=None, dtype=None, device=None, operations=None, **_ignored):
            cfg = dict(diffusers_config)
            with torch.device("meta"), no_init_weights():
                super().__init__(**cfg)
            if device is None:
                device = torch.device("cpu")
            if operations is not None:
                _swap_to_comfy_ops(self, operations, device, dtype)
            # whatever is still on the meta device: the positional-embedding buffer (recomputed if
            # it is the fixed sin-cos table, else allocated and loaded from the checkpoint)
            pe = self.patch_embed
            if getattr(pe, "pos_embedding", None) is not None and pe.pos_embedding.is_meta:
                if pe.use_learned_positional_embeddings:
                    buf = torch.empty(pe.pos_embedding.shape, device=device, dtype=dtype or torch.float32)
                else:
                    buf = pe._get_positional_embeddings(pe.sample_height, pe.sample_width, pe.sample_frames).to(device)
                pe.register_buffer("pos_embedding", buf, persistent=pe.use_learned_positional_embeddings)
            for name, p in list(self.named_parameters()) + list(self.named_buffers()):
                if p.is_meta:
                    owner = self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self
                    leaf = name.rsplit(".", 1)[-1]
                    empty = torch.empty(p.shape, device=device, dtype=dtype if p.is_floating_point() and dtype is not None else p.dtype)
                    if isinstance(p, torch.nn.Parameter):
                        owner._parameters[leaf] = torch.nn.Parameter(empty, requires_grad=False)
                    else:
                        owner._buffers[leaf] = empty
            self._rope_cache = {}

        # ---- positional embedding (same facts as diffusers' pipelines) ----
        def rotary_embedding(self, frames, grid_h, grid_w, device):
            if not self.config.use_rotary_positional_embeddings:
                return None
            key = (frames, grid_h, grid_w, str(device))
            hit = self._rope_cache.get(key)
            if hit is not None:
                return hit
            p = self.config.patch_size
            p_t = self.config.patch_size_t
            base_w = self.config.sample_width // p
            base_h = self.config.sample_height // p
            if p_t is None:
                freqs = get_3d_rotary_pos_embed(
                    embed_dim=self.config.attention_head_dim,
                    crops_coords=grid_crop_region(grid_h, grid_w, base_w, base_h),
                    grid_size=(grid_h, grid_w), temporal_size=frames, device=device)
            else:
                freqs = get_3d_rotary_pos_embed(
                    embed_dim=self.config.attention_head_dim, crops_coords=None,
                    grid_size=(grid_h, grid_w), temporal_size=(frames + p_t - 1) // p_t,
                    grid_type="slice", max_size=(base_h, base_w), device=device)
            if len(self._rope_cache) > 8:
                self._rope_cache.clear()
            self._rope_cache[key] = freqs
            return freqs

        def forward(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
            return comfy.patcher_extension.WrapperExecutor.new_class_executor(
                self._forward, self,
                comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                         transformer_options),
            ).execute(x, timestep, context, transformer_options, **kwargs)

        def _forward(self, x, timestep, context, transformer_options={}, **kwargs):
            if context is None:
                raise ValueError("CogVideoX needs text conditioning: connect a CONDITIONING from "
                                 "'CogVideoX Text Encode' (T5-XXL, 226 tokens) to the sampler.")
            if kwargs.get("time_dim_concat") is not None:
                raise ValueError("The conditioning carries Concat-ID reference latents, but this CogVideoX MODEL is not "
                                 "patched for them: put 'Concat-ID Model Patch (CogVideoX)' between the model and "
                                 "the sampler.")
            b, c, t, h, w = x.shape
            p = self.config.patch_size
            if h % p or w % p:
                raise ValueError(f"CogVideoX latents must have even height and width (got {h}x{w}); "
                                 "use a video width and height that are multiples of 16.")
            hidden = x.movedim(1, 2)  # [B, T, C, H, W]
            rope = self.rotary_embedding(t, h // p, w // p, x.device)
            ofs = None
            if self.ofs_embedding is not None:
                ofs = torch.full((1,), 2.0, device=x.device, dtype=x.dtype)
            out = CogVideoXTransformer3DModel.forward(
                self, hidden_states=hidden, encoder_hidden_states=context.to(hidden.dtype),
                timestep=timestep, ofs=ofs, image_rotary_emb=rope, return_dict=False)[0]
            return out.movedim(2, 1)

    return CogVideoXDiT


def transformer_init_args(cfg):
    """Splits a diffusers config.json dict into what CogVideoXTransformer3DModel accepts and the rest
    (FantasyID's config carries extra entries for its face modules)."""
    from diffusers import CogVideoXTransformer3DModel

    params = inspect.signature(CogVideoXTransformer3DModel.__init__).parameters
    accepted = {k: v for k, v in cfg.items() if k in params and k != "self"}
    extra = {k: v for k, v in cfg.items() if k not in params and not k.startswith("_")}
    return accepted, extra


class CogVideoXModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.V_PREDICTION, device=device, unet_model=dit_class())
        self.model_sampling = make_model_sampling(model_config.sampling_settings["snr_shift_scale"])
        cfg = model_config.unet_config["diffusers_config"]
        self.in_channels = cfg.get("in_channels", 16)
        self.out_channels = cfg.get("out_channels", 16) or self.in_channels
        self.is_i2v = self.in_channels > self.out_channels
        self.likeness_extras = None  # set by the loader (FantasyID face-module weights, ...)

    def extra_conds(self, **kwargs):
        out = {}
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:
            out["c_crossattn"] = comfy.conds.CONDCrossAttn(cross_attn)
        if self.is_i2v:
            noise = kwargs["noise"]
            image = kwargs.get("concat_latent_image", None)
            if image is None:
                raise ValueError(
                    "This CogVideoX model is image-to-video (in_channels {}), but the conditioning has no start "
                    "image: pass positive and negative through 'CogVideoX I2V Conditioning' before the sampler."
                    .format(self.in_channels))
            out["c_concat"] = comfy.conds.CONDNoiseShape(self.image_concat(image, noise))
        refs = kwargs.get("time_dim_concat", None)
        if refs is not None:  # Concat-ID reference latent frames (clean, scaled like the video latents)
            out["time_dim_concat"] = comfy.conds.CONDRegular(self.process_latent_in(refs))
        return out

    def image_concat(self, image_latent, noise):
        """Scaled image latent frames first, zeros after, same shape as the noise latents."""
        image = self.process_latent_in(image_latent.to(noise.device, torch.float32))
        if image.shape[-2:] != noise.shape[-2:]:
            raise ValueError(
                "The I2V start-image latent is {}x{} but the video latent is {}x{}: give 'CogVideoX I2V "
                "Conditioning' the same width and height as the video.".format(
                    image.shape[-1] * 8, image.shape[-2] * 8, noise.shape[-1] * 8, noise.shape[-2] * 8))
        frames = noise.shape[2]
        if image.shape[2] >= frames:
            image = image[:, :, :frames]
        else:
            pad = torch.zeros(image.shape[:2] + (frames - image.shape[2],) + image.shape[3:],
                              dtype=image.dtype, device=image.device)
            image = torch.cat([image, pad], dim=2)
        if image.shape[0] != noise.shape[0]:
            image = image[:1].repeat(noise.shape[0], 1, 1, 1, 1) if image.shape[0] == 1 else image[: noise.shape[0]]
        return image


class CogVideoXModelConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    latent_format = CogVideoXLatentFormat
    sampling_settings = {}
    memory_usage_factor = 2.0
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, diffusers_config):
        super().__init__({"diffusers_config": dict(diffusers_config)})
        scale, snr_shift = variant_facts(diffusers_config)
        self.latent_format = CogVideoXLatentFormat(scale)
        self.sampling_settings = {"snr_shift_scale": snr_shift}
        heads = diffusers_config.get("num_attention_heads", 30)
        # rough: the 5B transformer needs more activation memory per latent element than Wan 1.3B
        self.memory_usage_factor = 2.0 * max(1.0, heads / 30)

    def inpaint_model(self):
        return False

    def get_model(self, state_dict, prefix="", device=None):
        return CogVideoXModel(self, device=device)


def refuse_comfy_native_cogvideox(model_patcher, node):
    """Refuses ComfyUI's own CogVideoX MODEL (ComfyUI >= 0.33, stock 'Load Diffusion Model'): on the same weights it
    is not the released model (measured in bench/cogvideox_native_vs_diffusers.py, docs/cogvideox.md)."""
    native = getattr(comfy.model_base, "CogVideoX", None)  # ComfyUI 0.3.75 has none
    if native is not None and isinstance(getattr(model_patcher, "model", None), native):
        raise ValueError(
            f"{node}: this MODEL is ComfyUI's own CogVideoX (stock 'Load Diffusion Model'), which differs from the "
            "released CogVideoX on the same weights: its 3D RoPE positions are 1.875x too far apart (0.8-1.4 % "
            "network output error), it switches RoPE off for the learned-position layout of CogVideoX-5B-I2V and "
            "FantasyID, and its sampler feeds the network the latent without the sqrt(alpha_bar) scaling (36-44 % "
            "off at the middle sigma; docs/cogvideox.md). Load the same file with Likeness's 'Load CogVideoX' "
            "(it reads ComfyUI's key layout too) and connect that MODEL instead.")


def lora_key_map(model_patcher):
    """LoRA key names (diffusers/PEFT 'transformer.<module>', bare '<module>', ComfyUI
    'diffusion_model.<module>' and kohya 'lora_unet_<module_with_underscores>') -> model weight keys."""
    key_map = {}
    for k in model_patcher.model.diffusion_model.state_dict().keys():
        if not k.endswith(".weight"):
            continue
        base = k[: -len(".weight")]
        target = "diffusion_model." + k
        key_map["transformer." + base] = target
        key_map[base] = target
        key_map["diffusion_model." + base] = target
        key_map["lora_unet_" + base.replace(".", "_")] = target
        key_map["base_model.model." + base] = target
    return key_map
