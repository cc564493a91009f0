"""Writes tests/fixtures/spirals_openmesh.json: small irregular triangle meshes with boundaries and the spiral
sequences SpiralNet++/FantasyID build for them with OpenMesh itself (the reference for tests/test_wiring_spirals.py).

The meshes are synthetic (no FLAME data): a jittered grid face patch with two eye holes, a mouth hole and an open
outer (neck) boundary, quads split along random diagonals, faces in random order with randomly rotated vertex lists,
vertex ids shuffled; plus a few stray faces OpenMesh refuses (complex edges) and a small separate fan whose rings run
out (the nearest-points fallback).

Needs the `openmesh` Python binding, which is NOT a runtime or test dependency of the pack. It is an sdist only; build
it in a throwaway venv (about 8 minutes, numpy < 2 because its bundled pybind11 predates numpy 2):

    python3 -m venv /tmp/omvenv
    /tmp/omvenv/bin/pip install "numpy<2" setuptools wheel
    /tmp/omvenv/bin/pip install --no-build-isolation openmesh==1.2.1
    /tmp/omvenv/bin/python scripts/make_spiral_fixture.py

The spiral rule below is SpiralNet++'s (rings collected through OpenMesh's vertex-vertex circulator, each vertex of
the previous ring read from just after its first neighbour in that ring; when the rings run out the seq_length nearest
points instead), written here against openmesh, independently of likeness_blocks/fantasyid/spirals.py.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import openmesh as om

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "spirals_openmesh.json"


def face_patch(rng, rows=11, cols=13):
    """Jittered grid patch with eye and mouth holes; returns (points (V, 3), faces (F, 3))."""
    ys, xs = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    pts = np.stack([xs, ys, 0.3 * np.sin(xs / 3.0) * np.cos(ys / 4.0)], -1).reshape(-1, 3)
    pts[:, :2] += rng.uniform(-0.25, 0.25, size=(len(pts), 2))
    pts[:, 2] += rng.uniform(-0.05, 0.05, size=len(pts))

    def vid(r, c):
        return r * cols + c

    holes = [(3, 5, 2, 4), (3, 5, 8, 10), (7, 8, 4, 8)]  # (row0, row1, col0, col1) of removed quads: eyes, mouth

    def in_hole(r, c):
        return any(r0 <= r < r1 and c0 <= c < c1 for r0, r1, c0, c1 in holes)

    faces = []
    for r in range(rows - 1):
        for c in range(cols - 1):
            if in_hole(r, c):
                continue
            a, b, d, e = vid(r, c), vid(r, c + 1), vid(r + 1, c), vid(r + 1, c + 1)
            if rng.random() < 0.5:
                faces += [[a, b, e], [a, e, d]]
            else:
                faces += [[a, b, d], [b, e, d]]
    # cut the corners away so that the outer (neck) boundary is ragged
    keep = [f for f in faces if not all(vid(0, 0) <= v <= vid(0, 2) or v in (vid(1, 0), vid(1, 1)) for v in f)]
    return pts, np.array(keep, dtype=np.int64)


def scramble(rng, pts, faces):
    """Random vertex ids, random face order, each face's vertex list rotated (orientation kept)."""
    perm = rng.permutation(len(pts))  # old id -> new id
    new_pts = np.empty_like(pts)
    new_pts[perm] = pts
    f = perm[faces]
    f = f[rng.permutation(len(f))]
    rot = rng.integers(0, 3, size=len(f))
    f = np.stack([np.roll(row, k) for row, k in zip(f, rot)])
    return new_pts, f


def with_extras(rng, pts, faces):
    """A separate small fan (its rings run out) and two faces OpenMesh refuses (complex edges)."""
    n = len(pts)
    centre = np.array([[20.0, 20.0, 0.0]])
    ring = np.stack([[20 + np.cos(a), 20 + np.sin(a), 0.1 * np.sin(3 * a)] for a in np.linspace(0, 2 * np.pi, 6)[:-1]])
    ring += rng.uniform(-0.1, 0.1, size=ring.shape)
    fan = [[n, n + 1 + i, n + 1 + (i + 1) % 5] for i in range(5)]
    pts = np.concatenate([pts, centre, ring])
    f0 = faces[len(faces) // 2]
    a, b = int(f0[0]), int(f0[1])
    refused = [[a, b, n + 1], [b, a, n + 2]]  # a->b is used: the first is a complex edge; b->a then, the same again
    out = np.concatenate([faces[: len(faces) // 3], np.array(fan), faces[len(faces) // 3:], np.array(refused)])
    return pts, out


def vv(mesh, v):
    return [h.idx() for h in mesh.vv(om.VertexHandle(int(v)))]


def next_ring(mesh, last_ring, taken):
    last = set(last_ring)
    res = []
    for v in last_ring:
        nbrs = vv(mesh, v)
        first = next((k for k, u in enumerate(nbrs) if u in last), None)
        order = nbrs if first is None else nbrs[first + 1:] + nbrs[:first + 1]
        for u in order:
            if u not in last and u not in taken and u not in res:
                res.append(u)
    return res


def openmesh_spirals(pts, faces, seq_length, dilation):
    mesh = om.TriMesh(pts, faces)
    points = mesh.points()
    total = seq_length * dilation
    spirals = []
    for v in range(mesh.n_vertices()):
        spiral = [v]
        last_ring = vv(mesh, v)
        nxt = next_ring(mesh, last_ring, set(spiral))
        spiral += last_ring
        while len(spiral) + len(nxt) < total:
            if not nxt:
                break
            last_ring = nxt
            nxt = next_ring(mesh, last_ring, set(spiral))
            spiral += last_ring
        if nxt:
            spiral += nxt
        else:
            d = np.sqrt(((points - points[v]) ** 2).sum(1))
            spiral = [int(i) for i in np.argsort(d, kind="stable")[:total]]
        spirals.append(spiral[:total][::dilation])
    return spirals, mesh.n_faces()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rng = np.random.default_rng(17)
    meshes = []
    pts, faces = face_patch(rng)
    cases = [("patch_in_grid_order", pts, faces, 9, 1)]
    sp, sf = scramble(rng, pts, faces)
    cases.append(("patch_scrambled", sp, sf, 9, 1))
    ep, ef = with_extras(rng, sp, sf)
    cases.append(("patch_scrambled_with_fan_and_refused_faces", ep, ef, 12, 1))
    cases.append(("patch_scrambled_dilation_2", sp, sf, 9, 2))
    for name, p, f, seq, dil in cases:
        p = np.round(p, 6)  # the points the fixture stores (the nearest-points fallback reads them)
        spirals, n_faces = openmesh_spirals(p, f, seq, dil)
        meshes.append({"name": name, "seq_length": seq, "dilation": dil, "faces_kept_by_openmesh": n_faces,
                       "vertices": p.tolist(), "faces": f.tolist(), "spirals": spirals})
        print(f"{name}: {len(p)} vertices, {len(f)} faces ({n_faces} kept by OpenMesh), seq {seq} x dilation {dil}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"openmesh": om.__version__ if hasattr(om, "__version__") else "1.2.1",
                                    "meshes": meshes}, separators=(",", ":")))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
