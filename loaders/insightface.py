"""InsightFace model packs: find them, load detection + recognition with a chosen ONNX Runtime
provider, say which provider really runs, and explain missing or misplaced files.

A pack is a folder of .onnx files under <insightface folder>/models/<name>, e.g.
ComfyUI/models/insightface/models/antelopev2/{scrfd_10g_bnkps.onnx, glintr100.onnx, ...}.
insightface's model zoo decides what each file is (SCRFD detection, ArcFace recognition, ...).
"""

import glob
import logging
import os

import numpy as np

from .model_folders import model_folder_paths

log = logging.getLogger("likeness")

PROVIDERS = {
    "auto": None,
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "DirectML": "DmlExecutionProvider",
}
_AUTO_ORDER = ["CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider"]
_SHORT = {v: k for k, v in PROVIDERS.items() if v}

EXPECTED_LAYOUT = (
    "Expected layout: ComfyUI/models/insightface/models/<pack>/*.onnx, for example "
    "models/insightface/models/antelopev2/scrfd_10g_bnkps.onnx + glintr100.onnx (antelopev2) or "
    "models/insightface/models/buffalo_l/det_10g.onnx + w600k_r50.onnx (buffalo_l)."
)

INSTALL_HINT = (
    "Install them into ComfyUI's Python: `python -m pip install \"insightface>=2.1\" onnxruntime` "
    "(for NVIDIA GPUs use onnxruntime-gpu instead of onnxruntime; never keep both installed)."
)


def _onnx_files(folder):
    return sorted(glob.glob(os.path.join(folder, "*.onnx")))


def insightface_roots():
    return [p for p in model_folder_paths("insightface")]


def list_packs():
    """Pack names for the loader's dropdown: folders with .onnx files (also misplaced ones we can use)."""
    names = set()
    for root in insightface_roots():
        for base in (os.path.join(root, "models"), root):
            if not os.path.isdir(base):
                continue
            for entry in sorted(os.listdir(base)):
                d = os.path.join(base, entry)
                if entry == "models" or not os.path.isdir(d):
                    continue
                if _onnx_files(d) or _onnx_files(os.path.join(d, entry)):
                    names.add(entry)
    return sorted(names)


def resolve_pack_dir(name):
    """Folder holding the pack's .onnx files, plus notes about a misplaced layout.

    Accepted: <root>/models/<name> (correct), <root>/models/<name>/<name> (the nested
    antelopev2/antelopev2 that unzipping creates) and <root>/<name> (the "models" level missing).
    """
    if not name or os.sep in name or "/" in name or name in (".", ".."):
        raise ValueError(f"InsightFace pack name {name!r} is not a folder name; pick a pack from the list.")
    roots = insightface_roots()
    if not roots:
        raise RuntimeError("No 'insightface' model folder is registered with ComfyUI. " + EXPECTED_LAYOUT)
    searched = []
    for root in roots:
        correct = os.path.join(root, "models", name)
        candidates = [
            (correct, None),
            (os.path.join(correct, name),
             f"The {name} files are one folder too deep ({os.path.join(correct, name)}), the usual result of "
             f"unzipping {name}.zip inside {correct}. Likeness uses them there; to fix it for every tool, move the "
             f".onnx files up into {correct} and delete the empty inner folder."),
            (os.path.join(root, name),
             f"The {name} pack is in {os.path.join(root, name)} but belongs in {correct}. Likeness uses it there; "
             f"other InsightFace tools will not find it until you move the folder into {os.path.join(root, 'models')}."),
        ]
        for path, note in candidates:
            searched.append(path)
            if _onnx_files(path):
                return path, ([note] if note else [])
    hints = []
    for root in roots:
        correct = os.path.join(root, "models", name)
        for z in (os.path.join(root, "models", name + ".zip"), os.path.join(root, name + ".zip"), os.path.join(correct, name + ".zip")):
            if os.path.isfile(z):
                hints.append(f"Found {z}: unzip it so the .onnx files end up in {correct}.")
        if os.path.isdir(correct):
            inside = sorted(os.listdir(correct))
            hints.append(f"{correct} exists but holds no .onnx file (it holds: {inside[:10] or 'nothing'}).")
    available = list_packs()
    raise FileNotFoundError(
        f"InsightFace pack '{name}' was not found. Looked for .onnx files in: {', '.join(searched)}. "
        + " ".join(hints) + " " + EXPECTED_LAYOUT
        + (f" Packs found: {', '.join(available)}." if available else " No pack is installed yet.")
    )


def _import_insightface():
    try:
        import onnxruntime  # noqa: F401
        from insightface.model_zoo import model_zoo
    except ImportError as exc:
        raise RuntimeError(f"The face nodes need insightface>=2.1 and onnxruntime, which failed to import ({exc}). " + INSTALL_HINT) from exc
    return model_zoo


def choose_providers(provider):
    """(providers list for onnxruntime, warning or None) for a provider choice."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ValueError(f"Unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}.")
    available = list(ort.get_available_providers())
    if provider == "auto":
        for p in _AUTO_ORDER:
            if p in available:
                return [p, "CPUExecutionProvider"], None
        return ["CPUExecutionProvider"], None
    wanted = PROVIDERS[provider]
    if wanted in available:
        return ([wanted, "CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [wanted]), None
    gpu_hint = {
        "CUDAExecutionProvider": "install onnxruntime-gpu (pip uninstall onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu) with a CUDA/cuDNN that matches it",
        "ROCMExecutionProvider": "install onnxruntime-rocm",
        "DmlExecutionProvider": "install onnxruntime-directml (Windows)",
        "CoreMLExecutionProvider": "use the standard onnxruntime wheel on macOS",
    }.get(wanted, "")
    return ["CPUExecutionProvider"], (
        f"{provider} was requested but this onnxruntime ({ort.__version__}) offers only "
        f"{', '.join(_SHORT.get(p, p) for p in available)}; running on CPU instead (slower). To use {provider}, {gpu_hint}."
    )


class InsightFacePack:
    """Loaded detection + recognition models of one pack (the INSIGHTFACE socket value)."""

    def __init__(self, name, folder, det, rec, requested, notes):
        self.name = name
        self.folder = folder
        self.det = det
        self.rec = rec
        self.requested = requested
        self.notes = list(notes)
        rin = rec.session.get_inputs()[0]
        self.rec_input_name = rin.name
        self.rec_input_size = int(rin.shape[2]) if isinstance(rin.shape[2], int) else 112
        self.rec_fixed_batch = rin.shape[0] if isinstance(rin.shape[0], int) and rin.shape[0] > 0 else None
        self.rec_output_name = rec.session.get_outputs()[0].name
        self.rec_mean = float(rec.input_mean)
        self.rec_std = float(rec.input_std)
        self.rec_name = f"{name}/{os.path.basename(rec.model_file)}"

    @property
    def det_fixed_size(self):
        return getattr(self.det, "static_input_size", None)

    @property
    def providers(self):
        return {
            "detection": self.det.session.get_providers()[0],
            "recognition": self.rec.session.get_providers()[0],
        }

    def describe(self):
        p = self.providers
        lines = [
            f"pack {self.name} at {self.folder}",
            f"detection: {os.path.basename(self.det.model_file)} on {_SHORT.get(p['detection'], p['detection'])}",
            f"recognition: {os.path.basename(self.rec.model_file)} on {_SHORT.get(p['recognition'], p['recognition'])}",
            f"requested provider: {self.requested}",
        ]
        return "\n".join(lines + self.notes)

    def detect(self, bgr, size, threshold):
        """uint8 BGR (H, W, 3) -> (boxes (N, 5) x1 y1 x2 y2 score, kps (N, 5, 2)) at one detector size."""
        fixed = self.det_fixed_size
        input_size = tuple(fixed) if fixed else (int(size), int(size))
        boxes, kps = self.det.detect(bgr, input_size=input_size, max_num=0, det_thresh=float(threshold))
        if kps is None:
            raise RuntimeError(
                f"The detection model {os.path.basename(self.det.model_file)} gives no facial keypoints, which alignment needs; "
                "use a pack whose detector has keypoints (SCRFD *_kps / *bnkps, det_10g)."
            )
        return boxes, kps

    def embed(self, crops_rgb01, batch_size=32):
        """(N, 3, S, S) float RGB in [0, 1], aligned -> (N, D) raw embeddings (float32), batched."""
        x = np.ascontiguousarray((np.asarray(crops_rgb01, dtype=np.float32) * 255.0 - self.rec_mean) / self.rec_std)
        return self._run_rec(x, batch_size)

    def embed_bgr(self, crops_bgr, batch_size=32):
        """List/array of (S, S, 3) uint8 BGR aligned crops -> (N, D) raw embeddings, scaled as insightface's
        own recogniser does it (cv2.dnn.blobFromImages: RGB, (x - mean) * (1 / std), fp32), batched."""
        if len(crops_bgr) == 0:
            return np.zeros((0, 512), dtype=np.float32)
        x = np.stack([np.asarray(c)[..., ::-1] for c in crops_bgr]).astype(np.float32)
        x = np.ascontiguousarray(((x - np.float32(self.rec_mean)) * np.float32(1.0 / self.rec_std)).transpose(0, 3, 1, 2))
        return self._run_rec(x, batch_size)

    def _run_rec(self, x, batch_size):
        if x.shape[0] == 0:
            return np.zeros((0, 512), dtype=np.float32)
        step = self.rec_fixed_batch or max(1, int(batch_size))
        outs = []
        for i in range(0, x.shape[0], step):
            chunk = x[i:i + step]
            if self.rec_fixed_batch and chunk.shape[0] < step:
                pad = np.zeros((step - chunk.shape[0],) + chunk.shape[1:], dtype=np.float32)
                out = self.rec.session.run([self.rec_output_name], {self.rec_input_name: np.concatenate([chunk, pad])})[0]
                outs.append(out[: chunk.shape[0]])
            else:
                outs.append(self.rec.session.run([self.rec_output_name], {self.rec_input_name: chunk})[0])
        return np.concatenate(outs).reshape(x.shape[0], -1).astype(np.float32)


def load_pack(name, provider="auto"):
    """Load a pack's detection and recognition models. Returns (InsightFacePack, status text)."""
    folder, notes = resolve_pack_dir(name)
    model_zoo = _import_insightface()
    providers, warning = choose_providers(provider)
    det = rec = None
    problems = []
    for path in _onnx_files(folder):
        try:
            model = model_zoo.get_model(path, providers=providers)
        except Exception as exc:  # a broken or foreign .onnx must not hide the others
            problems.append(f"{os.path.basename(path)} could not be loaded ({type(exc).__name__}: {exc})")
            continue
        task = getattr(model, "taskname", None)
        if task == "detection" and det is None:
            det = model
        elif task == "recognition" and rec is None:
            rec = model
    files = [os.path.basename(p) for p in _onnx_files(folder)]
    missing = []
    if det is None:
        missing.append("a face detection model (an SCRFD .onnx such as scrfd_10g_bnkps.onnx or det_10g.onnx)")
    if rec is None:
        missing.append("a face recognition model (an ArcFace .onnx with a 1x3x112x112 input, such as glintr100.onnx or w600k_r50.onnx)")
    if missing:
        raise FileNotFoundError(
            f"InsightFace pack '{name}' in {folder} lacks {' and '.join(missing)}. Files there: {', '.join(files)}. "
            + (" Problems: " + "; ".join(problems) + "." if problems else "") + " " + EXPECTED_LAYOUT
        )
    if problems:
        notes.append("Skipped: " + "; ".join(problems))
    pack = InsightFacePack(name, folder, det, rec, provider, notes)
    wanted = providers[0]
    actual = pack.providers
    fallback = [k for k, v in actual.items() if v != wanted]
    if warning is None and fallback:
        warning = (
            f"{_SHORT.get(wanted, wanted)} was requested and is installed, but onnxruntime could not start it for "
            f"{' and '.join(fallback)} and fell back to {_SHORT.get(actual[fallback[0]], actual[fallback[0]])} (slower). "
            "This is usually a CUDA/cuDNN version that does not match onnxruntime-gpu; see the ComfyUI console for onnxruntime's message."
        )
    if warning:
        pack.notes.append("WARNING: " + warning)
        log.warning("Likeness Load InsightFace: %s", warning)
    for n in notes:
        log.warning("Likeness Load InsightFace: %s", n)
    return pack, pack.describe()


# ---------------------------------------------------------------------------------------------
# differentiable ArcFace sources

TORCH_EXTS = (".pth", ".pt", ".safetensors", ".bin")  # .bin: CurricularFace glint360k_curricular_face_r101_backbone.bin


def list_arcface_sources():
    """Dropdown entries: 'insightface/<pack>/<file>.onnx' for every pack .onnx whose input is a square
    image of at least 112 px (cheap check of the file name is not enough, so the graph header is read
    lazily at load time), and '<folder key>/<file>' for torch iresnet checkpoints."""
    out = []
    for name in list_packs():
        try:
            folder, _ = resolve_pack_dir(name)
        except (FileNotFoundError, ValueError, RuntimeError):
            continue
        out += [f"insightface/{name}/{os.path.basename(p)}" for p in _onnx_files(folder)]
    for key in ("insightface", "stableanimator"):
        for root in model_folder_paths(key):
            if not os.path.isdir(root):
                continue
            for dirpath, _dirs, files in os.walk(root):
                for f in sorted(files):
                    if f.endswith(TORCH_EXTS):
                        rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                        out.append(f"{key}/{rel}")
    # recognisers first (glintr100 / w600k / arcface names), then the rest in order
    rank = lambda s: (0 if any(k in s.lower() for k in ("glintr", "w600k", "arcface", "curricular", "r100", "r101", "r50", "rec")) else 1, s)
    return sorted(dict.fromkeys(out), key=rank)


def _resolve_arcface_source(source):
    key, _, rest = source.partition("/")
    if key == "insightface" and rest.endswith(".onnx"):
        pack, _, fname = rest.partition("/")
        folder, _ = resolve_pack_dir(pack)
        path = os.path.join(folder, fname)
        if os.path.isfile(path):
            return path
    elif key in ("insightface", "stableanimator"):
        for root in model_folder_paths(key):
            path = os.path.normpath(os.path.join(root, rest))
            if os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) != os.path.abspath(root):
                continue
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f"ArcFace source '{source}' was not found. Put a recognition .onnx in an InsightFace pack "
        "(models/insightface/models/<pack>/glintr100.onnx) or a torch iresnet checkpoint such as StableAnimator's "
        "glintr100_torch.pth in models/stableanimator/ or models/insightface/ (CurricularFace: "
        "glint360k_curricular_face_r101_backbone.bin in models/insightface/), then refresh the node list."
    )


def load_arcface_torch(source):
    """ARCFACE_TORCH from a pack's recognition ONNX or an iresnet state dict (safe loading only)."""
    import torch

    from ..likeness_blocks.arcface import arcface_from_iresnet_state_dict, arcface_from_onnx

    path = _resolve_arcface_source(source)
    if path.endswith(".onnx"):
        try:
            import onnx
        except ImportError as exc:
            raise RuntimeError(f"Converting an ONNX recogniser needs the 'onnx' package ({exc}). `python -m pip install onnx`.") from exc
        model = onnx.load(path)
        dims = [d.dim_value if d.dim_value > 0 else d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[1] != 3 or dims[2] != dims[3] or not isinstance(dims[2], int) or dims[2] < 112:
            raise ValueError(
                f"{source} is not a face recognition model: its input is {dims}, a recogniser takes (batch, 3, 112, 112). "
                "Pick the pack's recognition file (glintr100.onnx in antelopev2, w600k_r50.onnx in buffalo_l)."
            )
        return arcface_from_onnx(model, name=source)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"{source} could not be loaded safely (weights_only=True): {exc}. Only plain state dicts are accepted; "
                "re-save it with torch.save(model.state_dict(), path) or convert it to .safetensors."
            ) from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{source} holds a {type(sd).__name__}, not a state dict of tensors.")
    from ..likeness_blocks.curricularface import is_curricularface_state_dict

    if is_curricularface_state_dict(sd):
        from ..likeness_blocks.arcface import recognizer_from_curricularface_state_dict

        return recognizer_from_curricularface_state_dict(sd, name=source)
    return arcface_from_iresnet_state_dict(sd, name=source)
