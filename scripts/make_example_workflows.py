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
    'likeness_face_identity_metrics': [
        ('Read me: model files',
         'Identity check: embed a reference face, then measure a generated video against it.\n\nModel files (InsightFace antelopev2, non-commercial licence):\nComfyUI/models/insightface/models/antelopev2/\n  scrfd_10g_bnkps.onnx  (detection)\n  glintr100.onnx  (recognition)\n  (1k3d68.onnx, 2d106det.onnx, genderage.onnx are loaded but not needed)\nbuffalo_l works too: models/insightface/models/buffalo_l/det_10g.onnx + w600k_r50.onnx\n\nNot antelopev2/antelopev2: if unzipping made a nested folder, move the .onnx files up one level.\nPython packages: insightface>=2.1, onnxruntime (or onnxruntime-gpu, not both), onnx.\n\nIdentity Metrics: similarity to reference (RS / CSIM / ArcSim), inter-frame similarity, face motion, frames without face, per-second similarity and drift (set fps to the video frame rate), a pass/fail gate and a summary.\n\nprotocol: likeness (every frame) or the benchmarks own scoring: consisid (16 frames) / opens2v (32 frames) = FaceSim-Arc and FaceSim-Cur as their scripts compute them. For those use the buffalo_l pack (det_10g.onnx + w600k_r50.onnx) and, for FaceSim-Cur, put glint360k_curricular_face_r101_backbone.bin (OpenS2V / ConsisID weight release) in models/insightface/, load it with Load Differentiable ArcFace and connect it to the recognizer input. See docs/metrics.md.'),
    ],
    'concat_id_wan': [
        ('Concat-ID: models and folders',
         "Concat-ID on Wan 2.1 T2V 1.3B (Likeness)\n\nModel files and folders (ComfyUI/models/...):\n- concat_id/second_stage_adaln.pt  (AdaLN model; or first_stage.pt) from HF yongzhong/Concat-ID-Wan. The file holds the full Wan 2.1 1.3B weights: no separate Wan checkpoint needed.\n- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (or umt5_xxl_fp16) - Wan 2.1 text encoder\n- vae/wan_2.1_vae.safetensors - Wan 2.1 VAE\n- insightface/models/antelopev2/*.onnx - face detector for ArcFace Embed (keypoints for alignment; non-commercial licence)\n\nConcat-ID settings: 480x832, 81 frames, 50 steps, CFG 5, flow shift 5, 16 fps.\nThe reference face is aligned to 448 px, (optionally masked: connect a face-parsing MASK keeping face+hair), padded to the video size and appended as one extra latent frame; the patch gives it Concat-ID's RoPE slot and cuts it off the output.\nThe released weights were trained with ONE reference; more references (a batch of images) work but are untrained.\nfirst_stage.pt also loads with the stock Load Diffusion Model node (put it in diffusion_models/) + the patch without weights."),
    ],
    "concat_id_wan_long": [(
        "Concat-ID long video: context windows",
        "Concat-ID Wan beyond its 81 trained frames: WAN Context Windows (Manual) after the Concat-ID Model Patch runs "
        "the 161 frames as windows of 81 overlapping 16 (static schedule, pyramid fusion). Every window's model call "
        "gets the same reference frame in its own RoPE slot right after that window's frames; the reference never "
        "reaches the output. Identity Metrics on the decoded video: per-frame similarity, its per-second curve and "
        "drift (last second / first second; the gate fails below 0.9).\n\n"
        "Same model files as the Concat-ID Wan workflow (concat_id/second_stage_adaln.pt, "
        "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors, vae/wan_2.1_vae.safetensors, "
        "insightface antelopev2). ComfyUI 0.33 adds FreeNoise, retain_first_frame and an anchor frame per window "
        "(causal_window_fix) to this node; the patch follows the frames each call holds on both versions.",
    )],
    'concat_id_wan_hjb': [
        ('HJB face guidance (StableAnimator) on top of Concat-ID Wan',
         "Model files and folders (ComfyUI/models/...), the Concat-ID Wan workflow's plus the differentiable ArcFace:\n- concat_id/second_stage_adaln.pt  (AdaLN model; or first_stage.pt) from HF yongzhong/Concat-ID-Wan\n- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (or umt5_xxl_fp16) - Wan 2.1 text encoder\n- vae/wan_2.1_vae.safetensors - Wan 2.1 VAE\n- insightface/models/antelopev2/*.onnx - face detector and recogniser (non-commercial licence); Load Differentiable ArcFace converts its glintr100.onnx (listed as insightface/antelopev2/glintr100.onnx) to torch, or loads stableanimator/glintr100_torch.pth.\n\nFace boxes come from the InsightFace detector on a preview decode at the first active step; connect a face MASK to fix them yourself. Costs extra VAE decodes per active step: see docs/hjb.md."),
    ],
    "fantasyid_face_geometry": [(
        "Model files",
        "Photo -> DECA -> FLAME vertices (FantasyID's 3D input), a jawline edit, previews and a .ply.\n\n"
        "models/deca/deca_model.tar  (DECA project, github.com/yfeng95/DECA; non-commercial licence)\n"
        "models/flame/generic_model.pkl  (FLAME 2020; register at flame.is.tue.mpg.de)\n\n"
        "No chumpy needed. Put your photo in ComfyUI/input and pick it in Load Image.",
    )],
    "fantasyid_cogvideox_i2v": [(
        "FantasyID: model files",
        "FantasyID on native CogVideoX-5B-I2V: a photo -> aligned face crop (first frame + EVA02-CLIP face tokens) "
        "and DECA FLAME vertices (3D tokens; edit the face shape with FLAME Shape Edit) -> fused ID tokens -> "
        "Layer-Aware Injector after every DiT block.\n\n"
        "models/cogvideox/FantasyID/transformer/ (config.json + diffusion_pytorch_model*.safetensors from HF "
        "acvlab/FantasyID; its face modules are set aside by Load CogVideoX and read by Load FantasyID)\n"
        "models/cogvideox/FantasyID/vae/ (the same repository's vae/)\n"
        "models/fantasyid/transform.pkl (assets/transform.pkl of github.com/Fantasy-AMAP/fantasy-id; FLAME licence)\n"
        "models/fantasyid/EVA02_CLIP_L_336_psz14_s6B.pt (face_encoder/ of acvlab/FantasyID)\n"
        "models/text_encoders/t5xxl_fp16.safetensors (Load CLIP, type sd3)\n"
        "models/insightface/models/antelopev2/*.onnx (face detection + alignment; non-commercial)\n"
        "models/deca/deca_model.tar, models/flame/generic_model.pkl (DECA / FLAME 2020; non-commercial)\n\n"
        "Upstream settings: 49 frames, 720x480, 50 steps, CFG 6, seed 42, sampler ddim + scheduler simple.",
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
