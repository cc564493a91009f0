"""Pure-torch face blocks: ArcFace alignment, the torch ArcFace (iresnet and ONNX conversion)
against onnxruntime, gradients, and the identity metrics."""

import os

import numpy as np
import pytest
import torch

from likeness_blocks import face_align as FA
from likeness_blocks.arcface import (
    ArcFaceTorch,
    OnnxGraphModule,
    arcface_from_iresnet_state_dict,
    arcface_from_onnx,
    onnx_input_normalisation,
)
from support import tiny_faces

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

# the standard ArcFace template, typed in again from the reference values (not imported)
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])


def insightface_image(name):
    import insightface

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", name)
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    assert img is not None, path
    return img[..., ::-1].copy()  # RGB uint8


def reference_similarity(src, dst):
    """Plain least squares for [a, -b, tx; b, a, ty] (numpy lstsq), the independent reference."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, -y, 1, 0]); rhs.append(u)
        rows.append([y, x, 0, 1]); rhs.append(v)
    a, b, tx, ty = np.linalg.lstsq(np.array(rows, float), np.array(rhs, float), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_template_sizes():
    assert np.allclose(FA.arcface_template(112).numpy(), TEMPLATE, atol=1e-5)
    assert np.allclose(FA.arcface_template(224).numpy(), TEMPLATE * 2, atol=1e-4)
    t128 = TEMPLATE * 1.0
    t128[:, 0] += 8.0
    assert np.allclose(FA.arcface_template(128).numpy(), t128, atol=1e-4)


def test_similarity_recovers_known_transform_and_matches_lstsq():
    rng = np.random.default_rng(0)
    for _ in range(5):
        ang, s = rng.uniform(-0.6, 0.6), rng.uniform(0.3, 3.0)
        m = np.array([[s * np.cos(ang), -s * np.sin(ang), rng.uniform(-50, 50)],
                      [s * np.sin(ang), s * np.cos(ang), rng.uniform(-50, 50)]])
        src = rng.uniform(100, 400, size=(5, 2))
        dst = src @ m[:, :2].T + m[:, 2]
        got = FA.estimate_similarity(torch.tensor(src), torch.tensor(dst)).numpy()
        assert np.allclose(got, m, atol=1e-8)
        noisy = dst + rng.normal(0, 3, size=dst.shape)
        got = FA.estimate_similarity(torch.tensor(src), torch.tensor(noisy)).numpy()
        assert np.allclose(got, reference_similarity(src, noisy), atol=1e-8)


@pytest.mark.parametrize("size", [112, 128, 224, 256])
def test_alignment_matrix_matches_insightface_estimate_norm(size):
    fa = pytest.importorskip("insightface.utils.face_align")
    rng = np.random.default_rng(size)
    kps = (TEMPLATE * 1.7 + [120, 80] + rng.normal(0, 2.5, size=(5, 2))).astype(np.float32)
    ours = FA.alignment_matrix(torch.tensor(kps[None], dtype=torch.float64), size)[0].numpy()
    theirs = fa.estimate_norm(kps, image_size=size)
    assert np.allclose(ours, theirs, atol=1e-4), (ours, theirs)


def test_align_real_photo_matches_cv2_and_lands_on_template():
    img = insightface_image("Tom_Hanks_54745.png").astype(np.float32) / 255.0
    h, w = img.shape[:2]
    # landmarks placed on the template of a face that fills the middle of the photo, rotated 10 degrees
    ang = np.deg2rad(10.0)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    kps = ((TEMPLATE - 56.0) @ rot.T) * (min(h, w) / 150.0) + [w / 2, h / 2]
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    kt = torch.tensor(kps[None], dtype=torch.float32)
    for size in (112, 512):
        crop = FA.align_faces(x, kt, size)[0].permute(1, 2, 0).numpy()
        m = FA.alignment_matrix(kt.double(), size)[0].numpy()
        ref = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        inner = (slice(2, -2), slice(2, -2))
        assert np.abs(crop[inner] - ref[inner]).max() < 2e-3
        mapped = kps @ m[:, :2].T + m[:, 2]
        assert np.allclose(mapped, FA.arcface_template(size).numpy(), atol=1e-3)


def test_crop_boxes_is_crop_then_bilinear_resize():
    img = torch.from_numpy(insightface_image("t1.jpg")).permute(2, 0, 1)[None].float() / 255.0
    box = torch.tensor([[100.0, 40.0, 324.0, 264.0]])
    got = FA.crop_boxes(img, box, 112)
    ref = torch.nn.functional.interpolate(img[:, :, 40:264, 100:324], size=(112, 112), mode="bilinear", align_corners=False)
    assert (got - ref).abs().max() < 1e-4


def test_alignment_gradients_reach_image_and_landmarks():
    img = torch.rand(2, 3, 200, 180, requires_grad=True)
    kps = torch.tensor(TEMPLATE[None] + [40.0, 50.0], dtype=torch.float32).repeat(2, 1, 1).requires_grad_(True)
    FA.align_faces(img, kps, 112).square().mean().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert kps.grad is not None and kps.grad.abs().sum() > 0


def test_box_masks():
    m = FA.box_masks([np.array([[10, 20, 30, 60]]), []], 100, 80)
    assert m.shape == (2, 100, 80) and m[0].sum() == 20 * 40 and m[1].sum() == 0
    assert m[0, 20:60, 10:30].min() == 1


# ---------------------------------------------------------------------------------------------- recognition


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory):
    d = tmp_path_factory.mktemp("rec")
    sd = tiny_faces.iresnet_state_dict(seed=3)
    path = d / "rec.onnx"
    onnx.save(tiny_faces.build_iresnet_onnx(sd), str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return path, sd, sess


def _ort_embed(sess, rgb01):
    x = ((rgb01.numpy() * 255.0 - 127.5) / 127.5).astype(np.float32)
    return torch.from_numpy(sess.run(None, {"input.1": x})[0])


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_onnx_converted_arcface_matches_onnxruntime(tiny_rec):
    path, _sd, sess = tiny_rec
    net = arcface_from_onnx(str(path))
    assert (net.input_mean, net.input_std, net.input_size) == (127.5, 127.5, 112)
    x = torch.rand(4, 3, 112, 112)
    with torch.no_grad():
        ours = net(x)
    ref = _ort_embed(sess, x)
    assert ours.shape == (4, 512)
    assert _cos(ours, ref).min() >= 0.9999
    assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()


def test_iresnet_state_dict_matches_onnxruntime(tiny_rec, tmp_path):
    path, sd, sess = tiny_rec
    pth = tmp_path / "glintr100_torch.pth"
    torch.save(sd, pth)
    loaded = torch.load(pth, map_location="cpu", weights_only=True)
    net = arcface_from_iresnet_state_dict(loaded)
    assert net.net.layers_cfg == (1, 1, 1, 1)
    x = torch.rand(3, 3, 112, 112)
    with torch.no_grad():
        ours = net(x)
    assert _cos(ours, _ort_embed(sess, x)).min() >= 0.9999


def test_iresnet100_layout_and_key_names():
    from likeness_blocks.arcface import IResNet, iresnet_config_from_state_dict

    net = IResNet()  # glintr100 = iresnet100
    sd = net.state_dict()
    assert iresnet_config_from_state_dict(sd) == ((3, 13, 30, 3), (64, 128, 256, 512), 512, 112)
    for key in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.downsample.0.weight",
                "layer3.29.conv2.weight", "layer4.2.bn3.bias", "bn2.weight", "fc.weight", "features.running_mean"):
        assert key in sd, key
    assert sd["fc.weight"].shape == (512, 512 * 7 * 7)
    n = sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k)
    assert 65_000_000 < n < 66_000_000  # iresnet100 has ~65.2 M parameters


def test_gradient_flows_to_input_through_converted_onnx(tiny_rec):
    path, _sd, _sess = tiny_rec
    net = arcface_from_onnx(str(path))
    img = torch.rand(2, 3, 160, 150, requires_grad=True)
    kps = torch.tensor(TEMPLATE[None] + [20.0, 25.0], dtype=torch.float32).repeat(2, 1, 1)
    ref = torch.randn(512)
    loss = (1 - torch.nn.functional.cosine_similarity(net.embed_aligned(img, kps), ref[None])).mean()
    loss.backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    img.grad = None
    net.embed_boxes(img, torch.tensor([[10.0, 10.0, 130.0, 140.0]] * 2)).sum().backward()
    assert img.grad.abs().sum() > 0


def test_mxnet_style_graph_takes_raw_pixels_and_unknown_ops_are_named():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Sub", ["data", "m"], ["a"], name="_minusscalar0"),
             helper.make_node("Mul", ["a", "s"], ["b"], name="_mulscalar0"),
             helper.make_node("Erf", ["b"], ["out"], name="erf0")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 112, 112])],
                          initializer=[helper.make_tensor("m", TensorProto.FLOAT, [], [127.5]),
                                       helper.make_tensor("s", TensorProto.FLOAT, [], [0.0078125])])
    model = helper.make_model(g)
    assert onnx_input_normalisation(model) == (0.0, 1.0)
    with pytest.raises(NotImplementedError, match="Erf"):
        OnnxGraphModule(model)


def test_bad_iresnet_checkpoint_is_explained():
    with pytest.raises(ValueError, match="not an arcface_torch iresnet"):
        arcface_from_iresnet_state_dict({"weight": torch.zeros(3)})
    sd = tiny_faces.iresnet_state_dict()
    del sd["layer2.0.conv2.weight"]
    with pytest.raises(ValueError, match="missing"):
        arcface_from_iresnet_state_dict(sd)


# ---------------------------------------------------------------------------------------------- detection + metrics


def test_tiny_detector_is_routed_and_finds_the_squares(tmp_path):
    from insightface.model_zoo import model_zoo

    path = tmp_path / "det.onnx"
    onnx.save(tiny_faces.build_square_detector(), str(path))
    det = model_zoo.get_model(str(path), providers=["CPUExecutionProvider"])
    assert det.taskname == "detection" and det.use_kps
    img = tiny_faces.squares_image((640, 640), [(64, 96, 32), (320, 320, 16), (448, 64, 64)])
    boxes, kps = det.detect(np.ascontiguousarray(img[..., ::-1]), input_size=(640, 640), det_thresh=0.5)
    got = sorted(tuple(b[:4].round().astype(int)) for b in boxes)
    assert got == [(64, 96, 96, 128), (320, 320, 336, 336)]  # the 64 px square is too big at 640
    boxes, _ = det.detect(np.ascontiguousarray(img[..., ::-1]), input_size=(320, 320), det_thresh=0.5)
    assert (448, 64, 512, 128) in [tuple(b[:4].round().astype(int)) for b in boxes]


def test_metrics_numbers():
    from likeness_blocks import metrics as M

    ref = torch.tensor([[3.0, 0, 0, 1, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0, 0, 1]])
    r = M.reference_vector(ref)
    unit = torch.nn.functional.normalize(ref, dim=-1)
    assert torch.allclose(r, torch.nn.functional.normalize(unit.mean(0), dim=0), atol=1e-6)
    emb = torch.stack([r * 3, -r, r + 0.0])
    assert torch.allclose(M.cosine_to_reference(emb, r), torch.tensor([1.0, -1.0, 1.0]), atol=1e-6)
    ifs = M.inter_frame_similarity(emb, [0, 1, 3])  # frame 2 has no face: pair (1, 3) is not consecutive
    assert ifs == [(1, pytest.approx(-1.0, abs=1e-6))]
    # a bright square moving 3 px right per frame: flow magnitude ~3 inside its box
    frames = []
    for t in range(3):
        f = np.zeros((96, 96), np.uint8)
        yy, xx = np.mgrid[:96, :96]
        f[:] = (127 + 100 * np.sin((xx - 3 * t) / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
        frames.append(f)
    fm = M.face_motion(frames, [None, np.array([30, 30, 60, 60.0]), np.array([30, 30, 60, 60.0])])
    assert [t for t, _ in fm] == [1, 2] and all(2.4 < v < 3.6 for _, v in fm)
    summary, rows = M.summarize(4, [0, 1, 3], [1.0, -1.0, 1.0], ifs, fm, [0.9, 0.8, 0.7])
    assert summary["frames_without_face"] == 1 and summary["frames_without_face_list"] == [2]
    assert summary["similarity_to_reference_mean"] == pytest.approx(1 / 3)
    table = M.table_json(summary, rows)
    assert '"frames_without_face": 1' in table
    plot = M.plot_identity(["similarity to reference"], 4, [("similarity", [(0, 1.0), (1, -1.0), (3, 1.0)])], [2],
                           face_motion_rows=fm)
    assert plot.shape == (540, 960, 3) and plot.dtype == np.uint8 and plot.std() > 5
