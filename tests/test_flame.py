"""FLAME / DECA pure-torch blocks: safe FLAME pickle reading, LBS parity, DECA encoder, crops,
sliders, renderer, .ply. Everything is synthetic: random numbers in the real file structures."""

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from _flame_synth import flame_pickle_bytes, save_synthetic_deca_tar, save_synthetic_flame_pkl, synthetic_flame_arrays
from likeness_blocks.deca import DecaEncoder, crop_square, deca_box_square, resize_whole, split_params
from likeness_blocks.flame import FlameLayer, axis_angle_to_matrix
from likeness_blocks.flame_edit import derive_sliders, measure, parse_coefficients
from likeness_blocks.flame_file import convert_flame_file, read_flame_file, read_flame_pickle
from likeness_blocks.mesh_render import render_mesh
from likeness_blocks.ply import read_ply, write_ply


@pytest.fixture(scope="module")
def flame_pkl(tmp_path_factory):
    path = tmp_path_factory.mktemp("flame") / "generic_model.pkl"
    arrays = save_synthetic_flame_pkl(path)
    return path, arrays


# ---------------------------------------------------------------- independent numpy LBS reference


def _np_rotation(aa):
    """Matrix exponential of the skew matrix by power series (independent of Rodrigues' closed form)."""
    k = np.array([[0, -aa[2], aa[1]], [aa[2], 0, -aa[0]], [-aa[1], aa[0], 0]], dtype=np.float64)
    out, term = np.eye(3), np.eye(3)
    for n in range(1, 40):
        term = term @ k / n
        out = out + term
    return out


def _np_flame(arr, shape, expr, pose6, neck=np.zeros(3), eyes=np.zeros(6)):
    v_t = arr["v_template"].astype(np.float64)
    sd = arr["shapedirs"].astype(np.float64)
    betas = np.zeros(sd.shape[2])
    betas[: len(shape)] = shape
    betas[300 : 300 + len(expr)] = expr
    v_shaped = v_t + np.tensordot(sd, betas, axes=([2], [0]))
    jnt = arr["J_regressor"] @ v_shaped
    full = np.concatenate([pose6[:3], neck, pose6[3:], eyes]).reshape(5, 3)
    rots = [_np_rotation(a) for a in full]
    feat = np.concatenate([(rots[j] - np.eye(3)).ravel() for j in range(1, 5)])
    v_posed = v_shaped + np.tensordot(arr["posedirs"], feat, axes=([2], [0]))
    parents = [-1] + [int(p) for p in arr["kintree_table"][0][1:]]
    world = []
    for j in range(5):
        local = np.eye(4)
        local[:3, :3] = rots[j]
        local[:3, 3] = jnt[j] - (jnt[parents[j]] if parents[j] >= 0 else 0)
        world.append(local if parents[j] < 0 else world[parents[j]] @ local)
    out = np.zeros_like(v_posed)
    for i in range(len(v_posed)):
        m = np.zeros((4, 4))
        for j in range(5):
            unbind = np.eye(4)
            unbind[:3, 3] = -jnt[j]
            m += arr["weights"][i, j] * (world[j] @ unbind)
        out[i] = (m @ np.append(v_posed[i], 1.0))[:3]
    return out


# ---------------------------------------------------------------- FLAME pickle


def test_pickle_reads_without_chumpy_or_scipy(flame_pkl):
    path, arrays = flame_pkl
    assert "chumpy" not in sys.modules
    mods_before = set(sys.modules)
    got = read_flame_pickle(str(path))
    assert not any(m.startswith("chumpy") for m in set(sys.modules) - mods_before)
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "f", "kintree_table"):
        np.testing.assert_array_equal(np.asarray(got[key], np.float64), np.asarray(arrays[key], np.float64), err_msg=key)
    assert "bs_style" not in got  # string tags are dropped


def test_pickle_uses_python2_names(flame_pkl):
    raw = open(flame_pkl[0], "rb").read()
    for name in (b"chumpy.ch\nCh", b"scipy.sparse.csc\ncsc_matrix", b"numpy.core.multiarray\n_reconstruct", b"__builtin__\nset"):
        assert name in raw


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("variant", ["os_system", "eval", "reconstructor_on_foreign_class", "codec"])
def test_malicious_pickle_refused(tmp_path, variant):
    marker = tmp_path / "pwned"
    path = tmp_path / "generic_model.pkl"
    if variant == "os_system":
        payload = pickle.dumps({"v_template": _Evil(f"touch {marker}")}, protocol=2)
    elif variant == "eval":
        payload = (b"\x80\x02cbuiltins\neval\nX" + len(f"open('{marker}','w')").to_bytes(4, "little")
                   + f"open('{marker}','w')".encode() + b"\x85R.")
    elif variant == "reconstructor_on_foreign_class":
        # copy_reg._reconstructor is allowed, but only for our placeholders: try to build a chumpy placeholder
        # on top of a forbidden base -> the base lookup itself is refused
        payload = b"\x80\x02ccopy_reg\n_reconstructor\ncchumpy.ch\nCh\ncsubprocess\nPopen\nN\x87R."
    else:
        payload = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R."
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="(?i)refused"):
        read_flame_pickle(str(path))
    assert not marker.exists()


def test_not_a_flame_dict(tmp_path):
    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps({"v_template": np.zeros((3, 3))}, protocol=2))
    with pytest.raises(ValueError, match="lacks the FLAME entries"):
        read_flame_pickle(str(p))


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_conversion_roundtrip(flame_pkl, tmp_path, ext):
    if ext == ".safetensors":
        pytest.importorskip("safetensors")
    path, arrays = flame_pkl
    dst = convert_flame_file(str(path), str(tmp_path / f"flame{ext}"))
    got = read_flame_file(dst)
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        np.testing.assert_allclose(got[key], arrays[key], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(got["f"], arrays["f"].astype(np.int64))
    a = FlameLayer(read_flame_file(str(path)))
    b = FlameLayer(got)
    torch.testing.assert_close(a.v_template, b.v_template)


# ---------------------------------------------------------------- FLAME layer


def test_zero_params_give_template(flame_pkl):
    path, arrays = flame_pkl
    flame = FlameLayer(read_flame_pickle(str(path)))
    v = flame(shape=torch.zeros(2, 100), expression=torch.zeros(2, 50), pose=torch.zeros(2, 6))
    assert v.shape == (2, len(arrays["v_template"]), 3)
    torch.testing.assert_close(v[0], torch.tensor(arrays["v_template"], dtype=torch.float32), atol=1e-7, rtol=0)
    torch.testing.assert_close(flame(), v[:1])


def test_flame_forward_matches_numpy_lbs(flame_pkl):
    path, arrays = flame_pkl
    flame = FlameLayer(read_flame_pickle(str(path)))
    rng = np.random.default_rng(3)
    shape = rng.normal(0, 2, (2, 100))
    expr = rng.normal(0, 2, (2, 50))
    pose = rng.normal(0, 0.4, (2, 6))
    neck = rng.normal(0, 0.3, (2, 3))
    eyes = rng.normal(0, 0.3, (2, 6))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = flame(shape=t(shape), expression=t(expr), pose=t(pose), neck_pose=t(neck), eye_pose=t(eyes)).double().numpy()
    for b in range(2):
        ref = _np_flame(arrays, shape[b], expr[b], pose[b], neck[b], eyes[b])
        assert np.abs(got[b] - ref).max() <= 1e-5
        assert np.abs(ref - arrays["v_template"]).max() > 1e-3  # the pose really moved the mesh


def test_rodrigues_identity_and_orthogonal():
    assert torch.equal(axis_angle_to_matrix(torch.zeros(4, 3)), torch.eye(3).expand(4, 3, 3))
    r = axis_angle_to_matrix(torch.randn(8, 3))
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3).expand(8, 3, 3), atol=1e-5, rtol=0)


def test_flame_rejects_bad_arrays(flame_pkl):
    arrays = dict(read_flame_pickle(str(flame_pkl[0])))
    arrays["weights"] = arrays["weights"][:, :4]
    with pytest.raises(ValueError, match="disagree"):
        FlameLayer(arrays)
    del arrays["posedirs"]
    with pytest.raises(ValueError, match="missing"):
        FlameLayer(arrays)


# ---------------------------------------------------------------- DECA encoder


def _np_bn(x, sd, p):
    return ((x - sd[p + ".running_mean"][:, None, None]) / np.sqrt(sd[p + ".running_var"][:, None, None] + 1e-5)
            * sd[p + ".weight"][:, None, None] + sd[p + ".bias"][:, None, None])


def _np_conv(x, w, stride=1, pad=0):
    c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    cols = np.empty((c, kh, kw, ho, wo))
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride]
    return np.tensordot(w, cols, axes=([1, 2, 3], [0, 1, 2]))


def _np_deca(sd, img, blocks):
    sd = {k: v.double().numpy() for k, v in sd.items()}
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    x = relu(_np_bn(_np_conv(img, sd["encoder.conv1.weight"], 2, 3), sd, "encoder.bn1"))
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    ho = (x.shape[1] - 1) // 2 + 1
    x = np.max([xp[:, i : i + 2 * ho : 2, j : j + 2 * ho : 2] for i in range(3) for j in range(3)], axis=0)
    for li, n in enumerate(blocks):
        for b in range(n):
            p = f"encoder.layer{li + 1}.{b}"
            stride = 2 if (li > 0 and b == 0) else 1
            y = relu(_np_bn(_np_conv(x, sd[p + ".conv1.weight"]), sd, p + ".bn1"))
            y = relu(_np_bn(_np_conv(y, sd[p + ".conv2.weight"], stride, 1), sd, p + ".bn2"))
            y = _np_bn(_np_conv(y, sd[p + ".conv3.weight"]), sd, p + ".bn3")
            skip = x if (p + ".downsample.0.weight") not in sd else _np_bn(
                _np_conv(x, sd[p + ".downsample.0.weight"], stride), sd, p + ".downsample.1")
            x = relu(y + skip)
    f = x.mean(axis=(1, 2))
    h = relu(sd["layers.0.weight"] @ f + sd["layers.0.bias"])
    return sd["layers.2.weight"] @ h + sd["layers.2.bias"]


def test_deca_encoder_matches_numpy_reference(tmp_path):
    from likeness_blocks.deca import load_deca_encoder

    blocks = (1, 2, 1, 1)
    path = tmp_path / "deca_model.tar"
    sd = save_synthetic_deca_tar(path, blocks=blocks, base_width=4, hidden=32)
    enc = load_deca_encoder(str(path))
    img = torch.rand(1, 3, 224, 224)
    got = enc(img)[0].double().numpy()
    ref = _np_deca(sd, img[0].double().numpy(), blocks)
    assert got.shape == (236,)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    codes = split_params(enc(img))
    assert [codes[k].shape[-1] for k in ("shape", "tex", "exp", "pose", "cam")] == [100, 50, 50, 6, 3]
    assert codes["light"].shape == (1, 9, 3)


def test_batchnorm_folding_keeps_outputs(tmp_path, flame_pkl):
    from likeness_blocks.deca import DecaFlame, load_deca_encoder

    path = tmp_path / "deca_model.tar"
    save_synthetic_deca_tar(path, blocks=(1, 2, 1, 1), base_width=8, hidden=32)
    img = torch.rand(2, 3, 224, 224)
    ref = load_deca_encoder(str(path))(img)
    flame = FlameLayer(flame_pkl[1])
    folded = DecaFlame(load_deca_encoder(str(path)), flame)
    assert not any("bn" in k for k in folded.encoder.state_dict())
    codes = folded.encode(img)
    torch.testing.assert_close(torch.cat([codes[k].flatten(1) for k in ("shape", "tex", "exp", "pose", "cam", "light")], 1),
                               ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("legacy", [False, True])
def test_deca_tar_formats_and_real_key_names(tmp_path, legacy):
    from likeness_blocks.deca import load_deca_encoder

    path = tmp_path / "deca_model.tar"
    sd = save_synthetic_deca_tar(path, legacy=legacy, blocks=(3, 4, 6, 3), base_width=4, hidden=16)
    for key in ("encoder.conv1.weight", "encoder.layer1.0.downsample.0.weight", "encoder.layer4.2.bn3.running_var",
                "layers.0.weight", "layers.2.bias"):
        assert key in sd
    enc = load_deca_encoder(str(path))
    assert isinstance(enc, DecaEncoder)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_deca_tar_refuses_code_and_bad_keys(tmp_path):
    from likeness_blocks.deca import load_deca_encoder

    evil = tmp_path / "deca_model.tar"
    torch.save({"E_flame": {"x": _Evil("true")}}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        load_deca_encoder(str(evil))
    bad = tmp_path / "other.tar"
    torch.save({"E_detail": {"a": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="E_flame"):
        load_deca_encoder(str(bad))


# ---------------------------------------------------------------- crops


def test_deca_box_square_and_crop():
    cx, cy, size = deca_box_square((100, 50, 200, 170), "bbox")
    assert (cx, cy) == (150.0, 110.0 + 110 * 0.12) and size == float(int(110 * 1.25))
    cx2, cy2, size2 = deca_box_square((100, 50, 200, 170), "kpt68")
    assert (cx2, cy2) == (150.0, 110.0) and size2 == float(int(110 * 1.1 * 1.25))
    img = torch.zeros(3, 300, 400)
    img[:, 100:120, 140:160] = 1.0  # a white square at the crop centre
    out = crop_square(img, 150.5, 110.5, 223.0)
    assert out.shape == (3, 224, 224)
    # the crop maps pixel (cx - size/2 + u) -> u exactly (scale 1 here)
    torch.testing.assert_close(out[:, 101:121, 101:121], torch.ones(3, 20, 20))
    assert out[:, 100, 101:121].abs().sum() == 0 and out[:, 121, 101:121].abs().sum() == 0
    assert out[:, :50].abs().sum() == 0
    whole = resize_whole(torch.rand(2, 3, 300, 400))
    assert whole.shape == (2, 3, 224, 224)


# ---------------------------------------------------------------- sliders, renderer, ply


def test_sliders_move_their_measurement(flame_pkl):
    flame = FlameLayer(read_flame_pickle(str(flame_pkl[0])))
    sliders = derive_sliders(flame, 100)
    assert {"face_width", "jaw_sharpness", "face_length"} <= set(sliders)
    base = flame(shape=torch.zeros(1, 100))
    for name, s in sliders.items():
        d = s["direction"]
        assert d.shape == (100,) and abs(float(d.norm()) - 1) < 1e-5
        moved = flame(shape=2.0 * d[None])
        m0 = measure(flame.v_template, base)[name]
        m1 = measure(flame.v_template, moved)[name]
        assert float(m1 - m0) == pytest.approx(2.0 * s["gain"], rel=1e-3)
        assert s["gain"] > 0
    names = list(sliders)
    for i in range(len(names)):
        for j in range(i):
            assert abs(float(sliders[names[i]]["direction"] @ sliders[names[j]]["direction"])) < 1e-5


def test_sliders_find_structured_components():
    """A basis with one pure x-scaling and one pure y-scaling component among noise: face_width must pick
    the first, face_length the second."""
    arrays = synthetic_flame_arrays(seed=5)
    sd = arrays["shapedirs"] * 0.02
    t = arrays["v_template"]
    sd[:, 0, 5] = 0.05 * t[:, 0]
    sd[:, 1, 7] = 0.05 * t[:, 1]
    arrays["shapedirs"] = sd
    sliders = derive_sliders(FlameLayer(arrays), 100)
    assert abs(float(sliders["face_width"]["direction"][5])) > 0.9
    assert abs(float(sliders["face_length"]["direction"][7])) > 0.9
    assert float(sliders["face_width"]["direction"][5]) > 0  # positive = wider


def test_parse_coefficients():
    assert parse_coefficients("0: 1.5, 3=-2; 0:0.5", 100) == {0: 2.0, 3: -2.0}
    assert parse_coefficients("  ", 100) == {}
    with pytest.raises(ValueError, match="outside"):
        parse_coefficients("100: 1", 100)
    with pytest.raises(ValueError, match="index: value"):
        parse_coefficients("abc", 100)


def test_renderer_zbuffer_and_shading():
    # two parallel squares facing the camera: the nearer (z=+1, red via depth) must hide the farther
    quad = lambda z, s: torch.tensor([[-s, -s, z], [s, -s, z], [s, s, z], [-s, s, z]], dtype=torch.float32)  # noqa: E731
    verts = torch.cat([quad(-1.0, 1.0), quad(1.0, 0.5)])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    img = render_mesh(verts, faces, 64, 64, background=(0, 0, 0))
    assert img.shape == (64, 64, 3)
    centre, corner_of_big, outside = img[32, 32], img[8, 8], img[0, 0]
    assert torch.all(centre > 0) and torch.all(corner_of_big > 0) and torch.all(outside == 0)
    # turn the scene by 180 degrees: now the big square is in front and covers everything
    back = render_mesh(verts, faces, 64, 64, yaw=180, background=(0, 0, 0))
    assert (back.sum(-1) > 0).float().mean() > 0.6
    pts = render_mesh(verts, None, 64, 64, background=(0, 0, 0))
    assert (pts.sum(-1) > 0).any()


def test_renderer_flame_head(flame_pkl):
    arrays = flame_pkl[1]
    flame = FlameLayer(read_flame_pickle(str(flame_pkl[0])))
    img = render_mesh(flame()[0], flame.faces, 96, 96)
    covered = (img - img[0, 0]).abs().sum(-1) > 1e-4
    assert 0.2 < covered.float().mean() < 0.9
    assert len(arrays["f"]) == flame.faces.shape[0]


@pytest.mark.parametrize("with_faces", [False, True])
def test_ply_roundtrip(tmp_path, with_faces):
    v = np.random.default_rng(0).normal(size=(5023, 3))
    f = np.random.default_rng(1).integers(0, 5023, (20, 3)) if with_faces else None
    write_ply(tmp_path / "a.ply", v, f)
    raw = (tmp_path / "a.ply").read_bytes()
    assert b"format binary_little_endian 1.0" in raw and b"property double x" in raw
    got_v, got_f = read_ply(tmp_path / "a.ply")
    np.testing.assert_allclose(got_v, v.astype(np.float32))
    if with_faces:
        np.testing.assert_array_equal(got_f, f)
    else:
        assert got_f is None


def test_ply_ascii_with_extra_properties(tmp_path):
    p = tmp_path / "b.ply"
    p.write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
                 "property uchar red\nelement face 1\nproperty list uchar int vertex_indices\nend_header\n"
                 "0 0 0 255\n1 0 0 0\n0 1 0 9\n3 0 1 2\n")
    v, f = read_ply(p)
    np.testing.assert_array_equal(v, [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(f, [[0, 1, 2]])
    with pytest.raises(ValueError, match="not a .ply"):
        (tmp_path / "c.ply").write_text("hello")
        read_ply(tmp_path / "c.ply")


# ---------------------------------------------------------------- node helpers (in-process pack)


def test_standard_crop_from_face_embeds(pack):
    import importlib

    from likeness_blocks.face_types import DetectedFace, FaceEmbeds

    geo = importlib.import_module("likeness_pack.nodes.geometry")
    image = torch.rand(2, 120, 160, 3)
    small = DetectedFace(0, torch.tensor([10.0, 10, 30, 30]), torch.zeros(5, 2), 0.9, torch.zeros(512))
    big = DetectedFace(0, torch.tensor([40.0, 20, 100, 100]), torch.zeros(5, 2), 0.9, torch.zeros(512))
    other = DetectedFace(1, torch.tensor([50.0, 30, 90, 80]), torch.zeros(5, 2), 0.9, torch.zeros(512))
    fe = FaceEmbeds(faces=[small, big, other], image_sizes=[(120, 160), (120, 160)])
    out = geo.deca_inputs(image, geo.CROP_BOX, fe)
    assert out.shape == (2, 3, 224, 224)
    chw = image.permute(0, 3, 1, 2)
    torch.testing.assert_close(out[0], crop_square(chw[0], *deca_box_square((40, 20, 100, 100))).clamp(0, 1))  # largest face
    torch.testing.assert_close(out[1], crop_square(chw[1], *deca_box_square((50, 30, 90, 80))).clamp(0, 1))
    with pytest.raises(ValueError, match="no face for image 1"):
        geo.deca_inputs(image, geo.CROP_BOX, FaceEmbeds(faces=[big], image_sizes=[(120, 160), (120, 160)]))
    with pytest.raises(ValueError, match="connect the same IMAGE"):
        geo.deca_inputs(image, geo.CROP_BOX, FaceEmbeds(faces=[big, other], image_sizes=[(100, 100), (100, 100)]))
    with pytest.raises(ValueError, match="needs face_embeds"):
        geo.deca_inputs(image, geo.CROP_BOX, None)
    torch.testing.assert_close(geo.deca_inputs(image, geo.CROP_FANTASYID), resize_whole(chw))
