"""Load StableAnimator: a tiny diffusers UNetSpatioTemporalConditionModel (real diffusers class and key names,
random weights, saved as unet.pth with the ID adapter's id_to_k/id_to_v) maps onto the tiny native SVD:
every key maps, the ComfyUI model computes the same as the diffusers model; face_encoder.pth / pose_net.pth."""

import importlib

import pytest
import torch

FRAMES = 3


@pytest.fixture(scope="module")
def L(pack):
    return importlib.import_module("likeness_pack.loaders.stableanimator")


@pytest.fixture(scope="module")
def files(tmp_path_factory, pack):
    pytest.importorskip("diffusers")
    from support.tiny_stableanimator import save_tiny_stableanimator

    d = tmp_path_factory.mktemp("stableanimator")
    return d, save_tiny_stableanimator(d)


def test_every_diffusers_key_maps_and_forward_matches(files, L):
    from support.tiny_models import build_tiny_svd

    d, dm = files
    svd = build_tiny_svd(seed=0)
    sd = L.load_file(str(d / "unet.pth"), "unet")
    comfy_sd, id_weights, unmapped = L.convert_unet(sd, svd.model.model_config.unet_config)
    assert unmapped == []
    target = svd.model.diffusion_model.state_dict()
    assert set(comfy_sd) == set(target)  # round trip: every diffusers key lands on exactly one ComfyUI key
    assert len(comfy_sd) == len(dm.state_dict())
    from likeness_pack.adapters.svd import spatial_block_keys

    assert set(id_weights) == set(spatial_block_keys(svd.model.diffusion_model))

    fresh = build_tiny_svd(seed=5)
    fresh.model.diffusion_model.load_state_dict(comfy_sd, strict=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(FRAMES, 8, 8, 8, generator=g)
    ctx = torch.randn(1, 1, 1024, generator=g)
    added = torch.tensor([[5.0, 127.0, 0.02]])
    t = torch.tensor(0.7)
    with torch.no_grad():
        want = dm(x[None], t, encoder_hidden_states=ctx, added_time_ids=added).sample[0]
        import comfy.ldm.modules.diffusionmodules.util as u

        y = torch.cat([u.timestep_embedding(added[:, i], 256) for i in range(3)], -1).repeat(FRAMES, 1)
        got = fresh.model.diffusion_model(x, t.repeat(FRAMES), context=ctx.repeat(FRAMES, 1, 1), y=y,
                                          num_video_frames=FRAMES)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_apply_unet_sets_weights_on_a_clone_and_reports(files, L):
    from support.tiny_models import build_tiny_svd

    d, dm = files
    svd = build_tiny_svd(seed=0)
    before = {k: v.clone() for k, v in svd.model.diffusion_model.state_dict().items()}
    sd = L.load_file(str(d / "unet.pth"), "unet")
    sd["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.lora.weight"] = torch.zeros(1)
    m, id_weights, report, unmapped, missing = L.apply_unet(svd, sd)
    assert unmapped == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.lora.weight"]
    assert missing == [] and "1 file keys did not map" in report
    m.patch_model()
    try:
        k = "input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"
        assert torch.equal(m.model.diffusion_model.state_dict()[k],
                           sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"])
    finally:
        m.unpatch_model()
    for k, v in svd.model.diffusion_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_wrong_files_give_clear_errors(files, L, tmp_path):
    from support.tiny_models import build_tiny_svd

    d, dm = files
    svd = build_tiny_svd(seed=0)
    with pytest.raises(ValueError, match="not a UNet in diffusers key names"):
        L.apply_unet(svd, L.load_file(str(d / "pose_net.pth"), "unet"))
    with pytest.raises(ValueError, match="no attn2.processor.id_to_k"):
        L.apply_unet(svd, dm.state_dict())
    with pytest.raises(ValueError, match="not face_encoder.pth"):
        L.build_face_encoder(L.load_file(str(d / "pose_net.pth"), "face encoder"))
    with pytest.raises(ValueError, match="not pose_net.pth"):
        L.build_pose_net(L.load_file(str(d / "face_encoder.pth"), "PoseNet"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"a": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="'evil.pth' could not be loaded safely"):
        L.load_file(str(tmp_path / "evil.pth"), "unet")


def test_face_encoder_and_pose_net_files_load(files, L):
    from likeness_blocks.stableanimator import FaceEncoder

    d, _ = files
    sd = torch.load(d / "face_encoder.pth", weights_only=True)
    enc = L.build_face_encoder(L.load_file(str(d / "face_encoder.pth"), "face encoder"))
    ref = FaceEncoder(cross_attention_dim=1024, depth=1, dim_head=64, heads=2, ff_mult=0.25)
    ref.load_state_dict(sd)
    e, c = torch.randn(1, 512), torch.randn(1, 1, 1024)
    with torch.no_grad():
        assert torch.equal(enc(e, c), ref(e, c))
    net = L.build_pose_net(L.load_file(str(d / "pose_net.pth"), "PoseNet"))
    assert net.final_proj.out_channels == 32
    assert torch.equal(net.scale, torch.load(d / "pose_net.pth", weights_only=True)["scale"])


def test_full_size_svd_xt_layout_maps_completely(pack, L):
    """The real SVD-xt sizes (diffusers default UNetSpatioTemporalConditionModel vs ComfyUI's SVD config, both on
    the meta device): every key and shape maps, 16 spatial cross-attentions get id_to_k/id_to_v."""
    diffusers = pytest.importorskip("diffusers")
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from support.tiny_models import TINY_SVD_UNET

    from likeness_pack.adapters.svd import spatial_block_keys

    cfg = dict(TINY_SVD_UNET, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
               transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
               num_heads=-1, num_head_channels=64)
    with torch.device("meta"):
        dm = diffusers.UNetSpatioTemporalConditionModel()  # defaults = SVD(-xt) UNet
        cm = UNetModel(**cfg, operations=comfy.ops.disable_weight_init, device="meta")
    dsd = {k: v for k, v in dm.state_dict().items()}
    comfy_sd, id_weights, unmapped = L.convert_unet(with_id_keys_meta(dsd), cfg)
    target = cm.state_dict()
    assert unmapped == []
    assert set(comfy_sd) == set(target)
    assert all(comfy_sd[k].shape == target[k].shape for k in target)
    keys = spatial_block_keys(cm)
    assert len(keys) == 16 and set(id_weights) == set(keys)
    widths = sorted({w[0].shape[0] for w in id_weights.values()})
    assert widths == [320, 640, 1280] and all(w[0].shape[1] == 1024 for w in id_weights.values())


def with_id_keys_meta(sd):
    out = dict(sd)
    for k, v in sd.items():
        if ".transformer_blocks." in k and "temporal" not in k and k.endswith("attn2.to_k.weight"):
            pre = k[: -len("to_k.weight")]
            out[pre + "processor.id_to_k.weight"] = v
            out[pre + "processor.id_to_v.weight"] = v
    return out
