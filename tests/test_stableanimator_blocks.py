"""StableAnimator pure-torch blocks vs plain references written here from the notes
(upstream-methods.md §2.2, §2.3, §9): FusionFaceId, PoseNet, the normalised ID attention."""

import math

import pytest
import torch

from likeness_blocks.stableanimator import FaceEncoder, PoseNet, normalized_id_attention, renormalize_to

ATOL = 1e-5


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        r = torch.randn(v.shape, generator=g)
        if v.ndim == 1 and ("norm" in k or k.endswith(".0.weight") and "layers" in k):
            sd[k] = 1.0 + 0.1 * r
        elif v.ndim <= 1:
            sd[k] = 0.1 * r
        else:
            sd[k] = r / math.sqrt(math.prod(v.shape[1:]))
    module.load_state_dict(sd)
    return sd


# ---------------------------------------------------------------- plain references (functional, from the notes)


def ref_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_face_encoder(sd, id_embeds, clip_embeds, num_tokens, dim, heads, depth):
    x = id_embeds @ sd["proj.0.weight"].T + sd["proj.0.bias"]
    x = ref_gelu(x)
    x = x @ sd["proj.2.weight"].T + sd["proj.2.bias"]
    x = x.reshape(id_embeds.shape[0], num_tokens, dim)
    lat = ref_layer_norm(x, sd["norm.weight"], sd["norm.bias"])
    ctx = clip_embeds @ sd["fusion_model.proj_in.weight"].T + sd["fusion_model.proj_in.bias"]
    dh = sd["fusion_model.layers.0.0.to_q.weight"].shape[0] // heads
    for i in range(depth):
        p = f"fusion_model.layers.{i}."
        c = ref_layer_norm(ctx, sd[p + "0.norm1.weight"], sd[p + "0.norm1.bias"])
        l = ref_layer_norm(lat, sd[p + "0.norm2.weight"], sd[p + "0.norm2.bias"])
        q = l @ sd[p + "0.to_q.weight"].T
        kv = torch.cat([c, l], dim=1) @ sd[p + "0.to_kv.weight"].T
        k, v = kv[..., : heads * dh], kv[..., heads * dh:]
        outs = []
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            qh = q[..., sl] * dh ** -0.25
            kh = k[..., sl] * dh ** -0.25
            logits = qh @ kh.transpose(1, 2)
            w = torch.exp(logits - logits.max(-1, keepdim=True).values)
            w = w / w.sum(-1, keepdim=True)
            outs.append(w @ v[..., sl])
        lat = lat + torch.cat(outs, -1) @ sd[p + "0.to_out.weight"].T
        f = ref_layer_norm(lat, sd[p + "1.0.weight"], sd[p + "1.0.bias"])
        f = ref_gelu(f @ sd[p + "1.1.weight"].T) @ sd[p + "1.3.weight"].T
        lat = lat + f
    out = lat @ sd["fusion_model.proj_out.weight"].T + sd["fusion_model.proj_out.bias"]
    return ref_layer_norm(out, sd["fusion_model.norm_out.weight"], sd["fusion_model.norm_out.bias"])


def ref_conv(x, w, b, stride, pad):
    """Direct convolution by unfolding (no torch conv kernel)."""
    n, c, hh, ww = x.shape
    o, _, kh, kw = w.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oh = (hh + 2 * pad - kh) // stride + 1
    ow = (ww + 2 * pad - kw) // stride + 1
    out = torch.zeros(n, o, oh, ow, dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i: i + stride * oh: stride, j: j + stride * ow: stride]  # n c oh ow
            out += torch.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def ref_pose_net(sd, x):
    spec = [(3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (3, 1)]
    for idx, (k, s) in enumerate(spec):
        w = sd[f"conv_layers.{2 * idx}.weight"]
        assert w.shape[-1] == k
        x = ref_conv(x, w, sd[f"conv_layers.{2 * idx}.bias"], s, 1)
        x = x * torch.sigmoid(x)
    x = ref_conv(x, sd["final_proj.weight"], sd["final_proj.bias"], 1, 0)
    return x * sd["scale"]


def ref_attention(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads
    out = torch.empty_like(q)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        w = torch.softmax(logits, -1)
        out[..., sl] = w @ v[..., sl]
    return out


def ref_id_attention(q, k, v, ik, iv, heads, scale):
    h_txt = ref_attention(q, k, v, heads)
    h_id = ref_attention(q, ik, iv, heads)
    res = []
    for b in range(q.shape[0]):  # per frame
        a, t = h_id[b].flatten(), h_txt[b].flatten()
        n = a.numel()
        mu_a, mu_t = a.sum() / n, t.sum() / n
        sd_a = torch.sqrt(((a - mu_a) ** 2).sum() / (n - 1))
        sd_t = torch.sqrt(((t - mu_t) ** 2).sum() / (n - 1))
        res.append((h_id[b] - mu_a) * sd_t / (sd_a + 1e-5) + mu_t)
    return h_txt + scale * torch.stack(res)


# ---------------------------------------------------------------- tests


def test_face_encoder_release_layout():
    """Full-size FusionFaceId: 56 tensors, the released key names, 57.18 M params (the 228.75 MB file)."""
    with torch.device("meta"):
        m = FaceEncoder()
    sd = m.state_dict()
    assert len(sd) == 56
    for k in ["proj.0.weight", "proj.2.bias", "norm.weight", "fusion_model.proj_in.weight", "fusion_model.proj_out.bias",
              "fusion_model.norm_out.weight", "fusion_model.layers.3.0.to_kv.weight", "fusion_model.layers.0.0.norm1.bias",
              "fusion_model.layers.0.1.0.weight", "fusion_model.layers.0.1.1.weight", "fusion_model.layers.0.1.3.weight"]:
        assert k in sd, k
    assert sd["proj.2.weight"].shape == (4096, 1024)
    assert sd["fusion_model.layers.0.0.to_kv.weight"].shape == (2048, 1024)
    assert sum(v.numel() for v in sd.values()) == 57183232


@pytest.mark.parametrize("batch", [1, 2])
def test_face_encoder_matches_reference(batch):
    torch.manual_seed(0)
    # Same structure, smaller widths for speed (dim 128, 4 heads of 32, depth 2).
    m = FaceEncoder(cross_attention_dim=128, id_embeddings_dim=64, clip_embeddings_dim=96, num_tokens=4,
                    depth=2, dim_head=32, heads=4).eval()
    sd = _randomize(m, 1)
    ide = torch.randn(batch, 64) * 5
    clip = torch.randn(batch, 1, 96)
    with torch.no_grad():
        got = m(ide, clip)
    want = ref_face_encoder(sd, ide, clip, 4, 128, 4, 2)
    assert got.shape == (batch, 4, 128)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # a 2-D CLIP embedding (B, 1024) is accepted as one token
    with torch.no_grad():
        torch.testing.assert_close(m(ide, clip[:, 0]), got, atol=0, rtol=0)


def test_face_encoder_full_size_matches_reference():
    m = FaceEncoder().eval()
    sd = _randomize(m, 2)
    ide = torch.randn(1, 512) * 5
    clip = torch.randn(1, 1, 1024)
    with torch.no_grad():
        got = m(ide, clip)
    torch.testing.assert_close(got, ref_face_encoder(sd, ide, clip, 4, 1024, 16, 4), atol=ATOL, rtol=0)


def test_face_encoder_rejects_wrong_inputs():
    m = FaceEncoder(cross_attention_dim=64, id_embeddings_dim=32, clip_embeddings_dim=48, depth=1, dim_head=16, heads=4)
    with pytest.raises(ValueError, match="ArcFace"):
        m(torch.randn(1, 31), torch.randn(1, 1, 48))
    with pytest.raises(ValueError, match="CLIP"):
        m(torch.randn(1, 32), torch.randn(1, 1, 47))


def test_pose_net_matches_reference():
    m = PoseNet().eval()
    sd = _randomize(m, 3)
    sd["scale"] = torch.tensor([1.7])
    m.load_state_dict(sd)
    assert [k for k in sd if k.endswith("weight")][:2] == ["conv_layers.0.weight", "conv_layers.2.weight"]
    assert sd["final_proj.weight"].shape == (320, 128, 1, 1)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        got = m(x)
    assert got.shape == (2, 320, 4, 6)
    torch.testing.assert_close(got, ref_pose_net(sd, x), atol=ATOL, rtol=0)
    # the learned scale is used (not a hard-coded 2)
    sd["scale"] = torch.tensor([2.0])
    m.load_state_dict(sd)
    with torch.no_grad():
        assert not torch.allclose(m(x), got)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_normalized_id_attention_matches_reference(scale):
    g = torch.Generator().manual_seed(4)
    b, n, c, heads = 3, 20, 64, 4
    q = torch.randn(b, n, c, generator=g)
    k, v = torch.randn(b, 1, c, generator=g), torch.randn(b, 1, c, generator=g)
    ik, iv = torch.randn(b, 4, c, generator=g), torch.randn(b, 4, c, generator=g) * 3 + 1
    got = normalized_id_attention(q, k, v, ik, iv, heads, scale=scale)
    torch.testing.assert_close(got, ref_id_attention(q, k, v, ik, iv, heads, scale), atol=ATOL, rtol=0)


def test_zero_face_tokens_add_the_main_branch_mean():
    """Upstream's uncond branch: zero face tokens -> h_id == 0 -> renormalised to mu(h_txt) (not to 0)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 32, generator=g)
    k, v = torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 32, generator=g)
    z = torch.zeros(2, 4, 32)
    got = normalized_id_attention(q, k, v, z, z, 2, scale=1.0)
    h_txt = ref_attention(q, k, v, 2)
    torch.testing.assert_close(got, h_txt + h_txt.mean(dim=(1, 2), keepdim=True), atol=ATOL, rtol=0)
    assert torch.equal(normalized_id_attention(q, k, v, z, z, 2, scale=0.0), ref_attention(q, k, v, 2)) or \
        torch.allclose(normalized_id_attention(q, k, v, z, z, 2, scale=0.0), ref_attention(q, k, v, 2), atol=ATOL)


def test_renormalize_uses_unbiased_std_and_eps_outside_sqrt():
    a = torch.tensor([[[0.0, 2.0], [4.0, 6.0]]])
    t = torch.tensor([[[1.0, 1.0], [1.0, 5.0]]])
    out = renormalize_to(a, t)
    sd_a = math.sqrt(((0 - 3) ** 2 + 1 + 1 + 9) / 3)
    sd_t = math.sqrt((1 + 1 + 1 + 9) / 3)
    want = (a - 3) * sd_t / (sd_a + 1e-5) + 2
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
