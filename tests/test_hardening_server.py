"""Hardening through a real ComfyUI server, as an API client would attack it (issue 16).

Every file-taking input and every FLOAT input is found in /object_info, so a new node is covered without
touching this file:

- file inputs: every combo of a pack node whose options list one of the files this test puts in every model
  folder (all named hardening_*). Each gets '..' paths, absolute paths and a name from another folder, all
  pointing at real, loadable files in a sentinel folder outside the model folders. Each must be refused (by
  ComfyUI's own "Value not in list" where it validates combos, else by the pack), and an audit hook in the server
  proves that no file or folder outside was opened or listed.
- FLOAT inputs: NaN, +Inf and -Inf (Python's json writes NaN/Infinity, which the server parses) must be refused
  with a message naming the input, before the node does anything.

Linked inputs get a placeholder from the test-only node LikenessTestAny, whose type matches every socket.
"""

import json
import os

import numpy as np
import pytest
import torch

from support.server import ComfyServer, PromptFailed

pytestmark = pytest.mark.server

PACK_MODULE = "likeness"  # python_module of the pack's nodes: custom_nodes.likeness
MARKER = "likeness_outside"
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


# --------------------------------------------------------------------------------------------- server and files
def _safetensors(path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))


def _populate(base):
    """One file (or folder) named hardening_* in every folder a pack input lists, and the same kinds of real
    files in the sentinel folder outside them."""
    from likeness_blocks.ply import write_ply

    m, inp, out = base / "models", base / "input", base / MARKER
    for d in ("deca", "flame", "fantasyid", "stableanimator", "concat_id", "cogvideox/hardening_cog",
              "diffusion_models", "vae", "loras", "insightface/models/hardening_pack", "input_placeholder"):
        (m / d).mkdir(parents=True, exist_ok=True)
    inp.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    state = {"w": torch.zeros(2)}
    torch.save(state, m / "deca" / "hardening_deca.tar")
    (m / "flame" / "hardening_flame.pkl").write_bytes(b"placeholder")
    torch.save(state, m / "fantasyid" / "hardening_fantasyid.pt")
    (m / "fantasyid" / "hardening_transform.pkl").write_bytes(b"placeholder")
    torch.save(state, m / "stableanimator" / "hardening_stableanimator.pth")
    torch.save(state, m / "concat_id" / "hardening_concat_id.pt")
    (m / "cogvideox" / "hardening_cog" / "config.json").write_text("{}")
    _safetensors(m / "cogvideox" / "hardening_cog" / "diffusion_pytorch_model.safetensors")
    _safetensors(m / "cogvideox" / "hardening_cogvideox.safetensors")
    _safetensors(m / "diffusion_models" / "hardening_dm.safetensors")
    _safetensors(m / "vae" / "hardening_vae.safetensors")
    _safetensors(m / "loras" / "hardening_lora.safetensors")
    (m / "insightface" / "models" / "hardening_pack" / "hardening_rec.onnx").write_bytes(b"placeholder")
    torch.save(state, m / "insightface" / "hardening_insightface.pth")
    write_ply(inp / "hardening_input.ply", np.zeros((4, 3)))
    # outside: loadable files of every kind, so loading one would not fail for another reason
    for ext in (".pt", ".pth", ".tar", ".bin"):
        torch.save(state, out / f"secret{ext}")
    for ext in (".safetensors", ".sft"):
        _safetensors(out / f"secret{ext}")
    write_ply(out / "secret.ply", np.zeros((4, 3)))
    for ext in (".pkl", ".npz", ".onnx"):
        (out / f"secret{ext}").write_bytes(b"placeholder")
    (out / "secret").mkdir()
    (out / "secret" / "config.json").write_text("{}")
    _safetensors(out / "secret" / "diffusion_pytorch_model.safetensors")
    (out / "secret" / "secret.onnx").write_bytes(b"placeholder")
    return out


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    base = tmp_path_factory.mktemp("hardening")
    outside = _populate(base)
    audit = tmp_path_factory.mktemp("audit") / "audit.log"
    audit.write_text("")
    old = os.environ.get("LIKENESS_TEST_AUDIT_LOG")
    os.environ["LIKENESS_TEST_AUDIT_LOG"] = str(audit)
    try:
        srv = ComfyServer(base)
        srv.start()
    finally:
        if old is None:
            os.environ.pop("LIKENESS_TEST_AUDIT_LOG", None)
        else:
            os.environ["LIKENESS_TEST_AUDIT_LOG"] = old
    yield srv, base, outside, audit
    srv.stop()


# --------------------------------------------------------------------------------------------- /object_info
def _pack_nodes(info):
    return {name: n for name, n in info.items() if n.get("python_module", "").split(".")[-1] == PACK_MODULE}


def _inputs(node):
    """[(name, type, options or None, config, required)] in the node's order."""
    out = []
    for section, required in (("required", True), ("optional", False)):
        for name, spec in (node.get("input", {}).get(section) or {}).items():
            kind, cfg = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(kind, list):
                out.append((name, "COMBO", kind, cfg, required))
            elif kind == "COMBO":
                out.append((name, "COMBO", list(cfg.get("options", [])), cfg, required))
            else:
                out.append((name, kind, None, cfg, required))
    return out


def _default(kind, options, cfg):
    if kind == "COMBO":
        return cfg.get("default", options[0] if options else "")
    if "default" in cfg:
        return cfg["default"]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def _prompt(node_name, node, overrides):
    """Node '2' with widget defaults (plus overrides), every required linked input from LikenessTestAny ('1'), and
    its first output into LikenessTestSink ('3')."""
    inputs = {}
    for name, kind, options, cfg, required in _inputs(node):
        if name in overrides:
            inputs[name] = overrides[name]
        elif kind in WIDGETS and not cfg.get("forceInput"):
            inputs[name] = _default(kind, options, cfg)
        elif required:
            inputs[name] = ["1", 0]
    prompt = {"1": {"class_type": "LikenessTestAny", "inputs": {}},
              "2": {"class_type": node_name, "inputs": inputs}}
    if node.get("output"):
        prompt["3"] = {"class_type": "LikenessTestSink", "inputs": {"value": ["2", 0]}}
    return prompt


def _outcome(srv, prompt):
    """('rejected', answer) when POST /prompt refused it, ('failed', error) when the node raised, ('ran', hist)."""
    try:
        return "ran", srv.run(prompt, timeout=120)
    except PromptFailed as e:
        if e.response is not None and "exception_message" in e.response:
            return "failed", e.response
        return "rejected", e.response if e.response is not None else {"error": str(e)}


def _rejected_for(answer, input_name):
    """ComfyUI's own validation refused this input (value_not_in_list / min / max) — the server's node_errors."""
    for errs in (answer.get("node_errors") or {}).values():
        for err in errs.get("errors", []):
            if (err.get("extra_info") or {}).get("input_name") == input_name or input_name in str(err.get("details")):
                return err
    return None


def _audit_lines(audit):
    return [ln for ln in audit.read_text().splitlines() if ln.strip()]


# --------------------------------------------------------------------------------------------- file inputs
def _file_inputs(info):
    found = []
    for node_name, node in sorted(_pack_nodes(info).items()):
        for name, kind, options, cfg, _req in _inputs(node):
            files = [o for o in (options or []) if isinstance(o, str) and "hardening_" in o]
            if kind == "COMBO" and files:
                found.append((node_name, node, name, files))
    return found


def _hostile_values(files, info, this_options):
    """(label, value) pairs aimed at real files in the sentinel folder."""
    first = files[0]
    if first.endswith("/"):
        secret = "secret/"
    elif "." in os.path.basename(first):
        secret = "secret" + os.path.splitext(first)[1]
    else:  # a folder name (an InsightFace pack)
        secret = "secret"
    head = first.rstrip("/").rpartition("/")[0]
    head = head + "/" if head else ""
    values = [(f"dotdot{k}", head + "../" * k + f"{MARKER}/{secret}") for k in range(1, 6)]
    values.append(("backslash", "..\\..\\..\\" + f"{MARKER}\\{secret}"))
    values.append(("inner-dotdot", head + f"hardening_x/../../../{MARKER}/{secret}"))
    return values, secret


def test_every_file_input_refuses_paths_outside_its_folders(hardened):
    srv, base, outside, audit = hardened
    info = srv.object_info()
    targets = _file_inputs(info)
    covered = {(n, i) for n, _node, i, _f in targets}
    # the enumeration must find the file inputs known today (new ones are added automatically)
    known = {("LikenessDecaFlameLoader", "deca_model"), ("LikenessDecaFlameLoader", "flame_model"),
             ("LikenessLoadFlamePly", "ply"), ("LikenessFlameConvert", "flame_model"),
             ("LikenessLoadCogVideoX", "model_name"), ("LikenessLoadCogVideoXVAE", "vae_name"),
             ("LikenessCogVideoXLoraLoader", "lora_name"), ("LikenessConcatIDLoader", "concat_id_name"),
             ("LikenessConcatIDCogVideoXLoader", "checkpoint"), ("LikenessLoadFantasyID", "face_modules"),
             ("LikenessLoadFantasyID", "transform"), ("LikenessLoadEvaClip", "eva_clip"),
             ("LikenessStableAnimatorLoader", "unet"), ("LikenessStableAnimatorLoader", "face_encoder"),
             ("LikenessStableAnimatorLoader", "pose_net"), ("LikenessLoadInsightFace", "model_name"),
             ("LikenessLoadDifferentiableArcFace", "source")}
    assert known <= covered, f"file inputs not found in /object_info: {sorted(known - covered)}"
    all_files = sorted({f for _n, _node, _i, fs in targets for f in fs})

    # the audit hook works: a test-only open of a sentinel path is recorded
    before = len(_audit_lines(audit))
    probe = _outcome(srv, {"1": {"class_type": "LikenessTestTouch", "inputs": {"path": str(outside / "secret.pt")}}})
    assert probe[0] == "ran", probe
    assert len(_audit_lines(audit)) == before + 1
    audit.write_text("")

    problems = []
    for node_name, node, name, files in targets:
        values, secret = _hostile_values(files, info, files)
        values.append(("absolute", str(outside / secret.rstrip("/"))))
        values.append(("absolute-file", str(outside / "secret.pt")))
        # a name that exists in another input's folder but not in this one's
        other = next((f for f in all_files if os.path.basename(f.rstrip("/")) not in
                      {os.path.basename(g.rstrip("/")) for g in files}), None)
        if other is not None:
            values.append(("other-folder", other))
        for label, value in values:
            kind, result = _outcome(srv, _prompt(node_name, node, {name: value}))
            text = json.dumps(result)
            where = f"{node_name}.{name} {label}={value!r}"
            if kind == "rejected":
                if _rejected_for(result, name) is None or "not in list" not in text.lower():
                    problems.append(f"{where}: rejected for another reason: {text[:400]}")
                continue
            if kind == "ran":
                problems.append(f"{where}: was accepted")
                continue
            msg = str(result.get("exception_message", ""))
            if result.get("node_type") != node_name:
                problems.append(f"{where}: failed in another node: {text[:400]}")
            elif label == "other-folder":
                if not any(s in msg for s in ("is not in", "was not found", "not found", "is refused")):
                    problems.append(f"{where}: unexpected message: {msg[:300]}")
            elif "is refused" not in msg:
                problems.append(f"{where}: not refused as a path: {msg[:300]}")
            if str(base) in msg or str(outside) in msg or "weights_only=False" in msg:
                problems.append(f"{where}: the message leaks a server path or unsafe advice: {msg[:300]}")
    assert not problems, "\n".join(problems)
    touched = _audit_lines(audit)
    assert not touched, f"files or folders outside the model folders were accessed: {touched[:20]}"


# --------------------------------------------------------------------------------------------- FLOAT inputs
def _float_inputs(info):
    return [(node_name, node, name) for node_name, node in sorted(_pack_nodes(info).items())
            for name, kind, _o, _c, _r in _inputs(node) if kind == "FLOAT"]


def test_every_float_input_refuses_nan_and_infinity(hardened):
    srv, base, _outside, _audit = hardened
    info = srv.object_info()
    targets = _float_inputs(info)
    covered = {(n, i) for n, _node, i in targets}
    known = {("LikenessHJBFaceGuidance", "eta"), ("LikenessHJBFaceGuidance", "strength"),
             ("LikenessConcatIDModelPatch", "strength"), ("LikenessFlameShapeEdit", "face_width"),
             ("LikenessFantasyIDInjector", "strength"), ("LikenessCogVideoXLoraLoader", "strength")}
    assert known <= covered, f"FLOAT inputs not found in /object_info: {sorted(known - covered)}"
    problems = []
    for node_name, node, name in targets:
        for value in (float("nan"), float("inf"), float("-inf")):
            kind, result = _outcome(srv, _prompt(node_name, node, {name: value}))
            where = f"{node_name}.{name}={value}"
            if kind == "rejected":  # ComfyUI's own min/max check (catches +-inf where a bound is set)
                if _rejected_for(result, name) is None:
                    problems.append(f"{where}: rejected for another reason: {json.dumps(result)[:400]}")
                continue
            if kind == "ran":
                problems.append(f"{where}: was accepted")
                continue
            msg = str(result.get("exception_message", ""))
            if result.get("node_type") != node_name or f"'{name}'" not in msg or "not a finite number" not in msg:
                problems.append(f"{where}: not refused by the finite check: {json.dumps(result)[:400]}")
            if str(base) in msg:
                problems.append(f"{where}: the message leaks a server path: {msg[:300]}")
    assert not problems, "\n".join(problems)
