"""The demo: the Concat-ID Wan identity-video workflow through a real ComfyUI server's API.

Uses the pinned test ComfyUI (make setup) unless COMFYUI_DIR points at your own. With the real
files in that ComfyUI's model folders (see NEEDS) it renders the real workflow with the photo of a
face that ships in the insightface package; without them it says so and renders the same graph on
tiny random-weight models (noise, not a video of anyone: it proves the plumbing only).
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from support.paths import TEST_NODES, comfyui_dir  # noqa: E402
from support.server import PACK_LINK, TEST_PACK_LINK, ComfyServer  # noqa: E402

WORKFLOW = REPO / "example_workflows" / "api" / "concat_id_wan.json"
NEEDS = {  # folder key -> file the workflow loads
    "concat_id": "second_stage_adaln.pt",
    "text_encoders": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae": "wan_2.1_vae.safetensors",
}
FACE_PACK = "antelopev2"
DEMO_FACE = "likeness_demo_face.png"


def missing_models(server):
    missing = [f"{key}/{name}" for key, name in NEEDS.items() if name not in server.get_json(f"/models/{key}")]
    if not any(f"{FACE_PACK}/" in f for f in server.get_json("/models/insightface")):
        missing.append(f"insightface/models/{FACE_PACK}/")
    return missing


def shipped_face_photo():
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"


def tiny_version(prompt):
    """The Concat-ID Wan graph on tiny models: a tiny Concat-ID file, the tiny square-face detector,
    test text conditioning, 128x128, 17 frames, 6 steps."""
    p = json.loads(json.dumps(prompt))
    p["2"]["inputs"]["concat_id_name"] = "tiny_concat_id_adaln.pt"
    del p["5"]
    p["6"] = {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 4096}}
    p["7"] = {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": 2, "tokens": 8, "width": 4096}}
    p["8"]["inputs"]["vae_name"] = "tiny_wan_vae.safetensors"
    p["9"]["inputs"]["image"] = "tiny_square_face.png"
    p["17"]["inputs"].update(model_name="tiny_demo", provider="CPU")
    p["10"]["inputs"].update(det_size=320)
    for n in ("11", "13"):
        p[n]["inputs"].update(width=128, height=128)
    p["13"]["inputs"]["length"] = 17
    p["14"]["inputs"].update(steps=6)
    p["16"]["inputs"]["filename_prefix"] = "likeness/tiny_concat_id_wan"
    return p


def make_tiny_models(base):
    from PIL import Image
    import torch

    from support.comfy_env import import_comfy
    from support import tiny_faces, tiny_models

    import_comfy()
    for sub in ("diffusion_models", "vae", "concat_id"):
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
    (base / "input").mkdir(parents=True, exist_ok=True)
    torch.save(tiny_models.tiny_concat_id_adaln_state_dict(), base / "models" / "concat_id" / "tiny_concat_id_adaln.pt")
    tiny_models.save_tiny_wan_vae(base / "models" / "vae" / "tiny_wan_vae.safetensors")
    tiny_faces.make_tiny_pack(base / "models", "tiny_demo", seed=1)
    Image.fromarray(tiny_faces.squares_image((256, 256), [(96, 96, 32)])).save(base / "input" / "tiny_square_face.png")


def main():
    own = os.environ.get("COMFYUI_DIR")
    comfy = Path(own).resolve() if own else comfyui_dir()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    prompt = json.loads(WORKFLOW.read_text())
    base = None if own else REPO / ".demo"
    print(f"[demo] ComfyUI: {comfy} ({'yours' if own else 'pinned 0.3.75 test copy'})")
    print(f"[demo] workflow: {WORKFLOW.relative_to(REPO)} (Concat-ID identity video on Wan 2.1 T2V 1.3B)")

    server = ComfyServer(base, packs={PACK_LINK: REPO}, python=python, comfy_dir=comfy)
    with server:
        missing = missing_models(server)
        if not missing:
            shutil.copy(shipped_face_photo(), server.input_dir / DEMO_FACE)
            prompt["9"]["inputs"]["image"] = DEMO_FACE
            print("[demo] real models found: rendering 832x480, 81 frames, 50 steps with the reference photo "
                  f"{DEMO_FACE} (from the insightface package). Hours on a CPU; minutes on a GPU.")
            return report(server, server.run(prompt, timeout=48 * 3600))
    print("[demo] real models not found: " + ", ".join(missing) + ".")
    print("[demo] Running the same graph on TINY RANDOM-WEIGHT models instead: the output is noise, "
          "it only shows that the pack and the graph run.")
    tiny_base = Path(tempfile.mkdtemp(prefix="likeness-demo-")) if own else REPO / ".demo" / "tiny"
    make_tiny_models(tiny_base)
    tiny = ComfyServer(tiny_base, packs={PACK_LINK: REPO, TEST_PACK_LINK: TEST_NODES}, python=python, comfy_dir=comfy)
    with tiny:
        return report(tiny, tiny.run(tiny_version(prompt), timeout=1800))


def report(server, hist):
    for name, sub, kind in server.output_files(hist, "16"):
        print(f"[demo] video written: {server.base_dir / kind / sub / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
