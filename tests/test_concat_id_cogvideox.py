"""Concat-ID's CogVideoX variant: SAT key mapping, patched forward vs a plain-torch reference of the
CogVideoX forward with the references appended (RoPE time indices T, T+1, same grid), and a real
server run (tiny SAT checkpoint -> loader -> patch -> conditioner -> KSampler -> video)."""

import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

# latent 12x16 = the model's base grid (sample_height/width), so the RoPE grid positions are the
# integers 0..h-1, 0..w-1 as in SAT's Rotary3DPositionEmbeddingMixin at its native size
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=32,
            text_embed_dim=64, num_layers=2, sample_width=16, sample_height=12, sample_frames=9, patch_size=2,
            max_text_seq_length=8, use_rotary_positional_embeddings=True)
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                scaling_factor=0.7)
P = "model.diffusion_model."


def _tiny_transformer(seed=0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tr = CogVideoXTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return tr


def _to_sat(sd, layers):
    """diffusers state dict -> SAT CogVideoX key layout (written from the SAT naming, independently of the
    pack's mapper)."""
    out = {}
    g = lambda k: sd[k].clone()  # noqa: E731
    for p in ("weight", "bias"):
        out[P + f"mixins.patch_embed.proj.{p}"] = g(f"patch_embed.proj.{p}")
        out[P + f"mixins.patch_embed.text_proj.{p}"] = g(f"patch_embed.text_proj.{p}")
        out[P + f"time_embed.0.{p}"] = g(f"time_embedding.linear_1.{p}")
        out[P + f"time_embed.2.{p}"] = g(f"time_embedding.linear_2.{p}")
        out[P + f"transformer.final_layernorm.{p}"] = g(f"norm_final.{p}")
        out[P + f"mixins.final_layer.norm_final.{p}"] = g(f"norm_out.norm.{p}")
        out[P + f"mixins.final_layer.linear.{p}"] = g(f"proj_out.{p}")
        out[P + f"mixins.final_layer.adaLN_modulation.1.{p}"] = g(f"norm_out.linear.{p}")
        for n in range(layers):
            b, s = f"transformer_blocks.{n}.", f"transformer.layers.{n}."
            out[P + s + f"input_layernorm.{p}"] = g(b + f"norm1.norm.{p}")
            out[P + s + f"attention.query_key_value.{p}"] = torch.cat(
                [g(b + f"attn1.to_{w}.{p}") for w in "qkv"], 0)
            out[P + s + f"attention.dense.{p}"] = g(b + f"attn1.to_out.0.{p}")
            out[P + s + f"post_attention_layernorm.{p}"] = g(b + f"norm2.norm.{p}")
            out[P + s + f"mlp.dense_h_to_4h.{p}"] = g(b + f"ff.net.0.proj.{p}")
            out[P + s + f"mlp.dense_4h_to_h.{p}"] = g(b + f"ff.net.2.{p}")
            n1, n2 = g(b + f"norm1.linear.{p}").chunk(6, 0), g(b + f"norm2.linear.{p}").chunk(6, 0)
            # SAT: image shift/scale/gate (msa), image (mlp), text (msa), text (mlp)
            out[P + f"mixins.adaln_layer.adaLN_modulations.{n}.1.{p}"] = torch.cat(n1[:3] + n2[:3] + n1[3:] + n2[3:], 0)
            out[P + f"mixins.adaln_layer.query_layernorm_list.{n}.{p}"] = g(b + f"attn1.norm_q.{p}")
            out[P + f"mixins.adaln_layer.key_layernorm_list.{n}.{p}"] = g(b + f"attn1.norm_k.{p}")
    return out


EXTRA_DROPPED = {P + "mixins.pos_embed.freqs_sin": torch.zeros(4, 8), P + "mixins.pos_embed.freqs_cos": torch.zeros(4, 8)}
EXTRA_UNMAPPED = {"first_stage_model.encoder.conv_in.weight": torch.zeros(2, 2), P + "mixins.mystery.weight": torch.zeros(3)}


def _save_sat(folder, tr, seed_name="single-identity"):
    d = folder / seed_name / "1000"
    d.mkdir(parents=True, exist_ok=True)
    sat = {**_to_sat(tr.state_dict(), TINY["num_layers"]), **EXTRA_DROPPED, **EXTRA_UNMAPPED}
    torch.save({"module": sat, "iteration": 1000}, str(d / "mp_rank_00_model_states.pt"))
    (folder / seed_name / "latest").write_text("1000")
    with open(d / "mp_rank_00_model_states.json", "w") as f:
        json.dump(dict(tr.config), f)
    return d / "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def S(pack):
    return importlib.import_module("likeness_pack.loaders.cogvideox_sat")


@pytest.fixture(scope="module")
def CID(pack):
    return importlib.import_module("likeness_pack.adapters.cogvideox_concat_id")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, S):
    d = tmp_path_factory.mktemp("cid_cog")
    tr = _tiny_transformer(0)
    path = _save_sat(d, tr)
    mp, mapping = S.load_sat_transformer(str(path), "fp32")
    return {"dir": d, "tr": tr, "path": path, "mp": mp, "mapping": mapping}


# ------------------------------------------------------------------ SAT -> diffusers mapping

def test_sat_keys_map_to_the_diffusers_model(tiny, S):
    tr, mapping, mp = tiny["tr"], tiny["mapping"], tiny["mp"]
    ref = tr.state_dict()
    assert set(mapping.state_dict) == set(ref)
    for k, v in ref.items():
        assert torch.equal(mapping.state_dict[k], v), k
    assert mapping.unmapped == sorted(EXTRA_UNMAPPED)
    assert mapping.dropped == sorted(EXTRA_DROPPED)
    rep = mapping.report()
    assert "first_stage_model.encoder.conv_in.weight" in rep and "mixins.mystery.weight" in rep
    loaded = mp.model.diffusion_model.state_dict()
    for k, v in ref.items():
        assert torch.equal(loaded[k], v), k
    extras = mp.model.likeness_extras
    assert extras.extra_config["sat_unmapped_keys"] == sorted(EXTRA_UNMAPPED)
    # the SAT folder (latest -> iteration folder) reads the same file
    sd_dir = S.read_sat_checkpoint(str(tiny["dir"] / "single-identity"))
    assert set(sd_dir) == set(_to_sat(ref, 2)) | set(EXTRA_DROPPED) | set(EXTRA_UNMAPPED)
    # same network output as the diffusers model
    x, ctx = torch.randn(1, 16, 2, 12, 16), torch.randn(1, 8, 64)
    with torch.no_grad():
        a = mp.model.diffusion_model(x, torch.tensor([300.0]), context=ctx)
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        rope = get_3d_rotary_pos_embed(16, ((0, 0), (6, 8)), (6, 8), 2)
        b = tr(hidden_states=x.movedim(1, 2), encoder_hidden_states=ctx, timestep=torch.tensor([300]),
               image_rotary_emb=rope, return_dict=False)[0].movedim(2, 1)
    assert (a - b).abs().max() < 1e-5


def test_not_a_sat_file_is_a_clear_error(S, tmp_path):
    f = tmp_path / "x.pt"
    torch.save({"module": {"foo.weight": torch.zeros(1)}}, str(f))
    with pytest.raises(ValueError, match="not a CogVideoX SAT"):
        S.load_sat_transformer(str(f))


# ------------------------------------------------------------------ plain-torch reference

def _rope_table(positions, head_dim, theta=10000.0):
    """cos, sin [N, head_dim] for (t, h, w) positions: head_dim/4 channels for time, 3/8 each for h and w,
    frequencies theta^(-2i/d) per axis, each repeated for an adjacent channel pair."""
    d_t, d_h = head_dim // 4, head_dim // 8 * 3
    parts = []
    for axis, d in ((0, d_t), (1, d_h), (2, d_h)):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = positions[:, axis:axis + 1].double() * inv[None]
        parts.append(ang.repeat_interleave(2, dim=1))
    ang = torch.cat(parts, 1)
    return ang.cos().float(), ang.sin().float()


def _apply_rope(x, cos, sin):  # x [B, heads, N, d]; pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    rot = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return x * cos + rot * sin


def _ln(x, sd, k, eps):
    return F.layer_norm(x, x.shape[-1:], sd[k + ".weight"], sd[k + ".bias"], eps)


def _lin(x, sd, k):
    return F.linear(x, sd[k + ".weight"], sd[k + ".bias"])


def _reference_forward(sd, x, t, ctx, positions, heads, head_dim, layers, p=2):
    """CogVideoX's MM-DiT forward from its weights. x [B, F, C, H, W] (video frames then reference frames)."""
    b, nf, c, hh, ww = x.shape
    dim = heads * head_dim
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    arg = t.float()[:, None] * freqs[None]
    temb = torch.cat([arg.cos(), arg.sin()], -1)  # flip_sin_to_cos
    temb = _lin(F.silu(_lin(temb, sd, "time_embedding.linear_1")), sd, "time_embedding.linear_2")
    txt = _lin(ctx, sd, "patch_embed.text_proj")
    img = F.conv2d(x.reshape(b * nf, c, hh, ww), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    gh, gw = img.shape[-2:]
    img = img.reshape(b, nf, dim, gh * gw).permute(0, 1, 3, 2).reshape(b, nf * gh * gw, dim)
    cos, sin = _rope_table(positions, head_dim)
    L = txt.shape[1]
    st = F.silu(temb)
    for n in range(layers):
        k = f"transformer_blocks.{n}."
        m = _lin(st, sd, k + "norm1.linear").chunk(6, 1)
        hi = _ln(img, sd, k + "norm1.norm", 1e-5) * (1 + m[1][:, None]) + m[0][:, None]
        ht = _ln(txt, sd, k + "norm1.norm", 1e-5) * (1 + m[4][:, None]) + m[3][:, None]
        h = torch.cat([ht, hi], 1)
        q, kk, v = (_lin(h, sd, k + f"attn1.to_{w}").view(b, -1, heads, head_dim).transpose(1, 2) for w in "qkv")
        q, kk = _ln(q, sd, k + "attn1.norm_q", 1e-6), _ln(kk, sd, k + "attn1.norm_k", 1e-6)
        q = torch.cat([q[:, :, :L], _apply_rope(q[:, :, L:], cos, sin)], 2)
        kk = torch.cat([kk[:, :, :L], _apply_rope(kk[:, :, L:], cos, sin)], 2)
        a = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(head_dim), -1) @ v
        a = _lin(a.transpose(1, 2).reshape(b, -1, dim), sd, k + "attn1.to_out.0")
        img = img + m[2][:, None] * a[:, L:]
        txt = txt + m[5][:, None] * a[:, :L]
        m = _lin(st, sd, k + "norm2.linear").chunk(6, 1)
        hi = _ln(img, sd, k + "norm2.norm", 1e-5) * (1 + m[1][:, None]) + m[0][:, None]
        ht = _ln(txt, sd, k + "norm2.norm", 1e-5) * (1 + m[4][:, None]) + m[3][:, None]
        f = _lin(F.gelu(_lin(torch.cat([ht, hi], 1), sd, k + "ff.net.0.proj"), approximate="tanh"), sd, k + "ff.net.2")
        img = img + m[2][:, None] * f[:, L:]
        txt = txt + m[5][:, None] * f[:, :L]
    img = _ln(img, sd, "norm_final", 1e-5)
    shift, scale = _lin(st, sd, "norm_out.linear").chunk(2, 1)
    img = _ln(img, sd, "norm_out.norm", 1e-5) * (1 + scale[:, None]) + shift[:, None]
    out = _lin(img, sd, "proj_out")
    out = out.reshape(b, nf, gh, gw, -1, p, p).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, nf, -1, gh * p, gw * p)
    return out


def _positions(frames, gh, gw):
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([t.flatten(), h.flatten(), w.flatten()], 1)


def _transformer_options(patcher):
    import comfy.patcher_extension

    return {"wrappers": comfy.patcher_extension.merge_nested_dicts({}, patcher.wrappers, copy_dict1=False)}


@pytest.mark.parametrize("n_refs", [1, 2])
def test_patched_prediction_equals_plain_reference(tiny, CID, n_refs):
    mp = tiny["mp"]
    patched = CID.apply_concat_id_cogvideox(mp)
    model = patched.model
    sd = {k: v.float() for k, v in tiny["tr"].state_dict().items()}
    torch.manual_seed(10 + n_refs)
    x = torch.randn(2, 16, 3, 12, 16)  # CFG-like batch of 2, T = 3 latent frames
    ctx = torch.randn(2, 8, 64)
    refs_raw = torch.randn(1, 16, n_refs, 12, 16)  # raw VAE latents from the conditioner
    conds = model.extra_conds(noise=x, cross_attn=ctx, time_dim_concat=refs_raw, device="cpu")
    refs = conds["time_dim_concat"].process_cond(batch_size=2, device="cpu").cond
    for t in (999, 400, 20):
        sigma = model.model_sampling.sigmas[t].reshape(1).repeat(2)
        with torch.no_grad():
            den = model.apply_model(x, sigma, c_crossattn=ctx, time_dim_concat=refs,
                                    transformer_options=_transformer_options(patched))
            xin = x / (sigma.reshape(-1, 1, 1, 1, 1) ** 2 + 1) ** 0.5
            seq = torch.cat([xin, (refs_raw * 0.7).expand(2, -1, -1, -1, -1)], 2).movedim(1, 2)  # clean refs
            v = _reference_forward(sd, seq, torch.tensor([t, t]), ctx, _positions(3 + n_refs, 6, 8), 2, 16, 2)
            v = v[:, :3].movedim(2, 1)  # reference frames cut off
        ab = (1.0 / (sigma.double() ** 2 + 1)).float().reshape(-1, 1, 1, 1, 1)
        ref = ab.sqrt() * xin - (1 - ab).sqrt() * v
        assert den.shape == x.shape
        err = (den - ref).abs().max().item()
        assert err < 1e-5, (t, err)
    # the references matter, and the unpatched original refuses them with a clear error
    with torch.no_grad():
        plain = model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=_transformer_options(patched))
        assert (plain - den).abs().max() > 1e-3
        with pytest.raises(ValueError, match="Concat-ID Model Patch"):
            mp.model.apply_model(x, sigma, c_crossattn=ctx, time_dim_concat=refs, transformer_options={})
    assert not mp.wrappers  # the shared model is untouched


def test_rope_of_references_is_time_T_and_T_plus_1_same_grid(tiny):
    """The table the patched network uses for the reference tokens (a T + n frame table, (t h w) order)
    equals the formula with time T, T+1 and the video's own (h, w) grid."""
    dm = tiny["mp"].model.diffusion_model
    T, n, gh, gw = 3, 2, 6, 8
    cos, sin = dm.rotary_embedding(T + n, gh, gw, torch.device("cpu"))
    ref_cos, ref_sin = _rope_table(_positions(T + n, gh, gw), 16)
    assert (cos - ref_cos).abs().max() < 1e-5 and (sin - ref_sin).abs().max() < 1e-5
    ref_tokens = cos[T * gh * gw:]
    for k in range(n):
        pos = torch.stack([torch.full((gh * gw,), T + k), _positions(1, gh, gw)[:, 1], _positions(1, gh, gw)[:, 2]], 1)
        c, s = _rope_table(pos, 16)
        assert (ref_tokens[k * gh * gw:(k + 1) * gh * gw] - c).abs().max() < 1e-5
    # the video tokens keep the plain T-frame table
    c_video, _ = dm.rotary_embedding(T, gh, gw, torch.device("cpu"))
    assert torch.equal(cos[:T * gh * gw], c_video)


def test_percent_window_and_bad_inputs(tiny, CID):
    mp = tiny["mp"]
    model = mp.model
    x, ctx = torch.randn(1, 16, 2, 12, 16), torch.randn(1, 8, 64)
    refs = torch.randn(1, 16, 1, 12, 16) * 0.7
    late = CID.apply_concat_id_cogvideox(mp, start_percent=0.5, end_percent=1.0)
    full = CID.apply_concat_id_cogvideox(mp)
    s_hi = model.model_sampling.sigmas[990].reshape(1)
    with torch.no_grad():
        plain = model.apply_model(x, s_hi, c_crossattn=ctx)
        outside = late.model.apply_model(x, s_hi, c_crossattn=ctx, time_dim_concat=refs,
                                         transformer_options=dict(_transformer_options(late), sigmas=s_hi))
        inside = full.model.apply_model(x, s_hi, c_crossattn=ctx, time_dim_concat=refs,
                                        transformer_options=dict(_transformer_options(full), sigmas=s_hi))
    assert torch.equal(outside, plain) and (inside - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="width and height"):
        with torch.no_grad():
            full.model.apply_model(x, s_hi, c_crossattn=ctx, time_dim_concat=torch.randn(1, 16, 1, 6, 8),
                                   transformer_options=_transformer_options(full))
    with pytest.raises(ValueError, match="start_percent"):
        CID.apply_concat_id_cogvideox(mp, 0.8, 0.2)


# ------------------------------------------------------------------ through the real server

def _webp_frames(data):
    import io as _io

    from PIL import Image

    return Image.open(_io.BytesIO(data)).n_frames


def _write_server_files(server):
    from diffusers import AutoencoderKLCogVideoX

    m = server.models_dir
    cid = m / "concat_id" / "tiny_cog_sat"
    if not (cid / "single-identity" / "latest").exists():
        cid.mkdir(parents=True, exist_ok=True)
        _save_sat(cid, _tiny_transformer(20))
    vae_dir = m / "vae" / "tiny_cid_cog_vae"
    if not (vae_dir / "config.json").exists():
        torch.manual_seed(21)
        AutoencoderKLCogVideoX(**TINY_VAE).eval().save_pretrained(vae_dir)


def _prompt(color, frames=9, seed=3, refs=1):
    p = {
        "1": {"class_type": "LikenessConcatIDCogVideoXLoader", "inputs": {
            "checkpoint": "tiny_cog_sat/single-identity/1000/mp_rank_00_model_states.pt", "weight_dtype": "fp32"}},
        "2": {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 64}},
        "3": {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 2, "tokens": 8, "width": 64}},
        "4": {"class_type": "LikenessLoadCogVideoXVAE", "inputs": {"vae_name": "tiny_cid_cog_vae/", "diffusers_tiling": False}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": refs, "color": color}},
        "6": {"class_type": "LikenessConcatIDConditioner", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["4", 0], "references": ["5", 0],
            "width": 64, "height": 48, "length": frames, "batch_size": 1}},
        "7": {"class_type": "LikenessConcatIDCogVideoXModelPatch", "inputs": {
            "model": ["1", 0], "start_percent": 0.0, "end_percent": 1.0}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0], "positive": ["6", 0], "negative": ["6", 1], "latent_image": ["6", 2],
            "seed": seed, "steps": 3, "cfg": 6.0, "sampler_name": "ddim", "scheduler": "simple", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["4", 0]}},
        "10": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["9", 0], "filename_prefix": "cid_cog", "fps": 8.0, "lossless": True, "quality": 90,
            "method": "default"}},
    }
    return p


def _frames_of(server, hist):
    import io as _io

    import numpy as np
    from PIL import Image, ImageSequence

    files = server.output_files(hist, "10")
    assert len(files) == 1
    im = Image.open(_io.BytesIO(server.view(*files[0])))
    return np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) for f in ImageSequence.Iterator(im)])


@pytest.mark.server
def test_server_concat_id_cogvideox_video(server):
    _write_server_files(server)
    a = _frames_of(server, server.run(_prompt(0x3366CC), timeout=300))
    assert a.shape[0] == 9  # the requested frames; the reference frame is not in the video
    b = _frames_of(server, server.run(_prompt(0xCC6633), timeout=300))
    assert b.shape == a.shape and abs(a - b).max() > 1.0  # the reference changes the video
    a2 = _frames_of(server, server.run(_prompt(0x3366CC), timeout=300))
    assert abs(a - a2).max() == 0  # no leak from the previous prompt
    two = _frames_of(server, server.run(_prompt(0x3366CC, frames=5, refs=2), timeout=300))
    assert two.shape[0] == 5
    # unpatched model + references -> the server reports a clear error and survives
    from support.server import PromptFailed

    p = _prompt(0x3366CC)
    p["8"]["inputs"]["model"] = ["1", 0]
    with pytest.raises(PromptFailed, match="Concat-ID Model Patch"):
        server.run(p, timeout=300)
