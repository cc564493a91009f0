"""EVA02-CLIP for FantasyID face tokens, verified on a TINY EVA02 config (timm architecture, 21 blocks, width 64):
EVA-CLIP key names map onto timm's EVA02 (cross-checked against timm's own EVA checkpoint filter), and the hidden
states are the inputs of blocks 4/8/12/16/20 of the model the weights came from. Not verified here: the real
EVA02_CLIP_L_336_psz14_s6B.pt file (not downloadable in tests) and numerical agreement with the original EVA-CLIP code."""

import pytest
import torch

from _fantasyid_synth import EVA_TINY, eva_clip_state_dict, tiny_eva
from likeness_blocks.fantasyid.eva_clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    block_inputs,
    infer_eva_config,
    load_eva_visual,
    preprocess_face,
    visual_state_dict,
)

pytest.importorskip("timm")


def test_eva_clip_keys_map_to_timm_and_agree_with_timm_filter(tmp_path):
    from timm.models.eva import checkpoint_filter_fn

    src = tiny_eva(1)
    sd = eva_clip_state_dict(src)
    assert "visual.blocks.0.attn.q_bias" in sd and "visual.blocks.0.mlp.w3.weight" in sd
    mine = visual_state_dict(sd)
    assert set(mine) == set(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(mine[k], v), k
    theirs = checkpoint_filter_fn(dict(sd), src)
    assert set(theirs) == set(mine)
    for k in mine:
        assert torch.equal(theirs[k], mine[k]), k
    cfg = infer_eva_config(mine)
    for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes"):
        assert cfg[k] == EVA_TINY[k], k
    # saved as users have it (a torch pickle of tensors), loaded with weights_only
    path = tmp_path / "EVA02_CLIP_tiny.pt"
    torch.save(sd, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    model, _ = load_eva_visual(loaded)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))


def test_hidden_states_are_inputs_of_blocks_4_to_20():
    src = tiny_eva(2)
    model, _ = load_eva_visual(eva_clip_state_dict(src))
    x = torch.randn(2, 3, 56, 56)
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone()))
             for i, b in enumerate(src.blocks)]
    with torch.no_grad():
        src.forward_features(x)
        hs = block_inputs(model, x)
    for h in hooks:
        h.remove()
    assert hs.shape == (5, 2, 17, 64)
    for j, i in enumerate((4, 8, 12, 16, 20)):
        assert (hs[j] - seen[i]).abs().max() <= 1e-5, i


def test_preprocess_and_bad_inputs():
    img = torch.rand(1, 40, 40, 3)
    px = preprocess_face(img, 56)
    assert px.shape == (1, 3, 56, 56)
    same = preprocess_face(torch.rand(1, 56, 56, 3).fill_(0.5), 56)
    want = (0.5 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(same[0, :, 3, 3], want, atol=1e-6)
    with pytest.raises(ValueError, match="IMAGE"):
        preprocess_face(torch.rand(3, 40, 40), 56)
    with pytest.raises(ValueError, match="EVA02-CLIP"):
        visual_state_dict({"foo": torch.zeros(1)})


def test_full_size_eva02_l_336_layout_is_inferred():
    """EVA02-CLIP-L-14-336 shapes (meta tensors, no weights): the config read from an EVA-CLIP-named state dict is
    timm's eva02_large_patch14_clip_336 (24 blocks, width 1024, 16 heads, 577 tokens, SwiGLU 2730, 768 projection)."""
    from timm.models.eva import Eva

    from _fantasyid_synth import _TO_EVA_CLIP

    args = dict(img_size=336, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4 * 2 / 3,
                qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
                ref_feat_shape=(16, 16), global_pool="token", num_classes=768)
    with torch.device("meta"):
        ref = Eva(**args)
    sd = {}
    for k, v in ref.state_dict().items():
        for a, b in _TO_EVA_CLIP:
            k = k.replace(a, b)
        sd["visual." + k] = v
    assert sd["visual.pos_embed"].shape == (1, 577, 1024)
    assert sd["visual.blocks.23.mlp.w3.weight"].shape == (1024, 2730)
    cfg = infer_eva_config(visual_state_dict(sd))
    for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes"):
        assert cfg[k] == args[k], k
    with torch.device("meta"):
        built = Eva(**cfg)
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}
