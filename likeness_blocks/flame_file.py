"""Reading FLAME model files without chumpy and without running pickled code.

FLAME's `generic_model.pkl` is a Python-2 pickle of a dict whose values are numpy arrays,
chumpy `Ch` objects (an array stored in the object's `x` attribute) and a scipy sparse matrix
(`J_regressor`). `read_flame_pickle` replays that pickle through an unpickler that only knows
a short allow-list of names; chumpy and scipy classes are replaced by inert placeholders that
just keep their stored state, which is then turned into plain arrays. Anything else named in
the pickle (os.system, eval, any other class) stops the load.

`.npz` (loaded with allow_pickle=False) and `.safetensors` conversions hold the same keys as
plain arrays. This module imports without ComfyUI; safetensors is imported lazily.
"""

import os
import pickle

import numpy as np

# the keys a FLAME layer needs (everything else in the pickle is dropped on conversion)
FLAME_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f")


class RefusedPickle(pickle.UnpicklingError):
    pass


class _Placeholder:
    """Stands in for an allow-listed foreign class; records its pickled state only."""

    _source = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):  # never runs any foreign code
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        object.__setattr__(self, "_state", state)


def _placeholder(module, name):
    return type(f"Placeholder_{name}", (_Placeholder,), {"_source": f"{module}.{name}"})


_CHUMPY_CLASSES = {}
_SPARSE_CLASSES = {}


def _chumpy_class(module, name):
    key = (module, name)
    if key not in _CHUMPY_CLASSES:
        _CHUMPY_CLASSES[key] = _placeholder(module, name)
    return _CHUMPY_CLASSES[key]


def _sparse_class(module, name):
    key = (module, name)
    if key not in _SPARSE_CLASSES:
        _SPARSE_CLASSES[key] = _placeholder(module, name)
    return _SPARSE_CLASSES[key]


def _safe_reconstructor(cls, base, state):
    """copyreg._reconstructor limited to our placeholders."""
    if not (isinstance(cls, type) and issubclass(cls, _Placeholder)) or base is not object:
        raise RefusedPickle(f"refused to rebuild {cls!r} on {base!r}")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__setstate__(state)
    return obj


def _safe_codecs_encode(text, encoding="utf-8", errors="strict"):
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise RefusedPickle(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    def safe(subtype, shape, dtype):
        if subtype is not np.ndarray:
            raise RefusedPickle(f"refused numpy array subtype {subtype!r}")
        return _reconstruct(subtype, shape, dtype)

    return safe


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar

    def safe(dtype, *args):
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise RefusedPickle("refused a numpy object scalar")
        return scalar(dtype, *args)

    return safe


_SIMPLE = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("copy_reg", "_reconstructor"): _safe_reconstructor,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("builtins", "frozenset"): frozenset,
    ("collections", "OrderedDict"): dict,
    ("_codecs", "encode"): _safe_codecs_encode,
}
_SPARSE_NAMES = {"csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array"}


class FlameUnpickler(pickle.Unpickler):
    """Allow-list unpickler: numpy arrays, basic containers, chumpy/scipy placeholders. Nothing else."""

    def find_class(self, module, name):
        if (module, name) in _SIMPLE:
            return _SIMPLE[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return _numpy_reconstruct()
            if name == "scalar":
                return _numpy_scalar()
        if (module == "chumpy" or module.startswith("chumpy.")) and name.isidentifier():
            return _chumpy_class(module, name)
        if module.startswith("scipy.sparse") and name in _SPARSE_NAMES:
            return _sparse_class(module, name)
        raise RefusedPickle(
            f"the pickle asks for '{module}.{name}', which is not on the FLAME allow-list "
            "(numpy arrays, chumpy arrays, scipy sparse matrices); it was not loaded"
        )


def _sparse_to_dense(obj):
    st = obj._state
    if not isinstance(st, dict):
        raise ValueError(f"unreadable sparse matrix state in {obj._source}")
    shape = st.get("_shape", st.get("shape"))
    kind = obj._source.rsplit(".", 1)[-1][:3]
    data = np.asarray(st["data"], dtype=np.float64)
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.float64)
    if kind == "coo":
        np.add.at(out, (np.asarray(st["row"]), np.asarray(st["col"])), data)
        return out
    indices = np.asarray(st["indices"], dtype=np.int64)
    indptr = np.asarray(st["indptr"], dtype=np.int64)
    major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    if kind == "csc":  # indptr runs over columns
        np.add.at(out, (indices, major), data)
    else:
        np.add.at(out, (major, indices), data)
    return out


def _to_array(value, key):
    if isinstance(value, _Placeholder):
        if type(value) in _SPARSE_CLASSES.values():
            return _sparse_to_dense(value)
        st = getattr(value, "_state", None)
        if isinstance(st, dict) and "x" in st:
            return np.asarray(_to_array(st["x"], key))
        raise ValueError(
            f"FLAME entry '{key}' is a chumpy expression ({value._source}) rather than a stored array; "
            "convert the file once in an environment that has chumpy (np.savez with np.array(value)) and load the .npz."
        )
    return np.asarray(value)


def read_flame_pickle(path):
    """generic_model.pkl -> dict of numpy arrays (FLAME_KEYS plus any other array entries)."""
    with open(path, "rb") as fh:
        try:
            raw = FlameUnpickler(fh, encoding="latin1").load()
        except RefusedPickle as exc:
            raise ValueError(
                f"Refused to load '{os.path.basename(path)}': {exc}. A FLAME generic_model.pkl only holds arrays; "
                "this file tries to run or build something else. Download FLAME again from flame.is.tue.mpg.de."
            ) from None
        except Exception as exc:
            raise ValueError(
                f"Could not read '{os.path.basename(path)}' as a FLAME pickle ({type(exc).__name__}: {exc}). "
                "Use FLAME's generic_model.pkl or its .npz/.safetensors conversion."
            ) from exc
    if not isinstance(raw, dict):
        raise ValueError(f"'{os.path.basename(path)}' holds a {type(raw).__name__}, not the dict a FLAME model pickle holds.")
    out = {}
    for key, value in raw.items():
        if isinstance(value, (str, bytes, int, float)) or value is None:
            continue  # bs_style, bs_type and similar tags
        out[str(key)] = _to_array(value, key)
    _check_keys(out, path)
    return out


def _check_keys(arrays, path):
    missing = [k for k in FLAME_KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"'{os.path.basename(path)}' lacks the FLAME entries {missing}. Use FLAME's generic_model.pkl "
            "(FLAME 2020/2023 from flame.is.tue.mpg.de) or a conversion of it made by Likeness."
        )


def read_flame_file(path):
    """.pkl / .npz / .safetensors -> dict of numpy arrays."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".pkl":
        return read_flame_pickle(path)
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    elif ext == ".safetensors":
        from safetensors.numpy import load_file

        arrays = load_file(path)
    else:
        raise ValueError(f"'{os.path.basename(path)}' is not a FLAME file: use .pkl, .npz or .safetensors.")
    _check_keys(arrays, path)
    return arrays


def convert_flame_file(src, dst):
    """Write the arrays a FLAME layer needs to .npz or .safetensors (float32 / int64). Returns dst."""
    arrays = read_flame_file(src)
    out = {}
    for k in FLAME_KEYS:
        a = np.asarray(arrays[k])
        out[k] = np.ascontiguousarray(a.astype(np.int64 if k in ("f", "kintree_table") else np.float32))
    ext = os.path.splitext(dst)[1].lower()
    tmp = dst + ".partial"
    if ext == ".npz":
        with open(tmp, "wb") as fh:
            np.savez(fh, **out)
    elif ext == ".safetensors":
        from safetensors.numpy import save_file

        save_file(out, tmp, metadata={"format": "flame", "converted_by": "likeness"})
    else:
        raise ValueError(f"Convert FLAME to .npz or .safetensors, not '{ext}'.")
    os.replace(tmp, dst)
    return dst
