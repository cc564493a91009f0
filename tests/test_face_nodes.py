"""Face nodes in-process (ComfyUI imported, pack as `likeness_pack`): pack loading, providers,
misplaced files, ArcFace Embed on the tiny SCRFD-interface detector, Identity Metrics."""

import importlib
import json

import numpy as np
import pytest
import torch

from support import tiny_faces

pytest.importorskip("insightface")


@pytest.fixture(scope="module")
def face(pack, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("facemodels")
    tiny_faces.make_tiny_pack(root, "tiny", seed=1)
    tiny_faces.make_tiny_pack(root, "nested", seed=1, nested=True)
    (root / "insightface" / "models" / "detonly").mkdir(parents=True)
    import onnx

    onnx.save(tiny_faces.build_square_detector(), str(root / "insightface" / "models" / "detonly" / "det.onnx"))
    old = folder_paths.folder_names_and_paths.get("insightface")
    folder_paths.folder_names_and_paths["insightface"] = ([str(root / "insightface")], set())
    mods = {n: importlib.import_module(f"likeness_pack.{n}") for n in ("loaders.insightface", "nodes.face")}
    yield type("F", (), {"root": root, "L": mods["loaders.insightface"], "N": mods["nodes.face"]})
    if old is not None:
        folder_paths.folder_names_and_paths["insightface"] = old


@pytest.fixture(scope="module")
def tiny(face):
    pack, status = face.L.load_pack("tiny", "CPU")
    return pack


def img_tensor(rgb_uint8):
    return torch.from_numpy(rgb_uint8).float().div(255.0)[None]


def test_list_and_load_with_provider_report(face, tiny):
    assert {"tiny", "nested", "detonly"} <= set(face.L.list_packs())
    assert tiny.providers == {"detection": "CPUExecutionProvider", "recognition": "CPUExecutionProvider"}
    assert "on CPU" in tiny.describe()
    out = face.N.LoadInsightFace.execute("tiny", "auto")
    assert "recognition: rec_tiny.onnx" in out.args[1]


def test_unavailable_provider_falls_back_and_says_so(face):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    pack, status = face.L.load_pack("tiny", "CUDA")
    assert pack.providers["recognition"] == "CPUExecutionProvider"
    assert "WARNING: CUDA was requested" in status and "onnxruntime-gpu" in status


def test_nested_pack_is_used_and_explained(face):
    pack, status = face.L.load_pack("nested", "CPU")
    assert pack.folder.endswith("nested/nested")
    assert "one folder too deep" in status and "move the .onnx files up" in status


def test_missing_pack_and_missing_models_are_explained(face):
    with pytest.raises(FileNotFoundError, match=r"'antelopev2' was not found.*models/insightface/models/antelopev2"):
        face.L.load_pack("antelopev2", "CPU")
    with pytest.raises(FileNotFoundError, match="lacks a face recognition model.*det.onnx"):
        face.L.load_pack("detonly", "CPU")


def run_embed(face, tiny, image, **kw):
    args = dict(face_choice="largest", face_index=0, on_no_face="error", det_size=640, threshold=0.5, crop_size=224)
    args.update(kw)
    return face.N.ArcFaceEmbed.execute(tiny, image, **args).args


def test_embed_multi_face_choices_and_outputs(face, tiny):
    from likeness_blocks.face_align import arcface_template

    img = tiny_faces.squares_image((640, 640), [(384, 96, 32), (64, 320, 16), (192, 448, 32)])
    fe, crops, large, mask, report = run_embed(face, tiny, img_tensor(img), face_choice="all")
    assert [f.bbox.tolist() for f in fe.faces] == [[64, 320, 80, 336], [192, 448, 224, 480], [384, 96, 416, 128]]
    assert crops.shape == (3, 112, 112, 3) and large.shape == (3, 224, 224, 3) and mask.shape == (1, 640, 640)
    assert mask.sum() == 16 * 16 + 2 * 32 * 32
    f = fe.faces[2]
    assert f.kps.shape == (5, 2) and f.det_score > 0.9 and f.image_index == 0
    assert torch.allclose(f.kps[0], torch.tensor([384 + 0.3 * 32, 96 + 0.35 * 32]))
    assert f.embedding.shape == (512,) and f.embedding.dtype == torch.float32
    assert torch.allclose(f.normed_embedding.norm(), torch.tensor(1.0))
    # the embedding is the recogniser's output on the aligned crop
    direct = torch.from_numpy(tiny.embed(crops.permute(0, 3, 1, 2).numpy()))
    assert torch.allclose(torch.stack([g.embedding for g in fe.faces]), direct, atol=1e-5)
    # the crop is aligned: the square's keypoints land on the template, so the crop centre is white
    assert crops[2, 56, 56].min() > 0.99 and crops[2, 2, 2].max() < 0.01
    assert fe.model_name == "tiny/rec_tiny.onnx"
    # largest, and by index (left to right)
    fe_l = run_embed(face, tiny, img_tensor(img))[0]
    assert len(fe_l) == 1 and fe_l.faces[0].bbox[2] - fe_l.faces[0].bbox[0] == 32
    fe_i = run_embed(face, tiny, img_tensor(img), face_choice="by index (left to right)", face_index=1)[0]
    assert fe_i.faces[0].bbox.tolist() == [192, 448, 224, 480]
    with pytest.raises(ValueError, match="image 0 .*has 3 faces but face_index is 5"):
        run_embed(face, tiny, img_tensor(img), face_choice="by index (left to right)", face_index=5)
    assert arcface_template(224).shape == (5, 2)


def test_detection_retries_at_smaller_size(face, tiny):
    img = tiny_faces.squares_image((640, 640), [(256, 256, 64)])  # a face too big for the 640 detector
    fe, *_rest, report = run_embed(face, tiny, img_tensor(img))
    assert len(fe) == 1 and "lowering the detector size" in report
    x1, y1, x2, y2 = fe.faces[0].bbox.tolist()  # found at 480 (partly) or 320 (exactly)
    assert (x1, y1) == (256, 256) and 290 < x2 <= 320 and 290 < y2 <= 320
    from likeness_blocks.face_embed import detection_sizes

    assert detection_sizes(640) == [640, 480, 320] and detection_sizes(320) == [320]


def test_no_face_error_names_the_image_and_skip_mode(face, tiny):
    good = tiny_faces.squares_image((640, 640), [(64, 64, 32)])
    empty = np.zeros_like(good)
    batch = torch.cat([img_tensor(good), img_tensor(empty), img_tensor(good)])
    with pytest.raises(ValueError, match=r"'image' image 1 \(of 3, counting from 0\): no face found.*skip image"):
        run_embed(face, tiny, batch)
    fe, crops, large, mask, report = run_embed(face, tiny, batch, on_no_face="skip image")
    assert fe.skipped == [1] and [f.image_index for f in fe.faces] == [0, 2]
    assert "image 1: skipped" in report and mask[1].sum() == 0 and mask.shape[0] == 3
    with pytest.raises(ValueError, match="No face was found in any of the 1"):
        run_embed(face, tiny, img_tensor(empty), on_no_face="skip image")


def test_rgba_gray_tiny_and_huge_images(face, tiny):
    rgb = tiny_faces.squares_image((640, 640), [(64, 64, 32)])
    base = run_embed(face, tiny, img_tensor(rgb))[0].faces[0]
    rgba = torch.cat([img_tensor(rgb), torch.full((1, 640, 640, 1), 0.3)], dim=-1)
    assert torch.allclose(run_embed(face, tiny, rgba)[0].faces[0].embedding, base.embedding, atol=1e-5)
    gray = img_tensor(rgb)[..., :1]
    assert torch.allclose(run_embed(face, tiny, gray)[0].faces[0].embedding, base.embedding, atol=1e-5)
    with pytest.raises(ValueError, match="8x8 pixels.*at least 16"):
        run_embed(face, tiny, torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="channels"):
        run_embed(face, tiny, torch.zeros(1, 64, 64, 5))
    # small image: 80x80 with a 4 px face, upscaled 8x by the detector to 640
    small = tiny_faces.squares_image((80, 80), [(8, 8, 4)])
    assert run_embed(face, tiny, img_tensor(small))[0].faces[0].bbox.tolist() == [8, 8, 12, 12]
    # huge image: 3200x2560, a 160 px face is found at 640 (scale 1/5 -> 32 px)
    huge = tiny_faces.squares_image((2560, 3200), [(800, 640, 160)])
    fe, crops, large, mask, _ = run_embed(face, tiny, img_tensor(huge))
    assert fe.faces[0].bbox.tolist() == [800, 640, 960, 800] and mask.shape == (1, 2560, 3200)


def test_identity_metrics_node(face, tiny):
    ref_img = tiny_faces.squares_image((320, 320), [(96, 96, 32)])
    fe = run_embed(face, tiny, img_tensor(ref_img), det_size=320)[0]
    frames = []
    for t in range(5):  # the face moves 32 px right per frame, frame 3 has none
        sq = [] if t == 3 else [(32 + 32 * t, 96, 32)]
        frames.append(img_tensor(tiny_faces.squares_image((320, 320), sq)))
    video = torch.cat(frames)
    out = face.N.IdentityMetrics.execute(tiny, fe, video, det_size=320, threshold=0.5, batch_size=2)
    sim, ifs, fm, missing, table, plot = out.args[:6]
    assert missing == 1
    assert sim == pytest.approx(1.0, abs=1e-5)  # the same white square each frame, identical aligned crop
    assert ifs == pytest.approx(1.0, abs=1e-5)
    data = json.loads(table)
    assert data["summary"]["frames_without_face_list"] == [3]
    assert [r["face"] for r in data["frames"]] == [True, True, True, False, True]
    assert data["frames"][1]["inter_frame_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert data["frames"][4]["inter_frame_similarity"] is None  # frame 3 has no face
    assert fm > 0
    assert plot.shape == (1, 540, 960, 3)
    # FaceSim-Cur has no reference to compare with under 'likeness': NaN, and the summary and table say why
    assert out.args[7] != out.args[7]
    assert "Not computed (NaN): facesim_cur: protocol 'likeness' scores against the reference FACE_EMBEDS" in out.args[10]
    assert set(data["summary"]["not_computed"]) == {"facesim_cur"}
    # batched and frame-by-frame recognition agree
    one = face.N.IdentityMetrics.execute(tiny, fe, video, det_size=320, threshold=0.5, batch_size=1).args
    assert one[4] == table


def test_metrics_refuse_embeddings_of_another_recogniser(face, tiny):
    fe = run_embed(face, tiny, img_tensor(tiny_faces.squares_image((320, 320), [(96, 96, 32)])), det_size=320)[0]
    fe.model_name = "antelopev2/glintr100.onnx"
    with pytest.raises(ValueError, match="cannot be compared"):
        face.N.IdentityMetrics.execute(tiny, fe, torch.zeros(2, 64, 64, 3), det_size=320, threshold=0.5)


def test_load_differentiable_arcface_from_pack_onnx_and_pth(face, tiny):
    sources = face.L.list_arcface_sources()
    assert "insightface/tiny/rec_tiny.onnx" in sources
    net = face.N.LoadDifferentiableArcFace.execute("insightface/tiny/rec_tiny.onnx").args[0]
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        ours = net(x)
    ref = torch.from_numpy(tiny.embed(x.numpy()))
    assert torch.nn.functional.cosine_similarity(ours, ref).min() >= 0.9999
    with pytest.raises(ValueError, match="not a face recognition model"):
        face.N.LoadDifferentiableArcFace.execute("insightface/tiny/det_tiny.onnx")
    sd = tiny_faces.iresnet_state_dict(seed=1)
    torch.save(sd, face.root / "insightface" / "glintr100_torch.pth")
    assert "insightface/glintr100_torch.pth" in face.L.list_arcface_sources()
    net2 = face.N.LoadDifferentiableArcFace.execute("insightface/glintr100_torch.pth").args[0]
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(net2(x), ref).min() >= 0.9999  # same seed, same weights
    (face.root / "insightface" / "evil.pth").write_bytes(b"\x80\x04\x95not a state dict")
    with pytest.raises(ValueError, match="could not be loaded safely"):
        face.N.LoadDifferentiableArcFace.execute("insightface/evil.pth")
    with pytest.raises(ValueError, match="is refused"):
        face.N.LoadDifferentiableArcFace.execute("insightface/../../etc/passwd.pth")
