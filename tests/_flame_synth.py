"""Synthetic FLAME / DECA files for tests (random numbers in the real file structures; no FLAME data).

- `save_synthetic_flame_pkl`: a protocol-2 pickle shaped like FLAME's generic_model.pkl: a dict with
  numpy arrays, chumpy `chumpy.ch.Ch` objects (array in state['x']) and a scipy `csc_matrix`
  J_regressor, with Python-2 module names (copy_reg, __builtin__, numpy.core.multiarray). The
  class references are written as plain GLOBAL opcodes: neither chumpy nor scipy is needed.
- `save_synthetic_deca_tar`: torch.save of {'E_flame', 'E_detail', 'D_detail'} with DECA's key names.
"""

import io
import pickle

import numpy as np
import torch


class _Global:
    """A class reference pickled as GLOBAL module\\nname without importing it."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class _Obj:
    """An instance of a foreign class, pickled the way protocol 2 pickles plain objects."""

    def __init__(self, cls: _Global, state):
        self.cls, self.state = cls, state


class _Py2Pickler(pickle._Pickler):
    def __init__(self, fh):
        super().__init__(fh, protocol=2, fix_imports=True)

    def _write_global(self, module, name):
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct" and "numpy" in getattr(obj, "__module__", ""):
            return self._write_global("numpy.core.multiarray", "_reconstruct")
        return super().save_global(obj, name)

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            return self._write_global(obj.module, obj.name)
        if isinstance(obj, _Obj):  # NEWOBJ (cls, ()) then BUILD state, like object.__reduce_ex__(2)
            self.save(obj.cls)
            self.save(())
            self.write(pickle.NEWOBJ)
            self.save(obj.state)
            self.write(pickle.BUILD)
            return None
        return super().save(obj, save_persistent_id)


def _ch(arr):
    return _Obj(_Global("chumpy.ch", "Ch"), {
        "x": arr, "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {},
        "_make_dense": False, "_make_sparse": False,
    })


def _csc(dense):
    rows, cols = np.nonzero(dense.T)  # column-major walk
    data = dense.T[rows, cols]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=dense.shape[1]))]).astype(np.int32)
    return _Obj(_Global("scipy.sparse.csc", "csc_matrix"), {
        "_shape": dense.shape, "maxprint": 50, "indices": cols.astype(np.int32), "indptr": indptr, "data": data,
    })


def synthetic_flame_arrays(seed=0, n_lat=31, n_lon=162, extra=1, n_shape=300, n_exp=100):
    """Random FLAME-structured arrays on an ellipsoid 'head' (V = n_lat*n_lon + extra, 5 joints)."""
    rng = np.random.default_rng(seed)
    lat = np.linspace(0.05, np.pi - 0.05, n_lat)
    lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    pts = np.stack([0.08 * np.sin(la) * np.sin(lo), 0.11 * np.cos(la), 0.10 * np.sin(la) * np.cos(lo)], -1).reshape(-1, 3)
    pts = np.concatenate([pts, rng.normal(0, 0.01, (extra, 3))])
    faces = []
    for i in range(n_lat - 1):
        for j in range(n_lon):
            a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
            c, d = a + n_lon, b + n_lon
            faces += [(a, c, b), (b, c, d)]
    nv = len(pts)
    weights = rng.random((nv, 5)) ** 4
    weights /= weights.sum(1, keepdims=True)
    jreg = np.zeros((5, nv))
    for j in range(5):
        idx = rng.choice(nv, 40, replace=False)
        jreg[j, idx] = rng.random(40)
        jreg[j] /= jreg[j].sum()
    return {
        "v_template": pts,
        "shapedirs": rng.normal(0, 1e-3, (nv, 3, n_shape + n_exp)),
        "posedirs": rng.normal(0, 1e-3, (nv, 3, 36)),
        "J_regressor": jreg,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": weights,
        "f": np.asarray(faces, dtype=np.uint32),
        "J": jreg @ pts,
    }


def flame_pickle_bytes(arrays):
    obj = {
        "f": arrays["f"],
        "J_regressor": _csc(arrays["J_regressor"]),
        "kintree_table": arrays["kintree_table"],
        "J": arrays["J"],
        "weights": arrays["weights"],
        "posedirs": arrays["posedirs"],
        "v_template": _ch(arrays["v_template"]),
        "shapedirs": _ch(arrays["shapedirs"]),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    buf = io.BytesIO()
    _Py2Pickler(buf).dump(obj)
    return buf.getvalue()


def save_synthetic_flame_pkl(path, seed=0, **kw):
    arrays = synthetic_flame_arrays(seed, **kw)
    with open(path, "wb") as fh:
        fh.write(flame_pickle_bytes(arrays))
    return arrays


def deca_state_dict(blocks=(3, 4, 6, 3), base_width=64, hidden=1024, outsize=236, seed=0):
    """A random E_flame state dict with DECA's key names (BN statistics randomised too)."""
    from likeness_blocks.deca import DecaEncoder

    torch.manual_seed(seed)
    enc = DecaEncoder(outsize=outsize, hidden=hidden, blocks=blocks, base_width=base_width)
    sd = enc.state_dict()
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if k.endswith("running_mean"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
        elif k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif k.endswith("bn3.weight"):
            v.copy_(torch.rand(v.shape, generator=g) * 0.3)  # keep the residual stack tame
        elif k.startswith("layers.") and k.endswith("weight"):
            v.mul_(0.3)
    return sd


def save_synthetic_deca_tar(path, legacy=False, **kw):
    sd = deca_state_dict(**kw)
    ckpt = {
        "E_flame": sd,
        "E_detail": {"encoder.conv1.weight": torch.zeros(8, 3, 7, 7), "layers.2.bias": torch.zeros(128)},
        "D_detail": {"layers.0.weight": torch.zeros(4, 4)},
    }
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return sd
