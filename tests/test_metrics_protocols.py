"""Identity Metrics' benchmark protocols against plain re-implementations of the two public scoring
scripts (ConsisID eval/get_facesim_fid.py, OpenS2V-Nexus eval/get_facesim.py), written here from
their facts: insightface FaceAnalysis on the pack folder (det size 320, threshold 0.5), the largest
face (last of equal areas), the 1.25x grey-pad retry with landmarks moved back, norm_crop 224 ->
RGB -> resize 112 -> /255 -0.5 /0.5 -> CurricularFace -> L2 norm, max(0, cos) per frame,
np.linspace frame choice, and the averaging (OpenS2V drops Cur zeros, keeps Arc zeros).

Models: the tiny square-face SCRFD-interface detector, a tiny arcface_torch iresnet as the pack's
ONNX recogniser and a tiny CurricularFace IR backbone with the released key names, loaded from a
.bin through the loader users take. Faces are patches of the photos the insightface wheel ships
(brightened so the square detector fires), at several positions, one only found after the pad
retry, two of equal size in one frame, and one frame without a face. The recognisers' final
BatchNorm is centred on these faces so cosines take both signs and the clipping matters.
"""

import importlib
import os

import numpy as np
import pytest
import torch

from support import tiny_faces, tiny_recognizers as TR

pytest.importorskip("insightface")
cv2 = pytest.importorskip("cv2")

S = 320
CUR_FILE = "glint360k_curricular_face_r101_backbone.bin"


def _photo_sources():
    import insightface
    from PIL import Image

    d = os.path.join(os.path.dirname(insightface.__file__), "data", "images")
    tom = np.asarray(Image.open(os.path.join(d, "Tom_Hanks_54745.png")).convert("RGB"))
    t1 = np.asarray(Image.open(os.path.join(d, "t1.jpg")).convert("RGB"))
    return {"tom": tom, "g1": t1[150:450, 0:300], "g2": t1[100:400, 450:750], "g3": t1[200:500, 900:1200],
            "tomflip": np.ascontiguousarray(tom[:, ::-1])}


def _patch(src, side):
    from PIL import Image

    p = np.asarray(Image.fromarray(src).resize((side, side), Image.BILINEAR)).astype(np.float32)
    return (170 + (85 / 255) * p).round().astype(np.uint8)  # bright enough for the square detector


def _frame(src, faces):
    img = np.zeros((S, S, 3), np.uint8)
    for name, x, y, side in faces:
        img[y:y + side, x:x + side] = _patch(src[name], side)
    return img


def make_video(src):
    """20 RGB uint8 frames: faces at grid positions (found at det 320), one 48 px face found only after
    the grey-pad retry, two equal faces in one frame, one empty frame."""
    plan = [
        [("tom", 96, 64, 32)], [("tom", 128, 64, 32)], [("g1", 96, 96, 32)], [("tomflip", 160, 96, 32)],
        [("g2", 32, 32, 32)], [], [("tom", 112, 64, 48)], [("g3", 224, 224, 32)], [("g1", 32, 32, 32), ("tom", 224, 192, 32)],
        [("tom", 64, 64, 32)], [("g2", 192, 64, 32)], [("tomflip", 96, 160, 32)], [("g3", 64, 192, 32)],
        [("tom", 160, 112, 48)], [("g1", 256, 32, 32)], [("tom", 32, 256, 32)], [("g2", 128, 128, 32)],
        [("g3", 160, 32, 32)], [("tomflip", 32, 128, 32)], [("tom", 192, 192, 32)],
    ]
    return [_frame(src, f) for f in plan]


# ---------------------------------------------------------------------------------------------
# the scripts' scoring, written plainly


def fa_process_image(fa, rgb):
    from insightface.utils import face_align

    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    area = lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1])
    faces = fa.get(bgr)
    if faces:
        face = sorted(faces, key=area)[-1]
        kps = face["kps"]
    else:
        h, w = bgr.shape[:2]
        top, left = int(h * 0.25), int(w * 0.25)
        padded = cv2.copyMakeBorder(bgr, top, top, left, left, cv2.BORDER_CONSTANT, value=(128, 128, 128))
        faces = fa.get(padded)
        if not faces:
            return None, None
        face = sorted(faces, key=area)[-1]
        kps = face["kps"]
        kps -= np.array([left, top])  # in place, as the scripts do: the landmarks stay float32
    aligned = cv2.cvtColor(face_align.norm_crop(bgr, landmark=kps, image_size=224), cv2.COLOR_BGR2RGB)
    return aligned, face["embedding"]


def cur_inference(cur_sd, aligned):
    img = cv2.resize(aligned, (112, 112))
    t = torch.from_numpy(np.transpose(img, (2, 0, 1))).unsqueeze(0).float()
    t.div_(255).sub_(0.5).div_(0.5)
    with torch.no_grad():
        e = TR.curricular_forward(cur_sd, t).numpy()[0]
    return e / np.linalg.norm(e)


def cos(a, b):
    return torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=-1).item()


def script_scores(fa, cur_sd, frames, ref_rgb, num_frames, opens2v):
    ref_aligned, ref_arc = fa_process_image(fa, ref_rgb)
    ref_cur = cur_inference(cur_sd, ref_aligned)
    idx = np.linspace(0, len(frames) - 1, num_frames, dtype=int)
    cur_scores, arc_scores, raw = [], [], []
    for i in idx:
        aligned, arc = fa_process_image(fa, frames[int(i)])
        if aligned is None:
            continue
        c_raw, a_raw = cos(ref_cur, cur_inference(cur_sd, aligned)), cos(ref_arc, arc)
        raw.append((c_raw, a_raw))
        c, a = max(0.0, c_raw), max(0.0, a_raw)
        if opens2v:
            if c != 0.0:
                cur_scores.append(c)
            arc_scores.append(a)  # the script's `if arc_scores != 0.0` tests the list: always true
        else:
            cur_scores.append(c)
            arc_scores.append(a)
    return (np.mean(cur_scores) if cur_scores else 0.0), (np.mean(arc_scores) if arc_scores else 0.0), raw


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(pack, tmp_path_factory):
    import folder_paths
    import onnx
    from insightface.model_zoo import model_zoo
    from insightface.utils import face_align

    src = _photo_sources()
    frames = make_video(src)
    ref = _frame(src, [("tom", 160, 112, 48)])  # the reference is found only after the pad retry
    root = tmp_path_factory.mktemp("bench_models")
    pack_dir = root / "insightface" / "models" / "bench"
    pack_dir.mkdir(parents=True)
    onnx.save(tiny_faces.build_square_detector(), str(pack_dir / "det_tiny.onnx"))
    det = model_zoo.get_model(str(pack_dir / "det_tiny.onnx"), providers=["CPUExecutionProvider"])
    arc_in, cur_in = [], []
    for img in frames + [ref]:
        bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        for im, shift in ((bgr, 0), (cv2.copyMakeBorder(bgr, 80, 80, 80, 80, cv2.BORDER_CONSTANT, value=(128,) * 3), 80)):
            _, kpss = det.detect(im, input_size=(320, 320), max_num=0, det_thresh=0.5)
            for k in kpss:
                arc_in.append(cv2.cvtColor(face_align.norm_crop(im, k, 112), cv2.COLOR_BGR2RGB))
                c = cv2.cvtColor(face_align.norm_crop(bgr, k - shift, 224), cv2.COLOR_BGR2RGB)
                cur_in.append(cv2.resize(c, (112, 112)))
    arc_x = TR.uint8_rgb_to_unit(np.stack(arc_in)).sub(127.5).div(127.5)
    cur_x = TR.uint8_rgb_to_unit(np.stack(cur_in)).div(255).sub(0.5).div(0.5)
    rec_sd = TR.centre_outputs(tiny_faces.iresnet_state_dict(seed=5), "features", TR.iresnet_forward, arc_x)
    onnx.save(tiny_faces.build_iresnet_onnx(rec_sd), str(pack_dir / "rec_tiny.onnx"))
    cur_sd = TR.centre_outputs(TR.curricular_state_dict(seed=7), "output_layer.4", TR.curricular_forward, cur_x)
    torch.save(cur_sd, str(root / "insightface" / CUR_FILE))
    old = folder_paths.folder_names_and_paths.get("insightface")
    folder_paths.folder_names_and_paths["insightface"] = ([str(root / "insightface")], set())
    L = importlib.import_module("likeness_pack.loaders.insightface")
    N = importlib.import_module("likeness_pack.nodes.face")
    from insightface.app import FaceAnalysis

    fa = FaceAnalysis(name=str(pack_dir), providers=["CPUExecutionProvider"])
    fa.prepare(ctx_id=0, det_size=(320, 320))
    yield type("S", (), {"frames": frames, "ref": ref, "src": src, "cur_sd": cur_sd, "fa": fa, "L": L, "N": N,
                         "pack": L.load_pack("bench", "CPU")[0], "cur": L.load_arcface_torch(f"insightface/{CUR_FILE}")})
    if old is not None:
        folder_paths.folder_names_and_paths["insightface"] = old


def video_tensor(frames):
    return torch.from_numpy(np.stack(frames)).float().div(255.0)


def run_node(s, frames, ref, protocol, **kw):
    out = s.N.IdentityMetrics.execute(s.pack, video=video_tensor(frames), protocol=protocol, reference_image=video_tensor([ref]),
                                      recognizer=s.cur, **kw)
    return dict(zip(["similarity", "ifs", "fm", "no_face", "json", "plot", "arc", "cur", "drift", "passed", "summary"], out.result))


def test_curricularface_loads_strictly_and_matches_the_plain_forward(setup):
    net = setup.cur.net
    assert setup.cur.kind == "curricularface" and setup.cur.input_size == 112
    assert net.units == (1, 2, 1, 1) and net.widths == (8, 16, 24, 32)
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(net(x), TR.curricular_forward(setup.cur_sd, x), atol=1e-5)
    # a missing key is named, not ignored
    bad = dict(setup.cur_sd)
    bad.pop("body.2.res_layer.4.weight")
    from likeness_pack.likeness_blocks.curricularface import curricularface_from_state_dict

    with pytest.raises(ValueError, match="body.2.res_layer.4.weight"):
        curricularface_from_state_dict(bad)


@pytest.mark.parametrize("protocol,num,opens2v", [("consisid", 16, False), ("opens2v", 32, True)])
def test_protocol_equals_the_script(setup, protocol, num, opens2v):
    want_cur, want_arc, raw = script_scores(setup.fa, setup.cur_sd, setup.frames, setup.ref, num, opens2v)
    # the data exercise what the protocols differ in: clipped scores of both kinds, kept ones too
    assert any(c < 0 for c, _ in raw) and any(c > 0 for c, _ in raw)
    assert any(a < 0 for _, a in raw) and any(a > 0 for _, a in raw)
    # one face per recognition batch: the scripts' own batching (oneDNN picks other kernels for larger
    # batches, which moves fp32 results by ~1e-6)
    got = run_node(setup, setup.frames, setup.ref, protocol, batch_size=1)
    assert abs(got["arc"] - want_arc) < 1e-6, (got["arc"], want_arc)
    assert abs(got["cur"] - want_cur) < 1e-6, (got["cur"], want_cur)
    assert got["similarity"] == got["cur"]  # the headline number with a CurricularFace connected
    idx = np.linspace(0, 19, num, dtype=int)
    assert got["no_face"] == int((idx == 5).sum())  # frame 5 is empty (twice among OpenS2V's 32 picks)
    # the batched path: the same numbers up to fp32 rounding
    batched = run_node(setup, setup.frames, setup.ref, protocol, batch_size=7)
    assert abs(batched["arc"] - want_arc) < 1e-5 and abs(batched["cur"] - want_cur) < 1e-5


def test_opens2v_quirk_changes_only_the_cur_mean(setup):
    """Scored on the same 16 frames, OpenS2V's averaging differs from ConsisID's exactly by the dropped Cur zeros."""
    c_cur, c_arc, raw = script_scores(setup.fa, setup.cur_sd, setup.frames, setup.ref, 16, False)
    o_cur, o_arc, _ = script_scores(setup.fa, setup.cur_sd, setup.frames, setup.ref, 16, True)
    assert o_arc == c_arc and o_cur > c_cur
    assert abs(o_cur - np.mean([c for c, _ in raw if c > 0])) < 1e-9


def test_protocols_without_curricularface_and_bad_inputs(setup):
    out = setup.N.IdentityMetrics.execute(setup.pack, video=video_tensor(setup.frames), protocol="opens2v",
                                          reference_image=video_tensor([setup.ref]))
    r = dict(zip(["similarity", "ifs", "fm", "no_face", "json", "plot", "arc", "cur", "drift", "passed", "summary"],
                 out.result))
    assert np.isnan(r["cur"]) and r["similarity"] == r["arc"]
    # every NaN says why, in the summary and the table
    assert np.isnan(r["ifs"]) and np.isnan(r["fm"])
    assert "Not computed (NaN): facesim_cur: no CurricularFace recognizer connected" in r["summary"]
    assert "inter_frame_mean, face_motion_mean: protocol 'opens2v' scores only its sampled frames" in r["summary"]
    import json
    assert set(json.loads(r["json"])["summary"]["not_computed"]) >= {"facesim_cur", "inter_frame_mean, face_motion_mean"}
    with_cur = run_node(setup, setup.frames, setup.ref, "opens2v")
    assert "facesim_cur" not in json.loads(with_cur["json"])["summary"]["not_computed"]
    with pytest.raises(ValueError, match="reference_image"):
        setup.N.IdentityMetrics.execute(setup.pack, video=video_tensor(setup.frames), protocol="consisid")
    with pytest.raises(ValueError, match="'reference_image' image 0.*no face"):
        setup.N.IdentityMetrics.execute(setup.pack, video=video_tensor(setup.frames), protocol="consisid",
                                        reference_image=video_tensor([setup.frames[5]]))
    arc = setup.L.load_arcface_torch("insightface/bench/rec_tiny.onnx")
    with pytest.raises(ValueError, match="CurricularFace"):
        setup.N.IdentityMetrics.execute(setup.pack, video=video_tensor(setup.frames), protocol="consisid",
                                        reference_image=video_tensor([setup.ref]), recognizer=arc)


def test_frame_choice_and_padding_facts(pack):
    M = importlib.import_module("likeness_pack.likeness_blocks.metrics")
    assert M.uniform_frame_indices(49, 16) == [0, 3, 6, 9, 12, 16, 19, 22, 25, 28, 32, 35, 38, 41, 44, 48]
    assert M.uniform_frame_indices(20, 32)[:5] == [0, 0, 1, 1, 2]  # repeats kept
    img = np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3)
    padded, shift = M.pad_grey(img)
    want = cv2.copyMakeBorder(img, 1, 1, 2, 2, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    assert shift == (2, 1) and np.array_equal(padded, want)
    boxes = np.array([[0, 0, 2, 2, 0.9], [5, 5, 7, 7, 0.8], [0, 0, 1, 1, 0.99]], np.float32)
    assert M.largest_index(boxes) == 1  # equal areas: the last, as sorted(...)[-1]



