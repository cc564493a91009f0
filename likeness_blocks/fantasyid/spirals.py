"""Spiral neighbour sequences on a triangle mesh, in OpenMesh's exact neighbour order.

FantasyID (after SpiralNet++) builds its spiral indices with the `openmesh` Python package: the mesh is built by
adding the triangles one by one (`TriMesh(points, faces)`), and the order of a vertex's neighbours is the order of
OpenMesh's vertex-vertex circulator. That order depends on OpenMesh's half-edge bookkeeping while the faces are added
(which outgoing half-edge each vertex keeps), so we rebuild the same half-edge structure here without openmesh:

* an edge `a->b` created new gets half-edges (2e: a->b, 2e+1: b->a);
* `add_face` follows OpenMesh's rules: reject a face on a non-boundary vertex ("complex vertex") or a used interior
  half-edge ("complex edge"), re-link boundary patches when two existing half-edges of the face are not consecutive,
  set each vertex's outgoing half-edge as OpenMesh does for the new/old edge cases, and re-point it at a boundary
  half-edge when the face closes the one it had;
* the vertex-vertex circulator starts at the vertex's outgoing half-edge `h`, yields `to(h)`, then steps clockwise with
  `h <- next(opposite(h))` until it is back at the start.

The spiral of a vertex is then [v, 1-ring, 2-ring, ...] truncated to `seq_length` entries, each later ring being
collected by walking every vertex of the previous ring and, for each, its circulator order rotated to start at the
first neighbour that belongs to the previous ring (new vertices only); if the rings run out before `seq_length`
vertices, the spiral is the `seq_length` nearest points by Euclidean distance instead.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import numpy as np

INVALID = -1


class HalfedgeTriMesh:
    """Minimal half-edge mesh with OpenMesh's `add_face` bookkeeping (no deletion)."""

    def __init__(self, n_vertices: int):
        self.n_vertices = int(n_vertices)
        self.v_out = [INVALID] * self.n_vertices  # outgoing half-edge per vertex
        self.to_v: List[int] = []
        self.next_h: List[int] = []
        self.prev_h: List[int] = []
        self.face_of: List[int] = []
        self.n_faces = 0
        self.skipped_faces: List[int] = []
        self._lookup = {}  # (a, b) -> half-edge a->b

    # -- basic queries ------------------------------------------------------------------------------------------------
    @staticmethod
    def opp(h: int) -> int:
        return h ^ 1

    def from_v(self, h: int) -> int:
        return self.to_v[h ^ 1]

    def he_is_boundary(self, h: int) -> bool:
        return self.face_of[h] == INVALID

    def v_is_boundary(self, v: int) -> bool:
        h = self.v_out[v]
        return h == INVALID or self.face_of[h] == INVALID

    def _set_next(self, h: int, n: int) -> None:
        self.next_h[h] = n
        self.prev_h[n] = h

    def _new_edge(self, a: int, b: int) -> int:
        h = len(self.to_v)
        self.to_v += [b, a]
        self.next_h += [INVALID, INVALID]
        self.prev_h += [INVALID, INVALID]
        self.face_of += [INVALID, INVALID]
        self._lookup[(a, b)] = h
        self._lookup[(b, a)] = h + 1
        return h

    def outgoing(self, v: int) -> Iterator[int]:
        """Outgoing half-edges of v, clockwise, starting at the stored one (OpenMesh's default circulators)."""
        start = self.v_out[v]
        if start == INVALID:
            return
        h = start
        while True:
            yield h
            h = self.next_h[h ^ 1]
            if h == start or h == INVALID:
                return

    def vv(self, v: int) -> List[int]:
        """Neighbours of v in OpenMesh's vertex-vertex circulator order."""
        return [self.to_v[h] for h in self.outgoing(v)]

    def _adjust_outgoing(self, v: int) -> None:
        for h in self.outgoing(v):
            if self.he_is_boundary(h):
                self.v_out[v] = h
                return

    # -- construction -------------------------------------------------------------------------------------------------
    def add_face(self, verts: Sequence[int]) -> int:
        """Add a face; returns its index, or -1 when OpenMesh would refuse it (the face is then skipped)."""
        n = len(verts)
        vs = [int(v) for v in verts]
        he = [INVALID] * n
        is_new = [False] * n
        needs_adjust = [False] * n
        for i in range(n):
            ii = (i + 1) % n
            if not self.v_is_boundary(vs[i]):
                return INVALID  # complex vertex
            h = self._lookup.get((vs[i], vs[ii]), INVALID)
            he[i] = h
            is_new[i] = h == INVALID
            if not is_new[i] and not self.he_is_boundary(h):
                return INVALID  # complex edge

        next_cache = []
        for i in range(n):
            ii = (i + 1) % n
            if not is_new[i] and not is_new[ii]:
                inner_prev, inner_next = he[i], he[ii]
                if self.next_h[inner_prev] != inner_next:
                    # re-link a patch: find a free boundary gap around the shared vertex
                    outer_prev = inner_next ^ 1
                    boundary_prev = outer_prev
                    while True:
                        boundary_prev = self.next_h[boundary_prev] ^ 1
                        if self.he_is_boundary(boundary_prev):
                            break
                    boundary_next = self.next_h[boundary_prev]
                    if boundary_prev == inner_prev:
                        return INVALID  # patch re-linking failed
                    patch_start = self.next_h[inner_prev]
                    patch_end = self.prev_h[inner_next]
                    next_cache += [(boundary_prev, patch_start), (patch_end, boundary_next), (inner_prev, inner_next)]

        for i in range(n):
            if is_new[i]:
                he[i] = self._new_edge(vs[i], vs[(i + 1) % n])

        fh = self.n_faces
        self.n_faces += 1

        for i in range(n):
            ii = (i + 1) % n
            vh = vs[ii]
            inner_prev, inner_next = he[i], he[ii]
            case = (1 if is_new[i] else 0) | (2 if is_new[ii] else 0)
            if case:
                outer_prev = inner_next ^ 1
                outer_next = inner_prev ^ 1
                if case == 1:  # prev new, next old
                    boundary_prev = self.prev_h[inner_next]
                    next_cache.append((boundary_prev, outer_next))
                    self.v_out[vh] = outer_next
                elif case == 2:  # next new, prev old
                    boundary_next = self.next_h[inner_prev]
                    next_cache.append((outer_prev, boundary_next))
                    self.v_out[vh] = boundary_next
                else:  # both new
                    if self.v_out[vh] == INVALID:
                        self.v_out[vh] = outer_next
                        next_cache.append((outer_prev, outer_next))
                    else:
                        boundary_next = self.v_out[vh]
                        boundary_prev = self.prev_h[boundary_next]
                        next_cache += [(boundary_prev, outer_next), (outer_prev, boundary_next)]
                next_cache.append((inner_prev, inner_next))
            else:
                needs_adjust[ii] = self.v_out[vh] == inner_next
            self.face_of[he[i]] = fh

        for h, nx in next_cache:
            self._set_next(h, nx)
        for i in range(n):
            if needs_adjust[i]:
                self._adjust_outgoing(vs[i])
        return fh

    @classmethod
    def from_faces(cls, n_vertices: int, faces) -> "HalfedgeTriMesh":
        faces = np.asarray(faces)
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise ValueError(f"faces must be an (F, 3) array of vertex indices, got shape {tuple(faces.shape)}.")
        if faces.size and (faces.min() < 0 or faces.max() >= n_vertices):
            raise ValueError(
                f"faces reference vertex indices outside 0..{n_vertices - 1}; the faces and vertices do not belong "
                "to the same mesh level."
            )
        mesh = cls(n_vertices)
        for fi, f in enumerate(faces.tolist()):
            if mesh.add_face(f) == INVALID:
                mesh.skipped_faces.append(fi)
        return mesh


def _next_ring(mesh: HalfedgeTriMesh, last_ring: List[int], taken: set) -> List[int]:
    last = set(last_ring)
    ring: List[int] = []
    seen = set()
    for v in last_ring:
        nbrs = mesh.vv(v)
        start = 0
        for k, u in enumerate(nbrs):
            if u in last:
                start = k
                break
        for u in nbrs[start:] + nbrs[:start]:
            if u not in last and u not in taken and u not in seen:
                ring.append(u)
                seen.add(u)
    return ring


def _nearest(points: np.ndarray, v: int, k: int) -> List[int]:
    d = np.sqrt(((points - points[v][None, :]) ** 2).sum(axis=1))
    order = np.argsort(d, kind="stable")
    return [int(i) for i in order[:k]]


def extract_spirals(
    faces,
    n_vertices: Optional[int] = None,
    vertices=None,
    seq_length: int = 9,
    dilation: int = 1,
) -> np.ndarray:
    """Spiral index sequences (V, seq_length) of a triangle mesh, in OpenMesh/SpiralNet++ order.

    `vertices` (V, 3) are used only for the nearest-point fallback (OpenMesh's default points are all ones when
    none are given, which makes the fallback order a plain index order).
    """
    faces = np.asarray(faces, dtype=np.int64)
    if vertices is not None:
        points = np.asarray(vertices, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"vertices must be a (V, 3) array, got shape {tuple(points.shape)}.")
        n_vertices = points.shape[0]
    else:
        if n_vertices is None:
            n_vertices = int(faces.max()) + 1
        points = np.ones((n_vertices, 3), dtype=np.float64)
    mesh = HalfedgeTriMesh.from_faces(n_vertices, faces)
    total = seq_length * dilation
    spirals = []
    for v in range(n_vertices):
        one_ring = mesh.vv(v)
        spiral = [v]
        last_ring = list(one_ring)
        next_ring = _next_ring(mesh, last_ring, set(spiral))
        spiral.extend(last_ring)
        while len(spiral) + len(next_ring) < total:
            if not next_ring:
                break
            last_ring = next_ring
            next_ring = _next_ring(mesh, last_ring, set(spiral))
            spiral.extend(last_ring)
        if next_ring:
            spiral.extend(next_ring)
        else:
            spiral = _nearest(points, v, total)
        spirals.append(spiral[:total][::dilation])
    return np.asarray(spirals, dtype=np.int64)
