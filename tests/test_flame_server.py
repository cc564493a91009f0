"""Geometry nodes through a real ComfyUI server: image -> DECA FLAME vertices -> shape edit -> preview IMAGE,
.ply export/import, and bad inputs (malicious FLAME pickle, missing face box) failing clearly."""

import io as _io

import numpy as np
import pytest
import torch
from PIL import Image

from support import example_tiny
from support.example_tiny import DECA_NAME, FLAME_NAME

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def geometry_files(server):
    return example_tiny.geometry_files(server)  # (FLAME arrays, DECA state dict, input/flame_face.png array)


def _prompt(prefix, **edit):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "flame_face.png"}},
        "2": {"class_type": "LikenessDecaFlameLoader", "inputs": {"deca_model": DECA_NAME, "flame_model": FLAME_NAME}},
        "3": {"class_type": "LikenessDecaFlameVertices", "inputs": {
            "deca_flame": ["2", 0], "image": ["1", 0], "crop": "fantasyid (whole image resized to 224)",
            "keep": "shape + expression + pose (FantasyID)"}},
        "4": {"class_type": "LikenessFlameShapeEdit", "inputs": {
            "flame_vertices": ["3", 0], "deca_flame": ["2", 0], "face_width": edit.get("face_width", 0.0),
            "jaw_sharpness": edit.get("jaw_sharpness", 0.0), "face_length": 0.0, "chin_forward": 0.0,
            "shape_coefficients": edit.get("coefficients", "")}},
        "5": {"class_type": "LikenessFlamePreview", "inputs": {
            "flame_vertices": ["4", 0], "width": 128, "height": 128, "yaw": 20.0, "pitch": 0.0, "draw": "mesh"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": f"{prefix}_edited"}},
        "7": {"class_type": "LikenessFlamePreview", "inputs": {
            "flame_vertices": ["3", 0], "width": 128, "height": 128, "yaw": 20.0, "pitch": 0.0, "draw": "mesh"}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"{prefix}_orig"}},
        "9": {"class_type": "LikenessSaveFlamePly", "inputs": {"flame_vertices": ["3", 0], "filename_prefix": f"{prefix}/orig", "with_faces": False}},
        "10": {"class_type": "LikenessSaveFlamePly", "inputs": {"flame_vertices": ["4", 0], "filename_prefix": f"{prefix}/edited", "with_faces": False}},
    }


def _png(server, hist, node):
    files = server.output_files(hist, node)
    assert len(files) == 1, hist["outputs"].get(node)
    return np.asarray(Image.open(_io.BytesIO(server.view(*files[0]))).convert("RGB"), dtype=np.float32)


def _ply(server, hist, node):
    from likeness_blocks.ply import read_ply

    items = hist["outputs"][node]["ply"]
    assert len(items) == 1
    path = server.output_dir / items[0]["subfolder"] / items[0]["filename"]
    return read_ply(path)[0]


def test_image_to_vertices_edit_preview(server, geometry_files):
    from likeness_blocks.deca import DecaFlame, load_deca_encoder, resize_whole
    from likeness_blocks.flame import FlameLayer
    from likeness_blocks.flame_edit import derive_sliders, measure
    from likeness_blocks.flame_file import read_flame_file

    arrays, _sd, img = geometry_files
    hist = server.run(_prompt("geo", face_width=2.0), timeout=180)
    edited_png, orig_png = _png(server, hist, "6"), _png(server, hist, "8")
    assert edited_png.shape == (128, 128, 3)
    assert edited_png.std() > 5 and orig_png.std() > 5  # a shaded head, not a flat image
    assert np.abs(edited_png - orig_png).mean() > 0.05  # the edit is visible

    orig, edited = _ply(server, hist, "9"), _ply(server, hist, "10")
    assert orig.shape == (5023, 3)
    # the same computation in-process, from the same files through the same loaders
    flame = FlameLayer(read_flame_file(str(server.models_dir / "flame" / FLAME_NAME)))
    deca = DecaFlame(load_deca_encoder(str(server.models_dir / "deca" / DECA_NAME)), flame)
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    codes = deca.encode(resize_whole(x))
    want = deca.vertices(codes)[0].numpy()
    np.testing.assert_allclose(orig, want, atol=1e-5, rtol=0)
    # the face_width slider widened the face, by the amount its gain promises
    sliders = derive_sliders(flame, 100)
    tmpl = flame.v_template
    w0 = measure(tmpl, flame(shape=codes["shape"])[0:1])["face_width"]
    w1 = measure(tmpl, flame(shape=codes["shape"] + 2.0 * sliders["face_width"]["direction"][None])[0:1])["face_width"]
    assert float(w1 - w0) == pytest.approx(2.0 * sliders["face_width"]["gain"], rel=1e-3) and float(w1 - w0) > 0
    assert np.abs(edited - orig).max() > 1e-4
    # the edited vertices are FLAME re-run with the moved shape and DECA's own expression and pose
    want_edited = flame(shape=codes["shape"] + 2.0 * sliders["face_width"]["direction"][None],
                        expression=codes["exp"], pose=codes["pose"])[0].numpy()
    np.testing.assert_allclose(edited, want_edited, atol=1e-5, rtol=0)


def test_ply_import_and_point_preview(server, geometry_files):
    from likeness_blocks.ply import write_ply

    arrays = geometry_files[0]
    write_ply(server.input_dir / "head.ply", arrays["v_template"])
    prompt = {
        "1": {"class_type": "LikenessLoadFlamePly", "inputs": {"ply": "head.ply"}},
        "2": {"class_type": "LikenessDecaFlameLoader", "inputs": {"deca_model": DECA_NAME, "flame_model": FLAME_NAME}},
        "3": {"class_type": "LikenessFlameShapeEdit", "inputs": {
            "flame_vertices": ["1", 0], "deca_flame": ["2", 0], "face_width": 0.0, "jaw_sharpness": 1.5,
            "face_length": 0.0, "chin_forward": 0.0, "shape_coefficients": "0: 1.0"}},
        "4": {"class_type": "LikenessFlamePreview", "inputs": {
            "flame_vertices": ["3", 0], "width": 96, "height": 96, "yaw": 0.0, "pitch": 0.0, "draw": "points"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "ply_points"}},
        "6": {"class_type": "LikenessFlamePreview", "inputs": {
            "flame_vertices": ["1", 0], "width": 96, "height": 96, "yaw": 0.0, "pitch": 0.0, "draw": "mesh",
            "deca_flame": ["2", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "ply_mesh"}},
        "8": {"class_type": "LikenessSaveFlamePly", "inputs": {"flame_vertices": ["3", 0], "filename_prefix": "ply_rt/x", "with_faces": True}},
    }
    hist = server.run(prompt, timeout=120)
    assert _png(server, hist, "5").std() > 5 and _png(server, hist, "7").std() > 5
    v = _ply(server, hist, "8")
    # a bare vertex set is edited by adding the shape-basis offsets of the requested coefficient change
    from likeness_blocks.flame import FlameLayer
    from likeness_blocks.flame_edit import derive_sliders

    flame = FlameLayer(arrays)
    delta = 1.5 * derive_sliders(flame, 100)["jaw_sharpness"]["direction"]
    delta[0] += 1.0
    want = arrays["v_template"] + flame.shape_offsets(delta[None])[0].double().numpy()
    assert v.shape == (5023, 3) and np.abs(v - arrays["v_template"]).max() > 1e-4
    np.testing.assert_allclose(v, want, atol=1e-6, rtol=0)


def test_bad_inputs_fail_clearly(server, geometry_files):
    from support.server import PromptFailed

    evil = server.models_dir / "flame" / "evil_model.pkl"
    evil.write_bytes(b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R.")
    p = _prompt("bad")
    p["2"]["inputs"]["flame_model"] = "evil_model.pkl"
    with pytest.raises(PromptFailed, match="(?i)refused"):
        server.run(p, timeout=60)

    p = _prompt("bad2")
    p["3"]["inputs"]["crop"] = "deca standard (InsightFace face box)"
    with pytest.raises(PromptFailed, match="needs face_embeds"):
        server.run(p, timeout=60)

    p = _prompt("bad3")
    p["3"]["inputs"]["crop"] = "deca standard (68 landmarks, face-alignment)"  # not offered: refused at validation
    with pytest.raises(PromptFailed, match="crop"):
        server.run(p, timeout=60)

    p = _prompt("bad4", coefficients="400: 1")
    with pytest.raises(PromptFailed, match="outside 0..99"):
        server.run(p, timeout=60)
    # the server keeps serving
    hist = server.run(_prompt("after"), timeout=120)
    assert _png(server, hist, "6").std() > 5


def test_convert_flame_node_and_load_converted(server, geometry_files):
    hist = server.run({"1": {"class_type": "LikenessFlameConvert", "inputs": {"flame_model": FLAME_NAME, "format": "safetensors"}}})
    out = server.models_dir / "flame" / "tiny_flame.safetensors"
    # named inside its model folder: the server's absolute layout is not shown to API clients
    assert out.is_file() and hist["outputs"]["1"]["text"] == ["flame/tiny_flame.safetensors"]
    ref = _ply(server, server.run(_prompt("conv_pkl")), "9")
    p = _prompt("conv_st")
    p["2"]["inputs"]["flame_model"] = "tiny_flame.safetensors"
    got = _ply(server, server.run(p), "9")
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
