"""Tiny StableAnimator files with the released layouts, made at test time (never committed):
unet.pth = a real diffusers UNetSpatioTemporalConditionModel sized like tiny_models.TINY_SVD_UNET, random
weights, plus attn2.processor.id_to_k/id_to_v on every spatial transformer block; face_encoder.pth; pose_net.pth."""

import torch

from .tiny_models import fill_random_

FRAMES = 3


def tiny_diffusers_svd_unet(num_frames=FRAMES, seed=11):
    import diffusers

    m = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
        up_block_types=("CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64), addition_time_embed_dim=256, projection_class_embeddings_input_dim=768,
        layers_per_block=1, cross_attention_dim=1024, transformer_layers_per_block=1, num_attention_heads=(2, 4),
        num_frames=num_frames,
    )
    m.load_state_dict(fill_random_(m.state_dict(), seed=seed))
    return m.eval()


def with_id_keys(sd, seed=12, noise=0.05):
    """Adds id_to_k/id_to_v next to each spatial attn2 (initialised from to_k/to_v as upstream, plus noise)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k, v in sd.items():
        if ".transformer_blocks." in k and "temporal" not in k and k.endswith("attn2.to_k.weight"):
            pre = k[: -len("to_k.weight")]
            out[pre + "processor.id_to_k.weight"] = v + noise * torch.randn(v.shape, generator=g)
            out[pre + "processor.id_to_v.weight"] = sd[pre + "to_v.weight"] + noise * torch.randn(v.shape, generator=g)
    return out


def tiny_face_encoder(seed=13):
    from likeness_blocks.stableanimator import FaceEncoder

    fe = FaceEncoder(cross_attention_dim=1024, depth=1, dim_head=64, heads=2, ff_mult=0.25)
    fe.load_state_dict(fill_random_(fe.state_dict(), seed=seed))
    return fe


def tiny_pose_net(seed=14, channels=32):
    from likeness_blocks.stableanimator import PoseNet

    pn = PoseNet(noise_latent_channels=channels)
    pn.load_state_dict(fill_random_(pn.state_dict(), seed=seed))
    return pn


def save_tiny_stableanimator(folder):
    """Writes unet.pth, face_encoder.pth, pose_net.pth into folder; returns the diffusers UNet."""
    folder.mkdir(parents=True, exist_ok=True)
    dm = tiny_diffusers_svd_unet()
    torch.save(with_id_keys(dm.state_dict()), folder / "unet.pth")
    torch.save(tiny_face_encoder().state_dict(), folder / "face_encoder.pth")
    torch.save(tiny_pose_net().state_dict(), folder / "pose_net.pth")
    return dm
