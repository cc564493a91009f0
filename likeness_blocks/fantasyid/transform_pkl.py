"""Safe reader for FantasyID's `transform.pkl` (SpiralNet++/CoMA mesh-sampling file).

The file is a pickle: a dict with `vertices`, `face`, `adj`, `down_transform`, `up_transform`, each a list per mesh
level of numpy arrays or scipy sparse matrices. It is user supplied, so it is read with an allow-list unpickler that
can only build numpy arrays/dtypes/scalars and scipy sparse matrices; anything else (os.system, eval, arbitrary
classes) is refused before it runs.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np

_SPARSE_NAMES = ("csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array")
_SPARSE_MODULES = (
    "scipy.sparse",
    "scipy.sparse.csc",
    "scipy.sparse.csr",
    "scipy.sparse.coo",
    "scipy.sparse._csc",
    "scipy.sparse._csr",
    "scipy.sparse._coo",
    "scipy.sparse._arrays",
)


def _allowed(module: str, name: str):
    """Return the object for an allowed global, or None."""
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        try:
            from numpy._core import multiarray as ma  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy < 2
            from numpy.core import multiarray as ma
        return getattr(ma, name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        try:
            from numpy._core import numeric as nm  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy < 2
            from numpy.core import numeric as nm
        return nm._frombuffer
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module == "numpy.dtypes" and name.endswith("DType"):
        import numpy.dtypes as npd

        obj = getattr(npd, name, None)
        return obj
    if module in ("copy_reg", "copyreg") and name == "_reconstructor":
        import copyreg

        return copyreg._reconstructor
    if module == "_codecs" and name == "encode":  # protocol-2 pickles store array bytes as latin1 text
        import codecs

        return codecs.encode
    if module in ("__builtin__", "builtins") and name == "object":
        return object
    if module in _SPARSE_MODULES and name in _SPARSE_NAMES:
        import scipy.sparse as sp

        return getattr(sp, name)
    return None


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _allowed(module, name)
        if obj is None:
            raise pickle.UnpicklingError(
                f"transform.pkl refers to '{module}.{name}', which is not allowed (only numpy arrays and scipy sparse "
                "matrices may appear in FantasyID's mesh-sampling file); the file was not loaded."
            )
        return obj


def safe_unpickle(data: bytes):
    """Unpickle bytes with the allow-list (latin1 for Python-2 pickles, as FantasyID reads the file)."""
    return _AllowListUnpickler(io.BytesIO(data), encoding="latin1").load()


SparseCOO = Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[int, int]]


@dataclass
class MeshTransform:
    vertices: List[np.ndarray] = field(default_factory=list)  # per level (V_l, 3)
    faces: List[np.ndarray] = field(default_factory=list)  # per level (F_l, 3)
    down: List[SparseCOO] = field(default_factory=list)  # level l -> l+1, shape (V_{l+1}, V_l)
    up: List[SparseCOO] = field(default_factory=list)  # level l+1 -> l, shape (V_l, V_{l+1})

    @property
    def level_sizes(self) -> List[int]:
        return [int(v.shape[0]) for v in self.vertices]


def _to_coo(m, what: str) -> SparseCOO:
    import scipy.sparse as sp

    if not sp.issparse(m):
        raise ValueError(f"transform.pkl: {what} is {type(m).__name__}, expected a scipy sparse matrix.")
    c = sp.coo_matrix(m)
    return (
        np.asarray(c.row, dtype=np.int64),
        np.asarray(c.col, dtype=np.int64),
        np.asarray(c.data, dtype=np.float32),
        (int(c.shape[0]), int(c.shape[1])),
    )


def parse_transform(obj) -> MeshTransform:
    if not isinstance(obj, dict):
        raise ValueError(f"transform.pkl must hold a dict, got {type(obj).__name__}.")
    missing = [k for k in ("vertices", "face", "down_transform", "up_transform") if k not in obj]
    if missing:
        raise ValueError(f"transform.pkl is missing {missing}; is this FantasyID's assets/transform.pkl?")
    verts = [np.asarray(v, dtype=np.float64) for v in obj["vertices"]]
    faces = [np.asarray(f, dtype=np.int64) for f in obj["face"]]
    for i, (v, f) in enumerate(zip(verts, faces)):
        if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
            raise ValueError(f"transform.pkl level {i}: vertices must be (V, 3) and faces (F, 3).")
    down = [_to_coo(m, f"down_transform[{i}]") for i, m in enumerate(obj["down_transform"])]
    up = [_to_coo(m, f"up_transform[{i}]") for i, m in enumerate(obj["up_transform"])]
    for i, d in enumerate(down):
        if i + 1 < len(verts) and d[3] != (verts[i + 1].shape[0], verts[i].shape[0]):
            raise ValueError(f"transform.pkl: down_transform[{i}] has shape {d[3]}, inconsistent with the mesh levels.")
    for i, u in enumerate(up):
        if i + 1 < len(verts) and u[3] != (verts[i].shape[0], verts[i + 1].shape[0]):
            raise ValueError(f"transform.pkl: up_transform[{i}] has shape {u[3]}, inconsistent with the mesh levels.")
    return MeshTransform(verts, faces, down, up)


def load_transform_pkl(path) -> MeshTransform:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FantasyID mesh-sampling file not found: {path} (FantasyID's assets/transform.pkl).")
    with open(path, "rb") as f:
        return parse_transform(safe_unpickle(f.read()))


def mesh_data_for_network(transform: MeshTransform, num_levels: int = 2, seq_length: int = 9, dilation: int = 1):
    """(spirals, down, up) for VertexSpiralNet.set_mesh: spirals of levels 0..num_levels-1 computed in OpenMesh order
    from the file's faces and vertices (as FantasyID does at construction time), and the first num_levels matrices."""
    from .spirals import extract_spirals

    if len(transform.faces) < num_levels or len(transform.down) < num_levels or len(transform.up) < num_levels:
        raise ValueError(f"transform.pkl has fewer than {num_levels} mesh levels; FantasyID needs {num_levels}.")
    spirals = [
        extract_spirals(transform.faces[i], vertices=transform.vertices[i], seq_length=seq_length, dilation=dilation)
        for i in range(num_levels)
    ]
    return spirals, transform.down[:num_levels], transform.up[:num_levels]
