"""ComfyUI's own CogVideoX (ComfyUI >= 0.33): its key layout loads through 'Load CogVideoX' (a 1:1 rename to the
diffusers names, every key accounted for), and the FantasyID / Concat-ID patches refuse the MODEL that ComfyUI's
stock 'Load Diffusion Model' builds, because it is not the released model (bench/cogvideox_native_vs_diffusers.py,
docs/cogvideox.md)."""

import importlib
import json

import pytest
import torch

pytest.importorskip("diffusers")

# The native names, written out from comfy/ldm/cogvideo/model.py (ComfyUI 0.33): diffusers module -> native module.
NATIVE_OF_BLOCK = {
    "norm1.linear": "norm1.linear", "norm1.norm": "norm1.norm",
    "attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.norm_q": "norm_q", "attn1.norm_k": "norm_k",
    "attn1.to_out.0": "attn_out", "norm2.linear": "norm2.linear", "norm2.norm": "norm2.norm",
    "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out",
}
NATIVE_OF_TOP = {
    "patch_embed.proj": "patch_embed.proj", "patch_embed.text_proj": "patch_embed.text_proj",
    "time_embedding.linear_1": "time_embedding_linear_1", "time_embedding.linear_2": "time_embedding_linear_2",
    "ofs_embedding.linear_1": "ofs_embedding_linear_1", "ofs_embedding.linear_2": "ofs_embedding_linear_2",
    "norm_final": "norm_final", "norm_out.linear": "norm_out.linear", "norm_out.norm": "norm_out.norm",
    "proj_out": "proj_out",
}

# head_dim 64 (ComfyUI's detection assumes it); width 192 so that ComfyUI's sin-cos table (width / 3) builds
BASE = dict(num_attention_heads=3, attention_head_dim=64, out_channels=16, time_embed_dim=32, text_embed_dim=48,
            num_layers=2, patch_size=2, sample_height=12, sample_width=20, sample_frames=9)
CONFIGS = {
    "t2v_rope": dict(BASE, in_channels=16, use_rotary_positional_embeddings=True),
    "i2v_learned_pos": dict(BASE, in_channels=32, use_rotary_positional_embeddings=True,
                            use_learned_positional_embeddings=True),
    "v1_5_ofs": dict(BASE, in_channels=32, use_rotary_positional_embeddings=True, patch_size_t=2, ofs_embed_dim=16,
                     sample_frames=17),
}


def to_native(sd):
    out = {}
    for k, v in sd.items():
        module, _, leaf = k.rpartition(".")
        if k == "patch_embed.pos_embedding":
            out[k] = v
        elif module.startswith("transformer_blocks."):
            _, idx, inner = module.split(".", 2)
            out[f"blocks.{idx}.{NATIVE_OF_BLOCK[inner]}.{leaf}"] = v
        else:
            out[f"{NATIVE_OF_TOP[module]}.{leaf}"] = v
    assert len(out) == len(sd)
    return out


def _diffusers(cfg, seed=0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tr = CogVideoXTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # every parameter matters (zero-initialised ones included)
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if tr.patch_embed.use_learned_positional_embeddings:
            tr.patch_embed.pos_embedding.add_(torch.randn_like(tr.patch_embed.pos_embedding) * 0.05)
    return tr


def _sd(tr):
    return {k: v.detach().clone().contiguous() for k, v in tr.state_dict().items()}


@pytest.fixture(scope="module")
def L(pack):
    return importlib.import_module("likeness_pack.loaders.cogvideox")


def _native_cogvideox():
    from support.paths import comfyui_dir

    if not (comfyui_dir() / "comfy" / "ldm" / "cogvideo" / "model.py").is_file():
        # the feature is absent from this version (not a missing dependency: support/ci_skips.py allows this reason)
        pytest.skip(f"not in this ComfyUI version: {comfyui_dir().name} has no native CogVideoX (comfy/ldm/cogvideo "
                    "arrived after 0.3.75), so there is no native layout or MODEL to check here")
    return importlib.import_module("comfy.ldm.cogvideo.model")  # present: an import error is a failure


# ------------------------------------------------------------------ key mapping

def test_rename_is_one_to_one_on_every_layout(L):
    """Every diffusers key has exactly one native name and the loader maps each back to it (both ways)."""
    for name, cfg in CONFIGS.items():
        sd = _sd(_diffusers(cfg))
        native = to_native(sd)
        assert L.is_native_layout(native) and not L.is_native_layout(sd), name
        back = L.native_to_diffusers(native)
        assert set(back) == set(sd), (name, set(back) ^ set(sd))
        assert all(back[k] is sd[k] for k in sd), name
        assert sorted(L.native_key_to_diffusers(k) for k in native) == sorted(sd), name


def test_rename_matches_comfyui_native_model_keys(L, comfy):
    """ComfyUI's own CogVideoX network (0.33) and diffusers' have the same weights under the rename: every native key
    maps, every diffusers key is reached, shapes agree."""
    native_mod = _native_cogvideox()
    import comfy.ops

    for name, cfg in CONFIGS.items():
        sd = _sd(_diffusers(cfg))
        net = native_mod.CogVideoXTransformer3DModel(**cfg, dtype=torch.float32,
                                                     operations=comfy.ops.disable_weight_init)
        nsd = net.state_dict()
        unmapped = [k for k in nsd if L.native_key_to_diffusers(k) is None]
        assert not unmapped, (name, unmapped)
        renamed = {L.native_key_to_diffusers(k): v for k, v in nsd.items()}
        assert len(renamed) == len(nsd), name  # injective
        assert set(renamed) == set(sd), (name, set(renamed) ^ set(sd))
        for k, v in renamed.items():
            assert tuple(v.shape) == tuple(sd[k].shape), (name, k)
        assert set(nsd) == set(to_native(sd)), name  # the test's own table agrees with ComfyUI's module names


def test_unmapped_or_incomplete_native_file_is_refused(L, tmp_path):
    from safetensors.torch import save_file

    native = to_native(_sd(_diffusers(CONFIGS["t2v_rope"])))
    bad = dict(native, **{"blocks.1.gate_proj.weight": torch.zeros(4, 4)})
    f = tmp_path / "odd_native.safetensors"
    save_file(bad, str(f))
    with pytest.raises(ValueError, match=r"blocks\.1\.gate_proj\.weight.*Load Diffusion Model"):
        L.load_transformer(str(f), "fp32")
    short = {k: v for k, v in native.items() if k != "blocks.1.attn_out.bias"}
    save_file(short, str(f))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn_out\.bias.*Load Diffusion Model"):
        L.load_transformer(str(f), "fp32")
    # a whole ComfyUI checkpoint (transformer next to a VAE) is not a transformer file
    save_file({**{"model.diffusion_model." + k: v for k, v in native.items()}, "vae.x.weight": torch.zeros(1)}, str(f))
    with pytest.raises(ValueError, match="Load Diffusion Model"):
        L.load_transformer(str(f), "fp32")


# ------------------------------------------------------------------ loading a native file

@pytest.mark.parametrize("name", ["t2v_rope", "i2v_learned_pos"])
def test_native_file_loads_like_the_diffusers_file(L, tmp_path, name):
    from safetensors.torch import save_file

    cfg = CONFIGS[name]
    tr = _diffusers(cfg, seed=3)
    sd = _sd(tr)
    save_file(sd, str(tmp_path / "cog_diffusers.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in to_native(sd).items()},
              str(tmp_path / "cog_native.safetensors"))  # as ComfyUI saves a diffusion model
    for stem in ("cog_diffusers", "cog_native"):
        (tmp_path / f"{stem}.json").write_text(json.dumps(dict(tr.config)))
    ref = L.load_transformer(str(tmp_path / "cog_diffusers.safetensors"), "fp32").model
    nat = L.load_transformer(str(tmp_path / "cog_native.safetensors"), "fp32").model
    assert dict(nat.diffusion_model.config) == dict(ref.diffusion_model.config)
    torch.manual_seed(4)
    x = torch.randn(1, 16, 3, 12, 20)  # non-square; the learned table's own grid (diffusers refuses others)
    kw = {"c_crossattn": torch.randn(1, 226, cfg["text_embed_dim"])}
    if cfg["in_channels"] == 32:
        kw["c_concat"] = torch.randn(1, 16, 3, 12, 20)
    with torch.no_grad():
        for t in (700, 300):
            sigma = ref.model_sampling.sigmas[t].reshape(1)
            a = nat.apply_model(x, sigma, **kw)
            b = ref.apply_model(x, sigma, **kw)
            assert (a - b).abs().max() <= 1e-5, (t, (a - b).abs().max())
            # and both are diffusers' transformer itself (ours vs diffusers is tested in test_cogvideox.py)
            xin = x / (sigma ** 2 + 1) ** 0.5
            net_in = torch.cat([xin, kw["c_concat"]], 1) if "c_concat" in kw else xin
            raw = nat.diffusion_model(net_in, torch.tensor([float(t)]), context=kw["c_crossattn"])
            ref_raw = tr(hidden_states=net_in.movedim(1, 2), encoder_hidden_states=kw["c_crossattn"],
                         timestep=torch.tensor([t]), image_rotary_emb=ref.diffusion_model.rotary_embedding(3, 6, 10, "cpu"),
                         return_dict=False)[0].movedim(2, 1)
            assert (raw - ref_raw).abs().max() <= 1e-5
    # without a config next to it, the config is inferred the same way for both layouts
    for stem in ("cog_diffusers", "cog_native"):
        (tmp_path / f"{stem}.json").unlink()
    c_ref = L.read_transformer(str(tmp_path / "cog_diffusers.safetensors"))[0]
    c_nat = L.read_transformer(str(tmp_path / "cog_native.safetensors"))[0]
    assert c_nat == c_ref and c_nat["use_learned_positional_embeddings"] == (name == "i2v_learned_pos")


# ------------------------------------------------------------------ ComfyUI's own MODEL is refused

def _tiny_native_t2v_file(path, seed=7):
    """A ComfyUI-native CogVideoX T2V file (RoPE layout) that ComfyUI's own loader detects."""
    from safetensors.torch import save_file

    cfg = dict(CONFIGS["t2v_rope"], num_attention_heads=2, text_embed_dim=64)
    save_file(to_native(_sd(_diffusers(cfg, seed))), str(path))
    return cfg


def test_patches_refuse_comfyui_native_model(pack, tmp_path):
    _native_cogvideox()
    import comfy.model_base
    import comfy.sd

    f = tmp_path / "native_t2v.safetensors"
    _tiny_native_t2v_file(f)
    mp = comfy.sd.load_diffusion_model(str(f))  # what the stock 'Load Diffusion Model' does
    assert isinstance(mp.model, comfy.model_base.CogVideoX)
    cid = importlib.import_module("likeness_pack.adapters.cogvideox_concat_id")
    fid = importlib.import_module("likeness_pack.adapters.cogvideox_fantasyid")
    with pytest.raises(ValueError, match=r"Concat-ID Model Patch \(CogVideoX\): this MODEL is ComfyUI's own CogVideoX.*"
                                         r"Load CogVideoX"):
        cid.apply_concat_id_cogvideox(mp)
    la = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"Layer-Aware Injector \(FantasyID\): this MODEL is ComfyUI's own CogVideoX"):
        fid.apply_layer_injection(mp, la, torch.zeros(1, 2, 2))


# ------------------------------------------------------------------ through the real server

def _listed(server, node, field):
    spec = server.object_info(node)[node]["input"]["required"][field]
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 combos / classic lists


def _text(seed):
    return {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": seed, "tokens": 226, "width": 64}}


def _write_native_files(server):
    from safetensors.torch import save_file

    d = server.models_dir / "diffusion_models"
    if (d / "tiny_cog_native.safetensors").exists():
        return
    cfg = _tiny_native_t2v_file(d / "tiny_cog_native.safetensors")
    save_file(_sd(_diffusers(cfg, 7)), str(d / "tiny_cog_native_as_diffusers.safetensors"))


def _sample_prompt(loader, prefix):
    return {
        "1": loader, "2": _text(1), "3": _text(2),
        "4": {"class_type": "LikenessEmptyCogVideoXLatent", "inputs": {"width": 64, "height": 48, "length": 5,
                                                                     "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 3,
            "steps": 2, "cfg": 4.0, "sampler_name": "ddim", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }


def _latent(server, hist):
    from safetensors.torch import load_file

    item = hist["outputs"]["6"]["latents"][0]
    return load_file(str(server.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


@pytest.mark.server
def test_server_load_cogvideox_reads_native_file(server):
    _write_native_files(server)
    listed = _listed(server, "LikenessLoadCogVideoX", "model_name")
    assert "tiny_cog_native.safetensors" in listed and "tiny_cog_native_as_diffusers.safetensors" in listed
    lat = {}
    for name in ("tiny_cog_native.safetensors", "tiny_cog_native_as_diffusers.safetensors"):
        loader = {"class_type": "LikenessLoadCogVideoX", "inputs": {"model_name": name, "weight_dtype": "fp32"}}
        lat[name] = _latent(server, server.run(_sample_prompt(loader, f"cog_native/{name[:-12]}")))
    a, b = lat.values()
    assert a.shape == (1, 16, 2, 6, 8) and a.abs().max() > 0
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.server
def test_server_patches_refuse_comfyui_native_model(server):
    from support import example_tiny
    from support.server import PromptFailed

    _native_cogvideox()
    _write_native_files(server)
    assert "tiny_cog_native.safetensors" in _listed(server, "UNETLoader", "unet_name")
    stock = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_cog_native.safetensors",
                                                    "weight_dtype": "default"}}
    # Concat-ID (CogVideoX) patch on the stock loader's MODEL
    p = _sample_prompt(stock, "cog_native/cid")
    p["7"] = {"class_type": "LikenessConcatIDCogVideoXModelPatch",
              "inputs": {"model": ["1", 0], "start_percent": 0.0, "end_percent": 1.0}}
    p["5"]["inputs"]["model"] = ["7", 0]
    with pytest.raises(PromptFailed, match=r"ComfyUI's own CogVideoX.*Load CogVideoX"):
        server.run(p)
    # FantasyID's injector: the whole FantasyID chain from the tiny FantasyID files, the MODEL from the stock loader
    example_tiny.fantasyid_files(server)
    from test_fantasyid_server import _prompt as fantasyid_prompt

    p = fantasyid_prompt("cog_native/fid")
    cog = [n for n in _listed(server, "LikenessLoadCogVideoX", "model_name") if n.startswith(example_tiny.COG + "/")]
    assert cog, "the tiny FantasyID transformer is not listed"
    p["10"]["inputs"]["model_name"] = cog[0]  # the value the dropdown lists
    for k in ("22", "23", "24", "25", "26", "27"):  # the I2V sampling half: the injector alone is what is checked
        p.pop(k)
    sample = _sample_prompt(stock, "cog_native/fid")
    p.update({"30": sample["1"], "40": sample["4"], "41": sample["5"], "42": sample["6"]})
    p["17"]["inputs"]["model"] = ["30", 0]
    p["41"]["inputs"].update(model=["17", 0], positive=["20", 0], negative=["21", 0], latent_image=["40", 0])
    p["42"]["inputs"]["samples"] = ["41", 0]
    with pytest.raises(PromptFailed, match=r"Layer-Aware Injector \(FantasyID\): this MODEL is ComfyUI's own CogVideoX"):
        server.run(p)
    # the pack's own loader on the same file is accepted by the same patch
    p = _sample_prompt({"class_type": "LikenessLoadCogVideoX",
                        "inputs": {"model_name": "tiny_cog_native.safetensors", "weight_dtype": "fp32"}}, "cog_native/ok")
    p["7"] = {"class_type": "LikenessConcatIDCogVideoXModelPatch",
              "inputs": {"model": ["1", 0], "start_percent": 0.0, "end_percent": 1.0}}
    p["5"]["inputs"]["model"] = ["7", 0]
    assert _latent(server, server.run(p)).shape == (1, 16, 2, 6, 8)
