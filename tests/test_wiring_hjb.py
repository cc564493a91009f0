"""HJB face guidance wired as users run it (issue 17): a later step than the first (the learning-rate schedule),
strength 0.5, an off-centre face with a small window margin (face boxes shifted into the decode window), on the
tiny native Wan 2.1 model and VAE; and the bf16 detection behind precision='auto' on fake device descriptions.

The expected result is a plain loop written here from the method (upstream-methods.md §HJB): Adam on x0 with
lr = eta * (1 - i / steps), loss mean_f |1 - cos(ArcFace(crop_f), ref)| on 112x112 bilinear crops of the decoded
latent window, then x0 + strength * (refined - x0).
"""

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from test_hjb import TinyRecognizer

LAT_T, LAT_H, LAT_W = 2, 6, 10  # 48x80 px frames, 5 output frames
BOX = [48, 24, 76, 44]  # x1, y1, x2, y2: right of and below the centre


@pytest.fixture(scope="module")
def hook_mod(pack):
    return importlib.import_module("likeness_pack.adapters.sampler_hook")


@pytest.fixture(scope="module")
def wan(pack):
    import comfy.sd
    from support import tiny_models

    model = comfy.sd.load_diffusion_model_state_dict(tiny_models.tiny_wan_t2v_state_dict())
    vae = comfy.sd.VAE(sd=tiny_models.tiny_wan_vae_state_dict())
    return model, vae


def _args(model, denoised, sigma, sample_sigmas):
    return {"denoised": denoised, "model": model, "sigma": torch.tensor([sigma]),
            "model_options": {"transformer_options": {"sample_sigmas": sample_sigmas}}}


def plain_hjb_step(model, vae, rec, ref, denoised, box, margin, step, total, iterations, eta, strength):
    """One active HJB step, written out: the latent window around the face (margin in latent pixels, 8 px per
    latent pixel), the face box moved into that window, Adam with the step's learning rate, the strength blend."""
    x1, y1, x2, y2 = box
    r0, r1 = max(y1 // 8 - margin, 0), min(math.ceil(y2 / 8) + margin, denoised.shape[-2])
    c0, c1 = max(x1 // 8 - margin, 0), min(math.ceil(x2 / 8) + margin, denoised.shape[-1])
    bx1, by1, bx2, by2 = x1 - 8 * c0, y1 - 8 * r0, x2 - 8 * c0, y2 - 8 * r0
    decoder = copy.deepcopy(vae.first_stage_model).float().requires_grad_(False)
    rec = copy.deepcopy(rec).requires_grad_(False)
    lr = eta * (1 - step / total)
    z = denoised.clone().float().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    losses = []
    for _ in range(iterations):
        opt.zero_grad()
        video = decoder.decode(model.process_latent_out(z[..., r0:r1, c0:c1]))  # (1, 3, frames, h, w)
        frames = ((video + 1) / 2).clamp(0, 1)[0].permute(1, 0, 2, 3)
        crops = F.interpolate(frames[:, :, by1:by2, bx1:bx2], size=(112, 112), mode="bilinear", align_corners=False)
        loss = torch.stack([(1 - F.cosine_similarity(e, ref, dim=0)).abs() for e in rec(crops)]).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return denoised + strength * (z.detach() - denoised), losses


@pytest.mark.parametrize("low_memory", [True, False])
def test_later_step_half_strength_off_centre_face(hook_mod, wan, low_memory):
    model, vae = wan
    rec = TinyRecognizer(seed=3)
    ref = F.normalize(torch.randn(512, generator=torch.Generator().manual_seed(8)), dim=0)
    denoised = torch.randn(1, 16, LAT_T, LAT_H, LAT_W, generator=torch.Generator().manual_seed(2))
    sigmas = torch.linspace(1, 0, 11)
    step, eta, strength, margin = 3, 0.4, 0.5, 1
    hook = hook_mod.HJBFaceGuidance(vae, rec, ref, torch.tensor([BOX]), iterations=2, eta=eta, strength=strength,
                                    window_margin=margin, framewise=low_memory, precision="fp32", progress=False)
    with torch.inference_mode():
        out = hook(_args(model.model, denoised, float(sigmas[step]), sigmas))
    want, losses = plain_hjb_step(model.model, vae, rec, ref, denoised, BOX, margin, step, 10, 2, eta, strength)
    assert hook.last_losses[-1][0] == step
    assert hook.last_losses[-1][1] == pytest.approx(losses, abs=1e-5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    # the test can tell: the window really is smaller than the latent, and lr/strength move the result
    assert (want - denoised).abs().max() > 0.05


def test_learning_rate_schedule_at_later_steps():
    from likeness_blocks import hjb

    for i, want in ((0, 0.2), (1, 0.18), (3, 0.14), (7, 0.06), (10, 0.0)):
        assert hjb.hjb_learning_rate(i, 10, 0.2) == pytest.approx(want, abs=1e-12)


# --- bf16 detection on fake device descriptions -----------------------------------------------------------------

INTEL_SPR = ("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw "
             "avx512_bf16 amx_bf16 amx_tile amx_int8\n\nprocessor\t: 1\nflags\t\t: fpu avx512_bf16 amx_bf16\n")
INTEL_ICX = "processor\t: 0\nflags\t\t: fpu vme sse avx2 avx512f avx512bw avx512_vnni\n"
AMX_ONLY = "processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n"
LOOKALIKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16x\nmodel name\t: avx512_bf16 in a name\n"


@pytest.mark.parametrize("text, fast", [(INTEL_SPR, True), (INTEL_ICX, False), (AMX_ONLY, True), (LOOKALIKE, False),
                                        ("", False)])
def test_cpu_bf16_units_from_cpuinfo_text(hook_mod, text, fast):
    assert hook_mod.cpuinfo_has_bf16(text) is fast


@pytest.mark.parametrize("capability, fast", [((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True),
                                              ((6, 1), False)])
def test_cuda_bf16_units_from_capability(hook_mod, monkeypatch, capability, fast):
    """The device query itself runs; only what the (absent) CUDA driver would answer is faked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    hook_mod._has_fast_bf16.cache_clear()
    try:
        dev = torch.device("cuda", 0)
        assert hook_mod._has_fast_bf16(dev) is fast
        assert hook_mod.decode_dtype("auto", dev) == (torch.bfloat16 if fast else torch.float32)
    finally:
        hook_mod._has_fast_bf16.cache_clear()


@pytest.mark.parametrize("text, fast", [(INTEL_SPR, True), (INTEL_ICX, False)])
def test_auto_precision_on_a_cpu_reads_its_flags(hook_mod, monkeypatch, tmp_path, text, fast):
    """The CPU branch of the device query runs on a fake /proc/cpuinfo file (only the file is swapped)."""
    (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.setattr(hook_mod, "CPUINFO", str(tmp_path / "cpuinfo"))
    hook_mod._has_fast_bf16.cache_clear()
    try:
        assert hook_mod._has_fast_bf16(torch.device("cpu")) is fast
        assert hook_mod.decode_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if fast else torch.float32)
        monkeypatch.setattr(hook_mod, "CPUINFO", str(tmp_path / "missing"))
        hook_mod._has_fast_bf16.cache_clear()
        assert hook_mod._has_fast_bf16(torch.device("cpu")) is False  # unreadable: fp32, the exact computation
    finally:
        hook_mod._has_fast_bf16.cache_clear()


def test_auto_precision_on_this_cpu_follows_its_cpuinfo(hook_mod):
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    fast = bool(flags & {"avx512_bf16", "amx_bf16"})
    hook_mod._has_fast_bf16.cache_clear()
    assert hook_mod.decode_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if fast else torch.float32)
