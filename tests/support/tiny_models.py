"""Tiny random-weight models with the real ComfyUI architectures and key names, made at test
time (never committed). Needs ComfyUI importable in-process (see comfy_env.import_comfy)."""

import math

import torch
from safetensors.torch import save_file


def fill_random_(state_dict, seed=0, scale=1.0, device=None):
    """Deterministic small random values: norm gains near 1, weights ~ 1/sqrt(fan_in).
    device: where the values are drawn and kept (benchmarks: billions of parameters drawn on the GPU)."""
    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    out = {}
    for k, v in state_dict.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        shape = v.shape
        r = torch.randn(shape, generator=g, dtype=torch.float32, device=device or "cpu")
        if v.ndim == 1 and any(s in k for s in ("norm", "gamma", "ln_", ".scale")) and not k.endswith("bias"):
            t = 1.0 + 0.05 * r
        elif v.ndim <= 1:
            t = 0.02 * r
        else:
            fan_in = math.prod(shape[1:])
            t = r * (scale / math.sqrt(fan_in))
        out[k] = t.to(v.dtype).contiguous()
    return out


def tiny_wan_t2v_state_dict(dim=128, layers=2, ffn_dim=256, seed=0):
    import comfy.ldm.wan.model
    import comfy.ops

    with torch.device("meta"):
        m = comfy.ldm.wan.model.WanModel(
            model_type="t2v", dim=dim, ffn_dim=ffn_dim, num_heads=dim // 128, num_layers=layers,
            in_dim=16, out_dim=16, text_dim=4096, operations=comfy.ops.manual_cast,
        )
    sd = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in m.state_dict().items()}
    return fill_random_(sd, seed)


def save_tiny_wan_t2v(path, dim=128, layers=2, seed=0):
    """Loads through the stock UNETLoader (detected as WAN21_T2V)."""
    save_file(tiny_wan_t2v_state_dict(dim=dim, layers=layers, seed=seed), str(path))
    return path


def tiny_wan_vae_state_dict(dim=8, seed=0):
    import comfy.ldm.wan.vae

    with torch.device("meta"):
        m = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                     attn_scales=[], temperal_downsample=[False, True, True])
    sd = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in m.state_dict().items()}
    return fill_random_(sd, seed)


def save_tiny_wan_vae(path, dim=8, seed=0):
    """Loads through the stock VAELoader (detected as the Wan 2.1 VAE, dim read from the file)."""
    save_file(tiny_wan_vae_state_dict(dim=dim, seed=seed), str(path))
    return path


def svd_vae_state_dict(seed=0):
    """SVD's VAE at its real (fixed) size with random weights: ComfyUI's VAE detects it by the temporal decoder's
    `mix_factor` and decodes with frames on the batch axis, mixing the frames of one decode call."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    enc = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
               num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):
        m = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": enc},
            decoder_config={"target": "comfy.ldm.modules.temporal_ae.VideoDecoder",
                            "params": dict(enc, video_kernel_size=[3, 1, 1], alpha=0.0)})
    sd = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in m.state_dict().items()}
    return fill_random_(sd, seed)


TINY_SVD_UNET = dict(
    model_channels=32, in_channels=8, out_channels=4, num_res_blocks=[1, 1], channel_mult=[1, 2],
    use_spatial_transformer=True, transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
    context_dim=1024, adm_in_channels=768, num_classes="sequential", use_linear_in_transformer=True,
    use_temporal_attention=True, use_temporal_resblock=True, use_spatial_context=True,
    extra_ff_mix_layer=True, merge_strategy="learned_with_images", video_kernel_size=[3, 1, 1],
    disable_temporal_crossattention=False, max_ddpm_temb_period=10000, image_size=32,
)


# SVD(-xt)'s UNet as ComfyUI detects it from the released file (1.5 B parameters); for benchmarks
SVD_XT_UNET = dict(TINY_SVD_UNET, model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                   transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                   transformer_depth_middle=1, image_size=32)


def build_tiny_svd(seed=0, state_dict=None, unet_config=None, num_head_channels=16, dtype=torch.float32,
                   fill_device=None):
    """A tiny native SVD MODEL (real model_base.SVD_img2vid, real SpatialVideoTransformer).
    ComfyUI's detection only matches the full-size SVD config, so it is built directly.
    dtype: the UNet's inference dtype ('auto': what ComfyUI picks for SVD on this device, fp16 on a GPU);
    fill_device: where the random weights are drawn (benchmarks)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    class TinySVD(comfy.supported_models.SVD_img2vid):
        unet_config = {}
        unet_extra_config = {"num_heads": -1, "num_head_channels": num_head_channels, "attn_precision": torch.float32}

    cfg = TinySVD(dict(unet_config or TINY_SVD_UNET))
    load = comfy.model_management.get_torch_device()
    if dtype == "auto":
        dtype = comfy.model_management.unet_dtype(model_params=0, supported_dtypes=cfg.supported_inference_dtypes)
    manual_cast = None
    if dtype != torch.float32:
        manual_cast = comfy.model_management.unet_manual_cast(dtype, load, cfg.supported_inference_dtypes)
    cfg.set_inference_dtype(dtype, manual_cast)
    model = cfg.get_model({}, "")
    if state_dict is None:
        shapes = model.diffusion_model.state_dict()
        state_dict = fill_random_({k: torch.empty(v.shape) for k, v in shapes.items()}, seed, device=fill_device)
    model.diffusion_model.load_state_dict(state_dict, strict=True)
    model.eval()
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=offload)


def tiny_taesd_state_dict(seed=0):
    """A TAESD VAE (4 latent channels) for SVD plumbing; the real SVD VAE is large."""
    import comfy.taesd.taesd

    with torch.device("meta"):
        m = comfy.taesd.taesd.TAESD(latent_channels=4)
    sd = {k: torch.empty(v.shape) for k, v in m.state_dict().items()}
    return fill_random_(sd, seed)


def tiny_concat_id_adaln_state_dict(dim=128, layers=2, seed=5):
    """A tiny Concat-ID `second_stage_adaln.pt` layout: full Wan weights plus the AdaLN extras
    (`time_projection_ref.*`, `blocks.N.modulation_ref`)."""
    sd = tiny_wan_t2v_state_dict(dim=dim, layers=layers, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = sd["time_projection.1.weight"]
    sd["time_projection_ref.1.weight"] = w + 0.05 * torch.randn(w.shape, generator=g)
    sd["time_projection_ref.1.bias"] = sd["time_projection.1.bias"].clone()
    for i in range(layers):
        sd[f"blocks.{i}.modulation_ref"] = 0.3 * torch.randn(1, 6, dim, generator=g)
    return sd
