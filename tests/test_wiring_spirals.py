"""FantasyID's spirals (SpiralNet++ order) against OpenMesh itself on irregular meshes with boundaries (issue 17).

tests/fixtures/spirals_openmesh.json is made by scripts/make_spiral_fixture.py with the `openmesh` binding: a jittered
face patch with eye and mouth holes and a ragged outer (neck) boundary, random diagonals, random face order and
vertex-list rotation, shuffled vertex ids, a separate fan whose rings run out and faces OpenMesh refuses. Unlike the
small hand-worked fans, here the ring rotation and the circulator direction change most spirals.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from likeness_blocks.fantasyid.spirals import HalfedgeTriMesh, extract_spirals

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "spirals_openmesh.json"
MESHES = json.loads(FIXTURE.read_text())["meshes"]


@pytest.mark.parametrize("case", MESHES, ids=[m["name"] for m in MESHES])
def test_spirals_match_openmesh(case):
    faces = np.array(case["faces"], dtype=np.int64)
    verts = np.array(case["vertices"], dtype=np.float64)
    got = extract_spirals(faces, vertices=verts, seq_length=case["seq_length"], dilation=case["dilation"])
    want = np.array(case["spirals"], dtype=np.int64)
    assert got.shape == want.shape
    bad = [v for v in range(len(want)) if not np.array_equal(got[v], want[v])]
    assert not bad, f"{len(bad)} of {len(want)} spirals differ from OpenMesh's, e.g. vertex {bad[0]}: " \
                    f"{got[bad[0]].tolist()} vs {want[bad[0]].tolist()}"
    mesh = HalfedgeTriMesh.from_faces(len(verts), faces)
    assert mesh.n_faces == case["faces_kept_by_openmesh"]


def _spirals_with(case, rotate=True, reverse=False):
    """The same rule with one thing changed: no ring rotation, or the circulator read the other way round."""
    faces = np.array(case["faces"], dtype=np.int64)
    verts = np.array(case["vertices"], dtype=np.float64)
    mesh = HalfedgeTriMesh.from_faces(len(verts), faces)

    def vv(v):
        n = mesh.vv(v)
        return n[::-1] if reverse else n

    total = case["seq_length"] * case["dilation"]
    out = []
    for v in range(len(verts)):
        spiral, last = [v], vv(v)
        spiral += last
        while len(spiral) < total:
            ring = []
            for u in last:
                nb = vv(u)
                k = next((i for i, w in enumerate(nb) if w in last), 0) if rotate else 0
                ring += [w for w in nb[k:] + nb[:k] if w not in spiral and w not in ring and w not in last]
            if not ring:
                break
            spiral += ring
            last = ring
        out.append(spiral[:total][::case["dilation"]])
    return out


def test_fixture_tells_ring_rotation_and_direction_apart():
    case = next(m for m in MESHES if m["name"] == "patch_scrambled")
    want = case["spirals"]
    long_enough = [v for v, s in enumerate(_spirals_with(case)) if len(s) == len(want[v])]
    assert len(long_enough) > len(want) // 2
    for kw in ({"rotate": False}, {"reverse": True}):
        wrong = _spirals_with(case, **kw)
        differ = sum(wrong[v] != want[v] for v in long_enough)
        assert differ > len(long_enough) // 4, (kw, differ)


def test_fixture_covers_boundaries_fallback_and_refused_faces():
    case = next(m for m in MESHES if m["name"] == "patch_scrambled_with_fan_and_refused_faces")
    faces = np.array(case["faces"], dtype=np.int64)
    mesh = HalfedgeTriMesh.from_faces(len(case["vertices"]), faces)
    assert mesh.skipped_faces, "no face refused: the complex-edge path is not covered"
    boundary = [v for v in range(mesh.n_vertices) if mesh.v_is_boundary(v)]
    assert len(boundary) > 40  # outer boundary and three holes
    # the fan's centre: rings run out, so the spiral is its nearest points (the fan itself first)
    centre = len(case["vertices"]) - 6
    assert sorted(case["spirals"][centre][:6]) == list(range(centre, centre + 6))
