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
        assert text.startswith("similarity to reference 1.0000") and "frames without face 0/4" in text, text
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
