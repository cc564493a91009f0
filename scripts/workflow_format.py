"""Converts between ComfyUI's API prompt format and the graph editor's UI workflow format,
using a server's /object_info for the order of widget values (the UI stores them by position).

    python scripts/workflow_format.py to-ui  API.json  UI.json  --object-info object_info.json
"""

import argparse
import json

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _inputs(info):
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            yield name, spec


def _is_widget(spec):
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _extra_widgets(spec):
    """Values the editor stores after the widget's own: the seed's 'control after generate', the
    upload button of image/video pickers."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = ["fixed"] if opts.get("control_after_generate") else []
    if opts.get("image_upload"):
        extra.append("image")
    return extra


def _type_name(spec):
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _default(spec):
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else ""
    return opts.get("options", [""])[0] if spec[0] == "COMBO" else None


def api_to_ui(prompt, object_info, notes=(), columns=4):
    """notes: (title, text) pairs added as Note nodes (the editor shows them; the API skips them)."""
    if all(str(nid).isdigit() for nid in prompt):  # keep the prompt's ids: node errors then name the same nodes
        ids = {nid: int(nid) for nid in prompt}
    else:
        ids = {nid: i + 1 for i, nid in enumerate(prompt)}
    nodes, links = [], []
    out_links = {}
    for nid, node in prompt.items():
        info = object_info[node["class_type"]]
        for name, spec in _inputs(info):
            val = node["inputs"].get(name)
            if isinstance(val, list) and len(val) == 2 and str(val[0]) in ids:
                link_id = len(links) + 1
                links.append([link_id, ids[str(val[0])], int(val[1]), ids[nid], None, _type_name(spec)])
                out_links.setdefault((str(val[0]), int(val[1])), []).append(link_id)
    for order, (nid, node) in enumerate(prompt.items()):
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in _inputs(info):
            val = node["inputs"].get(name)
            linked = isinstance(val, list) and len(val) == 2 and str(val[0]) in ids
            if linked:
                link_id = next(l[0] for l in links if l[3] == ids[nid] and l[4] is None)
                entry = {"name": name, "type": _type_name(spec), "link": link_id}
                if _is_widget(spec):
                    entry["widget"] = {"name": name}
                for l in links:
                    if l[0] == link_id:
                        l[4] = len(inputs)
                inputs.append(entry)
            if _is_widget(spec):
                widgets.append(_default(spec) if linked or val is None else val)
                widgets.extend(_extra_widgets(spec))
        outputs = []
        for slot, (otype, oname) in enumerate(zip(info["output"], info.get("output_name", info["output"]))):
            outputs.append({"name": oname, "type": otype if isinstance(otype, str) else "COMBO",
                            "links": out_links.get((nid, slot), []), "slot_index": slot})
        nodes.append({
            "id": ids[nid], "type": node["class_type"],
            "pos": [40 + 340 * (order % columns), 60 + 300 * (order // columns)], "size": [300, 160],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
            "title": node.get("_meta", {}).get("title", info.get("display_name", node["class_type"])),
        })
    next_id = max(ids.values()) + 1
    for i, (title, text) in enumerate(notes):
        nodes.append({"id": next_id + i, "type": "Note", "pos": [40 + 340 * i, -260], "size": [320, 220],
                      "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [text], "title": title,
                      "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(workflow, object_info):
    """What the editor's 'Queue' sends, for workflows whose nodes all exist in object_info.
    Raises KeyError naming a node type the server does not know."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote") or node.get("mode", 0) in (2, 4):
            continue
        if node["type"] not in object_info:
            raise KeyError(f"node type {node['type']!r} (node {node['id']}) is not installed on this server")
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in _inputs(info):
            if _is_widget(spec):
                val = values.pop(0) if values else _default(spec)
                del values[:len(_extra_widgets(spec))]
                inputs[name] = val
            if name in linked:
                l = linked[name]
                inputs[name] = [str(l[1]), l[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("direction", choices=["to-ui", "to-api"])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--object-info", required=True, help="a saved GET /object_info answer")
    a = ap.parse_args()
    info = json.load(open(a.object_info))
    data = json.load(open(a.src))
    out = api_to_ui(data, info) if a.direction == "to-ui" else ui_to_api(data, info)
    json.dump(out, open(a.dst, "w"), indent=1)


if __name__ == "__main__":
    main()
