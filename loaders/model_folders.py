"""Model folders the pack reads, registered with ComfyUI's folder_paths so that
extra_model_paths.yaml entries with the same keys work too."""

import os
import re

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


# ---------------------------------------------------------------------------------------------------------------
# Resolving names from the node inputs. Every file-taking input goes through resolve_file / resolve_in_roots:
# ComfyUI 0.3.75 does not check V3 combo values against their options, so an API client can send any string.

class RefusedName(ValueError):
    """A name that is not a plain relative name inside a model folder ('..', absolute paths, drive letters)."""


_DRIVE = re.compile(r"^[A-Za-z]:")


def _short(text, n=120):
    text = str(text)
    return text if len(text) <= n else text[:n] + "..."


def check_name(name, what):
    """Refuses anything but a relative name below a folder. Purely lexical: nothing on disk is touched, so a
    refused name cannot be used to probe the server's files."""
    if not isinstance(name, str) or not name.strip():
        raise RefusedName(f"{what}: no file chosen; pick one from the list (press R to refresh it).")
    parts = [p for p in re.split(r"[\\/]+", name) if p]
    if (name.startswith(("/", "\\")) or _DRIVE.match(name) or os.path.isabs(name) or "\x00" in name
            or ".." in parts or not parts or all(p == "." for p in parts)):
        absolute = name.startswith(("/", "\\")) or bool(_DRIVE.match(name)) or os.path.isabs(name)
        shown = "an absolute path" if absolute else f"'{_short(name)}'"  # the server's layout is never echoed
        raise RefusedName(
            f"{what}: {shown} is refused: only names from the list are accepted (files inside the model "
            "folder); absolute paths and '..' are not. Pick the file from the list."
        )
    return name


def resolve_file(key, name, what, hint=""):
    """Full path of a file listed under the registered folder(s) `key` (via folder_paths); refuses the rest."""
    check_name(name, what)
    path = folder_paths.get_full_path(key, name)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what}: '{_short(name)}' is not in the {key} model folder(s). "
            + (hint + " " if hint else "") + "Put the file there and refresh the list (press R)."
        )
    return path


def resolve_in_roots(roots, name, what, where, allow_dirs=False, hint=""):
    """Full path of `name` under one of `roots` (files, or folders too when allow_dirs): for inputs whose list
    is not a folder_paths list (CogVideoX diffusers folders, the input folder's .ply files)."""
    check_name(name, what)
    rel = os.path.normpath(name.rstrip("/\\"))
    for root in roots:
        path = os.path.join(root, rel)
        if os.path.isfile(path) or (allow_dirs and os.path.isdir(path)):
            return path
    raise FileNotFoundError(
        f"{what}: '{_short(name)}' is not in {where}. " + (hint + " " if hint else "")
        + "Put it there and refresh the list (press R)."
    )


def _known_roots():
    """(label, root) for every folder a name can be shown relative to: model folders, input/output/temp."""
    out = []
    for key, entry in list(folder_paths.folder_names_and_paths.items()):
        for root in entry[0]:
            out.append((key, root))
    for label, getter in (("input", "get_input_directory"), ("output", "get_output_directory"),
                          ("temp", "get_temp_directory")):
        try:
            out.append((label, getattr(folder_paths, getter)()))
        except Exception:  # noqa: BLE001 - a missing directory getter only loses a label
            pass
    out.append(("models", folder_paths.models_dir))
    base = getattr(folder_paths, "base_path", None)
    if base:
        out.append(("ComfyUI", base))
    return out


def display_path(path):
    """`path` as '<folder key>/<name inside it>' (never the server's absolute layout); the file name alone when
    it is in none of the known folders."""
    if not path:
        return str(path)
    p = os.path.abspath(str(path))
    best = None
    for label, root in _known_roots():
        r = os.path.abspath(root)
        if p == r or p.startswith(r.rstrip(os.sep) + os.sep):
            if best is None or len(r) > len(best[1]):
                best = (label, r)
    if best is None:
        return os.path.basename(p.rstrip(os.sep)) or p
    rel = os.path.relpath(p, best[1])
    return best[0] if rel == "." else f"{best[0]}/{rel.replace(os.sep, '/')}"


def scrub_paths(text):
    """`text` with every known folder's absolute path replaced by its label (for messages made by other code)."""
    text = str(text)
    for label, root in sorted(_known_roots(), key=lambda lr: -len(os.path.abspath(lr[1]))):
        r = os.path.abspath(root).rstrip(os.sep)
        if len(r) > 1:
            text = text.replace(r + os.sep, label + "/").replace(r, label)
    # any other absolute path (a temp file, a folder outside ComfyUI): its last part only
    return _ABS_PATH.sub(lambda m: m.group(1) + os.path.basename(m.group(2).rstrip("/")), text)


_ABS_PATH = re.compile(r"(^|[\s'\"(=\[:])((?:/[^/\s'\")\],:]+){2,}/?)")
