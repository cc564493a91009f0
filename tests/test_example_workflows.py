"""Example workflows: the UI files match their API prompts and run through the API queue."""

import json
import sys

import pytest

from support.paths import REPO

sys.path.insert(0, str(REPO / "scripts"))
from workflow_format import ui_to_api  # noqa: E402

pytestmark = pytest.mark.server
UI_FILES = sorted((REPO / "example_workflows").glob("*.json"))


def strip_meta(prompt):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_workflow_matches_its_api_prompt(server, path):
    api = REPO / "example_workflows" / "api" / path.name
    assert api.exists(), f"{path.name} has no API-format prompt in example_workflows/api/"
    converted = ui_to_api(json.loads(path.read_text()), server.object_info())
    assert converted == strip_meta(json.loads(api.read_text()))
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


def test_wan_skeleton_example_runs_on_tiny_models(server):
    p = json.loads((REPO / "example_workflows" / "api" / "wan21_t2v_skeleton.json").read_text())
    p["1"]["inputs"]["unet_name"] = "tiny_wan_t2v.safetensors"
    p["8"]["inputs"]["vae_name"] = "tiny_wan_vae.safetensors"
    del p["2"]
    p["3"] = {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 4096}}
    p["4"] = {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 2, "tokens": 8, "width": 4096}}
    p["6"]["inputs"].update(width=64, height=64, length=5)
    p["7"]["inputs"].update(steps=2, sampler_name="euler")
    assert server.output_files(server.run(p), "10")


def test_demo_runs_the_concat_id_workflow_on_tiny_models(server):
    """The tiny path of `make demo` (scripts/demo.py): same graph, tiny files, through the server."""
    sys.path.insert(0, str(REPO / "scripts"))
    import demo

    demo.make_tiny_models(server.base_dir)
    p = demo.tiny_version(json.loads(demo.WORKFLOW.read_text()))
    p["13"]["inputs"]["length"] = 5
    p["14"]["inputs"]["steps"] = 2
    hist = server.run(p)
    assert len(server.output_files(hist, "16")) == 1
