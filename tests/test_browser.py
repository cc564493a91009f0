"""The example workflows in the real graph editor: Debian's Chromium, headless, driven by Playwright
against the test server's own frontend (comfyui-frontend-package 1.32.x with ComfyUI 0.3.75, 1.49.x with 0.33.0).

For every UI workflow in example_workflows/: the editor loads it with no node type reported missing (1.32: the
"missing nodes" dialog; 1.49: the errors panel's "Missing Node Packs") and no node outlined red except loaders
whose file is really absent from the test server (1.49 outlines those), Likeness nodes coloured per family
(web/likeness.js); a screenshot goes to
test-artifacts/browser/. Then, in the editor, the loaded graph is turned into the same workflow on tiny
files (tests/support/example_tiny.py) by one generic function (MAP_JS: nodes replaced, widgets set and
links made by input name, as an artist would rewire it), queued from the browser with app.queuePrompt;
the prompt the editor POSTs must be exactly the mapped API prompt, the run must succeed and write its
file, and the Identity Metrics node must show its summary and plot. A workflow naming a node type that
does not exist must be reported missing.

Needs /usr/bin/chromium (scripts/setup_browser.sh installs it); skipped, with that reason, without it.
Deselect with `-m "not browser"`.
"""

import importlib.util
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
# the README's screenshots (docs/images/), rewritten by the test when LIKENESS_README_SCREENSHOTS=1
README_SHOTS = {"concat_id_wan": "editor_concat_id_wan_tiny.png",
                "likeness_face_identity_metrics": "editor_identity_metrics_tiny.png"}
MISSING_TITLE = "This workflow has missing nodes"  # the 1.32.x dialog title (en locale)
MISSING_PACKS = "Missing Node Packs"  # the 1.49.x errors panel's section for unknown node types (en locale)

if not Path(CHROMIUM).exists():
    if os.environ.get("LIKENESS_REQUIRE_BROWSER") == "1":  # CI (.ci/run): the browser test must not be skipped
        pytest.fail(f"no Chromium at {CHROMIUM} and LIKENESS_REQUIRE_BROWSER=1: run scripts/setup_browser.sh",
                    pytrace=False)
    pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/setup_browser.sh (apt-get install chromium) "
                "or set LIKENESS_CHROMIUM", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402  (tests/requirements.txt)

# What the editor tells about a loaded graph: nodes whose type is not registered (the frontend draws
# them red and lists them in the missing-nodes dialog), nodes flagged with errors, open dialogs.
STATE_JS = """() => ({
  nodes: app.graph.nodes.map(n => ({id: String(n.id), type: n.type,
    registered: n.type in LiteGraph.registered_node_types, has_errors: !!n.has_errors,
    absent_values: (n.widgets || []).filter(w => w.options && Array.isArray(w.options.values)
      && !w.options.values.includes(w.value)).map(w => w.name)})),
  dialogs: Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText),
  missing_list: Array.from(document.querySelectorAll('.comfy-missing-nodes')).map(d => d.innerText),
})"""

# The loaded graph -> the mapped API prompt, in the editor, for any workflow: nodes the prompt lacks or whose class
# differs are removed, the prompt's other nodes are created with the same id (where the removed one stood), widgets
# are set and links made by input name, links the prompt does not have are cut. Notes stay.
MAP_JS = """(prompt) => {
  const g = app.graph;
  // 1.32 keeps numeric node ids, 1.49 strings: look up and assign ids in the graph's own type
  const stringIds = g.nodes.some(n => typeof n.id === 'string');
  const asId = id => stringIds ? String(id) : Number(id);
  const byId = id => g.getNodeById(asId(id));
  const isLink = v => Array.isArray(v) && v.length === 2 && typeof v[0] === 'string' && Number.isInteger(v[1]);
  const virtual = n => !!n.isVirtualNode || n.type === 'Note' || n.type === 'MarkdownNote';
  const where = {};
  let x = 0;
  for (const n of [...g.nodes]) {
    if (virtual(n)) continue;
    const want = prompt[String(n.id)];
    if (!want || want.class_type !== n.type) { where[n.id] = [...n.pos]; g.remove(n); }
  }
  const created = [];
  for (const [id, spec] of Object.entries(prompt)) {
    if (byId(id)) continue;
    const node = LiteGraph.createNode(spec.class_type);
    if (!node) throw new Error(`the editor has no node type ${spec.class_type}`);
    node.id = asId(id);
    node.pos = where[id] || [x -= 400, -400];
    g.add(node);
    if (String(node.id) !== String(id)) throw new Error(`node ${spec.class_type} got id ${node.id}, not ${id}`);
    created.push(id);
  }
  for (const [id, spec] of Object.entries(prompt)) {
    const node = byId(id);
    for (const [name, value] of Object.entries(spec.inputs)) {
      const slot = (node.inputs || []).findIndex(i => i.name === name);
      if (isLink(value)) {
        if (slot < 0) throw new Error(`${spec.class_type} #${id} has no input ${name}`);
        byId(value[0]).connect(value[1], node, slot);
      } else {
        const w = (node.widgets || []).find(w => w.name === name);
        if (!w) throw new Error(`${spec.class_type} #${id} has no widget ${name}`);
        if (slot >= 0 && node.inputs[slot].link != null) node.disconnectInput(slot);
        w.value = value;
      }
    }
    (node.inputs || []).forEach((inp, slot) => {
      if (inp.link != null && !isLink(spec.inputs[inp.name])) node.disconnectInput(slot);
    });
  }
  g.setDirtyCanvas(true, true);
  return created;
}"""

# the view: the whole graph in the window
FIT_JS = """async () => {
  try { await app.extensionManager.command.execute('Comfy.Canvas.FitView'); }
  catch (e) { app.canvas.ds.reset(); }
  app.graph.setDirtyCanvas(true, true);
}"""

# the node state web/likeness.js adds to: family colours, the Identity Metrics summary and plot
NODE_UI_JS = """() => app.graph.nodes.map(n => ({
  id: n.id, type: n.type, category: (LiteGraph.registered_node_types[n.type] || {}).category || '',
  color: n.color || null, bgcolor: n.bgcolor || null, summary: n.likenessSummary || null,
  summary_widget: ((n.widgets || []).find(w => w.name === 'likeness_summary') || {}).value || null,
  images: ((app.nodeOutputs || {})[String(n.id)] || {}).images || null,
  imgs: (n.imgs || []).filter(i => i.complete && i.naturalWidth > 0).length,
}))"""


def save_readme_screenshot(src, name):
    """A palette PNG (256 colours) of the editor's screenshot, small enough to commit."""
    from PIL import Image

    out = REPO / "docs" / "images" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    assert out.stat().st_size < 2_000_000


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
    _set_setting(server, "Comfy.Minimap.Visible", False)  # it would cover part of the graph in the screenshots
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
    ctx.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # the "Nodes 2.0" banner
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
    page.wait_for_timeout(int(settle * 1000))  # the missing-nodes dialog / errors toast opens right after the load
    return page.evaluate(STATE_JS)


def missing_node_report(page, state):
    """The text in which the editor reports unknown node types after a load ('' if none): 1.32's missing-nodes
    dialog, or 1.49's errors panel (its toast's 'View details'), whose 'Missing Node Packs' section lists them
    (missing model files are listed there too, under another heading)."""
    old = [d for d in state["dialogs"] if MISSING_TITLE in d] + state["missing_list"]
    if old:
        return "\n".join(old)
    details = page.get_by_text("View details")
    if not details.count():
        return ""
    details.first.click()
    page.wait_for_timeout(800)
    text = page.evaluate("() => document.body.innerText")
    if MISSING_PACKS not in text:
        return ""
    return text[text.index(MISSING_PACKS):]


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_example_workflow_loads_without_missing_nodes(editor, path):
    wf = json.loads(path.read_text())
    state = load(editor, wf)
    editor.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
    assert sorted(n["id"] for n in state["nodes"]) == sorted(str(n["id"]) for n in wf["nodes"]), "not all nodes loaded"
    unregistered = [n for n in state["nodes"] if not n["registered"]]
    assert not unregistered, f"{path.name}: node types unknown to the editor: {unregistered}"
    # 1.49 outlines a loader whose file the server does not list (the real model files are absent here); any
    # other red node is a fault of ours
    flagged = [n for n in state["nodes"] if n["has_errors"] and not n["absent_values"]]
    assert not flagged, f"{path.name}: nodes flagged red: {flagged}"
    report = missing_node_report(editor, state)
    assert not report, f"{path.name}: missing nodes reported: {report[:500]}"


def test_unknown_node_type_is_reported_missing(editor):
    """The check above can fail: a workflow naming a node type nobody installed is reported (1.32: the dialog
    and the node drawn red; 1.49: the errors panel, without touching the other nodes' outlines)."""
    wf = json.loads((REPO / "example_workflows" / "wan21_t2v_skeleton.json").read_text())
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    ks["type"] = "LikenessNoSuchNode"
    state = load(editor, wf)
    editor.screenshot(path=str(ARTIFACTS / "negative_missing_node.png"))
    bad = [n for n in state["nodes"] if not n["registered"]]
    assert [(n["id"], n["type"]) for n in bad] == [(str(ks["id"]), "LikenessNoSuchNode")]
    report = missing_node_report(editor, state)
    assert "LikenessNoSuchNode" in report, report[:1000]
    if any(MISSING_TITLE in d for d in state["dialogs"]):  # 1.32
        assert any("LikenessNoSuchNode" in t for t in state["missing_list"]), state["missing_list"]
        assert bad[0]["has_errors"], "the missing node is not flagged (drawn red)"
    else:  # 1.49: listed as a missing pack, apart from the missing model files
        assert report.index("LikenessNoSuchNode") < report.find("Missing Models") or "Missing Models" not in report


def test_likeness_nodes_are_coloured_per_family(editor):
    """web/likeness.js: every Likeness node of a family has its family's colour, families differ, core nodes keep
    the default."""
    families = {}
    for path in UI_FILES:
        load(editor, json.loads(path.read_text()), settle=0.3)
        for n in editor.evaluate(NODE_UI_JS):
            if n["category"].startswith("Likeness/"):
                assert n["color"] and n["bgcolor"], f"{path.stem}: {n['type']} is not coloured"
                families.setdefault(n["category"], set()).add((n["color"], n["bgcolor"]))
            elif n["type"] in ("KSampler", "VAEDecode", "LoadImage"):
                assert n["bgcolor"] is None, f"{path.stem}: core node {n['type']} coloured {n['bgcolor']}"
    assert all(len(c) == 1 for c in families.values()), families
    assert len({next(iter(c)) for c in families.values()}) == len(families) >= 5, families


def strip_meta(prompt):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_example_workflow_queued_from_the_editor_runs_on_tiny_files(editor, server, path):
    from support.example_tiny import check_output, tiny_example
    from test_example_workflows import NEEDS, check_specific

    stem = path.stem
    if stem in NEEDS and any(importlib.util.find_spec(m) is None for m in NEEDS[stem]):
        pytest.skip(f"{stem} needs {NEEDS[stem]}")
    ex = tiny_example(server, stem, prefix="browser")  # not a pure cache hit of the API test's run
    # inputs this ComfyUI's node does not have (a newer version's extra context-window options) are not widgets here;
    # ComfyUI ignores them in an API prompt, the editor never sends them
    info = server.object_info()
    listed = {c: set(info[c]["input"].get("required", {})) | set(info[c]["input"].get("optional", {}))
              for c in {v["class_type"] for v in ex.prompt.values()}}
    mapped = {k: {**v, "inputs": {n: x for n, x in v["inputs"].items() if n in listed[v["class_type"]]}}
              for k, v in ex.prompt.items()}
    wf = json.loads(path.read_text())
    state = load(editor, wf, settle=0.5)
    assert all(n["registered"] for n in state["nodes"])
    editor.evaluate(MAP_JS, mapped)
    notes = [str(n["id"]) for n in wf["nodes"] if n["type"] == "Note"]
    assert [n["id"] for n in editor.evaluate(STATE_JS)["nodes"] if n["type"] == "Note"] == notes
    with editor.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                                timeout=60_000) as resp_info:
        editor.evaluate("async () => { await app.queuePrompt(0, 1); }")
    resp = resp_info.value
    answer = resp.json()
    assert resp.status == 200, f"the server refused the editor's prompt: {answer}"
    sent = json.loads(resp.request.post_data)["prompt"]
    assert strip_meta(sent) == strip_meta(mapped), "the editor queued another graph than the mapped prompt"
    pid = answer["prompt_id"]
    deadline, hist = time.time() + 300, None
    while time.time() < deadline:
        hist = server.history(pid)
        if hist and hist.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    assert hist, f"prompt {pid} queued from the editor did not finish in 300 s"
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
    filename, subfolder, _ = check_output(server, ex, hist)
    if ex.frames is not None or ex.prompt[ex.output]["class_type"] == "SaveImage":
        assert subfolder == "browser", (filename, subfolder)
    check_specific(server, stem, hist)
    editor.wait_for_timeout(1500)  # the editor shows the finished run (previews, the metrics summary)
    nodes = {n["id"]: n for n in editor.evaluate(NODE_UI_JS)}
    if stem == "likeness_face_identity_metrics":
        metrics = next(n for n in nodes.values() if n["type"] == "LikenessIdentityMetrics")
        text = hist["outputs"][str(metrics["id"])]["text"][0]
        assert metrics["summary"] == text.replace(", ", "\n").replace("; ", "\n"), metrics
        assert metrics["summary_widget"] == metrics["summary"], metrics
        assert "similarity to reference 1.0000" in metrics["summary"], metrics
        assert metrics["images"] and metrics["imgs"] == 1, f"the metrics plot is not shown on the node: {metrics}"
    editor.evaluate(FIT_JS)
    editor.wait_for_timeout(500)
    editor.screenshot(path=str(ARTIFACTS / f"{stem}_queued_tiny.png"))
    if stem in README_SHOTS and os.environ.get("LIKENESS_README_SCREENSHOTS"):
        save_readme_screenshot(ARTIFACTS / f"{stem}_queued_tiny.png", README_SHOTS[stem])
    assert not editor.errors, f"page errors while queueing: {editor.errors}"
