"""The example workflows in the real graph editor: Debian's Chromium, headless, driven by Playwright
against the test server's own frontend (comfyui-frontend-package 1.32.x).

For every UI workflow in example_workflows/: the editor loads it with no "missing nodes" dialog and
no node drawn as missing (red); a screenshot goes to test-artifacts/browser/. The Wan skeleton is then
mapped to the tiny models in the editor (widgets set, text encoders replaced by the test-only
conditioning node, as an artist would rewire it) and queued from the browser; the result is read from
/history. A workflow naming a node type that does not exist must be reported missing.

Needs /usr/bin/chromium (scripts/setup_browser.sh installs it); skipped, with that reason, without it.
Deselect with `-m "not browser"`.
"""

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from support.paths import REPO

pytestmark = [pytest.mark.server, pytest.mark.browser]

CHROMIUM = os.environ.get("LIKENESS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("LIKENESS_TEST_ARTIFACTS", REPO / "test-artifacts")) / "browser"
UI_FILES = sorted((REPO / "example_workflows").glob("*.json"))
MISSING_TITLE = "This workflow has missing nodes"  # the 1.32.x dialog title (en locale)

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/setup_browser.sh (apt-get install chromium) "
                "or set LIKENESS_CHROMIUM", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402  (tests/requirements.txt)

# What the editor tells about a loaded graph: nodes whose type is not registered (the frontend draws
# them red and lists them in the missing-nodes dialog), nodes flagged with errors, open dialogs.
STATE_JS = """() => ({
  nodes: app.graph.nodes.map(n => ({id: n.id, type: n.type,
    registered: n.type in LiteGraph.registered_node_types, has_errors: !!n.has_errors})),
  dialogs: Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText),
  missing_list: Array.from(document.querySelectorAll('.comfy-missing-nodes')).map(d => d.innerText),
})"""

# The Wan skeleton on the tiny models, done in the editor: pick the tiny files in the loaders' combos,
# shrink the video, replace CLIPLoader + the two CLIPTextEncode by LikenessTestTextConditioning.
MAP_WAN_JS = """() => {
  const g = app.graph;
  const byType = t => g.nodes.filter(n => n.type === t);
  const setW = (node, name, value) => {
    const w = node.widgets.find(w => w.name === name);
    if (!w) throw new Error(`${node.type} has no widget ${name}`);
    if (w.options && Array.isArray(w.options.values) && !w.options.values.includes(value))
      throw new Error(`${value} is not offered by ${node.type}.${name}: ${w.options.values}`);
    w.value = value;
  };
  setW(byType('UNETLoader')[0], 'unet_name', 'tiny_wan_t2v.safetensors');
  setW(byType('VAELoader')[0], 'vae_name', 'tiny_wan_vae.safetensors');
  const latent = byType('EmptyHunyuanLatentVideo')[0];
  setW(latent, 'width', 64); setW(latent, 'height', 64); setW(latent, 'length', 5);
  const ks = byType('KSampler')[0];
  setW(ks, 'steps', 2); setW(ks, 'sampler_name', 'euler');
  ['positive', 'negative'].forEach((name, i) => {
    const slot = ks.inputs.findIndex(inp => inp.name === name);
    const cond = LiteGraph.createNode('LikenessTestTextConditioning');
    cond.pos = [ks.pos[0] - 360, ks.pos[1] + 140 * i];
    g.add(cond);
    setW(cond, 'seed', i + 1); setW(cond, 'tokens', 8); setW(cond, 'width', 4096);
    cond.connect(0, ks, slot);
  });
  [...byType('CLIPTextEncode'), ...byType('CLIPLoader')].forEach(n => g.remove(n));
  g.setDirtyCanvas(true, true);
  return g.nodes.map(n => n.type);
}"""


def _set_setting(server, key, value):
    req = urllib.request.Request(f"{server.url}/settings/{key}", data=json.dumps(value).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()


@pytest.fixture(scope="module")
def browser(server):
    # The first-run template browser would cover the canvas: mark the tutorial seen on this server.
    _set_setting(server, "Comfy.TutorialCompleted", True)
    # Draw node titles and widgets at any zoom, so the screenshots of big graphs are readable.
    _set_setting(server, "LiteGraph.Canvas.MinFontSizeForLOD", 0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        # Playwright gives the browser a fresh temporary user-data-dir (profile) of its own.
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def editor(browser, server):
    """The editor in a fresh browser context (no workflow restored from an earlier test's local
    storage), with every node type of the server registered."""
    ctx = browser.new_context(viewport={"width": 1920, "height": 1200})
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(server.url)
    page.wait_for_function(
        "() => window.app && window.app.graph && window.LiteGraph && "
        "'LikenessTestTextConditioning' in LiteGraph.registered_node_types", timeout=90_000)
    state = page.evaluate(STATE_JS)
    assert not any(MISSING_TITLE in d for d in state["dialogs"]), f"dialog before loading: {state['dialogs']}"
    yield page
    ctx.close()


def load(page, workflow, settle=1.5):
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(int(settle * 1000))  # the missing-nodes dialog opens right after the load
    return page.evaluate(STATE_JS)


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_example_workflow_loads_without_missing_nodes(editor, path):
    wf = json.loads(path.read_text())
    state = load(editor, wf)
    editor.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
    assert sorted(n["id"] for n in state["nodes"]) == sorted(n["id"] for n in wf["nodes"]), "not all nodes loaded"
    unregistered = [n for n in state["nodes"] if not n["registered"]]
    assert not unregistered, f"{path.name}: node types unknown to the editor: {unregistered}"
    flagged = [n for n in state["nodes"] if n["has_errors"]]
    assert not flagged, f"{path.name}: nodes flagged red: {flagged}"
    assert not state["missing_list"], f"{path.name}: missing-nodes dialog: {state['missing_list']}"
    assert not any(MISSING_TITLE in d for d in state["dialogs"]), state["dialogs"]


def test_unknown_node_type_is_reported_missing(editor):
    """The check above can fail: a workflow naming a node type nobody installed is reported."""
    wf = json.loads((REPO / "example_workflows" / "wan21_t2v_skeleton.json").read_text())
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    ks["type"] = "LikenessNoSuchNode"
    state = load(editor, wf)
    editor.screenshot(path=str(ARTIFACTS / "negative_missing_node.png"))
    assert any(MISSING_TITLE in d and "LikenessNoSuchNode" in d for d in state["dialogs"]), state["dialogs"]
    assert any("LikenessNoSuchNode" in t for t in state["missing_list"]), state["missing_list"]
    bad = [n for n in state["nodes"] if not n["registered"]]
    assert [(n["id"], n["type"]) for n in bad] == [(ks["id"], "LikenessNoSuchNode")]
    assert bad[0]["has_errors"], "the missing node is not flagged (drawn red)"


def test_wan_skeleton_queued_from_the_editor_runs_on_tiny_models(editor, server):
    wf = json.loads((REPO / "example_workflows" / "wan21_t2v_skeleton.json").read_text())
    state = load(editor, wf, settle=0.5)
    assert all(n["registered"] for n in state["nodes"])
    types = editor.evaluate(MAP_WAN_JS)
    assert types.count("LikenessTestTextConditioning") == 2 and "CLIPLoader" not in types
    with editor.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                                timeout=60_000) as resp_info:
        editor.evaluate("async () => { await app.queuePrompt(0, 1); }")
    resp = resp_info.value
    answer = resp.json()
    assert resp.status == 200, f"the server refused the editor's prompt: {answer}"
    sent = json.loads(resp.request.post_data)["prompt"]
    assert sent["1"]["inputs"]["unet_name"] == "tiny_wan_t2v.safetensors"
    assert sorted(v["class_type"] for v in sent.values()).count("LikenessTestTextConditioning") == 2
    pid = answer["prompt_id"]
    deadline, hist = time.time() + 300, None
    while time.time() < deadline:
        hist = server.history(pid)
        if hist and hist.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    assert hist, f"prompt {pid} queued from the editor did not finish in 300 s"
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
    files = server.output_files(hist, "10")
    assert files and files[0][0].endswith(".webp"), hist["outputs"]
    assert server.view(*files[0])[:4] == b"RIFF"
    editor.wait_for_timeout(1000)  # the editor shows the finished run
    editor.screenshot(path=str(ARTIFACTS / "wan21_t2v_skeleton_queued_tiny.png"))
    assert not editor.errors, f"page errors while queueing: {editor.errors}"
