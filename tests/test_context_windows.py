"""The pack's identity patches under ComfyUI's own context windows (comfy/context_windows.py, driven through the
stock Context Windows nodes' execute), sampled in-process with the real KSampler path.

Concat-ID on Wan: every window's model call must carry the reference latent frames whole, appended after that
call's frames with Concat-ID's RoPE slot relative to the call (time = frames in the call, rows 0..h-1, columns
w..2w-1); the positions are checked against a table written here from the formula. One window over the whole video
must reproduce the run without context windows.
"""

import importlib
import inspect
import math

import pytest
import torch

from test_concat_id import DIM, HEADS, make_state_dict

TEXT_DIM = 4096


@pytest.fixture(scope="module")
def cw(comfy, pack):
    class NS:
        wan = importlib.import_module("likeness_pack.adapters.wan")
        windows = importlib.import_module("likeness_pack.adapters.context_windows")
        loader = importlib.import_module("likeness_pack.loaders.concat_id")
        nodes_cw = importlib.import_module("comfy_extras.nodes_context_windows")

    return NS


@pytest.fixture(scope="module")
def concat_files(cw, tmp_path_factory):
    d = tmp_path_factory.mktemp("concat_id_cw")
    torch.save(make_state_dict(False, seed=13), d / "first_stage.pt")
    torch.save(make_state_dict(True, seed=14), d / "second_stage_adaln.pt")
    return d


def with_context_windows(cw, model, length, overlap, wan=True, schedule="standard_static", fuse="pyramid", dim=2):
    """The stock node's execute (Wan: lengths in video frames, 4n+1; else latent frames on dim 2), with whatever
    arguments this ComfyUI version's node takes (0.33 adds freenoise and others)."""
    node = cw.nodes_cw.WanContextWindowsManualNode if wan else cw.nodes_cw.ContextWindowsManualNode
    params = inspect.signature(node.execute).parameters
    kw = dict(model=model, context_length=length, context_overlap=overlap, context_schedule=schedule,
              context_stride=1, closed_loop=False, fuse_method=fuse)
    if not wan:
        kw["dim"] = dim
    if "freenoise" in params:
        kw["freenoise"] = False
    out = node.execute(**kw)
    return out.args[0] if hasattr(out, "args") else out[0]


def comfy_version():
    import comfyui_version

    return tuple(int(p) for p in comfyui_version.__version__.split(".")[:3])


def force_one_window(model):
    """The windowed code path even when one window covers the video (the handler skips it otherwise)."""
    m = model.clone()
    handler = m.model_options["context_handler"]
    handler.should_use_context = lambda *a, **k: True
    return m


def sample(model, pos, neg, latent, steps=3, cfg=2.5, seed=5):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent,
                                   disable_pbar=True, seed=seed)


def conds(refs, seed=2):
    g = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(1, 7, TEXT_DIM, generator=g), {"time_dim_concat": refs}]]
    neg = [[torch.randn(1, 5, TEXT_DIM, generator=g), {"time_dim_concat": refs}]]
    return pos, neg


def inputs(T, n_refs, lat_h=6, lat_w=10, seed=1):
    """Non-square latents: 6x10 latent pixels -> 3x5 tokens per frame."""
    g = torch.Generator().manual_seed(seed)
    refs = torch.randn(1, 16, n_refs, lat_h, lat_w, generator=g)
    latent = torch.zeros(1, 16, T, lat_h, lat_w)
    return refs, latent


class CallSpy:
    """Records every forward_orig call of the shared WanModel (what the Concat-ID wrapper hands the transformer):
    the token input (video frames + references), the RoPE table and the context window of the call."""

    def __init__(self, dm):
        self.dm = dm
        self.calls = []

    def __enter__(self):
        orig = type(self.dm).forward_orig.__get__(self.dm)

        def spy(x, t, context, clip_fea=None, freqs=None, transformer_options={}, **kw):
            self.calls.append(dict(x=x.detach().clone(), freqs=None if freqs is None else freqs.detach().clone(),
                                   window=transformer_options.get("context_window"),
                                   sigma=float(transformer_options["sigmas"].reshape(-1)[0])))
            return orig(x, t, context, clip_fea=clip_fea, freqs=freqs, transformer_options=transformer_options, **kw)

        self.dm.forward_orig = spy
        return self

    def __exit__(self, *exc):
        del self.dm.forward_orig


def expected_angles(n_frames, h, w, n_refs, head_dim, theta=10000.0):
    """RoPE angles (L, head_dim/2) from the formula: video token (f, i, j); reference k at (n_frames + k, i, w + j)
    (Concat-ID's slot; next_frames for k > 0). Axis split of Wan: d - 4(d//6), 2(d//6), 2(d//6) channels."""
    axes = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    pos = [(f, i, j) for f in range(n_frames) for i in range(h) for j in range(w)]
    pos += [(n_frames + k, i, w + j) for k in range(n_refs) for i in range(h) for j in range(w)]
    pos = torch.tensor(pos, dtype=torch.float64)
    cols = []
    for a, d in enumerate(axes):
        inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        cols.append(pos[:, a:a + 1] * inv[None])
    return torch.cat(cols, 1)


def call_frames(window):
    """The whole-video frames a window's model call holds, read from the window object as ComfyUI documents it
    (0.33: an anchor frame before the window when causal_window_fix is on)."""
    idx = list(window.index_list)
    anchor = getattr(window, "causal_anchor_index", None)
    return ([anchor] + idx) if anchor is not None and anchor >= 0 else idx


# ----------------------------------------------------------------------------------------------
# Concat-ID on Wan
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["first_stage", "adaln"])
def test_concat_id_one_window_equals_no_windows(cw, concat_files, variant):
    name = "first_stage.pt" if variant == "first_stage" else "second_stage_adaln.pt"
    model, weights = cw.loader.load_concat_id(str(concat_files / name), model_options={"dtype": torch.float32})
    refs, latent = inputs(T=5, n_refs=1)
    pos, neg = conds(refs)
    for kw in (dict(), dict(strength=0.6, start_percent=0.0, end_percent=0.7)):
        patched = cw.wan.apply_concat_id(model, adaln=weights.adaln, **kw)
        plain = sample(patched, pos, neg, latent)
        # flat fusion: one window's weights divide out exactly (pyramid weights leave one-ulp rounding)
        one = force_one_window(with_context_windows(cw, patched, 4 * 5 + 1, 8, fuse="flat"))
        with CallSpy(patched.model.diffusion_model) as spy:
            windowed = sample(one, pos, neg, latent)
        assert spy.calls and all(c["window"] is not None for c in spy.calls)  # the windowed path really ran
        assert all(list(c["window"].index_list) == list(range(5)) for c in spy.calls)
        torch.testing.assert_close(windowed, plain, atol=1e-5, rtol=0)
    # the references matter for the result (so the parity above could fail)
    other, _ = inputs(T=5, n_refs=1, seed=7)
    assert (sample(patched, *conds(other), latent) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("variant,n_refs,schedule", [("first_stage", 1, "standard_static"),
                                                     ("adaln", 1, "standard_uniform"),
                                                     ("first_stage", 2, "standard_static")])
def test_concat_id_every_window_gets_whole_references_in_their_rope_slot(cw, concat_files, variant, n_refs, schedule):
    name = "first_stage.pt" if variant == "first_stage" else "second_stage_adaln.pt"
    model, weights = cw.loader.load_concat_id(str(concat_files / name), model_options={"dtype": torch.float32})
    T, lat_h, lat_w = 9, 6, 10
    refs, latent = inputs(T=T, n_refs=n_refs, lat_h=lat_h, lat_w=lat_w)
    pos, neg = conds(refs)
    patched = cw.wan.apply_concat_id(model, adaln=weights.adaln, strength=0.8, start_percent=0.0, end_percent=0.6)
    windowed = with_context_windows(cw, patched, 13, 8, schedule=schedule)  # 4 latent frames, overlap 2
    handler = windowed.model_options["context_handler"]
    assert handler.context_length == 4 and handler.context_overlap == 2
    steps = 4
    with CallSpy(patched.model.diffusion_model) as spy:
        out = sample(windowed, pos, neg, latent, steps=steps)
    assert out.shape == latent.shape
    want_refs = patched.model.process_latent_in(refs)
    ms = patched.get_model_object("model_sampling")
    sigma_end = float(ms.percent_to_sigma(0.6))
    h, w = lat_h // 2, lat_w // 2
    with_refs = without_refs = 0
    covered = set()
    for c in spy.calls:
        frames = call_frames(c["window"])
        covered.update(c["window"].index_list)
        n_video = len(frames)
        assert n_video < T  # a window, not the video
        if c["sigma"] < sigma_end:  # past end_percent: plain text-to-video, no reference at all
            assert c["x"].shape[2] == n_video
            without_refs += 1
            continue
        with_refs += 1
        assert c["x"].shape[2] == n_video + n_refs  # the window's frames, then every reference
        # the references: whole, unshifted, the same clean latents in every window and both CFG branches
        for b in range(c["x"].shape[0]):
            torch.testing.assert_close(c["x"][b:b + 1, :, n_video:], want_refs, atol=0, rtol=0)
        # RoPE of the call: window-relative video positions, references at time n_video (then n_video + 1)
        f = c["freqs"][0, :, 0]  # (L, head_dim/2, 2, 2) rotation matrices
        ang = expected_angles(n_video, h, w, n_refs, DIM // HEADS)
        assert f.shape[0] == ang.shape[0] == (n_video + n_refs) * h * w
        torch.testing.assert_close(f[..., 0, 0].double(), torch.cos(ang), atol=1e-5, rtol=0)
        torch.testing.assert_close(f[..., 1, 0].double(), torch.sin(ang), atol=1e-5, rtol=0)
    assert covered == set(range(T))
    assert with_refs >= 3 * 2 and without_refs >= 2  # several windows in each regime
    # no output frame is a reference frame (no "flash")
    for fr in range(T):
        for k in range(n_refs):
            assert (out[:, :, fr] - refs[:, :, k]).abs().max() > 1e-2


def test_concat_id_references_not_sliced_when_their_count_equals_the_video_length(cw, concat_files):
    """Two references in a two-latent-frame video: 0.33's slicing would take them for frames (one per window)."""
    model, weights = cw.loader.load_concat_id(str(concat_files / "first_stage.pt"), model_options={"dtype": torch.float32})
    refs, latent = inputs(T=2, n_refs=2)
    pos, neg = conds(refs)
    patched = cw.wan.apply_concat_id(model)
    windowed = with_context_windows(cw, patched, 1, 0, wan=False, schedule="batched")  # windows [0], [1]
    with CallSpy(patched.model.diffusion_model) as spy:
        sample(windowed, pos, neg, latent, steps=2)
    want_refs = patched.model.process_latent_in(refs)
    assert spy.calls
    for c in spy.calls:
        n_video = len(call_frames(c["window"]))
        assert c["x"].shape[2] == n_video + 2
        torch.testing.assert_close(c["x"][:1, :, n_video:], want_refs, atol=0, rtol=0)


def test_window_frames_reads_the_window_and_anchor(cw):
    class W:
        index_list = [4, 5, 6]

    assert cw.windows.window_frames({}, 3) is None
    assert cw.windows.window_frames({"context_window": W()}, 3) == [4, 5, 6]
    a = W()
    a.causal_anchor_index = 3
    assert cw.windows.window_frames({"context_window": a}, 4) == [3, 4, 5, 6]
    with pytest.raises(RuntimeError, match="context window"):
        cw.windows.window_frames({"context_window": W()}, 5)


# ----------------------------------------------------------------------------------------------
# HJB Face Guidance (post-CFG, on the fused prediction)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_wan(cw):
    import comfy.sd
    from support import tiny_models

    model = comfy.sd.load_diffusion_model_state_dict(tiny_models.tiny_wan_t2v_state_dict())
    vae = comfy.sd.VAE(sd=tiny_models.tiny_wan_vae_state_dict())
    return model, vae


def _hjb(vae, boxes=None, **kw):
    from test_hjb import TinyRecognizer

    mod = importlib.import_module("likeness_pack.adapters.sampler_hook")
    g = torch.Generator().manual_seed(3)
    ref = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
    kw.setdefault("iterations", 2)
    kw.setdefault("eta", 0.5)
    return mod.HJBFaceGuidance(vae, TinyRecognizer(), ref, boxes, progress=False, precision="fp32",
                               window_margin=1, **kw)


def _handler(length, overlap=1, dim=2):
    import comfy.context_windows as cwm

    return cwm.IndexListContextHandler(cwm.get_matching_context_schedule("standard_static"),
                                       cwm.get_matching_fuse_method("pyramid"), context_length=length,
                                       context_overlap=overlap, dim=dim)


def _moving_boxes(n_frames):
    """A face box per output frame (32x32 frames) that moves from frame to frame."""
    return torch.tensor([[1 + 2 * (f % 5), 2 + 3 * (f % 3), 1 + 2 * (f % 5) + 18, 2 + 3 * (f % 3) + 20]
                         for f in range(n_frames)])


def test_hjb_under_windows_refines_window_sized_pieces_with_their_frames_boxes(cw, tiny_wan):
    model, vae = tiny_wan
    T = 4  # latent frames -> 13 output frames; windows of 2 latent frames -> pieces [0, 2) and [2, 4)
    n_out = 1 + 4 * (T - 1)
    boxes = _moving_boxes(n_out)
    g = torch.Generator().manual_seed(8)
    denoised = torch.randn(1, 16, T, 4, 4, generator=g)
    sigmas = torch.linspace(1, 0, 6)

    def args(d, handler=None):
        mo = {"transformer_options": {"sample_sigmas": sigmas}}
        if handler is not None:
            mo["context_handler"] = handler
        return {"denoised": d, "model": model.model, "sigma": torch.tensor([float(sigmas[1])]), "model_options": mo}

    hook = _hjb(vae, boxes, iterations=1)
    seen = []  # latent frames of every decode the hook runs (low-memory framewise path or whole decode)
    inner_fw, inner_whole = hook._framewise_loss, hook._frames

    def spy_fw(decoder, count, raw_of, n_latent, frame_loss):
        seen.append(n_latent)
        return inner_fw(decoder, count, raw_of, n_latent, frame_loss)

    def spy_whole(decoder, raw):
        seen.append(raw.shape[2])
        return inner_whole(decoder, raw)

    hook._framewise_loss, hook._frames = spy_fw, spy_whole
    with torch.inference_mode():
        got = hook(args(denoised, _handler(2)))
        # independently: each piece as its own video, with the boxes of the video frames it decodes to
        # (a piece starting at latent frame s decodes to video frames 4s, 4s+1, ...)
        want = []
        for s, e in ((0, 2), (2, 4)):
            piece_boxes = boxes[4 * s: 4 * s + 1 + 4 * (e - s - 1)]
            want.append(_hjb(vae, piece_boxes, iterations=1)(args(denoised[:, :, s:e].clone())))
        want = torch.cat(want, 2)
        # boxes not following: the second piece gets the video's first frames' boxes (as many as it decodes)
        unshifted = _hjb(vae, boxes[:5], iterations=1)(args(denoised[:, :, 2:4].clone()))
    assert got.shape == denoised.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got[:, :, 2:4] - unshifted).abs().max() > 1e-5  # the second piece's boxes are frames 8.., not 0..
    assert (got - denoised).abs().max() > 1e-4
    assert seen and max(seen) == 2  # never more than one window of latent frames decoded together
    assert len(hook.last_losses[-1][1]) == 1


def test_hjb_one_window_through_ksampler_equals_no_windows(cw, tiny_wan):
    model, vae = tiny_wan
    g = torch.Generator().manual_seed(4)
    pos = [[torch.randn(1, 6, 4096, generator=g), {}]]
    neg = [[torch.randn(1, 6, 4096, generator=g), {}]]
    latent = torch.zeros(1, 16, 3, 4, 4)
    apply = importlib.import_module("likeness_pack.adapters.sampler_hook").apply_hjb
    # active at the first of two steps only (keeps the test short)
    guided = apply(model, _hjb(vae, _moving_boxes(9), iterations=1, start_percent=0.0, end_percent=0.4))
    plain = sample(guided, pos, neg, latent, steps=2)
    one = force_one_window(with_context_windows(cw, guided, 4 * 3 + 1, 4, fuse="flat"))
    windowed = sample(one, pos, neg, latent, steps=2)
    torch.testing.assert_close(windowed, plain, atol=1e-5, rtol=0)
    unguided = sample(model, pos, neg, latent, steps=2)
    assert (unguided - plain).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------
# StableAnimator on SVD (frames on the batch axis: context windows on dim 0)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def svd(cw):
    from support.tiny_models import build_tiny_svd

    return build_tiny_svd(seed=0)


def _svd_sample(model, frames, steps=2, cfg=2.0):
    from test_stableanimator_svd import _conds

    import nodes

    pos, neg = _conds()
    latent = {"samples": torch.zeros(frames, 4, 8, 8)}
    with torch.no_grad():
        (out,) = nodes.common_ksampler(model, 0, steps, cfg, "euler", "karras", pos, neg, latent, denoise=1.0)
    return out["samples"]


class InputBlockRecorder:
    """An input_block_patch that records h (and the call's window) where it sits in the patch list."""

    def __init__(self):
        self.seen = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, h, transformer_options):
        if transformer_options.get("block") == ("input", 0):
            self.seen.append((h.detach().clone(), transformer_options.get("context_window"),
                              list(transformer_options.get("cond_or_uncond") or [0])))
        return h


def test_stableanimator_pose_and_id_per_window(cw, svd):
    from test_stableanimator_svd import _id_weights, _pose_net_for

    A = importlib.import_module("likeness_pack.adapters.svd")
    frames = 6
    net = _pose_net_for(svd)
    g = torch.Generator().manual_seed(11)
    pose = torch.rand(frames, 64, 64, 3, generator=g)
    face = torch.randn(1, 4, 1024, generator=g)
    before, after = InputBlockRecorder(), InputBlockRecorder()
    m = svd.clone()
    m.set_model_input_block_patch(before)
    m, _ = A.apply_id_adapter(m, _id_weights(svd, A), face, strength=0.8)
    m, pp = A.apply_pose(m, net, pose, strength=0.7)
    m.set_model_input_block_patch(after)
    if comfy_version() < (0, 4):
        # 0.3.x's handler cannot look up SVD's per-frame timesteps: a clear message steering to Long Video
        win = with_context_windows(cw, m, 3, 1, wan=False, fuse="pyramid", dim=0)
        with pytest.raises(ValueError, match="StableAnimator Long Video"):
            _svd_sample(win, frames, steps=1)
        return
    plain = _svd_sample(m, frames)
    # one window over the whole video: the run without windows
    one = force_one_window(with_context_windows(cw, m, frames, 1, wan=False, fuse="flat", dim=0))
    before.seen.clear(), after.seen.clear()
    torch.testing.assert_close(_svd_sample(one, frames), plain, atol=1e-5, rtol=0)
    # several windows (3 frames, overlap 1) on the batch axis
    win = with_context_windows(cw, m, 3, 1, wan=False, fuse="pyramid", dim=0)
    before.seen.clear(), after.seen.clear()
    out = _svd_sample(win, frames)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert len(before.seen) == len(after.seen) >= 3
    with torch.no_grad():
        pose_lat = net(pose.movedim(-1, 1) * 2 - 1) * 0.7  # PoseNet on every video frame, at 64x64 = 8x8 latents
    covered = set()
    for (h0, window, flags), (h1, _, _) in zip(before.seen, after.seen):
        held = call_frames(window)
        covered.update(window.index_list)
        n = len(held)
        assert h0.shape[0] == n * len(flags)
        for c, flag in enumerate(flags):
            add = h1[c * n:(c + 1) * n] - h0[c * n:(c + 1) * n]
            want = torch.zeros_like(add) if flag == 1 else pose_lat[held]  # the pose of the frames this call holds
            torch.testing.assert_close(add, want, atol=1e-5, rtol=0)
    assert covered == set(range(frames))


def test_stableanimator_per_frame_face_tokens_follow_the_window(cw, svd):
    from test_stableanimator_svd import _id_weights

    A = importlib.import_module("likeness_pack.adapters.svd")
    frames, held = 6, [2, 3, 4]
    g = torch.Generator().manual_seed(12)
    tokens = torch.randn(frames, 4, 1024, generator=g)
    weights = _id_weights(svd, A)
    key_path, key = next(iter(A.spatial_block_keys(svd.model.diffusion_model).items()))
    wk, wv = weights[key_path]
    full = A.IDAttentionPatch(key, wk, wv, tokens, 0.9, 1e9, 0.0)
    sub = A.IDAttentionPatch(key, wk, wv, tokens[held], 0.9, 1e9, 0.0)
    inner = wk.shape[0]
    q = torch.randn(2 * len(held), 64, inner, generator=g)
    k = torch.randn(2 * len(held), 1, inner, generator=g)
    v = torch.randn(2 * len(held), 1, inner, generator=g)

    class W:
        index_list = held

    opts = {"n_heads": 2, "cond_or_uncond": [0, 1], "activations_shape": [2 * len(held), inner, 8, 8]}
    got = full(q, k, v, {**opts, "context_window": W()})
    torch.testing.assert_close(got, sub(q, k, v, dict(opts)), atol=0, rtol=0)
    assert (got - full(q, k, v, {**opts, "context_window": type("W0", (), {"index_list": [0, 1, 2]})()})).abs().max() > 1e-4


def test_stableanimator_tiles_and_context_windows_steer_to_one(cw, svd):
    A = importlib.import_module("likeness_pack.adapters.svd")
    both = with_context_windows(cw, A.apply_tiling(svd, tile_size=3, overlap=1), 3, 1, wan=False, dim=0)
    # 0.33: "both split this video ... use one"; 0.3.x: its context windows cannot run SVD at all
    with pytest.raises(ValueError, match="use one" if comfy_version() >= (0, 4) else "StableAnimator Long Video"):
        _svd_sample(both, 5, steps=1)


# ----------------------------------------------------------------------------------------------
# FantasyID on CogVideoX-I2V (the pack's native CogVideoX MODEL), beyond its trained length
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fantasy(cw, tmp_path_factory):
    pytest.importorskip("diffusers")
    from test_fantasyid_cogvideox import _las

    from diffusers import CogVideoXTransformer3DModel

    import test_fantasyid_cogvideox as T

    L = importlib.import_module("likeness_pack.loaders.cogvideox")
    A = importlib.import_module("likeness_pack.adapters.cogvideox_fantasyid")
    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(**T.TINY_I2V).eval()
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("cogfid_cw")
    tr.save_pretrained(d / "i2v")
    return L.load_transformer(str(d / "i2v"), "fp32"), A, _las(4), T.KV


def test_fantasyid_id_tokens_reach_every_window(cw, fantasy):
    import comfy.sample

    model, A, las, kv = fantasy
    T = 5  # latent frames; the tiny model is configured for 9 frames (3 latent), windows of 3 overlapping 1
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 16, T, 6, 8, generator=g)
    img = torch.randn(1, 16, 1, 6, 8, generator=g)
    pos = [[torch.randn(1, 8, 64, generator=g), {"concat_latent_image": img}]]
    neg = [[torch.randn(1, 8, 64, generator=g), {"concat_latent_image": img}]]
    ids = torch.randn(1, 5, kv, generator=g)

    def run(mp, steps=2):
        with torch.no_grad():
            return comfy.sample.sample(mp, noise, steps, 5.0, "ddim", "simple", pos, neg, torch.zeros_like(noise),
                                       denoise=1.0, disable_pbar=True, seed=0)

    patched = A.apply_layer_injection(model, las, ids, strength=0.7)
    plain = run(patched)
    one = force_one_window(with_context_windows(cw, patched, T, 1, wan=False, fuse="flat"))
    torch.testing.assert_close(run(one), plain, atol=1e-5, rtol=0)

    # several windows: record each DiT call (its window, its input incl. the image channels) and each injection
    dit = model.model.diffusion_model
    calls, injections = [], []
    h1 = dit.register_forward_pre_hook(lambda m, a, kw: calls.append(
        (a[0].detach().clone(), kw.get("transformer_options", {}).get("context_window"))), with_kwargs=True)
    h2 = [la.register_forward_pre_hook(lambda m, a: injections.append((a[0].detach().clone(), a[1].shape)))
          for la in las]
    try:
        out = run(with_context_windows(cw, patched, 3, 1, wan=False, fuse="pyramid"), steps=2)
    finally:
        h1.remove()
        [h.remove() for h in h2]
    assert out.shape == noise.shape and torch.isfinite(out).all()
    image = torch.zeros(1, 16, T, 6, 8)
    image[:, :, :1] = model.model.process_latent_in(img)  # the start image in frame 0, zeros after
    assert len(calls) >= 2 * 2  # two steps of two windows ([0, 1, 2] and [2, 3, 4])
    covered = set()
    for xc, window in calls:
        held = call_frames(window)
        covered.update(window.index_list)
        assert xc.shape[2] == len(held) < T
        for b in range(xc.shape[0]):  # the image condition at the frames this call holds
            torch.testing.assert_close(xc[b:b + 1, 16:], image[:, :, held], atol=1e-6, rtol=0)
    assert covered == set(range(T))
    # every call injects the same ID tokens at each of the 4 injection blocks
    assert len(injections) == 4 * len(calls)
    for (tok, h_shape), (xc, window) in zip(injections, [c for c in calls for _ in range(4)]):
        assert tok.shape[0] in (1, xc.shape[0])  # batch-1 ID tokens broadcast over the CFG branches, as upstream
        for b in range(tok.shape[0]):
            torch.testing.assert_close(tok[b:b + 1], ids, atol=0, rtol=0)
        assert h_shape[1] == len(call_frames(window)) * 3 * 4  # video tokens of the window's frames (6x8 / 2x2)
