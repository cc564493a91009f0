"""Identity Metrics through a real ComfyUI server: several identities (two faces, two references,
positions swapped), the pass/fail gate, frames without a face, drift on a video whose second half is
another face, and the benchmark protocol wiring. Faces are textured bright squares for the tiny
square detector; the same texture at another position is the same identity (cosine ~1), another
texture a different one (cosine ~0.97 with the tiny random recogniser), so match_threshold 0.995
separates them."""

import json

import numpy as np
import pytest
from PIL import Image

from support import tiny_faces

pytestmark = pytest.mark.server
pytest.importorskip("insightface")

S = 320


def _texture(seed):
    g = np.random.default_rng(seed)
    return (225 + g.integers(0, 31, size=(32, 32, 3))).astype(np.uint8)


def _checker():
    yy, xx = np.mgrid[0:32, 0:32]
    return np.repeat((205 + 50 * (((yy // 4) + (xx // 4)) % 2))[..., None], 3, axis=2).astype(np.uint8)


A, B = _texture(1), _checker()


def _frame(faces):
    img = np.zeros((S, S, 3), np.uint8)
    for tex, x, y in faces:
        img[y:y + 32, x:x + 32] = tex
    return img


def _save_video(path, frames):
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], format="PNG")


@pytest.fixture(scope="module")
def msrv(server):
    tiny_faces.make_tiny_pack(server.models_dir, "tiny_metrics", seed=4)
    Image.fromarray(_frame([(A, 64, 128), (B, 224, 128)])).save(server.input_dir / "ids_ref.png")
    Image.fromarray(_frame([(A, 96, 96)])).save(server.input_dir / "ids_ref_a.png")
    left_right = _frame([(A, 32, 64), (B, 256, 192)])
    swapped = _frame([(B, 32, 64), (A, 256, 192)])
    only_a = _frame([(A, 160, 160)])
    _save_video(server.input_dir / "ids_swap.png", [left_right, left_right, swapped, swapped, only_a])
    _save_video(server.input_dir / "ids_drift.png", [_frame([(A, 96, 96)])] * 4 + [_frame([(B, 96, 96)])] * 4)
    _save_video(server.input_dir / "ids_gaps.png", [_frame([(A, 96, 96)]), _frame([]), _frame([(A, 128, 64)]), _frame([])])
    return server


def prompt(ref, video, **kw):
    inputs = {"insightface": ["1", 0], "reference": ["3", 0], "video": ["4", 0], "det_size": 320, "threshold": 0.5,
              "batch_size": 4, "protocol": "likeness", "fps": 4.0, "identities": "one (references averaged)",
              "match_threshold": 0.995, "gate_on": "similarity", "gate_threshold": 0.5}
    inputs.update(kw)
    return {
        "1": {"class_type": "LikenessLoadInsightFace", "inputs": {"model_name": "tiny_metrics", "provider": "CPU"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": ref}},
        "3": {"class_type": "LikenessArcFaceEmbed", "inputs": {
            "insightface": ["1", 0], "image": ["2", 0], "face_choice": "all", "face_index": 0, "on_no_face": "error",
            "det_size": 320, "threshold": 0.5, "crop_size": 224}},
        "4": {"class_type": "LoadImage", "inputs": {"image": video}},
        "5": {"class_type": "LikenessIdentityMetrics", "inputs": inputs},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 5], "filename_prefix": "ids_plot"}},
    }


def run(srv, p):
    hist = srv.run(p, timeout=240)
    text = hist["outputs"]["5"]["text"]
    assert srv.output_files(hist, "6"), "the plot was not saved"
    return text[0], json.loads(text[1])


def test_two_identities_follow_the_faces_not_the_positions(msrv):
    summary, table = run(msrv, prompt("ids_ref.png", "ids_swap.png", identities="one per reference"))
    ids = table["summary"]["identities"]
    assert len(ids) == 2
    # A (reference 0, left in the reference) is found in all 5 frames, B in the first 4, at either position
    assert [d["found"] for d in ids] == [5, 4] and [d["missing"] for d in ids] == [0, 1]
    assert all(d["score"] > 0.995 for d in ids), ids
    assert [d["frames"] for d in ids] == [[0, 1, 2, 3, 4], [0, 1, 2, 3]]
    assert "identities" in summary and "(missing 1)" in summary
    # averaged into one identity the same video scores lower: the average matches neither face
    _, one = run(msrv, prompt("ids_ref.png", "ids_swap.png"))
    assert one["summary"]["similarity_mean"] < min(d["score"] for d in ids)


def test_gate_passes_and_fails_on_the_threshold(msrv):
    _, t0 = run(msrv, prompt("ids_ref_a.png", "ids_drift.png", gate_threshold=0.0))
    sim = t0["summary"]["similarity_mean"]
    assert sim < 0.999  # half the frames are another face
    s_pass, t_pass = run(msrv, prompt("ids_ref_a.png", "ids_drift.png", gate_threshold=round(sim - 0.0005, 4)))
    s_fail, t_fail = run(msrv, prompt("ids_ref_a.png", "ids_drift.png", gate_threshold=round(sim + 0.0005, 4)))
    assert t_pass["summary"]["passed"] is True and s_pass.startswith("PASS: similarity")
    assert t_fail["summary"]["passed"] is False and s_fail.startswith("FAIL: similarity")
    _, t_drift = run(msrv, prompt("ids_ref_a.png", "ids_drift.png", gate_on="drift", gate_threshold=0.999))
    assert t_drift["summary"]["passed"] is False and t_drift["summary"]["gate_value"] == t_drift["summary"]["drift"]


def test_drift_is_last_second_over_first(msrv):
    _, table = run(msrv, prompt("ids_ref_a.png", "ids_drift.png", fps=4.0))
    rows = table["frames"]
    first = np.mean([r["similarity_to_reference"] for r in rows[:4]])
    last = np.mean([r["similarity_to_reference"] for r in rows[4:]])
    assert first > 0.999 and last < 0.999
    assert abs(table["summary"]["drift"] - last / first) < 1e-6
    assert [p["second"] for p in table["summary"]["per_second"]] == [0, 1]
    # at 2 fps the last second is frames 6-7 and the first frames 0-1: the same figure
    _, t2 = run(msrv, prompt("ids_ref_a.png", "ids_drift.png", fps=2.0))
    assert abs(t2["summary"]["drift"] - last / first) < 1e-6 and len(t2["summary"]["per_second"]) == 4


def test_frames_without_a_face_are_counted_not_scored(msrv):
    summary, table = run(msrv, prompt("ids_ref_a.png", "ids_gaps.png"))
    assert table["summary"]["frames_without_face_list"] == [1, 3]
    assert "frames without face 2/4" in summary
    assert table["summary"]["similarity_mean"] > 0.99  # the empty frames are left out, not counted as 0
    # the benchmark protocol on the same video: 16 sampled frames, the empty ones skipped
    p = prompt("ids_ref_a.png", "ids_gaps.png", protocol="consisid")
    p["5"]["inputs"]["reference_image"] = ["2", 0]
    summary, table = run(msrv, p)
    picks = [int(i) for i in np.linspace(0, 3, 16, dtype=int)]
    assert table["summary"]["sampled_frames"] == picks
    assert table["summary"]["frames_without_face"] == sum(t in (1, 3) for t in picks) == 6 and table["summary"]["facesim_cur"] is None
    assert table["summary"]["facesim_arc"] > 0.99


def test_benchmark_protocol_without_reference_image_fails_clearly(msrv):
    from support.server import PromptFailed

    with pytest.raises(PromptFailed, match="reference_image"):
        msrv.run(prompt("ids_ref_a.png", "ids_gaps.png", protocol="opens2v"), timeout=120)
