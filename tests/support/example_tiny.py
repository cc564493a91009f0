"""Every example workflow (example_workflows/api/<stem>.json) mapped to tiny files by file name, for the API
test (tests/test_example_workflows.py) and the browser test (tests/test_browser.py).

`tiny_example(server, stem, prefix=None)` writes the tiny files that workflow needs into the running test
server's folders (once per server: the writers are memoised on the server object) and returns a
`TinyExample`: the shipped prompt with the model files, image/video inputs, sizes, frame counts and steps
replaced by tiny ones, plus the id of the output node to check and the number of frames its file must hold.
Only what cannot be tiny is swapped for a test-only node (the text encoders -> LikenessTestTextConditioning,
SVD-xt -> LikenessTestTinySVD, CLIP vision -> LikenessTestClipVisionOutput); the graph is the shipped one.

The file writers (`geometry_files`, `fantasyid_files`, `stableanimator_files`, `face_pack`) are also what the
server test modules' fixtures use.
"""

import json
import pickle
from dataclasses import dataclass

from .paths import REPO

API = REPO / "example_workflows" / "api"
FACE_PACK = "tiny_demo"  # the pack scripts/demo.py writes for its tiny run; the same detector/recogniser everywhere
FLAME_NAME = "tiny_flame.pkl"
DECA_NAME = "tiny_deca_model.tar"
SA_DIR = "tiny_sa/"
COG = "tiny_fantasyid_i2v"
EVA = "tiny_eva02_clip.pt"
TRANSFORM = "tiny_transform.pkl"
TINY_I2V = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, out_channels=16, time_embed_dim=32,
                text_embed_dim=64, num_layers=2, sample_width=16, sample_height=12, sample_frames=9, patch_size=2,
                max_text_seq_length=8, use_rotary_positional_embeddings=True)


@dataclass
class TinyExample:
    prompt: dict
    output: str  # node whose file is checked
    frames: int | None  # frames of the animated WEBP it writes; None: a still image


def _once(server, key, make):
    memo = server.__dict__.setdefault("_likeness_tiny_files", {})
    if key not in memo:
        memo[key] = make()
    return memo[key]


def api_prompt(stem):
    return json.loads((API / f"{stem}.json").read_text())


def _demo():
    import sys

    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    import demo

    return demo


# --- file writers ---------------------------------------------------------------------------------------
def face_pack(server):
    """The tiny square-face InsightFace pack (models/insightface/models/tiny_demo/{det,rec}_tiny.onnx)."""
    from . import tiny_faces

    return _once(server, "face_pack", lambda: tiny_faces.make_tiny_pack(server.models_dir, FACE_PACK, seed=1)[0])


def square_face_image(server, name, size_hw, squares):
    """input/<name>: black image with white squares (faces for the tiny detector)."""
    from PIL import Image

    from . import tiny_faces

    def make():
        Image.fromarray(tiny_faces.squares_image(size_hw, squares)).save(server.input_dir / name)
        return name

    return _once(server, ("image", name), make)


def square_face_video(server, name, size_hw=(320, 320), frames=4, side=32):
    """input/<name>: an MPEG-4 video (PyAV) of a white square face moving 32 px right per frame."""
    import av

    from . import tiny_faces

    def make():
        with av.open(str(server.input_dir / name), "w") as out:
            st = out.add_stream("mpeg4", rate=8)
            st.width, st.height, st.pix_fmt = size_hw[1], size_hw[0], "yuv420p"
            st.options = {"qscale": "1"}
            for t in range(frames):
                img = tiny_faces.squares_image(size_hw, [(96 + 32 * t, 96, side)])
                for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
            for packet in st.encode():
                out.mux(packet)
        return name

    return _once(server, ("video", name), make)


def geometry_files(server):
    """Synthetic FLAME (models/flame/tiny_flame.pkl), tiny DECA (models/deca/tiny_deca_model.tar) and a
    textured input/flame_face.png; returns (FLAME arrays, DECA state dict, image array)."""

    def make():
        import numpy as np
        from PIL import Image

        from _flame_synth import save_synthetic_deca_tar, save_synthetic_flame_pkl

        (server.models_dir / "flame").mkdir(parents=True, exist_ok=True)
        (server.models_dir / "deca").mkdir(parents=True, exist_ok=True)
        arrays = save_synthetic_flame_pkl(server.models_dir / "flame" / FLAME_NAME)  # 5023 vertices, 9720 faces
        sd = save_synthetic_deca_tar(server.models_dir / "deca" / DECA_NAME, blocks=(1, 1, 1, 1), base_width=8, hidden=64)
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:96, 0:80]
        img = np.stack([xx * 3, yy * 2, (xx + yy)], -1) % 256 + rng.integers(0, 20, (96, 80, 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(server.input_dir / "flame_face.png")
        return arrays, sd, img

    return _once(server, "geometry", make)


def fantasyid_files(server):
    """Tiny CogVideoX-I2V transformer with FantasyID face modules in its file (diffusion_models/tiny_fantasyid_i2v/
    transformer/), tiny CogVideoX VAE (vae/tiny_fid_vae/), fantasyid/tiny_transform.pkl over the synthetic FLAME mesh,
    fantasyid/tiny_eva02_clip.pt; returns the face-module state dict."""

    def make():
        import numpy as np
        import torch
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
        from safetensors.torch import load_file, save_file

        from _fantasyid_synth import eva_clip_state_dict, face_module_state_dict, tiny_eva, transform_dict

        arrays = geometry_files(server)[0]
        m = server.models_dir
        d = m / "diffusion_models" / COG / "transformer"
        torch.manual_seed(21)
        tr = CogVideoXTransformer3DModel(**TINY_I2V).eval()
        with torch.no_grad():
            for p in tr.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        tr.save_pretrained(d)
        f = d / "diffusion_pytorch_model.safetensors"
        face = face_module_state_dict(inner_dim=32, n_layers=2, seed=3)
        save_file({**load_file(str(f)), **face}, str(f))  # FantasyID keeps its face modules in the transformer file
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(cross_attn_interval=1, face_dim=64)
        (d / "config.json").write_text(json.dumps(cfg))
        if not (m / "vae" / "tiny_fid_vae" / "config.json").exists():
            torch.manual_seed(22)
            AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                   latent_channels=16, scaling_factor=0.7).eval().save_pretrained(m / "vae" / "tiny_fid_vae")
        fd = m / "fantasyid"
        fd.mkdir(exist_ok=True)
        (fd / TRANSFORM).write_bytes(pickle.dumps(transform_dict(arrays["v_template"], arrays["f"].astype(np.int64))))
        torch.save(eva_clip_state_dict(tiny_eva(5)), fd / EVA)
        return face

    return _once(server, "fantasyid", make)


def stableanimator_files(server):
    """models/stableanimator/tiny_sa/{unet,face_encoder,pose_net}.pth; returns the folder prefix 'tiny_sa/'."""
    from .tiny_stableanimator import save_tiny_stableanimator

    def make():
        save_tiny_stableanimator(server.models_dir / "stableanimator" / SA_DIR.rstrip("/"))
        return SA_DIR

    return _once(server, "stableanimator", make)


def concat_id_files(server):
    """What `make demo` writes for its tiny run (scripts/demo.py make_tiny_models): concat_id/tiny_concat_id_adaln.pt,
    the tiny_demo face pack, input/tiny_square_face.png."""

    def make():
        _demo().make_tiny_models(server.base_dir)
        return True

    return _once(server, "concat_id", make)


# --- the examples on tiny files ---------------------------------------------------------------------------
def _text_conditioning(seed, width):
    return {"class_type": "LikenessTestTextConditioning", "inputs": {"seed": seed, "tokens": 8, "width": width}}


def wan21_t2v_skeleton(server):
    p = api_prompt("wan21_t2v_skeleton")
    p["1"]["inputs"]["unet_name"] = "tiny_wan_t2v.safetensors"  # written by conftest's tiny_model_files
    p["8"]["inputs"]["vae_name"] = "tiny_wan_vae.safetensors"
    del p["2"]
    p["3"], p["4"] = _text_conditioning(1, 4096), _text_conditioning(2, 4096)
    p["6"]["inputs"].update(width=64, height=64, length=5)
    p["7"]["inputs"].update(steps=2, sampler_name="euler")
    return TinyExample(p, "10", 5)


def concat_id_wan(server, stem="concat_id_wan"):
    """The tiny version of `make demo` (scripts/demo.py tiny_version), 5 frames, 2 steps."""
    concat_id_files(server)
    p = _demo().tiny_version(api_prompt(stem))
    p["13"]["inputs"]["length"] = 5
    p["14"]["inputs"]["steps"] = 2
    return TinyExample(p, "16", 5)


def concat_id_wan_hjb(server):
    ex = concat_id_wan(server, "concat_id_wan_hjb")
    p = ex.prompt
    p["16"]["inputs"]["filename_prefix"] = "likeness/tiny_concat_id_wan_hjb"
    p["18"]["inputs"]["source"] = f"insightface/{FACE_PACK}/rec_tiny.onnx"
    p["19"]["inputs"].update(iterations=1, end_percent=0.5)  # one active step of the two
    for n in ("11", "13"):
        p[n]["inputs"].update(width=64, height=64)
    return ex


def concat_id_wan_long(server):
    """161 frames in windows of 81 overlapping 16 -> 13 frames (4 latent) in windows of 9 (3 latent) overlapping 4
    (1 latent): two windows, both with the reference; Identity Metrics on the decoded video."""
    ex = concat_id_wan(server, "concat_id_wan_long")
    p = ex.prompt
    p["13"]["inputs"]["length"] = 13
    p["18"]["inputs"].update(context_length=9, context_overlap=4)
    p["19"]["inputs"].update(det_size=320)
    p["16"]["inputs"]["filename_prefix"] = "likeness/tiny_concat_id_wan_long"
    return TinyExample(p, "16", 13)


def stableanimator_svd_pose_identity(server):
    """Real StableAnimator files (tiny); SVD-xt, its CLIP vision and the face embeddings are test stand-ins
    (tiny SVD, random CLIP vision output and face embeddings); 5 flat pose frames in tiles of 3."""
    sa = stableanimator_files(server)
    p = api_prompt("stableanimator_svd_pose_identity")
    p["1"] = {"class_type": "LikenessTestTinySVD", "inputs": {"seed": 0}}
    for k in ("unet", "face_encoder", "pose_net"):
        p["2"]["inputs"][k] = sa + p["2"]["inputs"][k]
    p["3"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}}
    p.pop("4")
    p["5"] = {"class_type": "LikenessTestFaceEmbeds", "inputs": {"seed": 0, "faces": 1}}
    p["6"] = {"class_type": "LikenessTestClipVisionOutput", "inputs": {"seed": 0}}
    p.pop("9")
    p["10"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 5, "color": 0xFFFFFF}}
    p["12"]["inputs"].update(tile_size=3, tile_overlap=1)
    p["14"] = {"class_type": "LikenessTestSVDConditioning", "inputs": {
        "vae": ["1", 1], "init_image": ["3", 0], "width": 64, "height": 64, "video_frames": 5, "seed": 0}}
    p["15"]["inputs"]["steps"] = 1
    p["16"]["inputs"]["vae"] = ["1", 1]
    return TinyExample(p, "17", 5)


def fantasyid_face_geometry(server):
    geometry_files(server)
    p = api_prompt("fantasyid_face_geometry")
    p["1"]["inputs"]["image"] = "flame_face.png"
    p["2"]["inputs"].update(deca_model=DECA_NAME, flame_model=FLAME_NAME)
    for node in ("5", "7"):
        p[node]["inputs"].update(width=96, height=96)
    return TinyExample(p, "8", None)


def fantasyid_cogvideox_i2v(server):
    """Tiny InsightFace pack, DECA, FLAME, CogVideoX + FantasyID, EVA02; the T5 text encoder is swapped for the
    test conditioning node. 5 frames at 64x48, 2 steps."""
    fantasyid_files(server)
    face_pack(server)
    square_face_image(server, "fid_square.png", (640, 640), [(384, 96, 32)])
    p = api_prompt("fantasyid_cogvideox_i2v")
    p["1"]["inputs"]["image"] = "fid_square.png"
    p["2"]["inputs"].update(model_name=FACE_PACK, provider="CPU")
    p["4"]["inputs"].update(deca_model=DECA_NAME, flame_model=FLAME_NAME)
    p["6"]["inputs"]["jaw_sharpness"] = 1.0
    p["10"]["inputs"].update(model_name=f"{COG}/", weight_dtype="fp32")
    p["11"]["inputs"].update(transform=TRANSFORM, dtype="fp32")
    p["12"]["inputs"]["eva_clip"] = EVA
    p.pop("20")
    p["21"], p["22"] = _text_conditioning(1, 64), _text_conditioning(2, 64)
    p["23"]["inputs"].update(vae_name="tiny_fid_vae/", diffusers_tiling=False)
    p["24"]["inputs"].update(width=64, height=48, length=5)
    p["25"]["inputs"]["steps"] = 2
    p["28"]["inputs"].update(width=64, height=64)
    return TinyExample(p, "27", 5)


def likeness_face_identity_metrics(server):
    """The reference photo and generated.mp4 show the tiny detector's square face (the video: moving, 4 frames)."""
    face_pack(server)
    square_face_image(server, "tiny_reference_face.png", (320, 320), [(96, 96, 32)])
    square_face_video(server, "tiny_generated.mp4")
    p = api_prompt("likeness_face_identity_metrics")
    p["2"]["inputs"].update(model_name=FACE_PACK, provider="CPU")
    p["3"]["inputs"]["image"] = "tiny_reference_face.png"
    p["4"]["inputs"].update(det_size=320, crop_size=224)
    p["6"]["inputs"]["file"] = "tiny_generated.mp4"
    p["8"]["inputs"].update(det_size=320)
    return TinyExample(p, "9", None)


MAPPERS = {f.__name__: f for f in (
    wan21_t2v_skeleton, concat_id_wan, concat_id_wan_hjb, concat_id_wan_long, stableanimator_svd_pose_identity,
    fantasyid_face_geometry, fantasyid_cogvideox_i2v, likeness_face_identity_metrics)}

# the node that writes the file of each example (its filename_prefix is changed by tiny_example(prefix=...))
_SAVE_NODES = ("SaveAnimatedWEBP", "SaveImage", "LikenessSaveFlamePly")


def tiny_example(server, stem, prefix=None):
    """The example `stem` on tiny files written into `server`'s folders. `prefix` replaces the filename_prefix of
    every saving node (so a second run of the same graph is not a pure cache hit)."""
    if stem not in MAPPERS:
        raise KeyError(f"no tiny mapping for example workflow {stem!r}: add one to tests/support/example_tiny.py")
    ex = MAPPERS[stem](server)
    if prefix:
        for node in ex.prompt.values():
            if node["class_type"] in _SAVE_NODES:
                node["inputs"]["filename_prefix"] = f"{prefix}/{node['inputs']['filename_prefix'].split('/')[-1]}"
    return ex


def check_output(server, ex, hist):
    """The output node wrote a real file: an animated WEBP with the expected frames, or a PNG that decodes."""
    import io

    from PIL import Image

    files = server.output_files(hist, ex.output)
    assert len(files) == 1, (ex.output, hist["outputs"].get(ex.output))
    img = Image.open(io.BytesIO(server.view(*files[0])))
    img.load()
    if ex.frames is None:
        assert img.format == "PNG" and min(img.size) >= 16, (img.format, img.size)
    else:
        assert img.format == "WEBP" and img.n_frames == ex.frames, (img.format, img.n_frames, ex.frames)
    check_pixels(img, files[0])
    return files[0]


def check_pixels(img, name):
    """What the output shows: every frame has content (not one flat colour: a silent zero or NaN turned black/grey),
    and a video's frames are not all the same picture."""
    import numpy as np
    from PIL import ImageSequence

    frames = [np.asarray(f.convert("RGB"), dtype=np.float32) / 255.0 for f in ImageSequence.Iterator(img)]
    for k, f in enumerate(frames):
        assert float(f.std()) > 2.0 / 255.0, f"{name}: frame {k} is one flat colour (mean {float(f.mean()):.3f})"
    if len(frames) > 1:
        change = max(float(np.abs(frames[k] - frames[0]).mean()) for k in range(1, len(frames)))
        assert change > 1.0 / 255.0, f"{name}: all {len(frames)} frames show the same picture"
