"""Writes the UI-format example workflows (example_workflows/*.json, what the graph editor and its
template browser open) from the API-format prompts in example_workflows/api/, using a real
server's /object_info for the widget order. Run after changing a prompt or a node's inputs:

    .venv/bin/python scripts/make_example_workflows.py
"""

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from support.server import ComfyServer  # noqa: E402
from workflow_format import api_to_ui  # noqa: E402

# Note nodes shown beside each workflow: which model files it needs, where they go, where to get them.
NOTES = {
    "stableanimator_svd_pose_identity": [(
        "Model files",
        "StableAnimator on native SVD-xt: a reference photo + a pose video (one DWPose skeleton image per frame) "
        "-> an animation of that person. Set video_frames to the number of pose frames (longer videos are run in "
        "tiles by StableAnimator Long Video).\n\n"
        "models/checkpoints/svd_xt.safetensors (stabilityai/stable-video-diffusion-img2vid-xt, Stability AI licence)\n"
        "models/stableanimator/unet.pth, face_encoder.pth, pose_net.pth (Animation/ of FrancisRing/StableAnimator)\n"
        "models/insightface/models/antelopev2/*.onnx (insightface antelopev2, non-commercial research terms)\n\n"
        "Pose video: render DWPose skeletons of the driving video with a DWPose preprocessor pack (e.g. "
        "comfyui_controlnet_aux), aligned to the reference person, at 512x512 or 576x1024.",
    )],
    "wan21_t2v_skeleton": [(
        "Model files",
        "Plain Wan 2.1 text-to-video, the base the identity workflows build on.\n\n"
        "models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors\n"
        "models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors\n"
        "models/vae/wan_2.1_vae.safetensors\n\n"
        "Source: Comfy-Org/Wan_2.1_ComfyUI_repackaged (Hugging Face), Apache-2.0.",
    )],
}


def main():
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(tmp) as server:
        info = server.object_info()
    for api in sorted((REPO / "example_workflows" / "api").glob("*.json")):
        prompt = json.loads(api.read_text())
        ui = api_to_ui(prompt, info, notes=NOTES.get(api.stem, ()))
        out = REPO / "example_workflows" / api.name
        out.write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
