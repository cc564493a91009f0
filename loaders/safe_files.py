"""Reading model files safely, and one kind of message for every file that cannot be read.

Every loader reads through `load_state_dict` / `torch_load` / `reading(...)`: safetensors, or torch.load with
weights_only=True (plus, where a release needs it, an explicit allow-list of numpy types). A failure becomes a
BadModelFile that says which file (relative to its model folder, never the server's absolute path), what is wrong
with it (empty, truncated, not a safetensors file, not a torch checkpoint, holds code) and what to do. torch's own
advice to retry with weights_only=False is never passed on.
"""

import json
import os
import pickle
import re
import zipfile
from contextlib import contextmanager

from .model_folders import RefusedName, display_path, scrub_paths

SAFETENSORS_EXTS = (".safetensors", ".sft")


class BadModelFile(ValueError):
    """A model file that exists but cannot be used (corrupt, wrong format, unsafe content, another model)."""


def _head(path, n=8):
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def clean_message(text):
    """Another library's message without absolute paths or advice to load unsafely (first 300 characters)."""
    text = str(text)
    if "Weights only load failed" in text:  # torch's text advises loading unsafely: say only what was refused
        refused = _refused_globals(text)
        text = text[: text.index("Weights only load failed")] + "refused by the safe unpickler" + (
            f" ({', '.join(refused[:4])})" if refused else "")
    # any remaining sentence about weights_only is advice about loading unsafely: dropped
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    parts = [p for p in parts if "weights_only" not in p and "WeightsUnpickler" not in p and p.strip()]
    text = " ".join(parts)
    text = scrub_paths(text)
    return text if len(text) <= 300 else text[:300] + "..."


def _refused_globals(text):
    found = re.findall(r"GLOBAL ([\w.]+)", str(text)) + re.findall(r"Unsupported global: ([\w.]+)", str(text))
    found += re.findall(r"global '([\w.]+)'", str(text)) + re.findall(r"refers to '([\w.]+)'", str(text))
    return sorted(set(found) - {"GLOBAL"})


def problem_of(exc, path):
    """(what is wrong, what to do) for an exception raised while reading `path`; None when it is not a
    reading failure this module knows."""
    name = type(exc).__name__
    msg = str(exc)
    ext = os.path.splitext(str(path))[1].lower()
    head = _head(path)
    redownload = "Download the file again (compare its size with the original)."
    if _size(path) == 0:
        return "is empty (0 bytes): the download or copy did not finish", redownload
    if name == "SafetensorError" or (ext in SAFETENSORS_EXTS and ("header" in msg.lower() or "metadata" in msg.lower())):
        if head[:2] == b"PK" or head[:1] == b"\x80":
            return ("is not a safetensors file (it is a torch checkpoint with a .safetensors name)",
                    "Rename it to .pt, or convert it to real .safetensors.")
        if "incomplete metadata" in msg or "not fully covered" in msg or "MetadataIncompleteBuffer" in msg:
            return "is truncated (the safetensors data ends before the tensors its header lists)", redownload
        return "is not a safetensors file (its header cannot be read)", redownload
    if "PytorchStreamReader" in msg or isinstance(exc, zipfile.BadZipFile):
        if head[:2] == b"PK":
            return "is truncated (its zip archive is incomplete)", redownload
        return "is not a torch checkpoint (no valid zip archive or pickle)", redownload
    if isinstance(exc, EOFError):
        return "is truncated (it ends in the middle of the data)", redownload
    if isinstance(exc, IndexError) and "pop from empty list" in msg:
        return "is not a torch checkpoint (its pickle stream is broken: truncated or a text file)", redownload
    if isinstance(exc, pickle.UnpicklingError) or name == "UnpicklingError":
        refused = _refused_globals(msg)
        if refused or "Weights only load failed" in msg or "not allowed" in msg or "refused" in msg.lower():
            what = f" ({', '.join(refused[:4])})" if refused else ""
            todo = "" if ext == ".pkl" else ("A state dict saved with torch.save(model.state_dict()) or a "
                                             ".safetensors conversion loads.")
            return (f"could not be loaded safely: it holds Python objects other than "
                    f"{'arrays' if ext == '.pkl' else 'tensors'}{what}, which are refused because unpickling them "
                    "could run code", todo)
        return "is not a torch checkpoint or pickle (truncated or a different format)", redownload
    if name == "DecodeError" or (ext == ".onnx" and ("protobuf" in msg.lower() or "parse" in msg.lower())):
        return "is not an ONNX model (truncated or a different format)", redownload
    if ext == ".npz" and ("pickled" in msg or isinstance(exc, (zipfile.BadZipFile, OSError, EOFError))):
        return "is not a .npz archive (truncated or a different format)", redownload
    if isinstance(exc, json.JSONDecodeError):
        return f"is not valid JSON (line {exc.lineno})", redownload
    if isinstance(exc, UnicodeDecodeError):
        return "is not a text file (it cannot be decoded as UTF-8)", redownload
    return None


def explain(exc, path, what, fix=""):
    """BadModelFile for an exception raised while reading `path`."""
    if isinstance(exc, (BadModelFile, RefusedName)):
        return exc
    known = problem_of(exc, path)
    shown = display_path(path)
    if known is None:
        return BadModelFile(f"{what}: '{shown}' could not be read ({type(exc).__name__}: {clean_message(exc)}). "
                            + (fix or "Check that it is the file the node asks for."))
    problem, todo = known
    return BadModelFile(f"{what}: '{shown}' {problem}. " + " ".join(t for t in (todo, fix) if t))


@contextmanager
def reading(path, what, fix=""):
    """Turns any failure of the reading code inside into a BadModelFile naming `path` by its display name.
    Messages that are already clear (ValueErrors this pack raises after reading) keep their text, scrubbed."""
    try:
        yield
    except (BadModelFile, RefusedName):
        raise
    except FileNotFoundError as exc:  # the OS names the absolute path: keep the message, not the layout
        raise FileNotFoundError(clean_message(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - every failure of reading a file becomes one clear message
        if problem_of(exc, path) is None and type(exc) is ValueError:
            raise BadModelFile(f"{what}: '{display_path(path)}': {clean_message(exc)}") from exc
        raise explain(exc, path, what, fix) from exc


def numpy_rng_globals():
    """Exactly what numpy.random.get_state() pickles to (a legacy MT19937 state: a uint32 array in a tuple), which
    SAT checkpoints carry as 'np_rng_state'; pairs with numpy 1.x names for files saved with numpy < 2."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]
    aliases = [(_reconstruct, "numpy.core.multiarray._reconstruct")]
    return allowed, aliases


def torch_load(path, what, fix="", allow_numpy_rng=False):
    """torch.load(weights_only=True) on the CPU; with allow_numpy_rng, numpy's RNG state types are allowed too."""
    import torch

    with reading(path, what, fix):
        if not allow_numpy_rng:
            return torch.load(path, map_location="cpu", weights_only=True)
        allowed, aliases = numpy_rng_globals()
        try:
            with torch.serialization.safe_globals(allowed + aliases):
                return torch.load(path, map_location="cpu", weights_only=True)
        except TypeError:  # torch < 2.6: no (object, name) aliases
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(path, what, fix="", allow_numpy_rng=False):
    """A .safetensors file (safetensors) or a torch file (weights_only=True) -> its object (a dict of tensors
    for a state dict)."""
    if str(path).lower().endswith(SAFETENSORS_EXTS):
        from safetensors.torch import load_file

        with reading(path, what, fix):
            return load_file(str(path))
    return torch_load(path, what, fix, allow_numpy_rng=allow_numpy_rng)


def require_state_dict(obj, path, what, fix=""):
    """`obj` when it is a non-empty dict; else a BadModelFile."""
    if not isinstance(obj, dict) or not obj:
        kind = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise BadModelFile(f"{what}: '{display_path(path)}' holds {kind}, not a state dict of tensors. "
                           + (fix or "Pick the file the node asks for."))
    return obj
