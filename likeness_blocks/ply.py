"""Minimal .ply reader / writer for vertex sets (and optional triangle faces).

Writes what FantasyID reads: binary little-endian, one `vertex` element with double x, y, z
(faces optional, off by default). Reads ascii and binary (little / big endian) files with
any numeric x/y/z property types, ignoring other vertex properties (normals, colours) and
elements other than vertex and face.
"""

import numpy as np

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def write_ply(path, vertices, faces=None):
    v = np.ascontiguousarray(np.asarray(vertices, dtype="<f8").reshape(-1, 3))
    header = ["ply", "format binary_little_endian 1.0", "comment written by Likeness",
              f"element vertex {len(v)}", "property double x", "property double y", "property double z"]
    if faces is not None:
        f = np.asarray(faces, dtype="<i4").reshape(-1, 3)
        header += [f"element face {len(f)}", "property list uchar int vertex_indices"]
    header.append("end_header")
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(v.tobytes())
        if faces is not None:
            rec = np.zeros(len(f), dtype=[("n", "u1"), ("i", "<i4", (3,))])
            rec["n"] = 3
            rec["i"] = f
            fh.write(rec.tobytes())


def _parse_header(fh, name):
    if fh.readline().strip() != b"ply":
        raise ValueError(f"'{name}' is not a .ply file (it does not start with 'ply').")
    fmt, elements = None, []
    while True:
        line = fh.readline()
        if not line:
            raise ValueError(f"'{name}' ends inside its header (no 'end_header').")
        words = line.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append({"name": words[1], "count": int(words[2]), "props": []})
        elif words[0] == "property":
            if not elements:
                raise ValueError(f"'{name}': property before any element.")
            if words[1] == "list":
                elements[-1]["props"].append(("list", words[2], words[3], words[4]))
            else:
                elements[-1]["props"].append(("scalar", words[1], words[2]))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"'{name}' has an unknown .ply format {fmt!r}.")
    return fmt, elements


def _dt(t, endian, name):
    if t not in _PLY_TYPES:
        raise ValueError(f"'{name}' uses the unknown .ply type {t!r}.")
    return np.dtype(endian + _PLY_TYPES[t])


def read_ply(path):
    """-> (vertices (N,3) float32, faces (F,3) int64 or None)."""
    name = str(path)
    with open(path, "rb") as fh:
        fmt, elements = _parse_header(fh, name)
        endian = ">" if fmt == "binary_big_endian" else "<"
        vertices, faces = None, None
        if fmt == "ascii":
            tokens = fh.read().split()
            pos = 0
            for el in elements:
                rows = []
                for _ in range(el["count"]):
                    row = {}
                    for p in el["props"]:
                        if p[0] == "list":
                            n = int(tokens[pos]); pos += 1
                            row[p[3]] = [int(float(t)) for t in tokens[pos : pos + n]]; pos += n
                        else:
                            row[p[2]] = float(tokens[pos]); pos += 1
                    rows.append(row)
                if el["name"] == "vertex":
                    vertices = np.array([[r["x"], r["y"], r["z"]] for r in rows], dtype=np.float32).reshape(-1, 3)
                elif el["name"] == "face":
                    faces = _tris([next(iter(r.values())) for r in rows])
        else:
            for el in elements:
                if all(p[0] == "scalar" for p in el["props"]):
                    dt = np.dtype([(p[2], _dt(p[1], endian, name)) for p in el["props"]])
                    data = np.frombuffer(fh.read(dt.itemsize * el["count"]), dtype=dt, count=el["count"])
                    if el["name"] == "vertex":
                        missing = [k for k in "xyz" if k not in dt.names]
                        if missing:
                            raise ValueError(f"'{name}' has vertices without {missing}.")
                        vertices = np.stack([data["x"], data["y"], data["z"]], -1).astype(np.float32)
                    continue
                rows = []
                for _ in range(el["count"]):
                    row = []
                    for p in el["props"]:
                        if p[0] == "list":
                            cdt, idt = _dt(p[1], endian, name), _dt(p[2], endian, name)
                            n = int(np.frombuffer(fh.read(cdt.itemsize), cdt)[0])
                            row = np.frombuffer(fh.read(idt.itemsize * n), idt).tolist()
                        else:
                            fh.read(_dt(p[1], endian, name).itemsize)
                    rows.append(row)
                if el["name"] == "face":
                    faces = _tris(rows)
                elif el["name"] == "vertex":
                    raise ValueError(f"'{name}': list properties on vertices are not supported.")
    if vertices is None or len(vertices) == 0:
        raise ValueError(f"'{name}' holds no vertices.")
    return vertices, faces


def _tris(polys):
    tris = []
    for p in polys:
        for k in range(1, len(p) - 1):  # fan-triangulate polygons
            tris.append((p[0], p[k], p[k + 1]))
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3) if tris else None
