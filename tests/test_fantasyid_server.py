"""FantasyID through a real ComfyUI server: tiny CogVideoX-I2V whose transformer/ holds tiny FantasyID face modules,
tiny EVA02-CLIP, synthetic transform.pkl over the synthetic FLAME mesh, tiny DECA -> every FantasyID node -> KSampler
-> video. Strength 0 equals the plain model; a FLAME shape edit changes the ID tokens and the output."""

import json
import pickle

import numpy as np
import pytest
import torch

from _fantasyid_synth import eva_clip_state_dict, face_module_state_dict, tiny_eva, transform_dict
from test_flame_server import DECA_NAME, FLAME_NAME, geometry_files  # noqa: F401 (fixture)

pytestmark = pytest.mark.server
pytest.importorskip("diffusers")

TINY_I2V = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, out_channels=16, time_embed_dim=32,
                text_embed_dim=64, num_layers=2, sample_width=16, sample_height=12, sample_frames=9, patch_size=2,
                max_text_seq_length=8, use_rotary_positional_embeddings=True)
COG = "tiny_fantasyid_i2v"
EVA = "tiny_eva02_clip.pt"
TRANSFORM = "tiny_transform.pkl"


@pytest.fixture(scope="module")
def fid_files(server, geometry_files):  # noqa: F811
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from safetensors.torch import load_file, save_file

    arrays = geometry_files[0]
    m = server.models_dir
    d = m / "diffusion_models" / COG / "transformer"
    torch.manual_seed(21)
    tr = CogVideoXTransformer3DModel(**TINY_I2V).eval()
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tr.save_pretrained(d)
    f = d / "diffusion_pytorch_model.safetensors"
    face = face_module_state_dict(inner_dim=32, n_layers=2, seed=3)
    save_file({**load_file(str(f)), **face}, str(f))  # FantasyID keeps its face modules in the transformer file
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(cross_attn_interval=1, face_dim=64)
    (d / "config.json").write_text(json.dumps(cfg))
    if not (m / "vae" / "tiny_fid_vae" / "config.json").exists():
        torch.manual_seed(22)
        AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                               latent_channels=16, scaling_factor=0.7).eval().save_pretrained(m / "vae" / "tiny_fid_vae")
    fd = m / "fantasyid"
    fd.mkdir(exist_ok=True)
    (fd / TRANSFORM).write_bytes(pickle.dumps(transform_dict(arrays["v_template"], arrays["f"].astype(np.int64))))
    torch.save(eva_clip_state_dict(tiny_eva(5)), fd / EVA)
    return face


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


def test_example_workflow_runs_on_tiny_files(server, fid_files):
    """example_workflows/api/fantasyid_cogvideox_i2v.json with tiny files (tiny InsightFace pack, DECA, FLAME,
    CogVideoX + FantasyID, EVA02); only the T5 text encoder is swapped for the test conditioning node."""
    from PIL import Image

    from support import tiny_faces
    from support.paths import REPO

    tiny_faces.make_tiny_pack(server.models_dir, "tiny", seed=1)
    Image.fromarray(tiny_faces.squares_image((640, 640), [(384, 96, 32)])).save(server.input_dir / "fid_square.png")
    p = json.loads((REPO / "example_workflows" / "api" / "fantasyid_cogvideox_i2v.json").read_text())
    p["1"]["inputs"]["image"] = "fid_square.png"
    p["2"]["inputs"]["model_name"] = "tiny"
    p["4"]["inputs"].update(deca_model=DECA_NAME, flame_model=FLAME_NAME)
    p["6"]["inputs"]["jaw_sharpness"] = 1.0
    p["10"]["inputs"].update(model_name=f"{COG}/", weight_dtype="fp32")
    p["11"]["inputs"].update(transform=TRANSFORM, dtype="fp32")
    p["12"]["inputs"]["eva_clip"] = EVA
    p.pop("20")
    p["21"] = {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 64}}
    p["22"] = {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 2, "tokens": 8, "width": 64}}
    p["23"]["inputs"].update(vae_name="tiny_fid_vae/", diffusers_tiling=False)
    p["24"]["inputs"].update(width=64, height=48, length=5)
    p["25"]["inputs"]["steps"] = 2
    p["28"]["inputs"].update(width=64, height=64)
    hist = server.run(p, timeout=300)
    files = server.output_files(hist, "27")
    assert len(files) == 1
    assert Image.open(__import__("io").BytesIO(server.view(*files[0]))).n_frames == 5
