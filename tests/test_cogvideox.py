"""CogVideoX as a native ComfyUI model: parity with diffusers on tiny random weights (real diffusers
classes, tiny configs, saved as diffusers folders / safetensors and loaded through the pack's loaders)."""

import importlib
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_T2V = dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=32,
                text_embed_dim=64, num_layers=2, sample_width=16, sample_height=12, sample_frames=9, patch_size=2,
                max_text_seq_length=8, use_rotary_positional_embeddings=True)
TINY_I2V = dict(TINY_T2V, in_channels=32)
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                scaling_factor=0.7)
FACE_KEYS = {
    "face_abstractor.proj_out": (8, 4),
    "vertex_spiral_net.vtx_query": (1, 3, 4),
    "vertex_reducer.conv_block1.conv_in.conv1d.weight": (4, 2, 5),
    "layer_attention.0.to_q.weight": (4, 32),
}


@pytest.fixture(scope="module")
def L(pack):
    return importlib.import_module("likeness_pack.loaders.cogvideox")


@pytest.fixture(scope="module")
def A(L):
    return importlib.import_module("likeness_pack.adapters.cogvideox")


def _tiny_transformer(cfg, seed=0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tr = CogVideoXTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # make every parameter matter (zero-initialised ones included)
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return tr


def _tiny_vae(seed=1):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(**TINY_VAE).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, L):
    d = tmp_path_factory.mktemp("cog")
    t2v, i2v = _tiny_transformer(TINY_T2V, 0), _tiny_transformer(TINY_I2V, 1)
    t2v.save_pretrained(d / "t2v")
    i2v.save_pretrained(d / "i2v")
    vae = _tiny_vae()
    vae.save_pretrained(d / "vae")
    return {"dir": d, "t2v": t2v, "i2v": i2v, "vae": vae}


def _rope(tr, t, gh, gw, A):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p = tr.config.patch_size
    crop = A.grid_crop_region(gh, gw, tr.config.sample_width // p, tr.config.sample_height // p)
    return get_3d_rotary_pos_embed(tr.config.attention_head_dim, crop, (gh, gw), t)


def _alpha_bar(ms, sigma):
    return 1.0 / (sigma.double() ** 2 + 1.0)


# ------------------------------------------------------------------ schedule facts

def test_schedule_matches_cogvideox_ddim_scheduler(A):
    from diffusers import CogVideoXDDIMScheduler

    for shift in (1.0, 3.0):
        sch = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                     snr_shift_scale=shift, prediction_type="v_prediction", timestep_spacing="trailing")
        ms = A.make_model_sampling(shift)
        ab = 1.0 / (ms.sigmas.double() ** 2 + 1.0)
        assert torch.allclose(ab[:-1], sch.alphas_cumprod[:-1].double(), rtol=1e-5, atol=1e-9)
        assert float(sch.alphas_cumprod[-1]) == 0.0 and abs(float(ab[-1]) - A.TERMINAL_ALPHA_BAR) < 1e-12
    # KSampler 'simple' scheduler == diffusers 'trailing' timesteps when steps divide 1000
    import comfy.samplers

    ms = A.make_model_sampling(1.0)
    for steps in (4, 5, 50):
        sch.set_timesteps(steps)
        sig = comfy.samplers.calculate_sigmas(ms, "simple", steps)
        assert sig[-1] == 0
        assert ms.timestep(sig[:-1]).long().tolist() == sch.timesteps.tolist()


# ------------------------------------------------------------------ one prediction

@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_prediction_equals_transformer_output(tiny, L, A, kind):
    tr = tiny[kind]
    mp = L.load_transformer(str(tiny["dir"] / kind), "fp32")
    model = mp.model
    assert model.is_i2v == (kind == "i2v")
    torch.manual_seed(3)
    x = torch.randn(2, 16, 3, 6, 8)
    ctx = torch.randn(2, 8, 64)
    image = torch.randn(1, 16, 1, 6, 8)
    for t in (999, 500, 19):
        sigma = model.model_sampling.sigmas[t].reshape(1).repeat(2)
        kwargs = {}
        xin = x / (sigma.reshape(-1, 1, 1, 1, 1) ** 2 + 1) ** 0.5
        ref_in = xin
        if kind == "i2v":
            conds = model.extra_conds(noise=x, concat_latent_image=image, cross_attn=ctx, device="cpu")
            kwargs["c_concat"] = conds["c_concat"].cond
            img = torch.cat([image * 0.7, torch.zeros(1, 16, 2, 6, 8)], dim=2).repeat(2, 1, 1, 1, 1)
            ref_in = torch.cat([xin, img], dim=1)
        with torch.no_grad():
            den = model.apply_model(x, sigma, c_crossattn=ctx, **kwargs)
            v = tr(hidden_states=ref_in.movedim(1, 2), encoder_hidden_states=ctx, timestep=torch.tensor([t, t]),
                   image_rotary_emb=_rope(tr, 3, 3, 4, A), return_dict=False)[0].movedim(2, 1)
        ab = _alpha_bar(model.model_sampling, sigma).float().reshape(-1, 1, 1, 1, 1)
        ref = ab.sqrt() * xin - (1 - ab).sqrt() * v
        assert (den - ref).abs().max() < 1e-5, (t, (den - ref).abs().max())
        # the underlying network output itself
        with torch.no_grad():
            raw = model.diffusion_model(ref_in, torch.tensor([float(t)] * 2), context=ctx)
        assert (raw - v).abs().max() < 1e-5


def test_i2v_without_start_image_is_a_clear_error(tiny, L):
    mp = L.load_transformer(str(tiny["dir"] / "i2v"), "fp32")
    with pytest.raises(ValueError, match="I2V Conditioning"):
        mp.model.extra_conds(noise=torch.zeros(1, 16, 2, 6, 8), cross_attn=torch.zeros(1, 8, 64), device="cpu")


# ------------------------------------------------------------------ full sampling vs diffusers pipelines

def _comfy_sample(mp, noise_c, ctx, neg, steps, cfg, concat=None):
    import comfy.sample

    pos = [[ctx, {} if concat is None else {"concat_latent_image": concat}]]
    negc = [[neg, {} if concat is None else {"concat_latent_image": concat}]]
    out = comfy.sample.sample(mp, noise_c, steps, cfg, "ddim", "simple", pos, negc, torch.zeros_like(noise_c),
                              denoise=1.0, disable_pbar=True, seed=0)
    return out


def _set_terminal(sch, A):
    sch.alphas_cumprod = sch.alphas_cumprod.clone()
    sch.alphas_cumprod[-1] = A.TERMINAL_ALPHA_BAR


# Tolerances (max |ours - diffusers| / max |diffusers|, fp32): ComfyUI samples in the "VE" space
# x = x_vp * sqrt(1 + sigma^2); at zero terminal SNR sigma_max ~ 4519, so the first Euler/DDIM step
# cancels numbers ~4500x larger than its result -> fp32 rounding of ~1e-4 relative (measured 3-6e-5
# with the same terminal alpha_bar on both sides). With diffusers' exact zero terminal alpha_bar
# (ComfyUI keeps it at 4.9e-8 so sigma stays finite) the first x0 estimate also differs by
# sqrt(4.9e-8) ~ 2.2e-4 of the noise (measured 1.1-1.2e-4). A wrong schedule, SNR shift, scaling
# factor, layout or RoPE gives errors of order 1.
TOLS = [("comfy", 2e-4), ("diffusers", 5e-4)]


@pytest.mark.parametrize("terminal, tol", TOLS)
def test_t2v_sampling_matches_diffusers_pipeline(tiny, L, A, terminal, tol):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    tr, vae = tiny["t2v"], tiny["vae"]
    sch = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, snr_shift_scale=1.0,
                                 prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    if terminal == "comfy":
        _set_terminal(sch, A)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr, scheduler=sch)
    torch.manual_seed(5)
    noise = torch.randn(1, 3, 16, 6, 8)  # diffusers layout [B, F, C, H, W]
    ctx, neg = torch.randn(1, 8, 64), torch.randn(1, 8, 64)
    steps, cfg = 5, 4.0
    with torch.no_grad():
        ref = pipe(prompt_embeds=ctx, negative_prompt_embeds=neg, latents=noise.clone(), height=48, width=64,
                   num_frames=9, num_inference_steps=steps, guidance_scale=cfg, output_type="latent",
                   use_dynamic_cfg=False).frames
    mp = L.load_transformer(str(tiny["dir"] / "t2v"), "fp32")
    out = _comfy_sample(mp, noise.movedim(2, 1).contiguous(), ctx, neg, steps, cfg)
    ours = (out * 0.7).movedim(1, 2)  # LATENT holds raw VAE latents; diffusers' are scaled
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"max relative error ({terminal} terminal alpha_bar): {err:.2e}")
    assert err < tol, err
    assert ref.abs().mean() > 0.1


@pytest.mark.parametrize("terminal, tol", TOLS)
def test_i2v_sampling_matches_diffusers_pipeline(tiny, L, A, terminal, tol, monkeypatch):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline
    from diffusers.pipelines.cogvideo import pipeline_cogvideox_image2video as i2v_mod

    # both sides take the posterior mode of the image latent (ComfyUI VAEs encode to the mode)
    monkeypatch.setattr(i2v_mod, "retrieve_latents", lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode())
    tr, vae = tiny["i2v"], tiny["vae"]
    sch = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, snr_shift_scale=1.0,
                                 prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    if terminal == "comfy":
        _set_terminal(sch, A)
    pipe = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr, scheduler=sch)
    torch.manual_seed(6)
    image = torch.rand(1, 3, 48, 64)
    noise = torch.randn(1, 3, 16, 6, 8)
    ctx, neg = torch.randn(1, 8, 64), torch.randn(1, 8, 64)
    steps, cfg = 4, 5.0
    with torch.no_grad():
        ref = pipe(image=image, prompt_embeds=ctx, negative_prompt_embeds=neg, latents=noise.clone(), height=48,
                   width=64, num_frames=9, num_inference_steps=steps, guidance_scale=cfg, output_type="latent",
                   use_dynamic_cfg=False).frames
    mp = L.load_transformer(str(tiny["dir"] / "i2v"), "fp32")
    cvae = L.load_vae(str(tiny["dir"] / "vae"), dtype=torch.float32)
    nodes_mod = importlib.import_module("likeness_pack.nodes.cogvideox")
    pos_c, neg_c, latent = nodes_mod.LikenessCogVideoXI2VConditioning.execute(
        [[ctx, {}]], [[neg, {}]], cvae, image.movedim(1, -1), 64, 48, 9, 1).args
    assert latent["samples"].shape == (1, 16, 3, 6, 8)
    import comfy.sample

    out = comfy.sample.sample(mp, noise.movedim(2, 1).contiguous(), steps, cfg, "ddim", "simple", pos_c, neg_c,
                              latent["samples"], denoise=1.0, disable_pbar=True, seed=0)
    ours = (out * 0.7).movedim(1, 2)
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"max relative error ({terminal} terminal alpha_bar): {err:.2e}")
    assert err < tol, err


# ------------------------------------------------------------------ VAE

def test_vae_round_trip_equals_diffusers(tiny, L):
    vae = tiny["vae"]
    cvae = L.load_vae(str(tiny["dir"] / "vae"), dtype=torch.float32)
    torch.manual_seed(7)
    video = torch.rand(9, 32, 48, 3)  # ComfyUI IMAGE batch = frames
    lat = cvae.encode(video)
    assert lat.shape == (1, 16, 3, 4, 6)
    with torch.no_grad():
        ref_lat = vae.encode(video.movedim(-1, 0).unsqueeze(0) * 2 - 1).latent_dist.mode()
        ref_pix = ((vae.decode(ref_lat).sample + 1) / 2).clamp(0, 1)[0].movedim(0, -1)
    assert (lat - ref_lat).abs().max() < 1e-5
    pix = cvae.decode(lat)
    assert pix.shape == (1, 9, 32, 48, 3)
    assert (pix[0] - ref_pix).abs().max() < 1e-5
    # pixel values (not only shapes) on every decode path this ComfyUI has: under inference mode as the executor
    # runs nodes (newer decode converts a preallocated buffer in place), and the tiled path with one tile
    with torch.inference_mode():
        assert (cvae.decode(lat)[0] - ref_pix).abs().max() < 1e-5
        assert (cvae.decode_tiled(lat, tile_x=64, tile_y=64, overlap=1)[0] - ref_pix).abs().max() < 1e-5
    assert (cvae.decode_tiled(lat, tile_x=64, tile_y=64, overlap=1)[0] - ref_pix).abs().max() < 1e-5
    assert ref_pix.min() < 0.3 and ref_pix.max() > 0.7, "the check needs pixels away from the middle grey"
    # tiled decode (stock 'VAE Decode (Tiled)' path) runs and keeps the frame count
    tiled = cvae.decode_tiled(lat, tile_x=4, tile_y=4, overlap=1)
    assert tiled.shape[1:] == (9, 32, 48, 3)
    # single .safetensors file with its config next to it
    from safetensors.torch import save_file

    f = tiny["dir"] / "vae_single.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(f))
    with open(tiny["dir"] / "vae_single.json", "w") as fh:
        json.dump(dict(vae.config), fh)
    cvae2 = L.load_vae(str(f), dtype=torch.float32)
    assert (cvae2.encode(video) - lat).abs().max() < 1e-6


# ------------------------------------------------------------------ files: single file, FantasyID folder

def test_single_file_and_fantasyid_folder(tiny, L, tmp_path):
    from safetensors.torch import save_file

    tr = tiny["i2v"]
    sd = {k: v.contiguous() for k, v in tr.state_dict().items()}
    # single file (config inferred from shapes), diffusers 'transformer.' prefix as some exports have
    f = tmp_path / "cog_i2v.safetensors"
    save_file({"transformer." + k: v for k, v in sd.items()}, str(f))
    cfg = L.infer_transformer_config(sd)
    for k in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
              "time_embed_dim", "text_embed_dim", "patch_size"):
        assert cfg[k] == tr.config[k], k
    mp_file = L.load_transformer(str(f), "fp32")
    # FantasyID-style folder: transformer/ with config.json (+ an extra config entry) and face-module keys
    fid = tmp_path / "fantasyid" / "transformer"
    fid.mkdir(parents=True)
    face = {k: torch.randn(s) for k, s in FACE_KEYS.items()}
    save_file({**sd, **face}, str(fid / "diffusion_pytorch_model.safetensors"))
    conf = dict(tr.config)
    conf["face_dim"] = 1024
    with open(fid / "config.json", "w") as fh:
        json.dump(conf, fh)
    mp = L.load_transformer(str(tmp_path / "fantasyid"), "fp32")
    extras = L.get_extras(mp)
    assert set(extras.face_state_dict) == set(FACE_KEYS)
    assert torch.equal(extras.face_state_dict["layer_attention.0.to_q.weight"], face["layer_attention.0.to_q.weight"])
    assert set(extras.set_aside_prefixes) == set(L.FACE_MODULE_PREFIXES)
    assert extras.extra_config.get("face_dim") == 1024
    assert L.get_extras(mp.clone()) is extras
    # same predictions: folder == FantasyID folder == single file with its config.json next to it
    save_file(sd, str(tmp_path / "cog_i2v_cfg.safetensors"))
    with open(tmp_path / "cog_i2v_cfg.json", "w") as fh:
        json.dump(dict(tr.config), fh)
    mp_cfg = L.load_transformer(str(tmp_path / "cog_i2v_cfg.safetensors"), "fp32")
    mp_dir = L.load_transformer(str(tiny["dir"] / "i2v"), "fp32")
    x = torch.randn(1, 16, 2, 6, 8)
    kw = dict(c_crossattn=torch.randn(1, 8, 64), c_concat=torch.randn(1, 16, 2, 6, 8))
    s = mp.model.model_sampling.sigmas[300].reshape(1)
    with torch.no_grad():
        a = mp.model.apply_model(x, s, **kw)
        b = mp_cfg.model.apply_model(x, s, **kw)
        c = mp_dir.model.apply_model(x, s, **kw)
        d = mp_file.model.apply_model(x, s, **kw)  # inferred config: default 480x720 RoPE base grid
    assert torch.equal(a, b) and torch.equal(a, c)
    assert d.shape == a.shape and torch.isfinite(d).all()
    # wrong folder -> clear error
    with pytest.raises(ValueError, match="config.json"):
        L.load_transformer(str(tmp_path))


# ------------------------------------------------------------------ LoRA (diffusers / PEFT format)

def test_diffusers_lora_applies(tiny, L, A, tmp_path):
    tr = tiny["t2v"]
    mp = L.load_transformer(str(tiny["dir"] / "t2v"), "fp32")
    torch.manual_seed(9)
    r = 2
    targets = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2", "proj_out"]
    lora, deltas = {}, {}
    for t in targets:
        w = tr.get_submodule(t).weight
        a, b = torch.randn(r, w.shape[1]) * 0.1, torch.randn(w.shape[0], r) * 0.1
        lora[f"transformer.{t}.lora_A.weight"] = a
        lora[f"transformer.{t}.lora_B.weight"] = b
        deltas[t] = b @ a
    patched, n = L.apply_lora(mp, lora, 0.8)
    assert n == len(targets)
    import copy

    ref_tr = copy.deepcopy(tr)
    with torch.no_grad():
        for t, d in deltas.items():
            ref_tr.get_submodule(t).weight.add_(0.8 * d)
    x, ctx = torch.randn(1, 16, 2, 6, 8), torch.randn(1, 8, 64)
    t = 400
    import comfy.model_management

    comfy.model_management.load_models_gpu([patched])
    try:
        with torch.no_grad():
            raw = patched.model.diffusion_model(x, torch.tensor([float(t)]), context=ctx)
    finally:
        patched.unpatch_model()
    with torch.no_grad():
        ref = ref_tr(hidden_states=x.movedim(1, 2), encoder_hidden_states=ctx, timestep=torch.tensor([t]),
                     image_rotary_emb=_rope(tr, 2, 3, 4, A), return_dict=False)[0].movedim(2, 1)
        base = tr(hidden_states=x.movedim(1, 2), encoder_hidden_states=ctx, timestep=torch.tensor([t]),
                  image_rotary_emb=_rope(tr, 2, 3, 4, A), return_dict=False)[0].movedim(2, 1)
        after = mp.model.diffusion_model(x, torch.tensor([float(t)]), context=ctx)
    assert (raw - ref).abs().max() < 1e-5
    assert (raw - base).abs().max() > 1e-3
    assert (after - base).abs().max() < 1e-6  # the original model is untouched
    with pytest.raises(ValueError, match="CogVideoX LoRA"):
        L.apply_lora(mp, {"foo.lora_A.weight": torch.zeros(1, 1), "foo.lora_B.weight": torch.zeros(1, 1)}, 1.0)


# ------------------------------------------------------------------ text tokens

def test_t5_tokens_match_diffusers_tokenization(L):
    from transformers import T5TokenizerFast

    import comfy.text_encoders.sd3_clip as sd3

    nodes_mod = importlib.import_module("likeness_pack.nodes.cogvideox")
    tok = sd3.SD3Tokenizer()

    class FakeClip:
        def tokenize(self, text):
            return tok.tokenize_with_weights(text)

    hf = T5TokenizerFast.from_pretrained(os.path.join(os.path.dirname(sd3.__file__), "t5_tokenizer"))
    for text in ["", "a man walks on the beach at sunset, cinematic", "word " * 400]:
        ours = nodes_mod.t5_tokens_226(FakeClip(), text)
        ids = [t for t, _w in ours["t5xxl"][0]]
        ref = hf(text, padding="max_length", max_length=226, truncation=True, add_special_tokens=True).input_ids
        assert ids == ref, text[:30]
        assert ours["l"] == [] and ours["g"] == []


# ------------------------------------------------------------------ through the real server

def _webp_frames(data):
    import io as _io

    from PIL import Image

    im = Image.open(_io.BytesIO(data))
    return im.n_frames


def _write_server_models(server):
    from safetensors.torch import save_file

    m = server.models_dir
    if (m / "diffusion_models" / "tiny_cog_t2v" / "config.json").exists():
        return
    _tiny_transformer(TINY_T2V, 10).save_pretrained(m / "diffusion_models" / "tiny_cog_t2v")
    _tiny_transformer(TINY_I2V, 11).save_pretrained(m / "diffusion_models" / "tiny_cog_i2v")
    _tiny_vae(12).save_pretrained(m / "vae" / "tiny_cog_vae")
    (m / "loras").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(13)
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 32, generator=g) * 0.1,
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 2, generator=g) * 0.1},
              str(m / "loras" / "tiny_cog_lora.safetensors"))


def _cog_prompt(frames, i2v=False, lora=False, seed=1):
    p = {
        "1": {"class_type": "LikenessLoadCogVideoX",
              "inputs": {"model_name": "tiny_cog_i2v/" if i2v else "tiny_cog_t2v/", "weight_dtype": "default"}},
        "2": {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 64}},
        "3": {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 2, "tokens": 8, "width": 64}},
        "4": {"class_type": "LikenessEmptyCogVideoXLatent", "inputs": {"width": 64, "height": 48, "length": frames, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "LikenessLoadCogVideoXVAE", "inputs": {"vae_name": "tiny_cog_vae/", "diffusers_tiling": False}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["7", 0], "filename_prefix": "cog", "fps": 8.0, "lossless": True, "quality": 90, "method": "default"}},
    }
    if i2v:
        p["9"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0x3366CC}}
        p["4"] = {"class_type": "LikenessCogVideoXI2VConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["6", 0], "start_image": ["9", 0],
            "width": 64, "height": 48, "length": frames, "batch_size": 1}}
        p["5"]["inputs"].update(positive=["4", 0], negative=["4", 1], latent_image=["4", 2])
    if lora:
        p["10"] = {"class_type": "LikenessCogVideoXLoraLoader",
                   "inputs": {"model": ["1", 0], "lora_name": "tiny_cog_lora.safetensors", "strength": 1.0}}
        p["5"]["inputs"]["model"] = ["10", 0]
    return p


@pytest.mark.server
@pytest.mark.parametrize("i2v, frames", [(False, 9), (True, 13)])
def test_server_workflow_produces_requested_length(server, i2v, frames):
    _write_server_models(server)
    hist = server.run(_cog_prompt(frames, i2v=i2v, lora=not i2v), timeout=300)
    files = server.output_files(hist, "8")
    assert len(files) == 1
    assert _webp_frames(server.view(*files[0])) == frames


@pytest.mark.server
def test_server_bad_inputs_are_clear_errors(server):
    from support.server import PromptFailed

    _write_server_models(server)
    p = _cog_prompt(9, i2v=False)
    p["1"]["inputs"]["model_name"] = "tiny_cog_i2v/"  # I2V model without the I2V conditioning node
    with pytest.raises(PromptFailed, match="I2V Conditioning"):
        server.run(p, timeout=300)
    p = _cog_prompt(9, i2v=False)
    p["4"]["inputs"]["length"] = 8 + 2  # passes the widget step check only if step allows; 10 is not 4k+1
    with pytest.raises(PromptFailed):
        server.run(p, timeout=300)
    assert _webp_frames(server.view(*server.output_files(server.run(_cog_prompt(5)), "8")[0])) == 5


def test_t5_encoder_on_226_tokens_matches_transformers(L):
    """ComfyUI's T5 (the class CLIPLoader type 'sd3' builds for t5xxl, here with a tiny config and the
    same settings: no attention mask, last layer) on our 226 packed tokens == transformers'
    T5EncoderModel on diffusers' tokenization (input_ids only, as CogVideoX's pipeline calls it)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    import comfy.sd1_clip
    import comfy.text_encoders.sd3_clip as sd3
    import comfy.text_encoders.t5

    nodes_mod = importlib.import_module("likeness_pack.nodes.cogvideox")
    tiny = {"d_ff": 64, "d_kv": 8, "d_model": 32, "num_heads": 4, "num_layers": 2, "dense_act_fn": "gelu_pytorch_tanh",
            "is_gated_act": True, "layer_norm_epsilon": 1e-6, "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "vocab_size": 32128, "model_type": "t5"}
    torch.manual_seed(0)
    hf = T5EncoderModel(T5Config(**tiny, feed_forward_proj="gated-gelu")).eval()
    te = comfy.sd1_clip.SDClipModel(textmodel_json_config=dict(tiny), model_class=comfy.text_encoders.t5.T5,
                                     special_tokens={"end": 1, "pad": 0}, enable_attention_masks=False,
                                     return_attention_masks=False, layer="last", dtype=torch.float32,
                                     model_options={"model_name": "t5xxl"})
    missing, unexpected = te.transformer.load_state_dict(hf.state_dict(), strict=False)
    assert not [k for k in missing if "encoder" in k], missing
    tok = sd3.SD3Tokenizer()

    class FakeClip:
        def tokenize(self, text):
            return tok.tokenize_with_weights(text)

    hf_tok = T5TokenizerFast.from_pretrained(os.path.join(os.path.dirname(sd3.__file__), "t5_tokenizer"))
    text = "a woman smiles at the camera, soft light"
    packed = nodes_mod.t5_tokens_226(FakeClip(), text)["t5xxl"]
    with torch.no_grad():
        ours = te.encode_token_weights(packed)[0]
        ids = hf_tok(text, padding="max_length", max_length=226, truncation=True, return_tensors="pt").input_ids
        ref = hf(ids)[0]
    assert ours.shape == (1, 226, 32)
    assert (ours.float() - ref).abs().max() < 1e-4


def test_hjb_refines_cogvideox_latents(tiny, L):
    """HJB Face Guidance on the native CogVideoX MODEL and VAE (the post-CFG hook, in inference mode)."""
    import torch.nn.functional as F

    from test_hjb import TinyRecognizer

    hook_mod = importlib.import_module("likeness_pack.adapters.sampler_hook")
    model = L.load_transformer(str(tiny["dir"] / "t2v"), "fp32").model
    vae = L.make_vae(tiny["vae"])
    hook = hook_mod.HJBFaceGuidance(vae, TinyRecognizer(), F.normalize(torch.randn(512), dim=0), iterations=3,
                                    eta=0.5, window_margin=64, progress=False)
    sigmas = torch.linspace(float(model.model_sampling.sigma_max), 0, 5)
    denoised = torch.randn(1, 16, 3, 6, 8)
    args = {"denoised": denoised, "model": model, "sigma": sigmas[:1],
            "model_options": {"transformer_options": {"sample_sigmas": sigmas}}}
    with torch.inference_mode():
        out = hook(args)
    losses = hook.last_losses[-1][1]
    assert out.shape == denoised.shape and not torch.equal(out, denoised)
    assert losses[-1] < losses[0]
