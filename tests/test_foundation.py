"""The pack under a real ComfyUI 0.3.75 server: import, registration, the walking skeleton."""

import io as _io
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from support.paths import REPO, comfyui_dir
from support.server import pack_import_failures

pytestmark = pytest.mark.server


def pack_nodes(object_info):
    return {k: v for k, v in object_info.items() if v.get("python_module", "").endswith(".likeness")}


def test_pack_imports_and_every_node_is_described(server):
    assert pack_import_failures(server.log()) == []
    assert any(line.rstrip().endswith("custom_nodes/likeness") and "seconds" in line
               for line in server.log().splitlines()), "the pack is missing from ComfyUI's import-time table"
    nodes = pack_nodes(server.object_info())
    assert nodes, "no Likeness node in /object_info"
    for name, info in nodes.items():
        assert name.startswith("Likeness"), name
        assert info["category"].startswith("Likeness/"), (name, info["category"])
        assert info["display_name"] and info["display_name"] != name, name
        assert info.get("description"), f"{name} has no description"
        for section in ("required", "optional"):
            for inp, spec in info["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"


def test_model_folders_are_registered(server):
    import json

    for key in ("insightface", "deca", "flame", "fantasyid", "stableanimator", "concat_id"):
        (server.models_dir / key).mkdir(exist_ok=True)
        assert isinstance(json.loads(server.get(f"/models/{key}")), list), key


def test_broken_pack_import_is_caught(tmp_path):
    """ComfyUI exits 0 whatever a pack does; the log check must still see the failure."""
    pack = tmp_path / "base" / "custom_nodes" / "likeness"
    shutil.copytree(REPO, pack, ignore=shutil.ignore_patterns(".venv*", ".comfyui*", ".git", ".gpu", "tests", "__pycache__", ".demo", "test-artifacts"))
    (pack / "nodes" / "broken.py").write_text("raise ImportError('deliberately broken node module')\n")
    run = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(tmp_path / "base"),
         "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
        cwd=comfyui_dir(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0  # the reason a log check is needed
    failures = pack_import_failures(run.stdout + run.stderr)
    assert failures and "deliberately broken" in (run.stdout + run.stderr)


def wan_skeleton_prompt(frames=9, width=64, height=64, steps=3, seed=1):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan_t2v.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 4096}},
        "3": {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 2, "tokens": 8, "width": 4096}},
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": width, "height": height, "length": frames, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_wan_vae.safetensors"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["7", 0], "filename_prefix": "skeleton", "fps": 16.0, "lossless": True, "quality": 90, "method": "default"}},
    }


def webp_frames(data):
    im = Image.open(_io.BytesIO(data))
    frames = []
    for i in range(im.n_frames):
        im.seek(i)
        frames.append(im.convert("RGB").copy())
    return frames


def test_walking_skeleton_wan_t2v(server):
    hist = server.run(wan_skeleton_prompt(frames=9))
    files = server.output_files(hist, "8")
    assert len(files) == 1, hist["outputs"]
    frames = webp_frames(server.view(*files[0]))
    assert len(frames) == 9
    import numpy as np

    arr = np.stack([np.asarray(f, dtype=np.float32) for f in frames])
    assert arr.std() > 1.0, "decoded video is constant"
    # a bad prompt fails clearly and the server keeps serving
    status, answer = server.post_prompt({"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "missing.safetensors", "weight_dtype": "default"}}})
    assert status == 400
    hist2 = server.run(wan_skeleton_prompt(frames=5, seed=2))
    assert len(webp_frames(server.view(*server.output_files(hist2, "8")[0]))) == 5


def test_tiny_svd_samples_through_the_server(server):
    """The tiny SVD (built in the server by a test-only node) runs through the stock KSampler."""
    prompt = {
        "1": {"class_type": "LikenessTestTinySVD", "inputs": {"seed": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "3": {"class_type": "LikenessTestSVDConditioning", "inputs": {
            "vae": ["1", 1], "init_image": ["2", 0], "width": 64, "height": 64, "video_frames": 4, "seed": 0}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["3", 2],
            "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "karras", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 1]}},
        "6": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["5", 0], "filename_prefix": "svd", "fps": 6.0, "lossless": True, "quality": 90, "method": "default"}},
    }
    hist = server.run(prompt)
    assert len(webp_frames(server.view(*server.output_files(hist, "6")[0]))) == 4
