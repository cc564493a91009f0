"""HJB face optimisation: the pure algorithm vs a plain upstream-style reference, and the sampler
hook on tiny native models (Wan, SVD) in-process."""

import copy
import importlib
import logging

import pytest
import torch
import torch.nn.functional as F

from likeness_blocks import hjb


class TinyRecognizer(torch.nn.Module):
    """A small differentiable face recogniser: [0,1] RGB crops -> 512-d."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.fc = torch.nn.Linear(8 * 27 * 27, 512)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.1

    def forward(self, x):
        x = (x * 255 - 127.5) / 127.5
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def plain_upstream_refine(x0, decode, recognizer, ref, boxes, iterations, lr):
    """StableAnimator's loop as written in the notes: full decode of every frame each iteration."""
    z0 = x0.clone().detach().float().requires_grad_(True)
    opt = torch.optim.Adam([z0], lr=lr)
    for _ in range(iterations):
        opt.zero_grad()
        frames = decode(z0)
        crops = torch.cat([F.interpolate(f[None, :, b[1]:b[3], b[0]:b[2]], size=(112, 112), mode="bilinear",
                                         align_corners=False) for f, b in zip(frames, boxes.tolist())])
        e = recognizer(crops)
        loss = torch.stack([(1 - F.cosine_similarity(ei, ref, dim=0)).abs() for ei in e]).mean()
        loss.backward()
        opt.step()
    return z0.detach()


def test_learning_rate_schedule():
    assert hjb.hjb_learning_rate(0, 25, 0.1) == pytest.approx(0.1)
    assert hjb.hjb_learning_rate(20, 25, 0.1) == pytest.approx(0.02)


def test_boxes_from_masks_and_window():
    m = torch.zeros(2, 64, 48)
    m[0, 10:20, 5:15] = 1
    boxes, present = hjb.boxes_from_masks(m)
    assert boxes[0].tolist() == [5, 10, 15, 20] and present.tolist() == [True, False]
    assert boxes[1].tolist() == [0, 0, 48, 64]
    assert hjb.latent_window(boxes[:1], 8, 1, 8, 6) == (0, 4, 0, 3)


def test_refine_matches_plain_upstream_loop():
    torch.manual_seed(0)
    dec = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 3, 8, stride=8), torch.nn.Sigmoid())
    rec = TinyRecognizer()
    ref = F.normalize(torch.randn(512), dim=0)
    x0 = torch.randn(3, 4, 16, 16)
    boxes = torch.tensor([[10, 12, 90, 100], [0, 0, 128, 128], [30, 20, 120, 110]])

    def loss_fn(z, it):
        return hjb.identity_loss(rec(hjb.crop_faces(dec(z), boxes)), ref)

    ours, losses = hjb.refine_x0(x0, loss_fn, 3, 0.05)
    plain = plain_upstream_refine(x0, dec, rec, ref, boxes, 3, 0.05)
    assert torch.allclose(ours, plain, atol=1e-5)
    assert not torch.equal(ours, x0)
    assert losses[-1] < losses[0]


# --- the sampler hook on tiny native models ----------------------------------------------------

def _args(model, denoised, sigma, sample_sigmas):
    return {"denoised": denoised, "model": model, "sigma": torch.tensor([sigma]),
            "model_options": {"transformer_options": {"sample_sigmas": sample_sigmas}}}


@pytest.fixture(scope="module")
def wan(pack):
    import comfy.sd
    from support import tiny_models

    model = comfy.sd.load_diffusion_model_state_dict(tiny_models.tiny_wan_t2v_state_dict())
    vae = comfy.sd.VAE(sd=tiny_models.tiny_wan_vae_state_dict())
    return model, vae


def _hook(pack, vae, rec, ref, **kw):
    import importlib

    mod = importlib.import_module("likeness_pack.adapters.sampler_hook")
    kw.setdefault("precision", "fp32")  # parity tests compare with plain fp32 loops; reduced precision has its own
    return mod.HJBFaceGuidance(vae, rec, ref, progress=False, **kw)


def test_hook_lowers_identity_loss_on_wan(pack, wan):
    model, vae = wan
    rec = TinyRecognizer()
    ref = F.normalize(torch.randn(512), dim=0)
    hook = _hook(pack, vae, rec, ref, iterations=5, eta=0.5, window_margin=64)
    denoised = torch.randn(1, 16, 2, 8, 8)
    sigmas = torch.linspace(1, 0, 11)
    with torch.inference_mode():  # as under the executor
        out = hook(_args(model.model, denoised, float(sigmas[0]), sigmas))
    losses = hook.last_losses[-1][1]
    assert losses[-1] < losses[0]
    assert out.shape == denoised.shape and not torch.equal(out, denoised)


def test_hook_is_inert_outside_its_range_and_at_zero_strength(pack, wan):
    model, vae = wan
    rec, ref = TinyRecognizer(), F.normalize(torch.randn(512), dim=0)
    sigmas = torch.linspace(1, 0, 11)
    denoised = torch.randn(1, 16, 2, 8, 8)
    late = _hook(pack, vae, rec, ref, start_percent=0.0, end_percent=0.5)
    assert late(_args(model.model, denoised, float(sigmas[8]), sigmas)) is denoised
    off = _hook(pack, vae, rec, ref, strength=0.0)
    assert off(_args(model.model, denoised, float(sigmas[0]), sigmas)) is denoised


def test_window_decode_matches_full_decode_inside_the_face(pack, wan):
    """The memory saving (decode a latent window) changes the face crop little on the real Wan VAE."""
    model, vae = wan
    rec, ref = TinyRecognizer(), F.normalize(torch.randn(512), dim=0)
    boxes = torch.tensor([[16, 16, 48, 48]])
    z = torch.randn(1, 16, 2, 16, 16)
    full = _hook(pack, vae, rec, ref, face_boxes=boxes, window_margin=64)
    dec, _ = full._decoder(torch.device("cpu"))
    with torch.no_grad():
        frames_full, _ = full._frames(dec, model.model.process_latent_out(z))
        y0, y1, x0, x1 = hjb.latent_window(boxes, 8, 4, 16, 16)
        frames_win, _ = full._frames(dec, model.model.process_latent_out(z[..., y0:y1, x0:x1]))
    a = frames_full[:, :, 16:48, 16:48]
    b = frames_win[:, :, 16 - y0 * 8:48 - y0 * 8, 16 - x0 * 8:48 - x0 * 8]
    assert (a - b).abs().mean() < 0.05  # random VAE, global mid-block attention: an approximation, see bench/hjb.py


def test_ksampler_with_hjb_keeps_weights_and_changes_output(pack, wan, comfy):
    import nodes as comfy_nodes

    model, vae = wan
    rec, ref = TinyRecognizer(), F.normalize(torch.randn(512), dim=0)
    before_m = {k: v.clone() for k, v in model.model.state_dict().items()}
    before_v = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
    from importlib import import_module

    hook_mod = import_module("likeness_pack.adapters.sampler_hook")
    hook = hook_mod.HJBFaceGuidance(vae, rec, ref, iterations=2, eta=0.3, progress=False)
    patched = hook_mod.apply_hjb(model, hook)
    cond = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(1)), {}]]
    unc = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(2)), {}]]
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}

    def run(m):
        with torch.inference_mode():
            return comfy_nodes.common_ksampler(m, 3, 3, 4.0, "euler", "simple", cond, unc, latent)[0]["samples"]

    plain = run(model)
    guided = run(patched)
    assert len(hook.last_losses) >= 2
    assert not torch.allclose(plain, guided)
    assert torch.equal(run(model), plain)  # the shared model is untouched
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, before_m[k]), k
    for k, v in vae.first_stage_model.state_dict().items():
        assert torch.equal(v, before_v[k]), k
    assert "sampler_post_cfg_function" not in model.model_options


def test_hook_on_svd_latents_with_frame_subsets(pack, comfy):
    import comfy.sd
    from support import tiny_models

    svd = tiny_models.build_tiny_svd()
    vae = comfy.sd.VAE(sd=tiny_models.tiny_taesd_state_dict())
    rec, ref = TinyRecognizer(), F.normalize(torch.randn(512), dim=0)
    hook = _hook(pack, vae, rec, ref, iterations=3, eta=0.5, frames_per_iteration=2, window_margin=64)
    sigmas = torch.linspace(10, 0, 6)
    denoised = torch.randn(4, 4, 8, 8)
    with torch.inference_mode():
        out = hook(_args(svd.model, denoised, float(sigmas[0]), sigmas))
    assert out.shape == denoised.shape and not torch.equal(out, denoised)


class FixedBoxDetector:
    """Test double with InsightFacePack's detect() interface: one face at a fixed box, none on odd calls."""

    def __init__(self):
        self.calls = 0

    def detect(self, bgr, size, threshold):
        import numpy as np

        self.calls += 1
        if self.calls % 2 == 0:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        return np.array([[8, 12, 40, 44, 0.9], [0, 0, 4, 4, 0.8]], np.float32), np.zeros((2, 5, 2), np.float32)


def test_detector_boxes_on_the_first_active_step(pack, wan):
    model, vae = wan
    rec, ref = TinyRecognizer(), F.normalize(torch.randn(512), dim=0)
    det = FixedBoxDetector()
    hook = _hook(pack, vae, rec, ref, iterations=1, detector=det)
    sigmas = torch.linspace(1, 0, 5)
    denoised = torch.randn(1, 16, 2, 8, 8)
    with torch.inference_mode():
        hook(_args(model.model, denoised, float(sigmas[0]), sigmas))
        first_calls = det.calls
        # output frames 0..4: the largest box where found, the nearest frame's box elsewhere
        assert hook._run_boxes.tolist() == [[8, 12, 41, 45]] * 5
        hook(_args(model.model, denoised, float(sigmas[1]), sigmas))
        assert det.calls == first_calls  # detection runs once per sampling run
        hook(_args(model.model, denoised, float(sigmas[0]), sigmas))  # a new run detects again
        assert det.calls > first_calls


@pytest.mark.parametrize("n_latent", [3, 4])
def test_framewise_decode_equals_whole_decode(pack, wan, n_latent, caplog):
    """Low-memory decode (checkpointed along time): the same loss and gradient as this ComfyUI's own
    whole-video decode (0.3.75 walks one latent frame per call; newer ones frame 0 alone, then pairs, and an
    even count ends on a single frame), with no fallback logged."""
    model, vae = wan
    rec, ref = TinyRecognizer(), F.normalize(torch.randn(512), dim=0)
    boxes = torch.tensor([[8, 8, 56, 56]])
    z0 = torch.randn(1, 16, n_latent, 8, 8, generator=torch.Generator().manual_seed(n_latent))
    grads, losses = [], []
    for framewise in (False, True):
        hook = _hook(pack, vae, rec, ref, face_boxes=boxes, window_margin=64, framewise=framewise)
        dec, r = hook._decoder(torch.device("cpu"))
        z = z0.clone().requires_grad_(True)

        def frame_loss(frames, idx):
            return hjb.identity_loss(r(hjb.crop_faces(frames, boxes[idx % 1])), ref)

        raw = lambda s, e: z[:, :, s:e] * 1.0
        if framewise:
            with caplog.at_level(logging.WARNING, logger="likeness"):
                layout = hook._causal_video_vae(dec)
            assert layout is not None and not caplog.records, "this ComfyUI's Wan VAE layout must be known"
            loss = hook._framewise_loss(dec, layout, raw, n_latent, frame_loss)
        else:
            frames, per = hook._frames(dec, z)
            assert per == 1 + 4 * (n_latent - 1)
            l = frame_loss(frames, torch.arange(frames.shape[0]))
            l.backward()
            loss = float(l.detach())
        grads.append(z.grad.flatten().clone())
        losses.append(loss)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4), (grads[0] - grads[1]).abs().max()


def test_low_memory_decode_fallback_is_logged_once(pack, caplog):
    """A 5-D latent whose VAE is not Wan's causal VAE cannot be decoded piecewise: the hook says so once, why,
    and what it costs (it then decodes whole)."""
    sampler_hook = importlib.import_module(f"{pack.__name__}.adapters.sampler_hook")
    other = torch.nn.Conv3d(1, 1, 1)
    layout, why = sampler_hook.wan_causal_layout(other)
    assert layout is None and "not Wan 2.1" in why
    hook = _hook(pack, None, TinyRecognizer(), F.normalize(torch.randn(512), dim=0), framewise=True)
    with caplog.at_level(logging.WARNING, logger="likeness"):
        assert hook._causal_video_vae(other) is None
        assert hook._causal_video_vae(other) is None
    msgs = [r.getMessage() for r in caplog.records if "low_memory_decode" in r.getMessage()]
    assert len(msgs) == 1 and "Conv3d" in msgs[0] and "memory that grows" in msgs[0], msgs


@pytest.mark.parametrize("low_memory", [False, True])
def test_svd_temporal_vae_is_decoded_in_upstream_chunks(pack, comfy, low_memory):
    """SVD's real temporal VAE mixes the frames of one decode call: upstream decodes 4 at a time
    (decode_chunk_size 4). The hook's losses and result are the plain upstream loop's with that chunking,
    whether it back-propagates chunk by chunk with checkpointed resnet blocks (low memory) or all at once."""
    import comfy.sd
    from support import tiny_models

    svd = tiny_models.build_tiny_svd()
    vae = comfy.sd.VAE(sd=tiny_models.svd_vae_state_dict())
    rec, ref = TinyRecognizer(), F.normalize(torch.randn(512), dim=0)
    boxes = torch.tensor([[1, 2, 15, 15]])  # 16x16 px frames: the real VAE's cost is in its widths, not needed here
    hook = _hook(pack, vae, rec, ref, face_boxes=boxes, iterations=2, eta=0.3, window_margin=64, framewise=low_memory)
    sigmas = torch.linspace(10, 0, 6)
    denoised = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        out = hook(_args(svd.model, denoised, float(sigmas[0]), sigmas))
    dec, r = hook._decoder(torch.device("cpu"))
    from comfy.ldm.modules.diffusionmodules.model import ResnetBlock

    blocks = [m for m in dec.modules() if isinstance(m, ResnetBlock)]
    assert blocks and all(("forward" in vars(m)) == low_memory for m in blocks), "low memory = checkpointed blocks"

    def pixels(z):
        return ((dec.decode(z / 0.18215) + 1) / 2).clamp(0, 1)  # SVD latents: scaling factor 0.18215

    def loss_of(frames):
        crops = torch.cat([F.interpolate(f[None, :, 2:15, 1:15], size=(112, 112), mode="bilinear", align_corners=False)
                           for f in frames])
        return torch.stack([(1 - F.cosine_similarity(e, ref, dim=0)).abs() for e in r(crops)]).mean()

    z = denoised.clone().requires_grad_(True)  # upstream: chunks of 4 frames, Adam, lr = eta * (1 - 0/5)
    opt, losses = torch.optim.Adam([z], lr=0.3), []
    for _ in range(2):
        opt.zero_grad()
        loss = loss_of(torch.cat([pixels(c) for c in z.split(4)]))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert hook.last_losses[-1][1] == pytest.approx(losses, abs=1e-6)
    # Adam divides by the gradient's running RMS: where two steps' gradients nearly cancel, float rounding in the
    # summation order (per chunk vs all frames) shows up magnified in a few elements; the rest agree to 1e-6
    diff = (out - z.detach()).abs()
    assert float(diff.max()) < 1e-3 and float(diff.median()) < 1e-6, (float(diff.max()), float(diff.median()))
    with torch.no_grad():
        whole = float(loss_of(pixels(denoised)))
    assert abs(whole - losses[0]) > 1e-4, "the test cannot tell chunked from whole-video decoding"


@pytest.mark.parametrize("base", ["svd", "wan"])
def test_reduced_precision_decode_stays_within_stated_tolerance(pack, comfy, base):
    """precision='bf16' really runs the decoder's convolutions in bf16 (fp32 master weights, fp32 ArcFace, loss and
    Adam) and stays within the tolerance docs/hjb.md states, on the real-size VAEs of SVD and Wan 2.1: identity loss
    within 2e-3 of fp32 at every iteration, gradient with respect to the latent at cosine >= 0.99. Small frames
    (16x16 px; SVD 2 frames, Wan 1): the real channel widths are what the precision claim is about, and bf16 convolutions on a
    CPU without bf16 units are slow."""
    import comfy.sd
    from support import tiny_models

    if base == "svd":
        model = tiny_models.build_tiny_svd().model
        vae = comfy.sd.VAE(sd=tiny_models.svd_vae_state_dict())
        denoised = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(6))
        to_raw = lambda z: z / 0.18215  # noqa: E731  SVD's latent scaling
    else:
        model = comfy.sd.load_diffusion_model_state_dict(tiny_models.tiny_wan_t2v_state_dict()).model
        vae = comfy.sd.VAE(sd=tiny_models.tiny_wan_vae_state_dict(dim=96))
        denoised = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(6))
        to_raw = lambda z: z  # noqa: E731  any latent will do: both precisions decode the same one
    rec, ref = TinyRecognizer(), F.normalize(torch.randn(512, generator=torch.Generator().manual_seed(5)), dim=0)
    boxes = torch.tensor([[1, 2, 15, 14]])
    sigmas = torch.linspace(10, 0, 6)
    seen, grads, losses = {}, {}, {}
    for precision in ("fp32", "bf16"):
        hook = _hook(pack, vae, rec, ref, face_boxes=boxes, iterations=2, eta=0.3, window_margin=64,
                     precision=precision)
        dec, r = hook._decoder(torch.device("cpu"))
        first_conv = next(m for m in dec.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
        first_conv.register_forward_hook(lambda m, a, o, p=precision: seen.__setitem__(p, o.dtype))
        z = denoised.clone().requires_grad_(True)
        frames, _ = hook._frames(dec, to_raw(z))
        hjb.identity_loss(r(hjb.crop_faces(frames, boxes.expand(len(frames), -1))), ref).backward()
        grads[precision] = z.grad.flatten()
        with torch.inference_mode():
            hook(_args(model, denoised, float(sigmas[0]), sigmas))
        losses[precision] = hook.last_losses[-1][1]
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert losses["fp32"][-1] < losses["fp32"][0] and losses["bf16"][-1] < losses["bf16"][0]
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=2e-3), losses
    cos = float(F.cosine_similarity(grads["fp32"], grads["bf16"], dim=0))
    assert cos >= 0.99, cos
    assert not torch.equal(grads["fp32"], grads["bf16"]), "the test cannot tell bf16 from fp32"


def test_precision_names(pack):  # 'auto': test_wiring_hjb.py, on this CPU's cpuinfo and on fake ones
    import importlib

    mod = importlib.import_module("likeness_pack.adapters.sampler_hook")
    assert mod.decode_dtype("fp32", torch.device("cpu")) == torch.float32
    assert mod.decode_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="precision must be one of"):
        _hook(pack, None, TinyRecognizer(), torch.zeros(512), precision="int8")
