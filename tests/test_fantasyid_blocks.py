"""FantasyID building blocks: parity against plain-torch references written from the notes, key layout, spirals in
OpenMesh order (hand-worked), transform.pkl allow-list loading."""

import math
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from likeness_blocks.fantasyid import (
    CAbstractor,
    FaceAbstractor,
    FusionTransformer,
    HalfedgeTriMesh,
    LayerAttention,
    SpiralConv,
    VertexReducer,
    VertexSpiralNet,
    depth_sin_encoding,
    extract_spirals,
    fuse_id_tokens,
    load_transform_pkl,
    sparse_pool,
)
from likeness_blocks.fantasyid.transform_pkl import parse_transform, safe_unpickle

ATOL = 1e-5


def _randomize(module, seed=0, scale=0.2):
    """Shared random weights (LayerNorm/GroupNorm affine too), so no parameter sits at a trivial default."""
    from _fantasyid_synth import _randomize as randomize

    return randomize(module, seed, scale)


# =====================================================================================================================
# Plain-torch references (from the formulas in the notes; they only read the state dict)
# =====================================================================================================================
def ref_linear(x, sd, p, bias=True):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias") if bias else None)


def ref_ln(x, sd, p, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def ref_ln2d(x, sd, p):
    # timm's ConvNormAct turns norm_layer=LayerNorm2d into LayerNormAct2d, whose eps is 1e-5 (not LayerNorm2d's 1e-6)
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), sd[p + ".weight"], sd[p + ".bias"], 1e-5).permute(
        0, 3, 1, 2
    )


def ref_regnet_block(x, sd, p):
    """RegNet bottleneck (ratio 1, group size 1 = depthwise 3x3), SE after conv2, SiLU, LayerNorm2d."""
    silu = F.silu
    y = silu(ref_ln2d(F.conv2d(x, sd[p + ".conv1.conv.weight"]), sd, p + ".conv1.bn"))
    c = y.shape[1]
    y = silu(ref_ln2d(F.conv2d(y, sd[p + ".conv2.conv.weight"], padding=1, groups=c), sd, p + ".conv2.bn"))
    s = y.mean(dim=(2, 3), keepdim=True)
    s = silu(F.conv2d(s, sd[p + ".se.fc1.weight"], sd[p + ".se.fc1.bias"]))
    s = torch.sigmoid(F.conv2d(s, sd[p + ".se.fc2.weight"], sd[p + ".se.fc2.bias"]))
    y = y * s
    y = ref_ln2d(F.conv2d(y, sd[p + ".conv3.conv.weight"]), sd, p + ".conv3.bn")
    if p + ".downsample.conv.weight" in sd:
        sc = ref_ln2d(F.conv2d(x, sd[p + ".downsample.conv.weight"]), sd, p + ".downsample.bn")
    else:
        sc = x
    return silu(y + sc)


def ref_cabstractor_net(x, sd, p, q_side, depth=3):
    """(B, N, C) without pos-emb -> RegStage -> adaptive avg pool -> RegStage -> readout MLP (SiLU)."""
    b, n, c = x.shape
    side = int(math.isqrt(n))
    y = x.permute(0, 2, 1).reshape(b, c, side, side)
    for i in range(depth):
        y = ref_regnet_block(y, sd, f"{p}.net.0.b{i + 1}")
    y = F.adaptive_avg_pool2d(y, (q_side, q_side))
    for i in range(depth):
        y = ref_regnet_block(y, sd, f"{p}.net.2.b{i + 1}")
    y = y.reshape(b, y.shape[1], -1).permute(0, 2, 1)
    y = ref_linear(y, sd, f"{p}.readout.0")
    return ref_linear(F.silu(y), sd, f"{p}.readout.2")


def ref_mapping(x, sd, p):
    y = F.leaky_relu(ref_ln(ref_linear(x, sd, p + ".0"), sd, p + ".1"), 0.01)
    y = F.leaky_relu(ref_ln(ref_linear(y, sd, p + ".3"), sd, p + ".4"), 0.01)
    return ref_linear(y, sd, p + ".6")


def ref_face_ff(x, sd, p):
    y = ref_ln(x, sd, p + ".0")
    y = F.linear(y, sd[p + ".1.weight"])
    y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))  # exact GELU
    return F.linear(y, sd[p + ".3.weight"])


def ref_face_abstractor(ys, sd, per_scale, q_side):
    """The upstream loop literally: every layer runs, pos_emb is added IN PLACE to the shared context view."""
    x2 = None
    for i in range(len(ys)):
        ctx = ref_mapping(ys[i], sd, f"mapping_{i}")[:, 1:]
        for j in range(i * per_scale, (i + 1) * per_scale):
            ctx += sd[f"layers.{j}.0.pos_emb"]  # the in-place quirk
            x2 = ref_cabstractor_net(ctx, sd, f"layers.{j}.0", q_side)
            x2 = ref_face_ff(x2, sd, f"layers.{j}.1")
    return x2 @ sd["proj_out"]


def ref_depth_encoding(z, dim):
    d = (0.5 * z.double() + 0.5) * 2 * math.pi  # (B, N)
    out = torch.empty(*z.shape, dim, dtype=torch.float64)
    for i in range(dim):
        freq = 10000.0 ** (2 * (i // 2) / dim)
        out[..., i] = torch.sin(d / freq) if i % 2 == 0 else torch.cos(d / freq)
    return out.float()


def ref_attention_heads(q, k, v, heads, scale):
    b, n, inner = q.shape
    dh = inner // heads
    outs = []
    for h in range(heads):
        qs, ks, vs = (t[..., h * dh : (h + 1) * dh] for t in (q, k, v))
        w = torch.softmax(torch.einsum("bid,bjd->bij", qs, ks) * scale, dim=-1)
        outs.append(torch.einsum("bij,bjd->bid", w, vs))
    return torch.cat(outs, dim=-1)


def ref_fusion_transformer(x, sd, depth, heads, p="layers"):
    for i in range(depth):
        y = ref_ln(x, sd, f"{p}.{i}.0.norm")
        q, k, v = F.linear(y, sd[f"{p}.{i}.0.fn.to_qkv.weight"]).chunk(3, dim=-1)
        a = ref_attention_heads(q, k, v, heads, (q.shape[-1] // heads) ** -0.5)
        x = x + ref_linear(a, sd, f"{p}.{i}.0.fn.to_out.0")
        y = ref_ln(x, sd, f"{p}.{i}.1.norm")
        y = ref_linear(y, sd, f"{p}.{i}.1.fn.net.0")
        y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
        x = x + ref_linear(y, sd, f"{p}.{i}.1.fn.net.3")
    return x


def ref_spiral_conv(x, spirals, w, b):
    """For each vertex: concatenate the features of its spiral (in order), then one linear map."""
    rows = []
    for v in range(spirals.shape[0]):
        rows.append(torch.cat([x[:, int(u)] for u in spirals[v]], dim=-1))
    return F.linear(torch.stack(rows, dim=1), w, b)


def dense(coo):
    row, col, val, shape = coo
    m = torch.zeros(shape, dtype=torch.float32)
    for r, c, w in zip(row, col, val):
        m[int(r), int(c)] += float(w)
    return m


def ref_mish(x):
    return x * torch.tanh(F.softplus(x))


def ref_reducer(x, sd):
    specs = [(4, 2), (4, 2), (2, 1), (2, 1)]
    y = x.transpose(1, 2)
    for i, (s, pad) in enumerate(specs):
        p = f"conv_block{i + 1}"
        h = F.conv1d(y, sd[p + ".conv_in.conv1d.weight"], sd[p + ".conv_in.conv1d.bias"], stride=s, padding=pad)
        h = ref_mish(F.group_norm(h, 8, sd[p + ".conv_in.group_norm.weight"], sd[p + ".conv_in.group_norm.bias"]))
        h = F.conv1d(h, sd[p + ".conv_out.conv1d.weight"], sd[p + ".conv_out.conv1d.bias"], stride=1, padding=1)
        h = ref_mish(F.group_norm(h, 8, sd[p + ".conv_out.group_norm.weight"], sd[p + ".conv_out.group_norm.bias"]))
        r = F.conv1d(y, sd[p + ".residual_conv.weight"], sd[p + ".residual_conv.bias"], stride=s, padding=pad)
        y = h + r
    return y.transpose(1, 2)


# =====================================================================================================================
# C-Abstractor / face abstractor
# =====================================================================================================================
TINY_FACE = dict(
    dim=32, vision_dim=32, num_queries=4, id_dim=40, output_dim=48, num_input_tokens=16, num_query_tokens=4,
    cabs_hidden=16,
)


def test_cabstractor_matches_reference():
    torch.manual_seed(0)
    m = _randomize(CAbstractor(16, 32, 16, 32, 4)).eval()
    sd = {"x." + k: v for k, v in m.state_dict().items()}
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        out = m(x)
        ref = ref_cabstractor_net(x + sd["x.pos_emb"], sd, "x", 2)
    assert out.shape == (2, 4, 32)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_face_abstractor_effective_forward_keeps_in_place_pos_emb_quirk():
    torch.manual_seed(1)
    m = _randomize(FaceAbstractor(**TINY_FACE), seed=1).eval()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    ys = [torch.randn(2, 17, 32) for _ in range(5)]
    with torch.no_grad():
        out = m(ys)
        ref = ref_face_abstractor(ys, sd, per_scale=2, q_side=2)
        # without the quirk (each layer adding only its own pos_emb) the result differs
        ctx = ref_mapping(ys[4], sd, "mapping_4")[:, 1:] + sd["layers.9.0.pos_emb"]
        no_quirk = ref_face_ff(ref_cabstractor_net(ctx, sd, "layers.9.0", 2), sd, "layers.9.1") @ sd["proj_out"]
    assert out.shape == (2, 4, 48)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert (out - no_quirk).abs().max() > 1e-3
    # only the last hidden state matters
    with torch.no_grad():
        out_last = m([ys[4]])
    torch.testing.assert_close(out_last, out, atol=0, rtol=0)


def test_face_abstractor_drop_unused_keeps_output():
    m = _randomize(FaceAbstractor(**TINY_FACE), seed=9).eval()
    ys = [torch.randn(1, 17, 32) for _ in range(5)]
    with torch.no_grad():
        before = m(ys)
        n_before = sum(p.numel() for p in m.parameters())
        m.drop_unused()
        after = m(ys)
    assert sum(p.numel() for p in m.parameters()) < n_before / 3
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_face_abstractor_full_size_token_count():
    m = FaceAbstractor(dim=32, vision_dim=32, id_dim=40, output_dim=64, cabs_hidden=16).eval()
    with torch.no_grad():
        out = m([torch.randn(1, 577, 32)] * 5)
    assert out.shape == (1, 36, 64)


def test_face_abstractor_rejects_bad_hidden_state():
    m = FaceAbstractor(**TINY_FACE)
    with pytest.raises(ValueError, match="CLS"):
        m([torch.randn(1, 16, 32)] * 5)


# =====================================================================================================================
# depth encoding, fusion transformer, LayerAttention, reducer
# =====================================================================================================================
def test_depth_encoding_matches_formula():
    z = torch.rand(2, 7) * 0.4 - 0.2
    out = depth_sin_encoding((0.5 * z + 0.5).unsqueeze(-1), 128)
    torch.testing.assert_close(out, ref_depth_encoding(z, 128), atol=ATOL, rtol=0)
    # interleaved: channels 0 and 1 share a frequency (sin, cos)
    torch.testing.assert_close(out[..., 0] ** 2 + out[..., 1] ** 2, torch.ones(2, 7), atol=1e-5, rtol=0)


def test_fusion_transformer_matches_reference():
    torch.manual_seed(2)
    m = _randomize(FusionTransformer(dim=32, depth=6, heads=4, dim_head=8, mlp_dim=64), seed=2).eval()
    sd = m.state_dict()
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref_fusion_transformer(x, sd, 6, 4), atol=ATOL, rtol=0)


def test_layer_attention_matches_reference():
    torch.manual_seed(3)
    m = _randomize(LayerAttention(dim=48, dim_head=8, heads=4, kv_dim=32), seed=3).eval()
    sd = m.state_dict()
    ids = torch.randn(1, 9, 32)
    h = torch.randn(2, 20, 48)
    with torch.no_grad():
        out = m(ids, h)
        kv = F.linear(ref_ln(ids, sd, "norm1"), sd["to_kv.weight"]).expand(2, -1, -1)
        k, v = kv.chunk(2, dim=-1)
        q = F.linear(ref_ln(h, sd, "norm2"), sd["to_q.weight"])
        ref = F.linear(ref_attention_heads(q, k, v, 4, 8 ** -0.5), sd["to_out.weight"])
    assert out.shape == h.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_reducer_matches_reference_and_token_count():
    torch.manual_seed(4)
    m = _randomize(VertexReducer((16, 16, 24, 32, 40)), seed=4, scale=0.1).eval()
    x = torch.randn(2, 300, 16)
    with torch.no_grad():
        sd64 = {k: v.double() for k, v in m.state_dict().items()}
        torch.testing.assert_close(m(x), ref_reducer(x.double(), sd64).float(), atol=ATOL, rtol=0)
        full = VertexReducer((8, 8, 8, 8, 16))(torch.randn(1, 5023, 8))
    assert full.shape == (1, 79, 16)  # 5023 -> 1256 -> 314 -> 157 -> 79


def test_fused_id_tokens():
    face = torch.randn(1, 36, 16)
    vert = torch.randn(2, 79, 16)
    out = fuse_id_tokens(face, vert)
    assert out.shape == (2, 115, 16)
    torch.testing.assert_close(out[1, :36], face[0])
    torch.testing.assert_close(out[1, 36:], vert[1])


# =====================================================================================================================
# spirals in OpenMesh order (worked out by hand)
# =====================================================================================================================
HEX_FAN = [(0, 1, 2), (0, 2, 3), (0, 3, 4), (0, 4, 5), (0, 5, 6), (0, 6, 1)]


def test_vv_order_hexagon_fan_by_hand():
    # Worked by hand with OpenMesh's add_face rules: after face (0,k,k+1) vertex 0 keeps the outgoing half-edge 0->k+1;
    # the last face closes 0, both its edges at 0 are old, no boundary half-edge is left, so 0 keeps 0->6.
    # The circulator goes clockwise (h <- next(opp(h))): 6, 5, 4, 3, 2, 1.
    # Boundary vertex k keeps its boundary out-edge k->(k+1 around the rim) ... e.g. 1: 1->6, then 1->0, then 1->2.
    m = HalfedgeTriMesh.from_faces(7, HEX_FAN)
    assert m.vv(0) == [6, 5, 4, 3, 2, 1]
    assert m.vv(1) == [6, 0, 2]
    assert m.vv(2) == [1, 0, 3]
    assert m.vv(6) == [5, 0, 1]
    assert m.skipped_faces == []


def test_vv_order_out_of_order_faces_adjusts_outgoing_halfedge():
    # Faces (0,1,2), (0,3,4), (0,2,3): the last face uses two old boundary edges at 0 (3->0, 0->2) and covers 0's
    # stored out-edge 0->2, so OpenMesh re-points it, circulating clockwise from 0->2, at the first boundary out-edge:
    # 0->2 (face), 0->1 (face), 0->4 (boundary) -> vv(0) starts at 4: 4, 3, 2, 1 (not 2, 1, 4, 3).
    # Vertex 3: the new edge 2->3 and old 3->0 -> 3 keeps 3->2 (boundary): 2, 0, 4.
    # Vertex 4 never changed (4->3): 3, 0.  Vertex 1 (1->0): 0, 2.  Vertex 2 (2->1): 1, 0, 3.
    m = HalfedgeTriMesh.from_faces(5, [(0, 1, 2), (0, 3, 4), (0, 2, 3)])
    assert m.vv(0) == [4, 3, 2, 1]
    assert m.vv(3) == [2, 0, 4]
    assert m.vv(4) == [3, 0]
    assert m.vv(1) == [0, 2]
    assert m.vv(2) == [1, 0, 3]


def test_vv_order_with_patch_relinking_by_hand():
    # Three separate fans at 0: (0,1,2), (0,3,4), (0,5,6). Each new fan is linked into 0's boundary cycle just before
    # 0's stored out-edge 0->2, giving the cycle of boundary pairs (in->out at 0): 1->0 => 0->4, 3->0 => 0->6,
    # 5->0 => 0->2 (so vv(0) = 2, 1, 4, 3, 6, 5 here). Face (0,2,3) then uses the old edges 3->0 and 0->2, which are
    # not consecutive (next(3->0) = 0->6): OpenMesh moves the patch 0->6 .. 5->0 into the free gap found by rotating
    # from 2->0: opp(next(2->0)) = 1->0 is boundary, so next(1->0) = 0->6, next(5->0) = 0->4, next(3->0) = 0->2.
    # 0's stored 0->2 is now covered; circulating clockwise 0->2 (face), 0->1 (face), then next(1->0) = 0->6, a
    # boundary out-edge: vv(0) = 6, 5, 4, 3, 2, 1.
    m = HalfedgeTriMesh.from_faces(7, [(0, 1, 2), (0, 3, 4), (0, 5, 6)])
    assert m.vv(0) == [2, 1, 4, 3, 6, 5]
    m.add_face((0, 2, 3))
    assert m.vv(0) == [6, 5, 4, 3, 2, 1]
    assert m.vv(3) == [2, 0, 4]  # 3 keeps 3->2: new edge 2->3, old 3->0 (prev new, next old)
    assert m.vv(2) == [1, 0, 3]
    # a face over an interior half-edge is refused ("complex edge") and skipped, as OpenMesh's TriMesh(points, faces)
    m = HalfedgeTriMesh.from_faces(3, [(0, 1, 2), (0, 1, 2)])
    assert m.skipped_faces == [1]


def test_spirals_by_hand_and_fallback_quirk():
    # vertex 1: 1-ring [6, 0, 2]; next ring walks 6 (vv 5,0,1 rotated to start at 0 -> 0,1,5: new 5),
    # 0 (vv 6,5,4,3,2,1 rotated at 6: new 4, 3), 2 (1,0,3 rotated at 0: nothing new) -> [5, 4, 3].
    sp = extract_spirals(HEX_FAN, 7, seq_length=7)
    assert sp[1].tolist() == [1, 6, 0, 2, 5, 4, 3]
    # vertex 0: its 1-ring fills the spiral but the next ring is empty -> SpiralNet++ falls back to nearest points;
    # with no coordinates OpenMesh's points are all ones, i.e. index order.
    assert sp[0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    # with coordinates the fallback is Euclidean nearest (itself first)
    pts = np.array([[0, 0, 0]] + [[math.cos(a), math.sin(a), 0] for a in np.arange(6) * math.pi / 3], float)
    pts[4] *= 0.5  # vertex 4 nearer the centre
    sp = extract_spirals(HEX_FAN, vertices=pts, seq_length=3)
    assert sp[0].tolist()[:2] == [0, 4]


def _grid(n, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float), indexing="xy")
    verts = np.stack([xs.ravel(), ys.ravel(), rng.uniform(-0.2, 0.2, n * n)], axis=1)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            faces += [(a, b, e), (a, e, d)]
    return verts, np.array(faces)


def test_vv_is_clockwise_ring_for_any_face_order():
    verts, faces = _grid(5)
    rng = np.random.default_rng(3)
    for trial in range(20):
        order = rng.permutation(len(faces))
        m = HalfedgeTriMesh.from_faces(len(verts), faces[order])
        assert m.skipped_faces == []
        for v in range(len(verts)):
            nb = m.vv(v)
            ang = [math.atan2(verts[u, 1] - verts[v, 1], verts[u, 0] - verts[v, 0]) for u in nb]
            steps = [(ang[i] - ang[i + 1]) % (2 * math.pi) for i in range(len(ang) - 1)]
            assert all(0 < s < math.pi + 1e-9 for s in steps), (trial, v, nb)  # clockwise consecutive neighbours
            if m.v_is_boundary(v):
                assert m.face_of[m.v_out[v]] == -1  # boundary vertices start at their boundary out-edge


# =====================================================================================================================
# spiral conv, pooling, vertex network
# =====================================================================================================================
def _tiny_mesh_levels(seed=0):
    """Three-level synthetic mesh (36 -> 9 -> 4 vertices) with selection down- and 3-nnz up-matrices."""
    rng = np.random.default_rng(seed)
    v0, f0 = _grid(6, seed)
    v1, f1 = _grid(3, seed + 1)
    v2, f2 = _grid(2, seed + 2)
    levels = [(v0, f0), (v1, f1), (v2, f2)]
    down, up = [], []
    for (va, _), (vb, _) in zip(levels[:-1], levels[1:]):
        sel = rng.choice(len(va), size=len(vb), replace=False)
        down.append((np.arange(len(vb)), sel, np.ones(len(vb), np.float32), (len(vb), len(va))))
        rows = np.repeat(np.arange(len(va)), 3)
        cols = np.concatenate([rng.choice(len(vb), 3, replace=False) for _ in range(len(va))])
        w = rng.uniform(0.1, 1, (len(va), 3))
        w = (w / w.sum(1, keepdims=True)).ravel().astype(np.float32)
        up.append((rows, cols, w, (len(va), len(vb))))
    return levels, down, up


def test_spiral_conv_and_pool_match_reference():
    torch.manual_seed(5)
    v0, f0 = _tiny_mesh_levels()[0][0]
    spirals = extract_spirals(f0, vertices=v0, seq_length=9)
    conv = _randomize(SpiralConv(8, 6, 9, spirals), seed=5)
    x = torch.randn(2, len(v0), 8)
    with torch.no_grad():
        torch.testing.assert_close(
            conv(x), ref_spiral_conv(x, spirals, conv.layer.weight, conv.layer.bias), atol=ATOL, rtol=0
        )
    _, down, up = _tiny_mesh_levels()
    for coo in (down[0], up[0]):
        row, col, val, shape = coo
        xin = torch.randn(2, shape[1], 5)
        out = sparse_pool(xin, torch.as_tensor(row), torch.as_tensor(col), torch.as_tensor(val), shape[0])
        torch.testing.assert_close(out, dense(coo) @ xin, atol=ATOL, rtol=0)


def test_vertex_spiral_net_matches_reference():
    torch.manual_seed(6)
    levels, down, up = _tiny_mesh_levels(1)
    spirals = [extract_spirals(f, vertices=v, seq_length=9) for v, f in levels[:2]]
    net = VertexSpiralNet(emb_dim=16, num_v_coarse=4, hw_dims=(64, 32, 16), depth=2, heads=4)
    net.set_mesh(spirals, down, up)
    _randomize(net, seed=6, scale=0.1).eval()
    verts = torch.randn(2, 36, 3) * 0.1
    face = torch.randn(2, 5, 64)
    with torch.no_grad():
        out = net(verts, face)
    # reference, in float64
    sd = {k: v.double() for k, v in net.state_dict().items()}
    verts, face = verts.double(), face.double()
    dense64 = lambda c: dense(c).double()  # noqa: E731
    with torch.no_grad():
        coarse = dense64(down[1]) @ (dense64(down[0]) @ verts)
        tok = sd["vtx_query"] + ref_depth_encoding(coarse[..., 2], 16).double()
        hw = face
        for i in range(2):
            hw = ref_linear(F.gelu(ref_linear(hw, sd, f"hw_down.{i}.fc1")), sd, f"hw_down.{i}.fc2")
        t = ref_fusion_transformer(torch.cat([tok, hw], 1), sd, 2, 4, p="transformer.layers")[:, :4]
        x = dense64(up[1]) @ t
        x = F.elu(ref_spiral_conv(x, spirals[1], sd["vtx_upsampler.de_layers.0.conv.layer.weight"],
                                  sd["vtx_upsampler.de_layers.0.conv.layer.bias"]))
        x = dense64(up[0]) @ x
        x = F.elu(ref_spiral_conv(x, spirals[0], sd["vtx_upsampler.de_layers.1.conv.layer.weight"],
                                  sd["vtx_upsampler.de_layers.1.conv.layer.bias"]))
        x = ref_spiral_conv(x, spirals[0], sd["vtx_upsampler.de_layers.2.layer.weight"],
                            sd["vtx_upsampler.de_layers.2.layer.bias"])
        ref = ref_linear(x, sd, "vtx_descriptor_head.0")
    assert out.shape == (2, 36, 16)
    torch.testing.assert_close(out, ref.float(), atol=ATOL, rtol=0)
    verts, face = verts.float(), face.float()
    # x and y never enter the network: only z does
    moved = verts.clone()
    moved[..., :2] += 0.3
    with torch.no_grad():
        torch.testing.assert_close(net(moved, face), out, atol=0, rtol=0)
        assert (net(verts * torch.tensor([1.0, 1.0, 1.5]), face) - out).abs().max() > 1e-4


def test_vertex_spiral_net_without_mesh_is_a_clear_error():
    net = VertexSpiralNet(emb_dim=16, num_v_coarse=4, hw_dims=(32, 16), depth=1)
    with pytest.raises(RuntimeError, match="transform.pkl"):
        net(torch.randn(1, 36, 3), torch.randn(1, 4, 32))


# =====================================================================================================================
# key layout (names as in the released checkpoint; shapes of a full-size build on the meta device)
# =====================================================================================================================
RELEASED_PATTERNS = {
    "face_abstractor": [
        r"latents", r"proj_out", r"layers\.\d+\.0\.pos_emb", r"layers\.\d+\.0\.net\.[02]\.b[123]\..+",
        r"layers\.\d+\.0\.readout\.[02]\.(weight|bias)", r"layers\.\d+\.1\.0\.(weight|bias)",
        r"layers\.\d+\.1\.[13]\.weight", r"mapping_[0-4]\.[0-6]\.(weight|bias)",
        r"id_embedding_mapping\.[0-6]\.(weight|bias)",
    ],
    "vertex_spiral_net": [
        r"vtx_query", r"hw_down\.[0-3]\.fc[12]\.(weight|bias)",
        r"transformer\.layers\.\d\.0\.norm\.(weight|bias)", r"transformer\.layers\.\d\.0\.fn\.to_qkv\.weight",
        r"transformer\.layers\.\d\.0\.fn\.to_out\.0\.(weight|bias)", r"transformer\.layers\.\d\.1\.norm\.(weight|bias)",
        r"transformer\.layers\.\d\.1\.fn\.net\.[03]\.(weight|bias)",
        r"vtx_upsampler\.de_layers\.[01]\.conv\.layer\.(weight|bias)", r"vtx_upsampler\.de_layers\.2\.layer\.(weight|bias)",
        r"vtx_descriptor_head\.0\.(weight|bias)",
    ],
    "vertex_reducer": [
        r"conv_block[1-4]\.conv_(in|out)\.conv1d\.(weight|bias)",
        r"conv_block[1-4]\.conv_(in|out)\.group_norm\.(weight|bias)", r"conv_block[1-4]\.residual_conv\.(weight|bias)",
    ],
    "layer_attention.0": [r"norm[12]\.(weight|bias)", r"to_(q|kv|out)\.weight"],
}


def _build_all(full: bool):
    if full:
        return {
            "face_abstractor": FaceAbstractor(),
            "vertex_spiral_net": VertexSpiralNet(),
            "vertex_reducer": VertexReducer(),
            "layer_attention.0": LayerAttention(),
        }
    return {
        "face_abstractor": FaceAbstractor(**TINY_FACE),
        "vertex_spiral_net": VertexSpiralNet(emb_dim=16, num_v_coarse=4, hw_dims=(128, 64, 32, 16, 16)),
        "vertex_reducer": VertexReducer((16, 16, 24, 32, 40)),
        "layer_attention.0": LayerAttention(dim=48, dim_head=8, heads=4, kv_dim=32),
    }


def test_tiny_build_keys_follow_released_naming():
    for prefix, module in _build_all(full=False).items():
        keys = list(module.state_dict().keys())
        assert keys, prefix
        for k in keys:
            assert any(re.fullmatch(p, k) for p in RELEASED_PATTERNS[prefix]), f"{prefix}.{k} is not a released key"
        for p in RELEASED_PATTERNS[prefix]:
            assert any(re.fullmatch(p, k) for k in keys), f"{prefix}: nothing matches released pattern {p}"


def test_full_size_shapes_match_released_table():
    with torch.device("meta"):
        mods = _build_all(full=True)
    sd = {f"{p}.{k}": v.shape for p, m in mods.items() for k, v in m.state_dict().items()}
    expected = {
        "face_abstractor.proj_out": (1024, 2048),
        "face_abstractor.layers.9.0.pos_emb": (1, 576, 1024),
        "face_abstractor.layers.9.0.readout.0.weight": (1024, 256),
        "face_abstractor.layers.9.0.readout.2.weight": (1024, 1024),
        "face_abstractor.layers.9.1.1.weight": (4096, 1024),
        "face_abstractor.layers.9.1.3.weight": (1024, 4096),
        "face_abstractor.mapping_4.6.weight": (1024, 1024),
        "vertex_spiral_net.vtx_query": (1, 314, 128),
        "vertex_spiral_net.hw_down.0.fc1.weight": (2048, 2048),
        "vertex_spiral_net.hw_down.0.fc2.weight": (1024, 2048),
        "vertex_spiral_net.transformer.layers.0.0.fn.to_qkv.weight": (384, 128),
        "vertex_spiral_net.transformer.layers.0.1.fn.net.0.weight": (256, 128),
        "vertex_spiral_net.vtx_upsampler.de_layers.0.conv.layer.weight": (128, 1152),
        "vertex_spiral_net.vtx_upsampler.de_layers.2.layer.weight": (128, 1152),
        "vertex_spiral_net.vtx_descriptor_head.0.weight": (128, 128),
        "vertex_reducer.conv_block1.conv_in.conv1d.weight": (256, 128, 5),
        "vertex_reducer.conv_block4.residual_conv.weight": (2048, 1024, 3),
        "layer_attention.0.to_q.weight": (2048, 3072),
        "layer_attention.0.to_kv.weight": (4096, 2048),
        "layer_attention.0.to_out.weight": (3072, 2048),
        "layer_attention.0.norm1.weight": (2048,),
        "layer_attention.0.norm2.weight": (3072,),
    }
    for k, shape in expected.items():
        assert k in sd, k
        assert tuple(sd[k]) == shape, (k, tuple(sd[k]), shape)
    assert sum(1 for k in sd if k.startswith("vertex_spiral_net.transformer.layers.") and k.endswith("to_qkv.weight")) == 6
    assert sum(1 for k in sd if re.fullmatch(r"face_abstractor\.layers\.\d+\.0\.pos_emb", k)) == 10


# =====================================================================================================================
# transform.pkl: allow-list unpickler
# =====================================================================================================================
def _synthetic_transform():
    import scipy.sparse as sp

    levels, down, up = _tiny_mesh_levels(2)
    mk = lambda c: sp.csc_matrix((c[2], (c[0], c[1])), shape=c[3])  # noqa: E731
    return {
        "vertices": [v for v, _ in levels],
        "face": [f for _, f in levels],
        "adj": [sp.coo_matrix(np.eye(len(v))) for v, _ in levels],
        "down_transform": [mk(d) for d in down],
        "up_transform": [mk(u) for u in up],
    }, down, up


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_transform_pkl_loads_synthetic_file(tmp_path, protocol):
    obj, down, up = _synthetic_transform()
    path = tmp_path / "transform.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    t = load_transform_pkl(str(path))
    assert t.level_sizes == [36, 9, 4]
    for got, want in zip(t.down + t.up, down + up):
        np.testing.assert_allclose(dense(got).numpy(), dense(want).numpy(), atol=1e-7)
    np.testing.assert_array_equal(t.faces[1], obj["face"][1])


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_transform_pkl_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    obj, _, _ = _synthetic_transform()
    obj["adj"] = _Evil(marker)
    path = tmp_path / "transform.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_transform_pkl(str(path))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        safe_unpickle(b"cbuiltins\neval\n(S'1+1'\ntR.")


def test_transform_pkl_wrong_content_is_clear(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        parse_transform({"vertices": []})
    with pytest.raises(FileNotFoundError, match="transform.pkl"):
        load_transform_pkl(str(tmp_path / "nope.pkl"))


# =====================================================================================================================
# end to end at the released token counts (tiny widths): 577 CLIP tokens + ~5k vertices -> 36 + 79 = 115 ID tokens
# =====================================================================================================================
def test_id_tokens_end_to_end_token_counts():
    from likeness_blocks.fantasyid import encode_id_tokens

    rng = np.random.default_rng(7)
    v0, f0 = _grid(71, 7)  # 5041 vertices: 5041 -> 1261 -> 316 -> 158 -> 79 through the reducer, like 5023
    v1, f1 = _grid(35, 8)  # 1225 + 31 isolated vertices (nearest-point spirals) = 1256
    v1 = np.concatenate([v1, rng.normal(size=(31, 3))])
    sizes = [len(v0), 1256, 314]
    down, up = [], []
    for a, b in zip(sizes[:-1], sizes[1:]):
        down.append((np.arange(b), rng.choice(a, b, replace=False), np.ones(b, np.float32), (b, a)))
        up.append((np.repeat(np.arange(a), 3), rng.integers(0, b, 3 * a), np.full(3 * a, 1 / 3, np.float32), (a, b)))
    spirals = [extract_spirals(f0, vertices=v0), extract_spirals(f1, vertices=v1)]
    assert spirals[0].shape == (5041, 9) and spirals[1].shape == (1256, 9)
    face = FaceAbstractor(dim=32, vision_dim=32, id_dim=40, output_dim=64, cabs_hidden=16).eval()
    net = VertexSpiralNet(emb_dim=16, num_v_coarse=314, hw_dims=(64, 32, 16), depth=2).eval()
    net.set_mesh(spirals, down, up)
    reducer = VertexReducer((16, 16, 16, 32, 64)).eval()
    with torch.no_grad():
        ids = encode_id_tokens(face, net, reducer, [torch.randn(1, 577, 32)] * 5, torch.randn(1, len(v0), 3) * 0.1)
    assert ids.shape == (1, 115, 64)
    assert torch.isfinite(ids).all()
