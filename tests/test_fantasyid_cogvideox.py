"""FantasyID layer-aware injection on the native CogVideoX MODEL (tiny diffusers CogVideoX-I2V loaded through the
pack's loader, in-process): strength 0 == plain bit-exactly, patched blocks == a plain-torch reference, video tokens
only, block range / interval / start-end percent, the shared model is left untouched."""

import importlib

import pytest
import torch
import torch.nn as nn

from test_fantasyid_blocks import _randomize
from test_fantasyid_loader import ref_la

pytest.importorskip("diffusers")

TINY_I2V = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, out_channels=16, time_embed_dim=32,
                text_embed_dim=64, num_layers=4, sample_width=16, sample_height=12, sample_frames=9, patch_size=2,
                max_text_seq_length=8, use_rotary_positional_embeddings=True)
KV = 24
HEADS = 4


@pytest.fixture(scope="module")
def M(pack):
    L = importlib.import_module("likeness_pack.loaders.cogvideox")
    A = importlib.import_module("likeness_pack.adapters.cogvideox_fantasyid")
    return L, A


@pytest.fixture(scope="module")
def cog(tmp_path_factory, M):
    from diffusers import CogVideoXTransformer3DModel

    L, _ = M
    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(**TINY_I2V).eval()
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("cogfid")
    tr.save_pretrained(d / "i2v")
    return L.load_transformer(str(d / "i2v"), "fp32")


def _las(n, seed=0):
    from likeness_blocks.fantasyid import LayerAttention

    return nn.ModuleList(
        _randomize(LayerAttention(dim=32, dim_head=6, heads=HEADS, kv_dim=KV), seed=seed + i, scale=0.3).eval()
        for i in range(n))


def _inputs(seed=1, b=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, 2, 6, 8, generator=g)
    kw = dict(c_crossattn=torch.randn(b, 8, 64, generator=g), c_concat=torch.randn(b, 16, 2, 6, 8, generator=g))
    ids = torch.randn(1, 5, KV, generator=g)
    return x, kw, ids


def _predict(mp, x, kw, sigma_index=300):
    s = mp.model.model_sampling.sigmas[sigma_index].reshape(1).repeat(x.shape[0])
    to = {"wrappers": mp.wrappers, "sigmas": s}  # what the sampler hands the model (wrappers merged from the patcher)
    with torch.no_grad():
        return mp.model.apply_model(x, s, transformer_options=to, **kw)


class _Capture:
    """Hooks registered before the injector's (so they see each block's raw output) + pre-hooks (the next block's
    input, i.e. after injection)."""

    def __init__(self, blocks):
        self.raw, self.inp, self.handles = {}, {}, []
        for i, b in enumerate(blocks):
            self.handles.append(b.register_forward_hook(lambda m, a, o, i=i: self.raw.__setitem__(i, (o[0].clone(), o[1].clone()))))
            self.handles.append(b.register_forward_pre_hook(
                lambda m, a, kw, i=i: self.inp.__setitem__(i, (kw.get("hidden_states", a[0] if a else None).clone(),
                                                                kw.get("encoder_hidden_states", a[1] if len(a) > 1 else None).clone())),
                with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()


def _ref_model_with_hooks(mp, las, ids, strength, blocks_on, interval=1):
    """The plain (unpatched) model with the test's own hooks adding strength * ref_la(ids, video) after the chosen
    blocks: an independent implementation of the formula."""
    sds = [{k: v.detach() for k, v in la.state_dict().items()} for la in las]
    handles = []
    for i, b in enumerate(mp.model.diffusion_model.transformer_blocks):
        if i not in blocks_on:
            continue

        def hook(m, a, o, i=i):
            h = o[0]
            return (h + strength * ref_la(sds[i // interval], ids, h, heads=HEADS), o[1])

        handles.append(b.register_forward_hook(hook))
    return handles


def test_strength_zero_is_bit_exact_and_shared_model_untouched(cog, M):
    _, A = M
    x, kw, ids = _inputs()
    plain = _predict(cog, x, kw)
    zero = A.apply_layer_injection(cog, _las(4), ids, strength=0.0)
    assert torch.equal(_predict(zero, x, kw), plain)
    on = A.apply_layer_injection(cog, _las(4), ids, strength=1.0)
    assert (_predict(on, x, kw) - plain).abs().max() > 1e-3
    # the source MODEL (and the network it shares) is unchanged afterwards: no hooks left behind
    assert torch.equal(_predict(cog, x, kw), plain)
    assert all(not b._forward_hooks for b in cog.model.diffusion_model.transformer_blocks)
    assert not any(cog.wrappers.values()) and not cog.additional_models


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_patched_blocks_match_plain_torch_reference(cog, M, strength):
    _, A = M
    x, kw, ids = _inputs(2)
    las = _las(4, seed=5)
    blocks = cog.model.diffusion_model.transformer_blocks
    patched = A.apply_layer_injection(cog, las, ids, strength=strength)
    cap = _Capture(blocks)
    try:
        out = _predict(patched, x, kw)
    finally:
        cap.remove()
    # per block: next block's video input == raw output + strength * LayerAttention_i(ids, raw); text untouched
    for i in range(len(blocks) - 1):
        raw_v, raw_t = cap.raw[i]
        want = raw_v + strength * ref_la({k: v for k, v in las[i].state_dict().items()}, ids, raw_v, heads=HEADS)
        got_v, got_t = cap.inp[i + 1]
        assert (got_v - want).abs().max() <= 1e-5, i
        assert torch.equal(got_t, raw_t)
        assert (raw_v - got_v).abs().max() > 1e-4  # the injection did something at this block
    # whole model == plain model with the reference hooks
    hs = _ref_model_with_hooks(cog, las, ids, strength, set(range(4)))
    try:
        ref = _predict(cog, x, kw)
    finally:
        for h in hs:
            h.remove()
    assert (out - ref).abs().max() <= 1e-5


def test_block_range_interval_and_percent(cog, M):
    _, A = M
    x, kw, ids = _inputs(3)
    las = _las(4, seed=9)
    # block range 1..3 (end exclusive)
    out = _predict(A.apply_layer_injection(cog, las, ids, block_start=1, block_end=3), x, kw)
    hs = _ref_model_with_hooks(cog, las, ids, 1.0, {1, 2})
    try:
        ref = _predict(cog, x, kw)
    finally:
        for h in hs:
            h.remove()
    assert (out - ref).abs().max() <= 1e-5
    # interval 2 (2 modules for 4 blocks: blocks 0 and 2 use modules 0 and 1)
    las2 = _las(2, seed=13)
    out = _predict(A.apply_layer_injection(cog, las2, ids), x, kw)
    hs = _ref_model_with_hooks(cog, las2, ids, 1.0, {0, 2}, interval=2)
    try:
        ref = _predict(cog, x, kw)
    finally:
        for h in hs:
            h.remove()
    assert (out - ref).abs().max() <= 1e-5
    # start/end percent: outside the window the prediction is the plain one
    plain = _predict(cog, x, kw, sigma_index=900)
    late = A.apply_layer_injection(cog, las, ids, start_percent=0.5, end_percent=1.0)
    assert torch.equal(_predict(late, x, kw, sigma_index=900), plain)  # early step (high sigma): off
    assert not torch.equal(_predict(late, x, kw, sigma_index=100), _predict(cog, x, kw, sigma_index=100))


def test_bad_inputs_are_clear(cog, M):
    _, A = M
    _, _, ids = _inputs()
    with pytest.raises(ValueError, match="layer_attention modules"):
        A.apply_layer_injection(cog, _las(3), ids)
    with pytest.raises(ValueError, match="width"):
        A.apply_layer_injection(cog, _las(4), torch.zeros(1, 5, 7))
    with pytest.raises(ValueError, match="CogVideoX MODEL"):
        A.apply_layer_injection(object(), _las(4), ids)
    with pytest.raises(ValueError, match="start_percent"):
        A.apply_layer_injection(cog, _las(4), ids, start_percent=0.8, end_percent=0.2)


def test_cfg_sampling_both_branches_get_ids(cog, M):
    """Through comfy.sample (cond + uncond batched): strength 0 == plain sampling, bit-exactly; with strength the
    result differs; the hooks are gone afterwards."""
    import comfy.sample

    _, A = M
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 16, 2, 6, 8, generator=g)
    img = torch.randn(1, 16, 1, 6, 8, generator=g)
    pos = [[torch.randn(1, 8, 64, generator=g), {"concat_latent_image": img}]]
    neg = [[torch.randn(1, 8, 64, generator=g), {"concat_latent_image": img}]]
    ids = torch.randn(1, 5, KV, generator=g)

    def sample(mp):
        return comfy.sample.sample(mp, noise, 3, 5.0, "ddim", "simple", pos, neg, torch.zeros_like(noise),
                                   denoise=1.0, disable_pbar=True, seed=0)

    plain = sample(cog)
    assert torch.equal(sample(A.apply_layer_injection(cog, _las(4), ids, strength=0.0)), plain)
    assert (sample(A.apply_layer_injection(cog, _las(4), ids, strength=1.0)) - plain).abs().max() > 1e-4
    assert all(not b._forward_hooks for b in cog.model.diffusion_model.transformer_blocks)


def test_face_modules_from_model_extras_equal_from_file(tmp_path, M, pack):
    """Load FantasyID's two sources give the same modules: the keys 'Load CogVideoX' set aside from a FantasyID
    transformer/ folder, and the same transformer file read directly (face keys only; 'transformer.' prefix too)."""
    import json
    import pickle

    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file, save_file

    from _fantasyid_synth import _grid, face_module_state_dict, transform_dict

    L, _ = M
    Lf = importlib.import_module("likeness_pack.loaders.fantasyid")
    torch.manual_seed(1)
    d = tmp_path / "FantasyID" / "transformer"
    CogVideoXTransformer3DModel(**dict(TINY_I2V, num_layers=2)).save_pretrained(d)
    f = d / "diffusion_pytorch_model.safetensors"
    face = face_module_state_dict(inner_dim=32, n_layers=2, seed=4)
    save_file({**load_file(str(f)), **face}, str(f))
    cfg = json.loads((d / "config.json").read_text())
    cfg["cross_attn_interval"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    v0, f0 = _grid(12, 0)  # 144 vertices -> 49 -> 16
    tp = tmp_path / "transform.pkl"
    tp.write_bytes(pickle.dumps(transform_dict(v0, f0)))

    mp = L.load_transformer(str(tmp_path / "FantasyID"), "fp32")
    ex = L.get_extras(mp)
    assert ex.extra_config.get("cross_attn_interval") == 1
    a = Lf.load_fantasyid(ex.face_state_dict, str(tp), cross_attn_interval=1)
    b = Lf.load_fantasyid(Lf.read_face_state_dict(str(f)), str(tp))
    pref = tmp_path / "prefixed.safetensors"
    save_file({"transformer." + k: v for k, v in load_file(str(f)).items()}, str(pref))
    c = Lf.load_fantasyid(Lf.read_face_state_dict(str(pref)), str(tp))
    assert set(Lf.read_face_state_dict(str(tmp_path / "FantasyID"))) == set(face)
    for other in (b, c):
        sa, sb = a.modules.state_dict(), other.modules.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(1, 17, 64, generator=g) for _ in range(5)]
    verts = torch.randn(1, 144, 3, generator=g) * 0.1
    with torch.no_grad():
        from likeness_blocks.fantasyid import encode_id_tokens

        ids = [encode_id_tokens(m.modules.face_abstractor, m.modules.vertex_spiral_net, m.modules.vertex_reducer, hs,
                                verts) for m in (a, b)]
    assert ids[0].shape == (1, 36 + 3, 64)  # 144 vertices -> 36 -> 9 -> 5 -> 3 vertex tokens at this mesh size
    assert torch.equal(ids[0], ids[1])
    with pytest.raises(ValueError, match="no FantasyID face modules"):
        Lf.load_fantasyid({}, str(tp))
