"""Concat-ID on native Wan 2.1: RoPE tables, reference preparation, block/model parity with an
independent plain-torch reference of Concat-ID's forward (first stage and AdaLN), loaders, controls.

The reference forward below is written from the formulas in shared/reference/upstream-methods.md §3
and §9 (official Wan layout, complex RoPE in float64 on adjacent channel pairs) and shares no code
with the pack.
"""

import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from likeness_blocks.concat_id import (
    ARCFACE_TEMPLATE_112,
    align_face,
    concat_id_positions,
    resize_pad_crop,
    similarity_transform,
)

REPO = Path(__file__).resolve().parents[1]
DIM, FFN, LAYERS, HEADS, TEXT_DIM, FREQ_DIM = 256, 320, 2, 2, 4096, 256


# ----------------------------------------------------------------------------------------------
# ComfyUI in-process (the harness's `comfy`/`pack` fixtures when present, else a local import)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cm(comfy, pack):
    class NS:
        wan = importlib.import_module("likeness_pack.adapters.wan")
        loader = importlib.import_module("likeness_pack.loaders.concat_id")
        nodes = importlib.import_module("likeness_pack.nodes.concat_id")

    return NS


def _wan_shapes():
    """Official Wan 2.1 T2V key names and shapes for a tiny config (num_heads = dim // 128)."""
    s = {
        "patch_embedding.weight": (DIM, 16, 1, 2, 2), "patch_embedding.bias": (DIM,),
        "text_embedding.0.weight": (DIM, TEXT_DIM), "text_embedding.0.bias": (DIM,),
        "text_embedding.2.weight": (DIM, DIM), "text_embedding.2.bias": (DIM,),
        "time_embedding.0.weight": (DIM, FREQ_DIM), "time_embedding.0.bias": (DIM,),
        "time_embedding.2.weight": (DIM, DIM), "time_embedding.2.bias": (DIM,),
        "time_projection.1.weight": (6 * DIM, DIM), "time_projection.1.bias": (6 * DIM,),
        "head.head.weight": (4 * 16, DIM), "head.head.bias": (4 * 16,), "head.modulation": (1, 2, DIM),
    }
    for i in range(LAYERS):
        p = f"blocks.{i}."
        for a in ("self_attn", "cross_attn"):
            for l in ("q", "k", "v", "o"):
                s[p + f"{a}.{l}.weight"] = (DIM, DIM)
                s[p + f"{a}.{l}.bias"] = (DIM,)
            s[p + f"{a}.norm_q.weight"] = (DIM,)
            s[p + f"{a}.norm_k.weight"] = (DIM,)
        s[p + "norm3.weight"] = (DIM,)
        s[p + "norm3.bias"] = (DIM,)
        s[p + "ffn.0.weight"] = (FFN, DIM)
        s[p + "ffn.0.bias"] = (FFN,)
        s[p + "ffn.2.weight"] = (DIM, FFN)
        s[p + "ffn.2.bias"] = (DIM,)
        s[p + "modulation"] = (1, 6, DIM)
    return s


def make_state_dict(adaln, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shp in _wan_shapes().items():
        if k.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            sd[k] = 1.0 + 0.1 * torch.randn(shp, generator=g)
        elif k.endswith("modulation"):
            sd[k] = 0.3 * torch.randn(shp, generator=g)
        else:
            fan_in = shp[1] if len(shp) > 1 else DIM
            if len(shp) == 5:
                fan_in = shp[1] * 4
            sd[k] = torch.randn(shp, generator=g) / math.sqrt(fan_in)
    if adaln:
        sd["time_projection_ref.1.weight"] = torch.randn(6 * DIM, DIM, generator=g) / math.sqrt(DIM)
        sd["time_projection_ref.1.bias"] = 0.1 * torch.randn(6 * DIM, generator=g)
        for i in range(LAYERS):
            sd[f"blocks.{i}.modulation_ref"] = 0.3 * torch.randn(1, 6, DIM, generator=g)
    return sd


# ----------------------------------------------------------------------------------------------
# Independent reference of Concat-ID's Wan forward (formulas only)
# ----------------------------------------------------------------------------------------------

def _ln(x, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _lin(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _ref_freqs(T, h, w, n_refs, head_dim, theta=10000.0):
    """Complex (L, head_dim/2) table: video (f, i, j), reference k at (T + k, i, w + j)."""
    c = head_dim // 2
    split = (c - 2 * (c // 3), c // 3, c // 3)
    tabs = []
    for n in split:
        inv = 1.0 / theta ** (torch.arange(n, dtype=torch.float64) * 2 / (2 * n))
        tabs.append(torch.polar(torch.ones(1024, n, dtype=torch.float64),
                                torch.arange(1024, dtype=torch.float64)[:, None] * inv[None]))
    rows = []
    for f in range(T):
        for i in range(h):
            for j in range(w):
                rows.append((f, i, j))
    for k in range(n_refs):
        for i in range(h):
            for j in range(w):
                rows.append((T + k, i, w + j))
    return torch.stack([torch.cat([tabs[0][f], tabs[1][i], tabs[2][j]]) for f, i, j in rows])


def _rope(x, freqs):
    b, l, n, d = x.shape
    xc = torch.view_as_complex(x.double().reshape(b, l, n, d // 2, 2))
    return torch.view_as_real(xc * freqs[None, :, None]).reshape(b, l, n, d).float()


def _attn(q, k, v, heads):
    b, lq, _ = q.shape
    d = q.shape[-1] // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
    return (a @ v).transpose(1, 2).reshape(b, lq, heads * d)


def reference_forward(sd, x, refs, t, ctx, adaln, strength_log=0.0):
    """Concat-ID Wan forward: x (B,16,T,H,W) noisy video latent, refs (B,16,N,H,W) clean reference
    latents appended on the frame axis, t (B,) timesteps, ctx (B,L,4096). Returns (B,16,T,H,W)."""
    B, _, T, H, W = x.shape
    n_refs = refs.shape[2]
    xin = torch.cat([x, refs], 2)
    tok = F.conv3d(xin, sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=(1, 2, 2))
    Tp, h, w = tok.shape[2:]
    tok = tok.flatten(2).transpose(1, 2)
    lv = T * h * w
    half = FREQ_DIM // 2
    arg = t.float()[:, None] * torch.pow(10000.0, -torch.arange(half).float() / half)[None]
    temb = torch.cat([torch.cos(arg), torch.sin(arg)], 1)
    e = _lin(F.silu(_lin(temb, sd, "time_embedding.0")), sd, "time_embedding.2")  # (B, dim)
    e0 = _lin(F.silu(e), sd, "time_projection.1").reshape(B, 6, DIM)
    e0r = _lin(F.silu(e), sd, "time_projection_ref.1").reshape(B, 6, DIM) if adaln else None
    c = _lin(F.gelu(_lin(ctx, sd, "text_embedding.0"), approximate="tanh"), sd, "text_embedding.2")
    freqs = _ref_freqs(T, h, w, n_refs, DIM // HEADS)
    hd = DIM // HEADS
    for i in range(LAYERS):
        p = f"blocks.{i}."
        m = (sd[p + "modulation"] + e0).unbind(1)  # 6 x (B, dim)
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = (v[:, None] for v in m)
        if adaln:
            mr = (sd[p + "modulation_ref"] + e0r).unbind(1)
            rsh_msa, rsc_msa, rg_msa, rsh_mlp, rsc_mlp, rg_mlp = (v[:, None] for v in mr)
        else:
            rsh_msa, rsc_msa, rg_msa, rsh_mlp, rsc_mlp, rg_mlp = sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp
        xv, xr = tok[:, :lv], tok[:, lv:]
        hin = torch.cat([_ln(xv) * (1 + sc_msa) + sh_msa, _ln(xr) * (1 + rsc_msa) + rsh_msa], 1)
        L = hin.shape[1]
        q = _rope(_rms(_lin(hin, sd, p + "self_attn.q"), sd[p + "self_attn.norm_q.weight"]).reshape(B, L, HEADS, hd), freqs)
        k = _rope(_rms(_lin(hin, sd, p + "self_attn.k"), sd[p + "self_attn.norm_k.weight"]).reshape(B, L, HEADS, hd), freqs)
        v = _lin(hin, sd, p + "self_attn.v").reshape(B, L, HEADS, hd)
        logits = torch.einsum("blnd,bmnd->bnlm", q, k) / math.sqrt(hd)
        logits[..., lv:] = logits[..., lv:] + strength_log
        y = torch.einsum("bnlm,bmnd->blnd", torch.softmax(logits, -1), v).reshape(B, L, DIM)
        y = _lin(y, sd, p + "self_attn.o")
        xv = xv + y[:, :lv] * g_msa
        xr = xr + y[:, lv:] * rg_msa
        # text cross-attention for the video tokens only
        nv = F.layer_norm(xv, (DIM,), sd[p + "norm3.weight"], sd[p + "norm3.bias"], eps=1e-6)
        cq = _rms(_lin(nv, sd, p + "cross_attn.q"), sd[p + "cross_attn.norm_q.weight"])
        ck = _rms(_lin(c, sd, p + "cross_attn.k"), sd[p + "cross_attn.norm_k.weight"])
        cv = _lin(c, sd, p + "cross_attn.v")
        xv = xv + _lin(_attn(cq, ck, cv, HEADS), sd, p + "cross_attn.o")
        # FFN; the AdaLN model feeds the reference tokens with the self-attention shift/scale (quirk)
        fr_in = _ln(xr) * (1 + rsc_msa) + rsh_msa if adaln else _ln(xr) * (1 + sc_mlp) + sh_mlp
        fin = torch.cat([_ln(xv) * (1 + sc_mlp) + sh_mlp, fr_in], 1)
        y = _lin(F.gelu(_lin(fin, sd, p + "ffn.0"), approximate="tanh"), sd, p + "ffn.2")
        xv = xv + y[:, :lv] * g_mlp
        xr = xr + y[:, lv:] * rg_mlp
        tok = torch.cat([xv, xr], 1)
    hm = (sd["head.modulation"] + e[:, None]).unbind(1)
    out = _lin(_ln(tok) * (1 + hm[1][:, None]) + hm[0][:, None], sd, "head.head")  # (B, L, 64)
    out = out[:, :lv].reshape(B, T, h, w, 1, 2, 2, 16)
    out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, 16, T, 2 * h, 2 * w)
    return out


# ----------------------------------------------------------------------------------------------
# Pure-torch tests
# ----------------------------------------------------------------------------------------------

def test_positions_follow_concat_id_formula():
    T, h, w = 3, 2, 4
    pos = concat_id_positions(T, h, w, 1)
    assert pos.shape == ((T + 1) * h * w, 3)
    video = pos[: T * h * w].reshape(T, h, w, 3)
    for f in range(T):
        for i in range(h):
            for j in range(w):
                assert video[f, i, j].tolist() == [f, i, j]
    ref = pos[T * h * w:].reshape(h, w, 3)
    assert (ref[..., 0] == T).all()  # right after the last video frame
    assert ref[..., 1].tolist() == [[i] * w for i in range(h)]  # rows 0..h-1
    assert ref[..., 2].tolist() == [list(range(w, 2 * w))] * h  # columns w..2w-1
    # several identities: own slot each
    p2 = concat_id_positions(T, h, w, 2, "next_frames")[T * h * w:].reshape(2, h, w, 3)
    assert (p2[0] == ref).all() and (p2[1, ..., 0] == T + 1).all() and (p2[1, ..., 1:] == ref[..., 1:]).all()
    p3 = concat_id_positions(T, h, w, 2, "side_by_side")[T * h * w:].reshape(2, h, w, 3)
    assert (p3[0] == ref).all() and (p3[1, ..., 0] == T).all()
    assert p3[1, ..., 2].tolist() == [list(range(2 * w, 3 * w))] * h
    with pytest.raises(ValueError, match="placement"):
        concat_id_positions(T, h, w, 2, "diagonal")


def test_resize_pad_crop_square_face_to_480x832():
    img = torch.rand(1, 448, 448, 3) * 0.5 + 0.25
    out = resize_pad_crop(img, 480, 832)
    assert out.shape == (1, 480, 832, 3)
    # square into 480x832: resized to 480x480, 176 black columns each side
    assert out[:, :, :176].abs().max() == 0 and out[:, :, 656:].abs().max() == 0
    inner = F.interpolate(img.movedim(-1, 1), size=(480, 480), mode="bicubic", antialias=True).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(out[:, :, 176:656], inner, atol=1e-6, rtol=0)
    # wide image into a tall frame: width matched, height int(), odd padding goes to the bottom
    wide = torch.rand(1, 101, 200, 3)
    o2 = resize_pad_crop(wide, 64, 48)
    nh = int(101 * 48 / 200)  # 24
    top = (64 - nh) // 2
    assert o2.shape == (1, 64, 48, 3)
    assert o2[:, :top].abs().max() == 0 and o2[:, top + nh:].abs().max() == 0 and o2[:, top:top + nh].abs().max() > 0


def test_similarity_transform_recovers_known_transform():
    ang, s, tx, ty = 0.35, 1.7, 12.0, -4.0
    m = torch.tensor([[s * math.cos(ang), -s * math.sin(ang), tx], [s * math.sin(ang), s * math.cos(ang), ty]], dtype=torch.float64)
    src = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64)
    dst = src @ m[:, :2].T + m[:, 2]
    torch.testing.assert_close(similarity_transform(src, dst), m, atol=1e-9, rtol=0)


def test_align_face_maps_keypoints_onto_scaled_template():
    # a smooth image; keypoints = template*4 moved by a known similarity into a 300x260 source
    ang, s, tx, ty = -0.2, 0.5, 40.0, 30.0
    fwd = torch.tensor([[s * math.cos(ang), -s * math.sin(ang), tx], [s * math.sin(ang), s * math.cos(ang), ty]], dtype=torch.float64)
    tmpl = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64) * 4
    kps = tmpl @ fwd[:, :2].T + fwd[:, 2]
    H, W = 300, 260
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    img = torch.stack([torch.sin(xx / 17.0), torch.cos(yy / 13.0), (xx + yy) / (H + W)], -1) * 0.4 + 0.5
    out, mk = align_face(img.float(), kps, 448, mask=torch.ones(H, W))
    assert out.shape == (448, 448, 3) and mk.shape == (448, 448)
    # aligned pixel (x, y) comes from source fwd @ (x, y): check the centre region analytically
    ys, xs = torch.meshgrid(torch.arange(150, 300, 7, dtype=torch.float64), torch.arange(150, 300, 7, dtype=torch.float64), indexing="ij")
    sx = fwd[0, 0] * xs + fwd[0, 1] * ys + fwd[0, 2]
    sy = fwd[1, 0] * xs + fwd[1, 1] * ys + fwd[1, 2]
    expect = torch.stack([torch.sin(sx / 17.0), torch.cos(sy / 13.0), (sx + sy) / (H + W)], -1) * 0.4 + 0.5
    got = out[ys.long(), xs.long()].double()
    assert (got - expect).abs().max() < 2e-3  # bilinear on a smooth field
    # aligned (x=447, y=0) comes from source y = -14: outside, so black, and the warped mask is 0 there
    assert fwd[1, 0] * 447 + fwd[1, 2] < -2
    assert out[0, 447].abs().max() == 0 and mk[0, 447] == 0 and mk[224, 224] == 1


# ----------------------------------------------------------------------------------------------
# ComfyUI-backed tests
# ----------------------------------------------------------------------------------------------

def _inputs(seed=1, T=2, n_refs=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, T, 8, 8, generator=g)
    refs = torch.randn(1, 16, n_refs, 8, 8, generator=g)
    ctx = torch.randn(1, 7, TEXT_DIM, generator=g)
    t = torch.tensor([637.0])
    return x, refs, t, ctx


def _run(patcher, x, refs, t, ctx):
    """The diffusion model as the sampler calls it (wrappers and block patches from the patcher)."""
    dm = patcher.model.diffusion_model
    with torch.no_grad():
        return dm(x, t, ctx, time_dim_concat=refs, transformer_options=_opts(patcher))


def _opts(patcher, **extra):
    """transformer_options as the sampler builds them (sampler_helpers merges the patcher's wrappers)."""
    import comfy.patcher_extension

    to = dict(patcher.model_options["transformer_options"])
    to["wrappers"] = comfy.patcher_extension.merge_nested_dicts({}, patcher.wrappers, copy_dict1=False)
    to.update(extra)
    return to


@pytest.fixture(scope="module")
def files(cm, tmp_path_factory):
    d = tmp_path_factory.mktemp("concat_id")
    torch.save(make_state_dict(False, seed=3), d / "first_stage.pt")
    torch.save(make_state_dict(True, seed=4), d / "second_stage_adaln.pt")
    return d


@pytest.mark.parametrize("variant", ["first_stage", "adaln"])
def test_model_parity_with_reference(cm, files, variant):
    name = "first_stage.pt" if variant == "first_stage" else "second_stage_adaln.pt"
    sd = torch.load(files / name, weights_only=True)
    model, weights = cm.loader.load_concat_id(str(files / name), model_options={"dtype": torch.float32})
    assert weights.variant == variant
    patched = cm.wan.apply_concat_id(model, adaln=weights.adaln)
    x, refs, t, ctx = _inputs()
    got = _run(patched, x, refs, t, ctx)
    want = reference_forward(sd, x, refs, t, ctx, adaln=variant == "adaln")
    assert got.shape == x.shape  # reference frame cut off
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the reference matters, and the unpatched (Phantom-style) forward differs from Concat-ID's
    x2, refs2, _, _ = _inputs(seed=9)
    assert (got - _run(patched, x, refs2, t, ctx)).abs().max() > 1e-3
    assert (got - _run(model, x, refs, t, ctx)).abs().max() > 1e-3
    # the shared model is untouched: no wrappers / block patches on the original
    assert not model.model_options["transformer_options"].get("patches_replace")


def test_first_stage_is_not_adaln(cm, files):
    """A check that the AdaLN reference really differs (so the parity above can fail)."""
    sd = torch.load(files / "second_stage_adaln.pt", weights_only=True)
    x, refs, t, ctx = _inputs()
    a = reference_forward(sd, x, refs, t, ctx, adaln=True)
    b = reference_forward(sd, x, refs, t, ctx, adaln=False)
    assert (a - b).abs().max() > 1e-3


def test_strength_and_percent_controls(cm, files):
    model, weights = cm.loader.load_concat_id(str(files / "second_stage_adaln.pt"), model_options={"dtype": torch.float32})
    sd = torch.load(files / "second_stage_adaln.pt", weights_only=True)
    x, refs, t, ctx = _inputs()
    no_ref = _run(model, x, None, t, ctx)
    half = cm.wan.apply_concat_id(model, adaln=weights.adaln, strength=0.5)
    got = _run(half, x, refs, t, ctx)
    want = reference_forward(sd, x, refs, t, ctx, adaln=True, strength_log=math.log(0.5))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    tiny = cm.wan.apply_concat_id(model, adaln=weights.adaln, strength=1e-9)
    torch.testing.assert_close(_run(tiny, x, refs, t, ctx), no_ref, atol=1e-5, rtol=0)
    zero = cm.wan.apply_concat_id(model, adaln=weights.adaln, strength=0.0)
    assert torch.equal(_run(zero, x, refs, t, ctx), no_ref)
    # start/end percent: outside the window the references are not used at all
    late = cm.wan.apply_concat_id(model, adaln=weights.adaln, start_percent=0.5, end_percent=1.0)
    ms = model.get_model_object("model_sampling")
    early_sigma, late_sigma = float(ms.percent_to_sigma(0.1)), float(ms.percent_to_sigma(0.9))
    def run_at(p, sigma):
        with torch.no_grad():
            return p.model.diffusion_model(x, t, ctx, time_dim_concat=refs,
                                           transformer_options=_opts(p, sigmas=torch.tensor([sigma])))

    assert torch.equal(run_at(late, early_sigma), no_ref)
    full = cm.wan.apply_concat_id(model, adaln=weights.adaln)
    torch.testing.assert_close(run_at(late, late_sigma), run_at(full, late_sigma), atol=0, rtol=0)
    with pytest.raises(ValueError, match="start_percent"):
        cm.wan.apply_concat_id(model, start_percent=0.8, end_percent=0.2)


def test_two_references_each_own_slot(cm, files):
    model, weights = cm.loader.load_concat_id(str(files / "first_stage.pt"), model_options={"dtype": torch.float32})
    x, refs, t, ctx = _inputs(n_refs=2)
    p = cm.wan.apply_concat_id(model, placement="next_frames")
    got = _run(p, x, refs, t, ctx)
    sd = torch.load(files / "first_stage.pt", weights_only=True)
    torch.testing.assert_close(got, reference_forward(sd, x, refs, t, ctx, adaln=False), atol=1e-5, rtol=0)
    side = _run(cm.wan.apply_concat_id(model, placement="side_by_side"), x, refs, t, ctx)
    assert (side - got).abs().max() > 1e-4
    assert got.shape == x.shape


def test_loaders_first_stage_and_adaln_layouts(cm, files):
    import comfy.sd

    for name, variant in (("first_stage.pt", "first_stage"), ("second_stage_adaln.pt", "adaln")):
        model, weights = cm.loader.load_concat_id(str(files / name), model_options={"dtype": torch.float32})
        assert weights.variant == variant
        # stock loader path (UNETLoader's comfy.sd.load_diffusion_model) reads the same Wan weights
        stock = comfy.sd.load_diffusion_model(str(files / name), model_options={"dtype": torch.float32})
        a = model.model.diffusion_model.state_dict()
        b = stock.model.diffusion_model.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        sd = torch.load(files / name, weights_only=True)
        assert torch.equal(a["blocks.1.self_attn.q.weight"], sd["blocks.1.self_attn.q.weight"])
        if variant == "adaln":
            assert weights.adaln.num_blocks == LAYERS and weights.adaln.dim == DIM
            assert torch.equal(weights.adaln.modulation_ref[1], sd["blocks.1.modulation_ref"])
    # a half AdaLN file is refused with a clear message
    sd = make_state_dict(True)
    del sd["blocks.1.modulation_ref"]
    with pytest.raises(ValueError, match="modulation_ref"):
        cm.loader.split_concat_id_state_dict(sd)


def test_patch_refuses_non_wan(cm):
    class FakePatcher:
        def get_model_object(self, name):
            return torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="Wan 2.1"):
        cm.wan.apply_concat_id(FakePatcher())


def test_prepare_reference_node_aligns_masks_and_pads(cm):
    from likeness_blocks.face_types import DetectedFace, FaceEmbeds

    H, W = 200, 240
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, H, W, 3, generator=g) * 0.8 + 0.1
    tmpl = torch.tensor(ARCFACE_TEMPLATE_112) * 4
    # image 0: a small and a large face (the large one is used); image 1: no face (whole image used)
    small = DetectedFace(0, torch.tensor([0.0, 0, 20, 20]), tmpl * 0.1, 0.9, torch.zeros(512))
    big_kps = tmpl * 0.4 + torch.tensor([30.0, 20.0])
    big = DetectedFace(0, torch.tensor([20.0, 10, 220, 190]), big_kps, 0.9, torch.zeros(512))
    fe = FaceEmbeds(faces=[small, big], image_sizes=[(H, W), (H, W)])
    mask = torch.ones(1, H, W)
    mask[:, :, : W // 2] = 0.0  # blank the left half of the source
    ref, aligned = cm.nodes.ConcatIDPrepareReference.execute(img, fe, 96, 64, mask).args
    assert ref.shape == (2, 64, 96, 3) and aligned.shape == (2, 448, 448, 3)
    want0, _ = align_face(img[0], big_kps, 448)
    # aligned face 0 = warp of the large face, with the left half of the source blanked
    m = torch.tensor([[1 / 0.4, 0, -30 / 0.4], [0, 1 / 0.4, -20 / 0.4]])  # source -> aligned
    src_x_at_aligned_400 = (400 - m[0, 2]) / m[0, 0]  # aligned x=400 comes from source x=190 (kept)
    assert src_x_at_aligned_400 > W // 2 + 2
    torch.testing.assert_close(aligned[0, 100:300, 390:410], want0[100:300, 390:410], atol=1e-5, rtol=0)
    assert aligned[0, 100:300, 10:40].abs().max() == 0  # from source x ~ 34..46 < 120: blanked
    # square 448 -> 64x96: 64x64 centre, 16 black columns each side
    assert ref[0, :, :16].abs().max() == 0 and ref[0, :, 80:].abs().max() == 0
    # image 1 (no face, 200x240) -> 64 x int(240*64/200)=76 wide, 10 black columns each side
    assert ref[1, :, :10].abs().max() == 0 and ref[1, :, 86:].abs().max() == 0 and ref[1, :, 50:86].min() > 0  # (left half masked)
    torch.testing.assert_close(ref[0:1], resize_pad_crop(aligned[0:1], 64, 96), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="mask"):
        cm.nodes.ConcatIDPrepareReference.execute(img, fe, 96, 64, torch.ones(1, 10, 10))


def test_conditioner_puts_one_clean_frame_per_reference_in_both_branches(cm):
    import comfy.sd
    from support.tiny_models import tiny_wan_vae_state_dict

    vae = comfy.sd.VAE(sd=tiny_wan_vae_state_dict())
    pos = [[torch.randn(1, 8, 4096), {}]]
    neg = [[torch.randn(1, 8, 4096), {}]]
    refs = torch.rand(2, 64, 64, 3)
    p, n, lat = cm.nodes.ConcatIDConditioner.execute(pos, neg, vae, refs, 64, 64, 9).args
    assert lat["samples"].shape == (1, 16, 3, 8, 8)
    a, b = p[0][1]["time_dim_concat"], n[0][1]["time_dim_concat"]
    assert a.shape == (1, 16, 2, 8, 8) and torch.equal(a, b)  # both CFG branches carry the references
    torch.testing.assert_close(a[:, :, 1:2], vae.encode(refs[1:2]), atol=1e-6, rtol=0)
    assert "time_dim_concat" not in pos[0][1]  # inputs not mutated
