"""FantasyID face modules out of a transformer checkpoint (saved as users have it), and the generic layer injector."""

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from adapters.layer_injection import LayerInjector
from test_fantasyid_blocks import _randomize, _synthetic_transform, ref_attention_heads, ref_ln

TINY_CFG = dict(
    face_abstractor=dict(
        dim=32, vision_dim=32, depth=10, num_scales=5, num_queries=4, num_id_token=5, id_dim=40, output_dim=64,
        ff_mult=4, num_input_tokens=16, cabs_hidden=16,
    ),
    vertex_spiral_net=dict(emb_dim=16, num_v_coarse=4, hw_dims=(64, 32, 16), depth=6, heads=4, mlp_mult=2,
                           seq_length=9, num_levels=2),
    vertex_reducer=(16, 16, 24, 32, 64),
    layer_attention=dict(count=3, dim=48, heads=16, dim_head=4, kv_dim=64),
)


@pytest.fixture(scope="module")
def fid(pack):
    return importlib.import_module("likeness_pack.loaders.fantasyid")


def _tiny_checkpoint(fid, tmp_path):
    torch.manual_seed(0)
    mods = _randomize(fid.build_face_modules(TINY_CFG), seed=11, scale=0.1).eval()
    sd = {k: v.contiguous() for k, v in mods.state_dict().items()}
    sd["transformer_blocks.0.attn1.to_q.weight"] = torch.randn(48, 48)
    sd["patch_embed.proj.weight"] = torch.randn(48, 32, 2, 2)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(sd, str(path))
    return mods, path


def test_face_modules_load_from_transformer_checkpoint(fid, tmp_path):
    ref, path = _tiny_checkpoint(fid, tmp_path)
    obj, _, _ = _synthetic_transform()
    from likeness_blocks.fantasyid.transform_pkl import mesh_data_for_network, parse_transform

    sd = fid.read_state_dict(str(tmp_path))  # the transformer/ folder, as users have it
    mods, rest = fid.load_face_modules(sd, transform=parse_transform(obj))
    assert sorted(rest) == ["patch_embed.proj.weight", "transformer_blocks.0.attn1.to_q.weight"]
    assert fid.infer_face_config(fid.split_fantasyid_state_dict(sd)[0]) == TINY_CFG
    assert len(mods.layer_attention) == 3
    # same weights -> same outputs as the modules that were saved
    ys = [torch.randn(1, 17, 32) for _ in range(5)]
    ref.vertex_spiral_net.set_mesh(*mesh_data_for_network(parse_transform(obj)))
    verts = torch.randn(1, 36, 3) * 0.1
    with torch.no_grad():
        f1, f2 = mods.face_abstractor(ys), ref.face_abstractor(ys)
        torch.testing.assert_close(f1, f2, atol=0, rtol=0)
        v1 = mods.vertex_reducer(mods.vertex_spiral_net(verts, f1))
        v2 = ref.vertex_reducer(ref.vertex_spiral_net(verts, f2))
        # not bit-equal: two module instances may take different kernels (seen: 7e-7); a wrong key is far off
        torch.testing.assert_close(v1, v2, atol=1e-6, rtol=0)
    assert v1.shape == (1, 1, 64)  # 36 vertices -> 9 -> 3 -> 2 -> 1 tokens (strides 4, 4, 2, 2)
    state_keys = set(mods.state_dict())
    assert state_keys == {k for k in sd if k.startswith(fid.FACE_PREFIXES)}  # mesh data is not in the state dict
    # the lean variant gives the same face tokens
    lean, _ = fid.load_face_modules(sd, drop_unused=True)
    with torch.no_grad():
        torch.testing.assert_close(lean.face_abstractor(ys), f1, atol=0, rtol=0)
    assert sum(p.numel() for p in lean.parameters()) < sum(p.numel() for p in mods.parameters())


def test_missing_face_keys_are_listed(fid, tmp_path):
    _, path = _tiny_checkpoint(fid, tmp_path)
    sd = fid.read_state_dict(str(path))
    del sd["face_abstractor.layers.9.0.pos_emb"]
    del sd["layer_attention.1.norm1.bias"]
    with pytest.raises(ValueError, match=r"2 missing.*layers\.9\.0\.pos_emb"):
        fid.load_face_modules(sd)
    with pytest.raises(ValueError, match="no FantasyID face modules"):
        fid.load_face_modules({"patch_embed.proj.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------------
# generic layer injector
# ---------------------------------------------------------------------------------------------------------------------
class ToyBlock(nn.Module):
    """Returns (video, text) like CogVideoX blocks."""

    def __init__(self, d):
        super().__init__()
        self.v = nn.Linear(d, d)
        self.t = nn.Linear(d, d)

    def forward(self, video, text):
        return torch.tanh(self.v(video)), torch.tanh(self.t(text))


def ref_la(sd, ids, h, heads=4):
    kv = F.linear(ref_ln(ids, sd, "norm1"), sd["to_kv.weight"]).expand(h.shape[0], -1, -1)
    k, v = kv.chunk(2, dim=-1)
    q = F.linear(ref_ln(h, sd, "norm2"), sd["to_q.weight"])
    return F.linear(ref_attention_heads(q, k, v, heads, (q.shape[-1] // heads) ** -0.5), sd["to_out.weight"])


def _toy(seed=0, n=4, d=24):
    from likeness_blocks.fantasyid import LayerAttention

    torch.manual_seed(seed)
    blocks = nn.ModuleList(ToyBlock(d) for _ in range(n))
    las = nn.ModuleList(_randomize(LayerAttention(dim=d, dim_head=6, heads=4, kv_dim=16), seed=20 + i) for i in range(n))
    return blocks, las


def _run(blocks, video, text):
    for b in blocks:
        video, text = b(video, text)
    return video, text


def test_injector_after_every_block_video_only():
    blocks, las = _toy()
    ids = torch.randn(1, 7, 16)
    video, text = torch.randn(2, 10, 24), torch.randn(2, 5, 24)  # CFG batch of 2, ID batch 1
    inj = LayerInjector(las, ids, strength=0.7)
    handles = inj.register(blocks, output_index=0)
    with torch.no_grad():
        got_v, got_t = _run(blocks, video, text)
        for h in handles:
            h.remove()
        rv, rt = video, text
        for i, b in enumerate(blocks):
            rv, rt = b(rv, rt)
            rv = rv + 0.7 * ref_la(las[i].state_dict(), ids, rv)
        plain_v, plain_t = _run(blocks, video, text)
    torch.testing.assert_close(got_v, rv, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_t, rt, atol=0, rtol=0)  # text tokens untouched
    torch.testing.assert_close(plain_t, rt, atol=0, rtol=0)
    assert (got_v - plain_v).abs().max() > 1e-3
    # both CFG branches got the same ID tokens: identical inputs give identical outputs
    with torch.no_grad():
        inj2 = LayerInjector(las, ids)
        same = inj2.apply(0, video[:1].expand(2, -1, -1))
    torch.testing.assert_close(same[0], same[1], atol=0, rtol=0)


def test_injector_strength_zero_and_block_range_and_token_slice():
    blocks, las = _toy(1)
    ids = torch.randn(1, 7, 16)
    h = torch.randn(2, 12, 24)
    with torch.no_grad():
        assert LayerInjector(las, ids, strength=0.0).apply(1, h) is h
        inj = LayerInjector(las, ids, block_start=1, block_end=3)
        assert inj.apply(0, h) is h and inj.apply(3, h) is h
        torch.testing.assert_close(inj.apply(2, h), h + ref_la(las[2].state_dict(), ids, h), atol=1e-5, rtol=0)
        # text first (4 tokens), video after: only the video slice changes, with attention over video tokens only
        sl = LayerInjector(las, ids, video_tokens=slice(4, None)).apply(1, h)
        torch.testing.assert_close(sl[:, :4], h[:, :4], atol=0, rtol=0)
        torch.testing.assert_close(sl[:, 4:], h[:, 4:] + ref_la(las[1].state_dict(), ids, h[:, 4:]), atol=1e-5, rtol=0)
        # inactive (outside the start/end percent) -> untouched
        assert LayerInjector(las, ids, active=lambda: False).apply(1, h) is h


def test_injector_hooks_on_tensor_blocks_and_removal():
    blocks, las = _toy(2, n=3)
    plain_blocks = nn.ModuleList(nn.Linear(24, 24) for _ in range(3))
    ids = torch.randn(2, 7, 16)  # per-branch ID tokens (batch 2) also work
    x = torch.randn(2, 9, 24)
    handles = LayerInjector(las, ids, strength=0.5, interval=2).register(plain_blocks)
    with torch.no_grad():
        got = x
        for b in plain_blocks:
            got = b(got)
        for h in handles:
            h.remove()
        plain = x
        for b in plain_blocks:
            plain = b(plain)  # hooks removed: the plain model again
        ref = x
        for i, b in enumerate(plain_blocks):
            ref = b(ref)
            if i % 2 == 0:  # interval 2: blocks 0 and 2 use layer_attention[0] and [1]
                ref = ref + 0.5 * torch.cat(
                    [ref_la(las[i // 2].state_dict(), ids[j : j + 1], ref[j : j + 1]) for j in range(2)]
                )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (plain - got).abs().max() > 1e-4
