"""The demo: the default example workflow through a real ComfyUI server's API.

Uses the pinned test ComfyUI (make setup) unless COMFYUI_DIR points at your own. With the real
Wan 2.1 T2V 1.3B files in that ComfyUI's model folders it renders the real workflow; without
them it says so and renders the same graph on tiny random-weight models (noise, not a video of
anyone: it proves the plumbing only).
"""

import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from support.paths import TEST_NODES, comfyui_dir  # noqa: E402
from support.server import PACK_LINK, TEST_PACK_LINK, ComfyServer  # noqa: E402

WORKFLOW = REPO / "example_workflows" / "api" / "wan21_t2v_skeleton.json"
NEEDS = {  # folder key -> file the workflow loads
    "diffusion_models": "wan2.1_t2v_1.3B_fp16.safetensors",
    "text_encoders": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae": "wan_2.1_vae.safetensors",
}


def missing_models(server):
    return [f"{key}/{name}" for key, name in NEEDS.items() if name not in server.get_json(f"/models/{key}")]


def tiny_version(prompt):
    p = json.loads(json.dumps(prompt))
    p["1"]["inputs"]["unet_name"] = "tiny_wan_t2v.safetensors"
    p["8"]["inputs"]["vae_name"] = "tiny_wan_vae.safetensors"
    del p["2"]
    p["3"] = {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 4096}}
    p["4"] = {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 2, "tokens": 8, "width": 4096}}
    p["6"]["inputs"].update(width=128, height=128, length=17)
    p["7"]["inputs"].update(steps=6, sampler_name="euler")
    p["10"]["inputs"]["filename_prefix"] = "likeness/tiny_wan21_t2v"
    return p


def main():
    own = os.environ.get("COMFYUI_DIR")
    comfy = Path(own).resolve() if own else comfyui_dir()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    prompt = json.loads(WORKFLOW.read_text())
    base = None if own else REPO / ".demo"
    print(f"[demo] ComfyUI: {comfy} ({'yours' if own else 'pinned 0.3.75 test copy'})")

    server = ComfyServer(base, packs={PACK_LINK: REPO}, python=python, comfy_dir=comfy)
    with server:
        missing = missing_models(server)
        if not missing:
            print("[demo] real models found: rendering Wan 2.1 T2V 1.3B, 832x480, 33 frames (slow on a CPU)")
            hist = server.run(prompt, timeout=24 * 3600)
            return report(server, hist)
    print("[demo] real models not found (" + ", ".join(missing) + ").")
    print("[demo] Running the same graph on TINY RANDOM-WEIGHT models instead: the output is noise, "
          "it only shows that the pack and the graph run.")
    from support.comfy_env import import_comfy
    from support import tiny_models

    import_comfy()
    tiny_base = Path(tempfile.mkdtemp(prefix="likeness-demo-")) if own else REPO / ".demo" / "tiny"
    (tiny_base / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (tiny_base / "models" / "vae").mkdir(parents=True, exist_ok=True)
    tiny_models.save_tiny_wan_t2v(tiny_base / "models" / "diffusion_models" / "tiny_wan_t2v.safetensors")
    tiny_models.save_tiny_wan_vae(tiny_base / "models" / "vae" / "tiny_wan_vae.safetensors")
    tiny = ComfyServer(tiny_base, packs={PACK_LINK: REPO, TEST_PACK_LINK: TEST_NODES}, python=python, comfy_dir=comfy)
    with tiny:
        hist = tiny.run(tiny_version(prompt), timeout=1800)
        return report(tiny, hist)


def report(server, hist):
    for name, sub, kind in server.output_files(hist):
        path = (server.base_dir / kind / sub / name) if not server.in_place else server.comfy_dir / kind / sub / name
        print(f"[demo] video written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
