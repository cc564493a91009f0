"""StableAnimator nodes through the real ComfyUI server with the tiny SVD: Load StableAnimator -> Face Encoder ->
ID Adapter -> PoseNet -> KSampler -> video; strength 0 == the loaded model without adapters; pose changes change
the output; a pose frame-count mismatch fails with a clear error and the server survives."""

import pytest
import torch

FRAMES = 3


@pytest.fixture(scope="module")
def sa_files(server):
    pytest.importorskip("diffusers")
    from support.example_tiny import stableanimator_files

    return stableanimator_files(server)


def _prompt(files, id_strength=1.0, pose_strength=1.0, pose_color=0xFFFFFF, pose_frames=FRAMES, adapters=True,
            video=False, prefix="sa", frames=FRAMES, tiles=None):
    p = {
        "1": {"class_type": "LikenessTestTinySVD", "inputs": {"seed": 0}},
        "2": {"class_type": "LikenessStableAnimatorLoader", "inputs": {
            "model": ["1", 0], "unet": files + "unet.pth", "face_encoder": files + "face_encoder.pth",
            "pose_net": files + "pose_net.pth"}},
        "3": {"class_type": "LikenessTestFaceEmbeds", "inputs": {"seed": 0, "faces": 1}},
        "4": {"class_type": "LikenessTestClipVisionOutput", "inputs": {"seed": 0}},
        "5": {"class_type": "LikenessStableAnimatorFaceEncoder", "inputs": {
            "stableanimator": ["2", 1], "face_embeds": ["3", 0], "clip_vision_output": ["4", 0], "face_index": 0}},
        "6": {"class_type": "LikenessStableAnimatorIDAdapter", "inputs": {
            "model": ["2", 0], "stableanimator": ["2", 1], "face_tokens": ["5", 0], "strength": id_strength,
            "start_percent": 0.0, "end_percent": 1.0}},
        "7": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": pose_frames,
                                                     "color": pose_color}},
        "8": {"class_type": "LikenessStableAnimatorPose", "inputs": {
            "model": ["6", 0], "stableanimator": ["2", 1], "pose_images": ["7", 0], "strength": pose_strength}},
        "9": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "10": {"class_type": "LikenessTestSVDConditioning", "inputs": {
            "vae": ["1", 1], "init_image": ["9", 0], "width": 64, "height": 64, "video_frames": frames, "seed": 0}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["8", 0] if adapters else ["2", 0], "positive": ["10", 0], "negative": ["10", 1],
            "latent_image": ["10", 2], "seed": 0, "steps": 1, "cfg": 2.0, "sampler_name": "euler",
            "scheduler": "karras", "denoise": 1.0}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}},
    }
    if tiles:
        p["15"] = {"class_type": "LikenessStableAnimatorTiles", "inputs": {
            "model": ["8", 0], "tile_size": tiles[0], "tile_overlap": tiles[1]}}
        p["11"]["inputs"]["model"] = ["15", 0]
    if not adapters:
        for k in ("3", "4", "5", "6", "7", "8"):
            p.pop(k)
    if video:
        p["13"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 1]}}
        p["14"] = {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["13", 0], "filename_prefix": prefix, "fps": 6.0, "lossless": True, "quality": 90,
            "method": "default"}}
    return p


def _latent(server, hist):
    from safetensors.torch import load

    item = hist["outputs"]["12"]["latents"][0]
    return load(server.view(item["filename"], item.get("subfolder", ""), item.get("type", "output")))["latent_tensor"]


def test_nodes_registered(server):
    info = server.object_info()
    for n in ("LikenessStableAnimatorLoader", "LikenessStableAnimatorFaceEncoder", "LikenessStableAnimatorIDAdapter",
              "LikenessStableAnimatorPose", "LikenessStableAnimatorTiles"):
        assert info[n]["category"] == "Likeness/StableAnimator"


def test_full_graph_makes_a_video_and_strength_zero_is_unpatched(server, sa_files):
    from PIL import Image
    import io as _io

    hist = server.run(_prompt(sa_files, video=True, prefix="sa_full"))
    full = _latent(server, hist)
    assert full.shape == (FRAMES, 4, 8, 8) and torch.isfinite(full).all()
    webp = server.view(*server.output_files(hist, "14")[0])
    assert Image.open(_io.BytesIO(webp)).n_frames == FRAMES

    plain = _latent(server, server.run(_prompt(sa_files, adapters=False, prefix="sa_plain")))
    zero = _latent(server, server.run(_prompt(sa_files, id_strength=0.0, pose_strength=0.0, prefix="sa_zero")))
    assert torch.equal(zero, plain)
    assert (full - plain).abs().max() > 1e-4

    other_pose = _latent(server, server.run(_prompt(sa_files, pose_color=0x000000, prefix="sa_pose")))
    assert (other_pose - full).abs().max() > 1e-4


def test_pose_frame_mismatch_is_a_clear_error(server, sa_files):
    from support.server import PromptFailed

    with pytest.raises(PromptFailed) as exc:
        server.run(_prompt(sa_files, pose_frames=FRAMES + 2, prefix="sa_bad"))
    assert "pose sequence has 5 frames but the video latent has 3" in str(exc.value)
    assert "Likeness" in str(server.object_info("LikenessStableAnimatorPose"))  # still serving


def test_long_video_tiles_through_the_server(server, sa_files):
    """5 frames in tiles of 3 (overlap 1): the pose sequence matches the whole video, each tile gets its frames."""
    hist = server.run(_prompt(sa_files, frames=5, pose_frames=5, tiles=(3, 1), prefix="sa_tiles"))
    out = _latent(server, hist)
    assert out.shape == (5, 4, 8, 8) and torch.isfinite(out).all()
