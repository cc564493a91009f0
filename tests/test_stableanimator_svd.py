"""StableAnimator adapter on the tiny native SVD, in-process: ID adapter (attn2_replace) and PoseNet
(input_block_patch) vs plain references, strength 0 == unpatched (bit-exact), CFG branches."""

import importlib
import math

import pytest
import torch

from likeness_blocks.stableanimator import PoseNet

FRAMES = 3


@pytest.fixture(scope="module")
def svd(pack):
    from support.tiny_models import build_tiny_svd

    return build_tiny_svd(seed=0)


@pytest.fixture(scope="module")
def base(comfy, svd):
    return _sample(comfy, svd)


@pytest.fixture(scope="module")
def A(pack):
    return importlib.import_module("likeness_pack.adapters.svd")


def _id_weights(model, A, seed=1):
    g = torch.Generator().manual_seed(seed)
    dm = model.model.diffusion_model
    out = {}
    for path in A.spatial_block_keys(dm):
        attn2 = dm.get_submodule(path).attn2
        wk = attn2.to_k.weight.detach().clone() + 0.05 * torch.randn(attn2.to_k.weight.shape, generator=g)
        wv = attn2.to_v.weight.detach().clone() + 0.05 * torch.randn(attn2.to_v.weight.shape, generator=g)
        out[path] = (wk, wv)
    return out


def _face_tokens(seed=2):
    return torch.randn(1, 4, 1024, generator=torch.Generator().manual_seed(seed))


def _conds(seed=3):
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(1, 1, 1024, generator=g)
    concat = torch.randn(1, 4, 8, 8, generator=g)
    extra = {"motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0}
    pos = [[pooled, {**extra, "concat_latent_image": concat}]]
    neg = [[torch.zeros_like(pooled), {**extra, "concat_latent_image": torch.zeros_like(concat)}]]
    return pos, neg


def _sample(comfy, model, cfg=2.0, steps=1, frames=FRAMES):
    pos, neg = _conds()
    latent = {"samples": torch.zeros(frames, 4, 8, 8)}
    (out,) = comfy.common_ksampler(model, 0, steps, cfg, "euler", "karras", pos, neg, latent, denoise=1.0)
    return out["samples"]


# ---------------------------------------------------------------- plain references


def ref_attention(q, k, v, heads):
    d = q.shape[-1] // heads
    out = torch.empty_like(q)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), -1)
        out[..., sl] = w @ v[..., sl]
    return out


def ref_id_attention(q, k, v, ik, iv, heads, scale):
    h_txt = ref_attention(q, k, v, heads)
    h_id = ref_attention(q, ik, iv, heads)
    res = []
    for b in range(q.shape[0]):
        a, t = h_id[b], h_txt[b]
        n = a.numel()
        mu_a, mu_t = a.sum() / n, t.sum() / n
        sd_a = torch.sqrt(((a - mu_a) ** 2).sum() / (n - 1))
        sd_t = torch.sqrt(((t - mu_t) ** 2).sum() / (n - 1))
        res.append((a - mu_a) * sd_t / (sd_a + 1e-5) + mu_t)
    return h_txt + scale * torch.stack(res)


# ---------------------------------------------------------------- tests


def test_spatial_blocks_enumerated(svd, A):
    keys = A.spatial_block_keys(svd.model.diffusion_model)
    # tiny SVD: input 1, 3 (one per level), middle, output 0..3 -> blocks with a spatial-video transformer
    assert ("middle", 0, 0) in keys.values()
    assert all(len(k) == 3 for k in keys.values())
    assert len(keys) == sum(1 for p in keys if p.endswith("transformer_blocks.0"))
    assert len(keys) >= 5


def test_block_with_id_adapter_matches_reference(svd, A):
    """One spatial BasicTransformerBlock run by ComfyUI with the patch == a plain composition around the reference
    normalised ID attention; batch = [uncond chunk, cond chunk] with zero face tokens for uncond."""
    dm = svd.model.diffusion_model
    path, key = next(iter(A.spatial_block_keys(dm).items()))
    block = dm.get_submodule(path)
    wts = _id_weights(svd, A)
    face = _face_tokens()
    patch = A.IDAttentionPatch(key, *wts[path], face, strength=0.8, sigma_start=1e9, sigma_end=0.0)
    g = torch.Generator().manual_seed(7)
    hh, ww, c = 4, 4, block.attn2.to_q.weight.shape[1]
    x = torch.randn(2 * FRAMES, hh * ww, c, generator=g)
    ctx = torch.randn(2 * FRAMES, 1, 1024, generator=g)
    opts = {"block": key[:2], "block_index": key[2], "patches_replace": {"attn2": {key: patch}},
            "activations_shape": [2 * FRAMES, c, hh, ww], "cond_or_uncond": [1, 0], "sigmas": torch.tensor([5.0])}
    with torch.no_grad():
        got = block(x, context=ctx, transformer_options=opts)
        x1 = x + block.attn1(block.norm1(x))
        n = block.norm2(x1)
        a = block.attn2
        ik = torch.cat([torch.zeros(FRAMES, 4, 1024), face.expand(FRAMES, -1, -1)]) @ wts[path][0].T
        iv = torch.cat([torch.zeros(FRAMES, 4, 1024), face.expand(FRAMES, -1, -1)]) @ wts[path][1].T
        ref = ref_id_attention(a.to_q(n), a.to_k(ctx), a.to_v(ctx), ik, iv, block.n_heads, 0.8)
        x2 = x1 + a.to_out(ref)
        want = x2 + block.ff(block.norm3(x2))
        plain = block(x, context=ctx, transformer_options={"block": key[:2], "block_index": key[2]})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-3
    assert patch.spatial_calls == 1 and patch.temporal_calls == 0


def test_temporal_call_untouched_and_tie_resolved_by_order(svd, A):
    """A temporal call on the same key returns plain attention, also when H*W == frames (shapes alike)."""
    dm = svd.model.diffusion_model
    path, key = next(iter(A.spatial_block_keys(dm).items()))
    wts = _id_weights(svd, A)
    patch = A.IDAttentionPatch(key, *wts[path], _face_tokens(), 1.0, 1e9, 0.0)
    c = dm.get_submodule(path).attn2.to_q.weight.shape[0]
    heads = dm.get_submodule(path).n_heads
    g = torch.Generator().manual_seed(8)
    shape = [FRAMES, c, 1, FRAMES]  # H*W == T: spatial q [T, 3, c] and temporal q [H*W, T, c] look alike
    q, k, v = (torch.randn(FRAMES, FRAMES, c, generator=g) for _ in range(3))
    opts = {"n_heads": heads, "attn_precision": torch.float32, "activations_shape": shape, "cond_or_uncond": [0]}
    s = patch(q, k[:, :1], v[:, :1], opts)
    t = patch(q, k[:, :1], v[:, :1], opts)
    assert patch.spatial_calls == 1 and patch.temporal_calls == 1
    torch.testing.assert_close(t, ref_attention(q, k[:, :1], v[:, :1], heads), atol=1e-5, rtol=0)
    assert not torch.allclose(s, t)
    # an unambiguous temporal shape: [B*H*W, T, C] with H*W = 4
    shape2 = [FRAMES, c, 2, 2]
    q2 = torch.randn(4, FRAMES, c, generator=g)
    t2 = patch(q2, k[:1, :1].expand(4, -1, -1), v[:1, :1].expand(4, -1, -1), {**opts, "activations_shape": shape2})
    torch.testing.assert_close(t2, ref_attention(q2, k[:1, :1].expand(4, -1, -1), v[:1, :1].expand(4, -1, -1), heads),
                               atol=1e-5, rtol=0)
    assert patch.temporal_calls == 2


def test_strength_zero_is_bit_exact_and_strength_one_differs(comfy, svd, A, base):
    wts = _id_weights(svd, A)
    m0, _ = A.apply_id_adapter(svd, wts, _face_tokens(), strength=0.0)
    assert torch.equal(_sample(comfy, m0), base)
    m1, patches = A.apply_id_adapter(svd, wts, _face_tokens(), strength=1.0)
    out1 = _sample(comfy, m1)
    assert (out1 - base).abs().max() > 1e-4
    assert sum(p.spatial_calls for p in patches) == len(patches)  # 1 step, cond+uncond in one batch
    assert sum(p.temporal_calls for p in patches) == sum(p.spatial_calls for p in patches)
    # the base model is untouched by the patched runs
    assert torch.equal(_sample(comfy, svd), base)
    # outside [start, end] the adapter is off: a window that excludes every step == unpatched
    m2, _ = A.apply_id_adapter(svd, wts, _face_tokens(), strength=1.0, start_percent=0.999, end_percent=1.0)
    assert torch.equal(_sample(comfy, m2), base)


def test_id_adapter_rejects_missing_weights(svd, A):
    wts = _id_weights(svd, A)
    wts.pop(next(iter(wts)))
    with pytest.raises(ValueError, match="id_to_k"):
        A.apply_id_adapter(svd, wts, _face_tokens())


def _pose_net_for(svd, seed=4):
    """PoseNet sized to the tiny SVD's first conv (32 channels)."""
    net = PoseNet(noise_latent_channels=svd.model.diffusion_model.input_blocks[0][0].out_channels).eval()
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(v.shape, generator=g) / math.sqrt(max(1, math.prod(v.shape[1:]))) if v.ndim > 1 else
              0.1 * torch.randn(v.shape, generator=g)) for k, v in net.state_dict().items()}
    sd["scale"] = torch.tensor([1.5])
    net.load_state_dict(sd)
    return net


def test_pose_patch_adds_after_conv_in_on_cond_only(svd, A):
    net = _pose_net_for(svd)
    pose = torch.rand(FRAMES, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    p = A.PosePatch(net, pose, strength=0.7)
    h = torch.randn(2 * FRAMES, net.final_proj.out_channels, 8, 8)
    out = p(h, {"block": ("input", 0), "cond_or_uncond": [1, 0]})
    with torch.no_grad():
        want = net(pose.movedim(-1, 1) * 2 - 1) * 0.7
    assert torch.equal(out[:FRAMES], h[:FRAMES])  # uncond chunk: no pose
    torch.testing.assert_close(out[FRAMES:], h[FRAMES:] + want, atol=1e-5, rtol=0)
    assert torch.equal(p(h, {"block": ("input", 1), "cond_or_uncond": [1, 0]}), h)  # only after conv_in
    with pytest.raises(ValueError, match="pose sequence has 3 frames but the video latent has 2"):
        p(h[:4], {"block": ("input", 0), "cond_or_uncond": [1, 0]})


def test_pose_changes_output_and_strength_zero_is_exact(comfy, svd, A, base):
    net = _pose_net_for(svd)
    g = torch.Generator().manual_seed(6)
    pose_a = torch.rand(FRAMES, 64, 64, 3, generator=g)
    pose_b = torch.rand(FRAMES, 64, 64, 3, generator=g)
    m0, _ = A.apply_pose(svd, net, pose_a, strength=0.0)
    assert torch.equal(_sample(comfy, m0), base)
    ma, pa = A.apply_pose(svd, net, pose_a)
    mb, _ = A.apply_pose(svd, net, pose_b)
    out_a, out_b = _sample(comfy, ma), _sample(comfy, mb)
    assert pa.calls == 1
    assert (out_a - base).abs().max() > 1e-4 and (out_a - out_b).abs().max() > 1e-4
    mbad, _ = A.apply_pose(svd, net, pose_a[:2])
    with pytest.raises(ValueError, match="pose sequence has 2 frames"):
        _sample(comfy, mbad)


# ---------------------------------------------------------------- long-video tiles


def ref_tiles(n, size, overlap):
    """From the notes/upstream description, written independently: starts 0, size-overlap, ...; each tile is
    frame 0 + the size-1 frames after its start; an extra end-aligned tile when the end is not reached."""
    if n <= size:
        return [list(range(n))]
    out = []
    s = 0
    while s <= n - size:
        out.append([0] + [f for f in range(s + 1, s + size) if f < n])
        s += size - overlap
    if out[-1][-1] != n - 1:
        out.append([0] + list(range(n - size + 1, n)))
    return out


def test_tile_indices_and_weights():
    from likeness_blocks.stableanimator import tile_indices, tile_weights

    assert tile_indices(16) == [list(range(16))]
    assert tile_indices(30) == [[0] + list(range(1, 16)), [0] + list(range(13, 28)), [0] + list(range(15, 30))]
    for n, size, ov in [(5, 3, 1), (40, 16, 4), (17, 16, 4), (9, 4, 2), (100, 16, 1)]:
        tiles = tile_indices(n, size, ov)
        assert tiles == ref_tiles(n, size, ov)
        assert all(len(t) == size and t[0] == 0 for t in tiles)
        assert set().union(*map(set, tiles)) == set(range(n))
    w = tile_weights(4)
    assert torch.allclose(w, torch.tensor([0.25, 0.75, 0.75, 0.25]))
    with pytest.raises(ValueError, match="overlap"):
        tile_indices(20, 4, 3)
    with pytest.raises(ValueError, match="overlap"):  # upstream would leave frames 16, 32, ... out of every tile
        tile_indices(40, 16, 0)


def test_tiled_apply_model_blends_tiles(A):
    """With a fake model whose output depends on the tile it ran in, the wrapper equals a per-frame weighted mean."""
    calls = []

    def executor(x, t, c_concat, c_crossattn, control, opts, **kw):
        calls.append((opts[A.FRAME_INDICES][0], kw["num_video_frames"], x.shape[0], kw["y"].shape[0]))
        tile_id = float(len(calls))
        return x * 2 + tile_id + c_concat.mean()

    n, size, ov = 7, 4, 1
    x = torch.randn(2 * n, 4, 2, 2)
    cc = torch.zeros(2 * n, 4, 2, 2)
    y = torch.randn(2 * n, 768)
    out = A.tiled_apply_model(executor, x, torch.ones(2 * n), cc, torch.zeros(2 * n, 1, 8), None,
                              {"cond_or_uncond": [1, 0]}, tile_size=size, overlap=ov, y=y, num_video_frames=n)
    tiles = ref_tiles(n, size, ov)
    assert [c[0] for c in calls] == tiles and all(c[1] == size and c[2] == 2 * size == c[3] for c in calls)
    w = [min((j + 0.5) * 2 / size, 2 - (j + 0.5) * 2 / size) for j in range(size)]
    want = torch.zeros_like(x)
    for f in range(n):
        num, den = 0.0, 0.0
        for ti, tile in enumerate(tiles):
            if f in tile:
                wj = w[tile.index(f)]
                num, den = num + wj * (ti + 1), den + wj
        for c in range(2):
            want[c * n + f] = x[c * n + f] * 2 + num / den
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_tiling_through_the_sampler(comfy, svd, A, base):
    """One tile (frames <= tile size) == untiled, bit-exact; several tiles run the UNet per tile (with the pose
    latents of the tile's frames) and give a finite, different result."""
    assert torch.equal(_sample(comfy, A.apply_tiling(svd, tile_size=16, overlap=4)), base)
    net = _pose_net_for(svd)
    pose = torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(9))
    mp, pp = A.apply_pose(svd, net, pose)
    tiled = A.apply_tiling(mp, tile_size=3, overlap=1)
    out = _sample(comfy, tiled, frames=4)
    assert pp.calls == 2  # tiles [0, 1, 2] and [0, 2, 3]
    assert torch.isfinite(out).all() and (out - _sample(comfy, mp, frames=4)).abs().max() > 1e-5


def test_composes_with_hjb_face_guidance(comfy, svd, A):
    """ID adapter + PoseNet + tiles + the pack's HJB Face Guidance (post-CFG hook) on one tiny SVD: it samples,
    HJB runs its optimisation, and the result differs from the same graph without HJB."""
    import torch.nn.functional as F
    from comfy.sd import VAE
    from support import tiny_models

    from likeness_pack.adapters.sampler_hook import HJBFaceGuidance, apply_hjb

    class Rec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
            self.fc = torch.nn.Linear(8 * 27 * 27, 512)
            for p in self.parameters():
                p.data = torch.randn(p.shape, generator=g) * 0.1

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(x * 2 - 1)).flatten(1))

    vae = VAE(sd=tiny_models.tiny_taesd_state_dict())
    m, _ = A.apply_id_adapter(svd, _id_weights(svd, A), _face_tokens(), strength=1.0)
    pose = torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(10))
    m, _ = A.apply_pose(m, _pose_net_for(svd), pose)
    m = A.apply_tiling(m, tile_size=3, overlap=1)
    hook = HJBFaceGuidance(vae, Rec(), F.normalize(torch.randn(512), dim=0), iterations=1, eta=0.5, progress=False)
    guided = _sample(comfy, apply_hjb(m, hook), steps=2, frames=4)
    plain = _sample(comfy, m, steps=2, frames=4)
    assert hook.last_losses and torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-6
