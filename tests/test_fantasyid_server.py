"""FantasyID through a real ComfyUI server: tiny CogVideoX-I2V whose transformer/ holds tiny FantasyID face modules,
tiny EVA02-CLIP, synthetic transform.pkl over the synthetic FLAME mesh, tiny DECA -> every FantasyID node -> KSampler
-> video. Strength 0 equals the plain model; a FLAME shape edit changes the ID tokens and the output."""

import json

import numpy as np
import pytest
import torch

from support import example_tiny
from support.example_tiny import COG, DECA_NAME, EVA, FLAME_NAME, TRANSFORM

pytestmark = pytest.mark.server
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def fid_files(server):
    return example_tiny.fantasyid_files(server)  # the FantasyID face-module state dict


def _prompt(prefix, strength=1.0, face_width=0.0, seed=1):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "flame_face.png"}},
        "2": {"class_type": "LikenessDecaFlameLoader", "inputs": {"deca_model": DECA_NAME, "flame_model": FLAME_NAME}},
        "3": {"class_type": "LikenessDecaFlameVertices", "inputs": {
            "deca_flame": ["2", 0], "image": ["1", 0], "crop": "fantasyid (whole image resized to 224)",
            "keep": "shape + expression + pose (FantasyID)"}},
        "4": {"class_type": "LikenessFlameShapeEdit", "inputs": {
            "flame_vertices": ["3", 0], "deca_flame": ["2", 0], "face_width": face_width, "jaw_sharpness": 0.0,
            "face_length": 0.0, "chin_forward": 0.0, "shape_coefficients": ""}},
        "5": {"class_type": "LikenessSaveFlamePly", "inputs": {
            "flame_vertices": ["4", 0], "filename_prefix": f"{prefix}/verts", "with_faces": False}},
        "10": {"class_type": "LikenessLoadCogVideoX", "inputs": {"model_name": f"{COG}/", "weight_dtype": "fp32"}},
        "11": {"class_type": "LikenessLoadFantasyID", "inputs": {
            "face_modules": "(from model)", "transform": TRANSFORM, "dtype": "fp32", "model": ["10", 0]}},
        "12": {"class_type": "LikenessLoadEvaClip", "inputs": {"eva_clip": EVA, "dtype": "fp32"}},
        "13": {"class_type": "LikenessFantasyIDFaceClipTokens", "inputs": {"eva_clip": ["12", 0], "face_image": ["1", 0]}},
        "14": {"class_type": "LikenessFantasyIDCAbstractor", "inputs": {"fantasyid": ["11", 0], "clip_hidden_states": ["13", 0]}},
        "15": {"class_type": "LikenessFantasyIDVertexTokens", "inputs": {"fantasyid": ["11", 0], "flame_vertices": ["4", 0]}},
        "16": {"class_type": "LikenessFantasyIDFusion", "inputs": {
            "fantasyid": ["11", 0], "face_tokens": ["14", 0], "vertex_tokens": ["15", 0]}},
        "17": {"class_type": "LikenessFantasyIDInjector", "inputs": {
            "model": ["10", 0], "fantasyid": ["11", 0], "id_tokens": ["16", 0], "strength": strength,
            "start_percent": 0.0, "end_percent": 1.0, "block_start": 0, "block_end": -1}},
        "20": {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 64}},
        "21": {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 2, "tokens": 8, "width": 64}},
        "22": {"class_type": "LikenessLoadCogVideoXVAE", "inputs": {"vae_name": "tiny_fid_vae/", "diffusers_tiling": False}},
        "23": {"class_type": "LikenessCogVideoXI2VConditioning", "inputs": {
            "positive": ["20", 0], "negative": ["21", 0], "vae": ["22", 0], "start_image": ["1", 0],
            "width": 64, "height": 48, "length": 9, "batch_size": 1}},
        "24": {"class_type": "KSampler", "inputs": {
            "model": ["17", 0], "positive": ["23", 0], "negative": ["23", 1], "latent_image": ["23", 2],
            "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "simple", "denoise": 1.0}},
        "25": {"class_type": "SaveLatent", "inputs": {"samples": ["24", 0], "filename_prefix": f"{prefix}/lat"}},
        "26": {"class_type": "VAEDecode", "inputs": {"samples": ["24", 0], "vae": ["22", 0]}},
        "27": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["26", 0], "filename_prefix": f"{prefix}/vid", "fps": 8.0, "lossless": True, "quality": 90,
            "method": "default"}},
    }


def _plain(prompt):
    p = json.loads(json.dumps(prompt))
    p["24"]["inputs"]["model"] = ["10", 0]
    for k in ("11", "12", "13", "14", "15", "16", "17"):
        p.pop(k)
    return p


def _latent(server, hist, node="25"):
    from safetensors.torch import load_file

    item = hist["outputs"][node]["latents"][0]
    return load_file(str(server.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def _ply(server, hist, node="5"):
    from likeness_blocks.ply import read_ply

    item = hist["outputs"][node]["ply"][0]
    return read_ply(server.output_dir / item["subfolder"] / item["filename"])[0]


def test_fantasyid_graph_strength_zero_and_shape_edit(server, fid_files, pack):
    from PIL import Image

    plain = _latent(server, server.run(_plain(_prompt("fid_plain")), timeout=300))
    zero_hist = server.run(_prompt("fid_zero", strength=0.0), timeout=300)
    assert torch.equal(_latent(server, zero_hist), plain)  # strength 0 == the plain model, bit-exactly
    on_hist = server.run(_prompt("fid_on", strength=1.0), timeout=300)
    on = _latent(server, on_hist)
    assert (on - plain).abs().max() > 1e-4
    wide_hist = server.run(_prompt("fid_wide", strength=1.0, face_width=3.0), timeout=300)
    wide = _latent(server, wide_hist)
    assert (wide - on).abs().max() > 1e-5  # the FLAME shape edit reaches the video
    vid = server.output_files(wide_hist, "27")
    assert len(vid) == 1 and Image.open(__import__("io").BytesIO(server.view(*vid[0]))).n_frames == 9

    # the ID tokens themselves: same nodes in-process on the vertices the server produced -> the vertex part of the
    # ID tokens changes with the edit, the face part does not
    import importlib

    N = importlib.import_module("likeness_pack.nodes.fantasyid")
    Lf = importlib.import_module("likeness_pack.loaders.fantasyid")
    from likeness_blocks.flame import FlameVertices

    fid = Lf.load_fantasyid(dict(fid_files), str(server.models_dir / "fantasyid" / TRANSFORM))
    v_on, v_wide = _ply(server, on_hist), _ply(server, wide_hist)
    assert np.abs(v_on - v_wide).max() > 1e-5
    face_tok = torch.randn(1, 36, 64, generator=torch.Generator().manual_seed(0))
    ids = [N.LikenessFantasyIDTokens.execute(fid, face_tok, FlameVertices(torch.from_numpy(v)[None].float())).result[0]
           for v in (v_on, v_wide)]
    assert ids[0].shape == (1, 115, 64)
    assert torch.equal(ids[0][:, :36], ids[1][:, :36])
    assert (ids[0][:, 36:] - ids[1][:, 36:]).abs().max() > 1e-6


def test_fantasyid_bad_inputs_fail_clearly(server, fid_files):
    from support.server import PromptFailed

    p = _prompt("fid_bad")
    p["11"]["inputs"]["model"] = ["30", 0]  # '(from model)' with a model that has no FantasyID face modules
    p["30"] = {"class_type": "LikenessTestTinySVD", "inputs": {"seed": 0}}
    with pytest.raises(PromptFailed, match="no FantasyID face modules"):
        server.run(p, timeout=300)
    p = _prompt("fid_bad2")
    p["17"]["inputs"]["model"] = ["30", 0]  # the injector on a non-CogVideoX model
    p["30"] = {"class_type": "LikenessTestTinySVD", "inputs": {"seed": 0}}
    with pytest.raises(PromptFailed, match="CogVideoX MODEL"):
        server.run(p, timeout=300)
