"""Example workflows: the UI files match their API prompts and run through the API queue."""

import importlib.util
import json
import re
import sys

import pytest

from support.example_tiny import MAPPERS, check_output, tiny_example
from support.paths import REPO

sys.path.insert(0, str(REPO / "scripts"))
from workflow_format import ui_to_api  # noqa: E402

pytestmark = pytest.mark.server
UI_FILES = sorted((REPO / "example_workflows").glob("*.json"))
STEMS = [p.stem for p in UI_FILES]
# optional Python packages a tiny run needs
NEEDS = {"concat_id_wan": ["insightface"], "concat_id_wan_hjb": ["insightface"], "concat_id_wan_long": ["insightface"],
         "likeness_face_identity_metrics": ["insightface"], "fantasyid_cogvideox_i2v": ["insightface", "diffusers"],
         "stableanimator_svd_pose_identity": ["diffusers"]}


def test_every_example_has_a_tiny_mapping():
    assert sorted(MAPPERS) == sorted(STEMS)


def test_web_extension_is_served(server):
    """ComfyUI serves the pack's WEB_DIRECTORY (web/likeness.js) to the editor, V3 entry point or not."""
    listed = server.get_json("/extensions")
    ours = [e for e in listed if e.endswith("/likeness.js")]
    assert ours, listed
    assert b"Likeness.NodeUI" in server.get(ours[0])


def strip_meta(prompt, object_info=None):
    """class_type and inputs; with object_info, only the inputs this server lists (a server ignores the others: an
    example may carry a newer ComfyUI's inputs of a core node, e.g. WanContextWindowsManual's in 0.33)."""
    out = {}
    for k, v in prompt.items():
        inputs = v["inputs"]
        if object_info is not None and v["class_type"] in object_info:
            spec = object_info[v["class_type"]]["input"]
            listed = {**spec.get("required", {}), **spec.get("optional", {})}
            inputs = {n: x for n, x in inputs.items() if n in listed}
        out[k] = {"class_type": v["class_type"], "inputs": inputs}
    return out


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_workflow_matches_its_api_prompt(server, path):
    api = REPO / "example_workflows" / "api" / path.name
    assert api.exists(), f"{path.name} has no API-format prompt in example_workflows/api/"
    converted = ui_to_api(json.loads(path.read_text()), server.object_info())
    assert converted == strip_meta(json.loads(api.read_text()), server.object_info())
    assert any(n["type"] == "Note" for n in json.loads(path.read_text())["nodes"]), "no Note listing model files"


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_notes_name_the_model_files(path):
    """Each workflow's Note names every model file (or folder) the workflow loads."""
    api = REPO / "example_workflows" / "api" / path.name
    notes = [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "Note"]
    assert notes, "no Note listing model files"
    text = "\n".join(str(v) for n in notes for v in n.get("widgets_values", []))
    files = model_files(json.loads(api.read_text()))
    assert files, f"{path.name}: no model file found: is MODEL_INPUTS up to date?"
    for node, name, value in files:
        base = value.rstrip("/").rsplit("/", 1)[-1]
        assert value in text or base in text, f"{path.name}: the Note does not name {value!r} ({node}.{name})"


# inputs that name model files or folders (user media such as LoadImage's image are not model files)
MODEL_INPUTS = {
    "CLIPLoader": ["clip_name"], "UNETLoader": ["unet_name"], "VAELoader": ["vae_name"],
    "CheckpointLoaderSimple": ["ckpt_name"], "ImageOnlyCheckpointLoader": ["ckpt_name"],
    "LikenessConcatIDLoader": ["concat_id_name"], "LikenessLoadDifferentiableArcFace": ["source"],
    "LikenessLoadInsightFace": ["model_name"], "LikenessDecaFlameLoader": ["deca_model", "flame_model"],
    "LikenessLoadCogVideoX": ["model_name"], "LikenessLoadCogVideoXVAE": ["vae_name"], "LikenessLoadEvaClip": ["eva_clip"],
    "LikenessLoadFantasyID": ["transform", "face_modules"],
    "LikenessStableAnimatorLoader": ["unet", "face_encoder", "pose_net"],
}
MODEL_FILE = re.compile(r"\.(safetensors|sft|pt|pth|ckpt|bin|onnx|pkl|tar|gguf)$")


def model_files(prompt):
    """(node type, input, value) of every model file or folder an API prompt loads."""
    out = []
    for node in prompt.values():
        cls, inputs = node["class_type"], node["inputs"]
        for name, value in inputs.items():
            if not isinstance(value, str) or value.startswith("("):  # "(from model)" and the like: no file
                continue
            if name in MODEL_INPUTS.get(cls, ()) or (cls not in ("LoadImage", "LoadVideo") and MODEL_FILE.search(value)):
                out.append((cls, name, value))
    return out


def test_model_file_inputs_are_known():
    """Every loader in the examples is in MODEL_INPUTS, so that the Note check above covers its files."""
    for api in sorted((REPO / "example_workflows" / "api").glob("*.json")):
        for node in json.loads(api.read_text()).values():
            if "Loader" in node["class_type"] or node["class_type"].startswith("LikenessLoad"):
                assert node["class_type"] in MODEL_INPUTS, (api.name, node["class_type"])


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_links_match_the_server_sockets(server, path):
    """Every link joins an output and an input of the type the server declares for them."""
    wf = json.loads(path.read_text())
    info = server.object_info()
    byid = {n["id"]: n for n in wf["nodes"]}
    for _lid, src, so, dst, di, typ in wf["links"]:
        assert info[byid[src]["type"]]["output"][so] == typ, (path.name, byid[src]["type"], so, typ)
        name = byid[dst]["inputs"][di]["name"]
        spec = {**info[byid[dst]["type"]]["input"].get("required", {}),
                **info[byid[dst]["type"]]["input"].get("optional", {})}[name]
        assert spec[0] == typ, (path.name, byid[dst]["type"], name, spec[0], typ)


def test_unknown_node_type_is_named(server):
    wf = json.loads((REPO / "example_workflows" / "wan21_t2v_skeleton.json").read_text())
    wf["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(KeyError, match="NoSuchNode"):
        ui_to_api(wf, server.object_info())


def check_specific(server, stem, hist):
    """What an example's own graph promises beyond its main output file."""
    out = hist["outputs"]
    if stem == "fantasyid_face_geometry":
        from likeness_blocks.ply import read_ply

        assert len(server.output_files(hist, "6")) == 1  # the unedited preview too
        item = out["9"]["ply"][0]
        assert read_ply(server.output_dir / item["subfolder"] / item["filename"])[0].shape == (5023, 3)
    if stem == "concat_id_wan_long":
        # Identity Metrics scored every decoded frame of the long video and drew its per-second curve
        summary, table = out["19"]["text"][:2]
        assert "drift" in summary and re.search(r"frames without face \d+/13\b", summary), summary
        assert json.loads(table)["summary"]["fps"] == 16.0
        assert len(out["19"]["images"]) == 1
    if stem == "likeness_face_identity_metrics":
        # the square face is in all 4 frames of the video: identical aligned crops, none missing
        text = out["8"]["text"][0]
        assert "similarity to reference 1.0000" in text and "frames without face 0/4" in text, text
        assert len(out["8"]["images"]) == 1  # the plot, shown on the node


@pytest.mark.parametrize("stem", STEMS)
def test_example_workflow_runs_through_the_api_on_tiny_files(server, stem):
    """Every example workflow, mapped to tiny files by file name (tests/support/example_tiny.py), through the
    API queue."""
    if stem in NEEDS and any(importlib.util.find_spec(m) is None for m in NEEDS[stem]):
        pytest.skip(f"{stem} needs {NEEDS[stem]}")
    ex = tiny_example(server, stem)
    hist = server.run(ex.prompt, timeout=300)
    check_output(server, ex, hist)
    check_specific(server, stem, hist)


def test_output_pixel_check_refuses_flat_and_frozen_videos():
    """check_output's pixel check fails on a black frame and on a video whose frames are all one picture."""
    import io

    import numpy as np
    from PIL import Image

    from support.example_tiny import check_pixels

    rng = np.random.default_rng(0)

    def webp(frames):
        buf = io.BytesIO()
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(buf, "WEBP", save_all=True, append_images=ims[1:], lossless=True)
        return Image.open(io.BytesIO(buf.getvalue()))

    noise = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    check_pixels(webp(noise), "ok.webp")
    with pytest.raises(AssertionError, match="flat colour"):
        check_pixels(webp(noise[:2] + [np.zeros((32, 32, 3), np.uint8)]), "black.webp")
    with pytest.raises(AssertionError, match="same picture"):
        nudged = [noise[0].copy() for _ in range(3)]
        for k, f in enumerate(nudged):
            f[0, 0, 0] = k * 7  # one pixel apart, so the encoder keeps three frames
        check_pixels(webp(nudged), "frozen.webp")
