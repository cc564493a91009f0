"""HJB Face Guidance through the real server (inference mode) on tiny Wan and tiny SVD."""

import numpy as np
import pytest
from PIL import Image

from support import tiny_faces

pytestmark = pytest.mark.server
pytest.importorskip("insightface")


@pytest.fixture(scope="module")
def hjb_server(server):
    tiny_faces.make_tiny_pack(server.models_dir, "tiny_hjb", seed=3)
    Image.fromarray(tiny_faces.squares_image((320, 320), [(96, 96, 32)])).save(server.input_dir / "hjb_ref.png")
    return server


def reference_nodes():
    return {
        "20": {"class_type": "LikenessLoadInsightFace", "inputs": {"model_name": "tiny_hjb", "provider": "CPU"}},
        "21": {"class_type": "LoadImage", "inputs": {"image": "hjb_ref.png"}},
        "22": {"class_type": "LikenessArcFaceEmbed", "inputs": {
            "insightface": ["20", 0], "image": ["21", 0], "face_choice": "largest", "face_index": 0,
            "on_no_face": "error", "det_size": 320, "threshold": 0.5, "crop_size": 224}},
        "23": {"class_type": "LikenessLoadDifferentiableArcFace", "inputs": {"source": "insightface/tiny_hjb/rec_tiny.onnx"}},
    }


def hjb_node(model, vae, strength, **kw):
    inputs = {"model": model, "vae": vae, "arcface": ["23", 0], "reference": ["22", 0], "iterations": 2, "eta": 0.2,
              "strength": strength, "start_percent": 0.0, "end_percent": 0.8, "window_margin": 4, "frames_per_iteration": 0, "low_memory_decode": True,
              "precision": "auto"}
    inputs.update(kw)
    return {"class_type": "LikenessHJBFaceGuidance", "inputs": inputs}


def frames_of(server, hist, node):
    from test_foundation import webp_frames

    return np.stack([np.asarray(f, np.float32) for f in webp_frames(server.view(*server.output_files(hist, node)[0]))])


def wan_prompt(strength, prefix):
    from test_foundation import wan_skeleton_prompt

    p = wan_skeleton_prompt(frames=5, steps=3)
    p.update(reference_nodes())
    p["30"] = hjb_node(["1", 0], ["6", 0], strength)
    p["5"]["inputs"]["model"] = ["30", 0]
    p["8"]["inputs"]["filename_prefix"] = prefix
    return p


def test_hjb_on_wan_through_the_server(hjb_server):
    off = frames_of(hjb_server, hjb_server.run(wan_prompt(0.0, "hjb_off")), "8")
    on = frames_of(hjb_server, hjb_server.run(wan_prompt(1.0, "hjb_on")), "8")
    from test_foundation import wan_skeleton_prompt

    plain = frames_of(hjb_server, hjb_server.run(wan_skeleton_prompt(frames=5, steps=3)), "8")
    assert on.shape == off.shape == plain.shape
    assert np.array_equal(off, plain), "strength 0 must equal the unpatched model"
    assert not np.array_equal(on, off)


def test_hjb_on_svd_through_the_server(hjb_server):
    p = reference_nodes()
    p.update({
        "1": {"class_type": "LikenessTestTinySVD", "inputs": {"seed": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "3": {"class_type": "LikenessTestSVDConditioning", "inputs": {
            "vae": ["1", 1], "init_image": ["2", 0], "width": 64, "height": 64, "video_frames": 4, "seed": 0}},
        "30": hjb_node(["1", 0], ["1", 1], 1.0, frames_per_iteration=2),
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["30", 0], "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["3", 2],
            "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "karras", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 1]}},
        "6": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["5", 0], "filename_prefix": "svd_hjb", "fps": 6.0, "lossless": True, "quality": 90, "method": "default"}},
    })
    assert frames_of(hjb_server, hjb_server.run(p), "6").shape[0] == 4


def test_hjb_with_curricularface_through_the_server(hjb_server):
    """CurricularFace (a tiny IR backbone with the released key names, saved as a .bin) loaded by Load Differentiable
    ArcFace, feeding both ArcFace Embed's 'recognizer' and HJB's 'arcface': the run changes the video; an ArcFace
    reference with that recogniser is refused through the API with the message naming the fix."""
    import torch
    from support import tiny_recognizers as TR
    from support.server import PromptFailed
    from test_foundation import wan_skeleton_prompt

    torch.save(TR.curricular_state_dict(seed=11), str(hjb_server.models_dir / "insightface" / "hjb_curricular_r101.bin"))
    p = wan_prompt(1.0, "hjb_cur")
    p["24"] = {"class_type": "LikenessLoadDifferentiableArcFace", "inputs": {"source": "insightface/hjb_curricular_r101.bin"}}
    p["22"]["inputs"]["recognizer"] = ["24", 0]
    p["30"]["inputs"]["arcface"] = ["24", 0]
    on = frames_of(hjb_server, hjb_server.run(p), "8")
    plain = frames_of(hjb_server, hjb_server.run(wan_skeleton_prompt(frames=5, steps=3)), "8")
    assert on.shape == plain.shape and not np.array_equal(on, plain)
    del p["22"]["inputs"]["recognizer"]
    p["8"]["inputs"]["filename_prefix"] = "hjb_cur_refused"
    with pytest.raises(PromptFailed, match=r"'arcface' is insightface/hjb_curricular_r101.bin \(curricularface\).*"
                                           r"ArcFace Embed's 'recognizer'"):
        hjb_server.run(p)
