"""Model folders the pack reads, registered with ComfyUI's folder_paths so that
extra_model_paths.yaml entries with the same keys work too."""

import os

import folder_paths

# key -> (default folder under ComfyUI/models, extensions listed in dropdowns, what goes there)
# An empty extension set means "every file" (folder_paths' own convention).
MODEL_FOLDERS = {
    "insightface": ("insightface", set(), "InsightFace model packs: insightface/models/<pack>/*.onnx (antelopev2, buffalo_l)"),
    "deca": ("deca", {".tar", ".pth", ".pt", ".safetensors"}, "DECA encoder deca_model.tar"),
    "flame": ("flame", {".pkl", ".npz", ".safetensors"}, "FLAME generic_model.pkl (or its converted .npz/.safetensors)"),
    "fantasyid": ("fantasyid", set(), "FantasyID face modules and transform.pkl"),
    "stableanimator": ("stableanimator", {".pth", ".pt", ".safetensors"}, "StableAnimator unet.pth, face_encoder.pth, pose_net.pth"),
    "concat_id": ("concat_id", {".pt", ".pth", ".safetensors"}, "Concat-ID first_stage.pt / second_stage_adaln.pt"),
    "cogvideox": ("cogvideox", set(), "CogVideoX diffusers folders (transformer/, vae/) or single .safetensors files"),
}


def register_model_folders():
    """Adds each folder once; keys a user's extra_model_paths.yaml already created keep their paths
    and get ours as well."""
    for key, (sub, exts, _what) in MODEL_FOLDERS.items():
        path = os.path.join(folder_paths.models_dir, sub)
        entry = folder_paths.folder_names_and_paths.get(key)
        if entry is None:
            folder_paths.folder_names_and_paths[key] = ([path], set(exts))
            continue
        paths, known = entry
        if path not in paths:
            paths.append(path)
        if exts and known:
            known.update(exts)


def model_folder_paths(key):
    return folder_paths.get_folder_paths(key)
