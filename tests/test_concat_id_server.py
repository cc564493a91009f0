"""Concat-ID through a real ComfyUI server: tiny Concat-ID Wan (AdaLN layout, loaded by the pack's
loader) + conditioner + patch + stock KSampler + VAEDecode."""

import io as _io

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.server

FRAMES = 9


def _frames(data):
    im = Image.open(_io.BytesIO(data))
    out = []
    for i in range(im.n_frames):
        im.seek(i)
        out.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    return np.stack(out)


@pytest.fixture(scope="module")
def concat_server(server):
    from support.tiny_models import tiny_concat_id_adaln_state_dict

    sd = tiny_concat_id_adaln_state_dict(dim=128, layers=2, seed=5)
    (server.models_dir / "concat_id").mkdir(exist_ok=True)
    torch.save(sd, server.models_dir / "concat_id" / "tiny_concat_id_adaln.pt")
    rng = np.random.default_rng(0)
    # two different "faces" (odd sizes: the conditioner resize-pad-crops them), and a copy of A
    a = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
    b = np.ascontiguousarray(255 - a[:, ::-1])
    Image.fromarray(a).save(server.input_dir / "concat_ref_a.png")
    Image.fromarray(b).save(server.input_dir / "concat_ref_b.png")
    Image.fromarray(a).save(server.input_dir / "concat_ref_a_copy.png")
    return server


def prompt(ref, prefix, seed=3, frames=FRAMES):
    return {
        "1": {"class_type": "LikenessConcatIDLoader", "inputs": {"concat_id_name": "tiny_concat_id_adaln.pt", "weight_dtype": "default"}},
        "2": {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 4096}},
        "3": {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 2, "tokens": 8, "width": 4096}},
        "4": {"class_type": "LoadImage", "inputs": {"image": ref}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_wan_vae.safetensors"}},
        "6": {"class_type": "LikenessConcatIDConditioner", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["5", 0], "references": ["4", 0],
            "width": 64, "height": 64, "length": frames, "batch_size": 1}},
        "7": {"class_type": "LikenessConcatIDModelPatch", "inputs": {
            "model": ["1", 0], "concat_id_weights": ["1", 1], "strength": 1.0, "start_percent": 0.0,
            "end_percent": 1.0, "multi_reference_placement": "next_frames"}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0], "positive": ["6", 0], "negative": ["6", 1], "latent_image": ["6", 2],
            "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["5", 0]}},
        "10": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["9", 0], "filename_prefix": prefix, "fps": 16.0, "lossless": True, "quality": 100, "method": "default"}},
    }


def _video(srv, p):
    hist = srv.run(p)
    files = srv.output_files(hist, "10")
    assert len(files) == 1, hist["outputs"]
    return _frames(srv.view(*files[0]))


def test_concat_id_video_through_server(concat_server):
    srv = concat_server
    a1 = _video(srv, prompt("concat_ref_a.png", "cid_a1"))
    assert a1.shape[0] == FRAMES  # the reference frame is not in the output
    assert a1.std() > 1.0
    b = _video(srv, prompt("concat_ref_b.png", "cid_b"))
    assert np.abs(a1 - b).max() > 0, "output did not change with the reference"
    # A again, through a different file with the same pixels: everything downstream of LoadImage
    # runs again while the patched model (cached) is reused -> no identity leaks from B
    a2 = _video(srv, prompt("concat_ref_a_copy.png", "cid_a2"))
    assert np.array_equal(a1, a2)


def test_concat_id_bad_input_fails_clearly(concat_server):
    srv = concat_server
    p = prompt("concat_ref_a.png", "cid_bad")
    p["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan_t2v.safetensors", "weight_dtype": "default"}}
    p["7"]["inputs"].pop("concat_id_weights")
    p["7"]["inputs"]["start_percent"] = 0.9
    p["7"]["inputs"]["end_percent"] = 0.1
    from support.server import PromptFailed

    with pytest.raises(PromptFailed, match="start_percent"):
        srv.run(p)
    # the stock loader + first-stage patch works, and the server still serves
    p["7"]["inputs"]["start_percent"] = 0.0
    p["7"]["inputs"]["end_percent"] = 1.0
    assert _video(srv, p).shape[0] == FRAMES
