"""Hardening in-process (issue 16): every kind of corrupt or wrong model file gets one clear message (which file,
named inside its model folder; what is wrong; what to do; never torch's weights_only=False advice nor an absolute
path), non-finite numbers in strings are refused, mismatched inputs are caught at node time, and the loader facts:
the SAT learned position embedding is kept, SAT's numpy RNG state is read through an allow-list, FantasyID's
transformer_ema/ wins as upstream chooses."""

import pickle
import random
import struct
import types

import numpy as np
import pytest
import torch

KEYS = ("concat_id", "flame", "deca", "fantasyid", "stableanimator", "cogvideox", "vae", "insightface")
P = "model.diffusion_model."


@pytest.fixture(scope="module")
def models(pack, tmp_path_factory):
    """A models root whose folders are registered (appended) for the pack's keys, removed afterwards."""
    import folder_paths

    root = tmp_path_factory.mktemp("hardening_models")
    added = []
    for key in KEYS:
        d = root / key
        d.mkdir()
        folder_paths.folder_names_and_paths[key][0].append(str(d))
        added.append((key, str(d)))
    yield root
    for key, d in added:
        folder_paths.folder_names_and_paths[key][0].remove(d)


def L(name):
    import importlib

    return importlib.import_module(f"likeness_pack.{name}")


def _clean(msg, root):
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg, msg
    assert str(root) not in msg, msg
    assert "/tmp/" not in msg, msg


def _error(fn, root, *args, exc=ValueError, **kw):
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    msg = str(info.value)
    _clean(msg, root)
    return msg


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _state():
    return {"w": torch.arange(64, dtype=torch.float32)}


def _safetensors(path):
    from safetensors.torch import save_file

    save_file(_state(), str(path))
    return path


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# ------------------------------------------------------------------------------------------- corrupt / wrong files
def test_concat_id_loader_names_the_file_and_the_problem(models):
    load = L("loaders.concat_id").load_concat_id
    d = models / "concat_id"
    (d / "huge_header.safetensors").write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    cut = _truncate(_safetensors(d / "cut.safetensors"))
    torch.save(_state(), d / "cut_zip.pt")
    _truncate(d / "cut_zip.pt")
    torch.save(_state(), d / "cut_legacy.pt", _use_new_zipfile_serialization=False)
    _truncate(d / "cut_legacy.pt")
    (d / "empty.pt").write_bytes(b"")
    (d / "notes.pt").write_text("these are my notes, not weights\n")
    torch.save({"a": _Evil()}, d / "evil.pt")
    torch.save(_state(), d / "other_model.pt")
    torch.save(_state(), d / "zip_named.safetensors")
    cases = {
        "huge_header.safetensors": "is not a safetensors file",
        "cut.safetensors": "is truncated",
        "cut_zip.pt": "is truncated (its zip archive is incomplete)",
        "cut_legacy.pt": "is truncated",
        "empty.pt": "is empty (0 bytes)",
        "notes.pt": "is not a torch checkpoint",
        "evil.pt": "could not be loaded safely",
        "other_model.pt": "is not a Wan 2.1 state dict",
        "zip_named.safetensors": "is a torch checkpoint with a .safetensors name",
    }
    for name, problem in cases.items():
        msg = _error(load, models, str(d / name))
        assert f"'concat_id/{name}'" in msg and problem in msg, (name, msg)
        assert "Concat-ID" in msg  # what to do: which file the loader wants
    assert cut.exists()
    assert "(print)" in _error(load, models, str(d / "evil.pt"))  # what was refused, by name


def test_flame_files_name_the_file_and_the_problem(models):
    flame = L("loaders.flame")
    d = models / "flame"
    (d / "huge.safetensors").write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    (d / "garbage.npz").write_bytes(b"\x00\x01garbage that is not a zip archive" * 10)
    (d / "evil.pkl").write_bytes(pickle.dumps(_Evil(), protocol=2))
    msg = _error(flame.load_flame_layer, models, "huge.safetensors")
    assert "'flame/huge.safetensors' is not a safetensors file" in msg
    msg = _error(flame.load_flame_layer, models, "garbage.npz")
    assert "'flame/garbage.npz' is not a .npz archive" in msg and "pickled data" not in msg
    msg = _error(flame.load_flame_layer, models, "evil.pkl")
    assert "flame/evil.pkl" in msg and ("refused" in msg.lower() or "could not be loaded safely" in msg)


def test_deca_checkpoint_refusal_names_the_file(models):
    from _flame_synth import synthetic_flame_arrays

    flame = L("loaders.flame")
    arrays = synthetic_flame_arrays(seed=0, n_lat=5, n_lon=8, n_shape=100, n_exp=50)
    np.savez(models / "flame" / "small.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    torch.save({"E_flame": {"x": _Evil()}}, models / "deca" / "evil.tar")
    msg = _error(flame.load_deca_flame, models, "evil.tar", "small.npz")
    assert "Load DECA + FLAME: deca_model: 'deca/evil.tar' could not be loaded safely" in msg and "(print)" in msg
    (models / "deca" / "cut.tar").write_bytes(b"")
    torch.save({"E_flame": {"w": torch.zeros(3)}}, models / "deca" / "cut.tar")
    _truncate(models / "deca" / "cut.tar")
    assert "'deca/cut.tar' is truncated" in _error(flame.load_deca_flame, models, "cut.tar", "small.npz")
    # both names are checked before either file is read
    msg = _error(flame.load_deca_flame, models, "../deca/evil.tar", "small.npz")
    assert "deca_model: '../deca/evil.tar' is refused" in msg


def test_cogvideox_transformer_and_vae_files(models):
    cog = L("loaders.cogvideox")
    d = models / "cogvideox"
    (d / "huge.safetensors").write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    _truncate(_safetensors(d / "cut.safetensors"))
    msg = _error(cog.read_transformer, models, str(d / "huge.safetensors"))
    assert "'cogvideox/huge.safetensors' is not a safetensors file" in msg
    msg = _error(cog.read_transformer, models, str(d / "cut.safetensors"))
    assert "'cogvideox/cut.safetensors' is truncated" in msg
    pytest.importorskip("diffusers")
    msg = _error(cog.load_vae, models, str(d / "huge.safetensors"))
    assert "'cogvideox/huge.safetensors' is not a safetensors file" in msg and "VAE" in msg
    (d / "badcfg").mkdir()
    (d / "badcfg" / "config.json").write_text("{not json")
    msg = _error(cog.read_transformer, models, str(d / "badcfg"))
    assert "'cogvideox/badcfg/config.json' is not valid JSON" in msg


def test_garbage_arcface_onnx_and_unsafe_pth(models):
    pytest.importorskip("onnx")
    ins = L("loaders.insightface")
    pack_dir = models / "insightface" / "models" / "garbagepack"
    pack_dir.mkdir(parents=True)
    (pack_dir / "garbage.onnx").write_bytes(bytes(range(256)) * 8)
    msg = _error(ins.load_arcface_torch, models, "insightface/garbagepack/garbage.onnx")
    assert "insightface/models/garbagepack/garbage.onnx" in msg and "is not an ONNX model" in msg
    assert "DecodeError" not in msg
    torch.save({"a": _Evil()}, models / "insightface" / "evil_iresnet.pth")
    msg = _error(ins.load_arcface_torch, models, "insightface/evil_iresnet.pth")
    assert "'insightface/evil_iresnet.pth' could not be loaded safely" in msg


def test_eva02_and_transform_pkl_refusals_name_the_file(models):
    nodes = L("nodes.fantasyid")
    fid = L("loaders.fantasyid")
    d = models / "fantasyid"
    torch.save({"visual.x": _Evil()}, d / "evil_eva.pt")
    msg = _error(nodes.LikenessLoadEvaClip.execute, models, "evil_eva.pt", "fp32")
    assert "'fantasyid/evil_eva.pt' could not be loaded safely" in msg and "(print)" in msg
    (d / "evil_transform.pkl").write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    msg = _error(fid.mesh_data_cached, models, str(d / "evil_transform.pkl"), 2, 9)
    assert "'fantasyid/evil_transform.pkl' could not be loaded safely" in msg and "builtin__.print" in msg


def test_stableanimator_wrong_file_names_it(models):
    sa = L("loaders.stableanimator")
    (models / "stableanimator" / "empty.pth").write_bytes(b"")
    msg = _error(sa.load_file, models, str(models / "stableanimator" / "empty.pth"), "unet")
    assert "'stableanimator/empty.pth' is empty" in msg and "StableAnimator unet" in msg


def test_messages_of_other_libraries_lose_paths_and_unsafe_advice(models):
    sf = L("loaders.safe_files")
    torch.save({"a": _Evil()}, models / "concat_id" / "evil2.pt")
    with pytest.raises(Exception) as raw:
        torch.load(str(models / "concat_id" / "evil2.pt"), weights_only=True)
    assert "weights_only" in str(raw.value)  # what torch itself says ...
    cleaned = sf.clean_message(f"reading {models / 'concat_id' / 'evil2.pt'}: {raw.value}")
    _clean(cleaned, models)  # ... and what is passed on
    assert cleaned == "reading concat_id/evil2.pt: refused by the safe unpickler (print)"


# ------------------------------------------------------------------------------------------- names
def test_names_outside_the_folders_are_refused_before_touching_disk(models):
    mf = L("loaders.model_folders")
    (models / "concat_id" / "ok.pt").write_bytes(b"x")
    assert mf.resolve_file("concat_id", "ok.pt", "t") == str(models / "concat_id" / "ok.pt")
    for bad in ("../concat_id/ok.pt", "..", "./../x.pt", "a/../../x.pt", "..\\x.pt", "/etc/passwd",
                str(models / "concat_id" / "ok.pt"), "C:\\x.pt", "c:x.pt", "", ".", "a\x00.pt"):
        with pytest.raises(mf.RefusedName) as info:
            mf.resolve_file("concat_id", bad, "Some Node: some_input")
        assert "Some Node: some_input" in str(info.value)
        _clean(str(info.value), models)
    with pytest.raises(FileNotFoundError, match="is not in the concat_id model folder"):
        mf.resolve_file("concat_id", "missing.pt", "t")
    assert mf.display_path(str(models / "concat_id" / "sub" / "x.pt")) == "concat_id/sub/x.pt"
    assert mf.display_path("/somewhere/else/x.pt") == "x.pt"


# ------------------------------------------------------------------------------------------- numbers
def test_non_finite_numbers_in_strings_and_inputs_are_refused(pack):
    from likeness_pack.likeness_blocks.flame_edit import parse_coefficients
    from likeness_pack.nodes import all_nodes

    assert parse_coefficients("0: 1.5, 3: -2", 10) == {0: 1.5, 3: -2.0}
    for text in ("0: nan", "1: inf", "2: -inf", "0: 1, 1: NaN"):
        with pytest.raises(ValueError, match=r"FLAME Shape Edit: input 'shape_coefficients' entry .* not a finite"):
            parse_coefficients(text, 10, where="FLAME Shape Edit")
    edit = next(n for n in all_nodes() if n.__name__ == "LikenessFlameShapeEdit")
    flame = types.SimpleNamespace(num_vertices=5, v_template=torch.zeros(5, 3))
    deca = types.SimpleNamespace(flame=flame, n_shape=3, sliders={})
    verts = types.SimpleNamespace(vertices=torch.zeros(1, 5, 3), meta={}, shape=None)
    with pytest.raises(ValueError, match="FLAME Shape Edit: input 'face_width' is nan, not a finite number"):
        edit.execute(flame_vertices=verts, deca_flame=deca, face_width=float("nan"))
    with pytest.raises(ValueError, match="input 'shape_coefficients' entry '1: inf' is inf"):
        edit.execute(flame_vertices=verts, deca_flame=deca, shape_coefficients="0: 1, 1: inf")


# ------------------------------------------------------------------------------------------- mismatched inputs
def _face_embeds(size_hw, n_images=1):
    from likeness_pack.likeness_blocks.face_types import DetectedFace, FaceEmbeds

    faces = [DetectedFace(image_index=i, bbox=torch.tensor([4.0, 4.0, 20.0, 20.0]), kps=torch.tensor(
        [[8.0, 8.0], [16.0, 8.0], [12.0, 12.0], [9.0, 16.0], [15.0, 16.0]]), det_score=0.9,
        embedding=torch.randn(512)) for i in range(n_images)]
    return FaceEmbeds(faces=faces, image_sizes=[size_hw] * n_images, model_name="test")


def test_concat_id_reference_refuses_face_embeds_of_another_image(pack):
    from likeness_pack.nodes.concat_id import ConcatIDPrepareReference

    image = torch.rand(1, 48, 64, 3)
    out = ConcatIDPrepareReference.execute(image, _face_embeds((48, 64)), 64, 48)
    assert out.args[0].shape == (1, 48, 64, 3)
    with pytest.raises(ValueError, match=r"detected on a 80x40 image but image 0 is 64x48.*same IMAGE"):
        ConcatIDPrepareReference.execute(image, _face_embeds((40, 80)), 64, 48)
    with pytest.raises(ValueError, match=r"made from 2 image\(s\) but 'image' has 1"):
        ConcatIDPrepareReference.execute(image, _face_embeds((48, 64), n_images=2), 64, 48)


def test_hjb_face_mask_too_small_is_refused_at_node_time(pack):
    from likeness_pack.nodes.hjb import LikenessHJBFaceGuidance

    args = dict(model=None, vae=None, arcface=None, reference=_face_embeds((48, 64)), iterations=1, eta=0.1,
                strength=1.0, start_percent=0.0, end_percent=0.8, window_margin=4, frames_per_iteration=0)
    tiny = torch.ones(1, 1, 1)
    with pytest.raises(ValueError, match=r"face_mask frame 0 marks a face region of only 1x1 pixels"):
        LikenessHJBFaceGuidance.execute(face_mask=tiny, **args)
    dot = torch.zeros(2, 32, 32)
    dot[0, 4:20, 4:20] = 1
    dot[1, 7, 9] = 1  # one painted pixel in frame 1
    with pytest.raises(ValueError, match=r"face_mask frame 1 marks a face region of only 1x1"):
        LikenessHJBFaceGuidance.execute(face_mask=dot, **args)


def test_hjb_mask_count_is_one_or_one_per_frame(pack):
    from likeness_pack.adapters.sampler_hook import HJBFaceGuidance

    vae = types.SimpleNamespace(upscale_ratio=(lambda t: max(0, t * 4 - 3), 8, 8))  # Wan/CogVideoX: 4x in time
    latent = torch.zeros(1, 16, 2, 4, 4)  # 2 latent frames -> 5 output frames

    def hook(n):
        return HJBFaceGuidance(vae, None, torch.ones(512), face_boxes=torch.tensor([[0, 0, 8, 8]] * n))

    hook(1)._check_mask_count(latent)
    hook(5)._check_mask_count(latent)
    for n in (3, 6):
        with pytest.raises(ValueError, match=rf"face_mask has {n} masks but the video has 5 frames"):
            hook(n)._check_mask_count(latent)
    svd_latent = torch.zeros(4, 4, 4, 4)  # frames on the batch axis
    hook(4)._check_mask_count(svd_latent)
    with pytest.raises(ValueError, match="has 3 masks but the video has 4 frames"):
        hook(3)._check_mask_count(svd_latent)


# ------------------------------------------------------------------------------------------- loader facts
def test_sat_learned_pos_embedding_is_kept_and_unused_keys_are_reported(pack):
    sat = L("loaders.cogvideox_sat")
    pe = torch.randn(1, 10, 8)
    m = sat.map_sat_to_diffusers({
        P + "mixins.pos_embed.pos_embedding": pe,
        P + "transformer.position_embeddings.weight": torch.zeros(4, 8),
        P + "mixins.pos_embed.freqs_sin": torch.zeros(2),
        P + "mixins.something_new.weight": torch.zeros(1),
    })
    assert torch.equal(m.state_dict["patch_embed.pos_embedding"], pe)
    assert m.dropped == sorted([P + "transformer.position_embeddings.weight", P + "mixins.pos_embed.freqs_sin"])
    assert m.unmapped == [P + "mixins.something_new.weight"]
    report = m.report()
    assert "transformer.position_embeddings.weight" in report and "mixins.something_new.weight" in report


def test_sat_checkpoint_with_numpy_rng_state_loads_safely(models):
    sat = L("loaders.cogvideox_sat")
    module = {P + "mixins.patch_embed.proj.weight": torch.randn(8, 4, 2, 2)}
    rng = np.random.RandomState(3)
    ckpt = {"module": module, "np_rng_state": rng.get_state(), "random_rng_state": random.Random(1).getstate(),
            "torch_rng_state": torch.get_rng_state(), "iteration": 1000}
    path = models / "concat_id" / "mp_rank_00_model_states.pt"
    torch.save(ckpt, path)
    with pytest.raises(Exception):  # plain weights_only refuses numpy's RNG state ...
        torch.load(str(path), weights_only=True)
    sd = sat.read_sat_checkpoint(str(path))  # ... the loader reads it through its allow-list
    assert list(sd) == list(module) and torch.equal(sd[list(module)[0]], module[list(module)[0]])
    # the allow-list is exactly the RNG state: other numpy objects and code stay refused
    torch.save({"module": module, "stat": np.float64(1.5)}, models / "concat_id" / "np_scalar.pt")
    msg = _error(sat.read_sat_checkpoint, models, str(models / "concat_id" / "np_scalar.pt"))
    assert "could not be loaded safely" in msg and "concat_id/np_scalar.pt" in msg
    torch.save({"module": module, "np_rng_state": rng.get_state(), "x": _Evil()}, models / "concat_id" / "evil_sat.pt")
    msg = _error(sat.read_sat_checkpoint, models, str(models / "concat_id" / "evil_sat.pt"))
    assert "could not be loaded safely" in msg and "(print)" in msg


def test_fantasyid_transformer_ema_wins_when_present(models):
    from safetensors.torch import save_file

    fid = L("loaders.fantasyid")
    cog = L("loaders.cogvideox")
    rel = models / "fantasyid" / "release"
    for sub, value in (("transformer", 1.0), ("transformer_ema", 2.0)):
        (rel / sub).mkdir(parents=True)
        (rel / sub / "config.json").write_text("{}")
        save_file({"face_abstractor.latents": torch.full((1, 2, 4), value), "proj_out.weight": torch.zeros(1)},
                  str(rel / sub / "diffusion_pytorch_model.safetensors"))
    sd = fid.read_face_state_dict(str(rel))
    assert list(sd) == ["face_abstractor.latents"] and float(sd["face_abstractor.latents"][0, 0, 0]) == 2.0
    assert cog._resolve_transformer_dir(str(rel)).endswith("transformer_ema")
    import shutil

    shutil.rmtree(rel / "transformer_ema")
    assert float(fid.read_face_state_dict(str(rel))["face_abstractor.latents"][0, 0, 0]) == 1.0
    assert cog._resolve_transformer_dir(str(rel)).endswith("transformer")
