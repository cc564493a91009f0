"""Identity Metrics wired as users run it (issue 17): a reference face that differs from every video frame, faces that
change colour and move, two faces per frame (the largest is measured), one frame without a face.

The detector and recogniser are a small fake pack with the InsightFace pack's interface (detect / embed), so the
expected numbers are written here from the definitions: similarity = cos(e_frame, e_reference), IFS = cos between
consecutive frames with a face, face motion = mean Farneback flow magnitude from the previous frame inside the
*current* frame's face box. The node's own detection -> alignment -> embedding path runs unchanged.
"""

import importlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

cv2 = pytest.importorskip("cv2")

SIZE = (96, 128)  # H, W
# per frame: [(x, y, side, colour)], the first square is the larger face
SCENE = [
    [(16, 20, 36, (220, 60, 30)), (100, 70, 14, (255, 255, 255))],
    [(24, 22, 36, (200, 90, 40)), (100, 70, 14, (255, 255, 255))],
    [(34, 26, 36, (150, 140, 60))],
    [],  # no face
    [(52, 30, 36, (90, 160, 200)), (4, 4, 12, (255, 255, 255))],
]
REF_COLOUR = (60, 200, 120)  # not in any frame
PROJ = torch.randn(512, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def embedding_of(colour):
    c = torch.tensor(list(colour) + [255.0], dtype=torch.float64) / 255.0
    return (PROJ @ c).float()


class ColourFacePack:
    """Finds each coloured square as a face (box = the square, five keypoints inside it); embeds a crop by the mean
    colour of its central 8x8 pixels through a fixed projection."""

    rec_input_size = 112
    rec_name = "colour/rec.onnx"
    det_fixed_size = None

    def detect(self, bgr, size, threshold):
        mask = (bgr.max(axis=2) > 0).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        boxes, kps = [], []
        rel = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32)
        for x, y, w, h, _area in stats[1:]:
            boxes.append([x, y, x + w, y + h, 0.9])
            kps.append(np.array([x, y], np.float32) + rel * np.array([w, h], np.float32))
        return np.array(boxes, np.float32).reshape(-1, 5), np.array(kps, np.float32).reshape(-1, 5, 2)

    def embed(self, crops, batch_size=64):
        c = torch.from_numpy(np.asarray(crops)).double()[:, :, 52:60, 52:60].mean(dim=(2, 3))  # (N, 3) in 0..1
        return (torch.cat([c, torch.ones(len(c), 1, dtype=torch.float64)], 1) @ PROJ.T).float().numpy()


def frames_uint8():
    out = []
    for squares in SCENE:
        img = np.zeros(SIZE + (3,), np.uint8)
        for x, y, side, colour in squares:
            img[y:y + side, x:x + side] = colour
        out.append(img)
    return out


@pytest.fixture(scope="module")
def face_nodes(pack):
    return importlib.import_module("likeness_pack.nodes.face")


def test_metrics_against_a_different_reference_and_the_current_face_box(face_nodes):
    from likeness_blocks.face_types import DetectedFace, FaceEmbeds

    ref = FaceEmbeds([DetectedFace(0, torch.tensor([0.0, 0, 36, 36]), torch.zeros(5, 2), 0.9, embedding_of(REF_COLOUR))],
                     [(96, 96)], model_name="colour/rec.onnx")
    imgs = frames_uint8()
    video = torch.from_numpy(np.stack(imgs)).float() / 255.0
    sim, ifs, fm, missing, table, _plot = face_nodes.IdentityMetrics.execute(
        ColourFacePack(), ref, video, det_size=320, threshold=0.5, batch_size=2).args[:6]
    rows = json.loads(table)["frames"]

    r = F.normalize(embedding_of(REF_COLOUR), dim=0)
    emb = {t: F.normalize(embedding_of(s[0][3]), dim=0) for t, s in enumerate(SCENE) if s}
    want_sim = {t: float(e @ r) for t, e in emb.items()}
    want_ifs = {t: float(emb[t] @ emb[t - 1]) for t in emb if t - 1 in emb}
    gray = [img.mean(axis=2).astype(np.uint8) for img in imgs]
    want_fm = {}
    for t in range(1, len(imgs)):
        if not SCENE[t]:
            continue
        x, y, side, _ = SCENE[t][0]  # the current frame's largest face
        flow = cv2.calcOpticalFlowFarneback(gray[t - 1], gray[t], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        want_fm[t] = float(np.sqrt((flow[y:y + side, x:x + side] ** 2).sum(-1)).mean())

    assert missing == 1 and [row["face"] for row in rows] == [bool(s) for s in SCENE]
    for t, row in enumerate(rows):
        assert row["similarity_to_reference"] == (pytest.approx(want_sim[t], abs=1e-4) if t in want_sim else None), t
        assert row["inter_frame_similarity"] == (pytest.approx(want_ifs[t], abs=1e-4) if t in want_ifs else None), t
        assert row["face_motion"] == (pytest.approx(want_fm[t], rel=1e-5) if t in want_fm else None), t
    assert sim == pytest.approx(np.mean(list(want_sim.values())), abs=1e-4)
    summary = json.loads(table)["summary"]
    assert summary["similarity_to_reference_min"] == pytest.approx(min(want_sim.values()), abs=1e-4)
    assert summary["frames_without_face_list"] == [3]
    assert ifs == pytest.approx(np.mean(list(want_ifs.values())), abs=1e-4)
    assert fm == pytest.approx(np.mean(list(want_fm.values())), rel=1e-5)
    # the scene can tell the wrong versions apart: the reference is unlike frame 0, faces change from frame to frame,
    # and the flow read in the previous frame's box differs from the current one's
    assert max(want_sim.values()) < 0.99 and abs(want_sim[0] - 1.0) > 0.02
    assert min(want_ifs.values()) < 0.999
    for t in want_fm:
        x, y, side, _ = SCENE[t - 1][0] if SCENE[t - 1] else SCENE[t][0]
        flow = cv2.calcOpticalFlowFarneback(gray[t - 1], gray[t], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        prev_box = float(np.sqrt((flow[y:y + side, x:x + side] ** 2).sum(-1)).mean())
        if SCENE[t - 1]:
            assert abs(prev_box - want_fm[t]) > 1e-3 * max(want_fm[t], 1e-3), t
