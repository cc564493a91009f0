"""docs/nodes.md (scripts/node_reference.py) covers every Likeness node the server registers, with
every input and output, and is rendered from /object_info."""

import sys

import pytest

from support.paths import REPO

sys.path.insert(0, str(REPO / "scripts"))
import node_reference  # noqa: E402

pytestmark = pytest.mark.server


def _sections(text):
    parts = text.split("\n### ")[1:]
    return {p.split("\n", 1)[0].strip(): p for p in parts}


def test_committed_node_reference_is_current(server):
    info = node_reference.likeness_nodes(server.object_info())
    assert "LikenessTestTextConditioning" not in info  # test-only nodes stay out
    doc = _sections((REPO / "docs" / "nodes.md").read_text())
    stale = sorted(set(doc) ^ set(info))
    assert not stale, f"docs/nodes.md is out of date for {stale}: run scripts/node_reference.py"
    for name, node in info.items():
        for section in ("required", "optional"):
            for iname, spec in ((node.get("input") or {}).get(section) or {}).items():
                assert f"| `{iname}` |" in doc[name], f"{name}.{iname} missing: run scripts/node_reference.py"
                tip = (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}).get("tooltip", "")
                assert node_reference._cell(tip) in doc[name], f"{name}.{iname}: tooltip changed"
        for oname in node.get("output_name") or []:
            assert f"| `{oname}` |" in doc[name], f"{name} output {oname} missing"
        assert (node.get("description") or "").strip() in doc[name]


def test_render_follows_object_info(server):
    info = server.object_info()
    text = node_reference.render(info)
    assert "### LikenessArcFaceEmbed" in text and "LikenessTestTextConditioning" not in text
    info["LikenessArcFaceEmbed"]["input"]["required"]["image"][1]["tooltip"] = "changed tooltip"
    assert "changed tooltip" in node_reference.render(info)
