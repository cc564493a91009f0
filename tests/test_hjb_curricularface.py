"""HJB Face Guidance with CurricularFace as its recogniser (issue 18), in-process.

The reference is made by ArcFace Embed with its 'recognizer' input connected: each detected box is cut as HJB cuts
decoded frames (integer box one pixel past the detector's right/bottom edge, bilinear to 112x112), scaled x / 255 - 0.5
over 0.5 and passed through CurricularFace. The expected values are written plainly here: the crop, resize and
scaling with torch ops, the backbone as the functional forward of support/tiny_recognizers.py from the state-dict key
names (not the pack's module), and for HJB a plain Adam loop (test_wiring_hjb.plain_hjb_step).

Models: the tiny square-face detector + iresnet pack, and two tiny CurricularFace IR state dicts with the released
key names, saved as .bin files in models/insightface/ and loaded through Load Differentiable ArcFace's loader.
The face is a textured bright 32 px square right of and above the centre of a 384x640 image (a non-square image, so
swapped axes show).
"""

import copy
import importlib
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from support import tiny_faces, tiny_recognizers as TR

pytest.importorskip("insightface")

CUR_FILE = "glint360k_curricular_face_r101_backbone.bin"
OTHER_CUR = "other_curricular_r101.bin"
H, W = 384, 640
FACE = (512, 96, 32)  # x, y, side: a 32 px square on the detector's grid, off-centre
# the detector reports the square's cell (512, 96, 544, 128); HJB's pixel box adds one pixel at the far edges
FACE_BOX = (512, 96, 545, 129)


def face_image(seed=4):
    g = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.uint8)
    x, y, s = FACE
    img[y:y + s, x:x + s] = g.integers(170, 256, size=(s, s, 3))  # textured, bright enough for the square detector
    return torch.from_numpy(img).float().div(255.0)[None]  # (1, H, W, 3)


def plain_cur_embedding(sd, image, box):
    """crop -> bilinear 112 -> x / 255 - 0.5 over 0.5 (x in 0..1 here: (x - 0.5) / 0.5) -> CurricularFace -> raw, L2-normed."""
    x1, y1, x2, y2 = box
    chw = image[0].permute(2, 0, 1)[None]
    crop = F.interpolate(chw[:, :, y1:y2, x1:x2], size=(112, 112), mode="bilinear", align_corners=False)
    with torch.no_grad():
        raw = TR.curricular_forward(sd, (crop - 0.5) / 0.5)[0]
    return raw, raw / torch.linalg.vector_norm(raw)


class PlainCur(torch.nn.Module):
    """CurricularFace as HJB's plain loop applies it: 0..1 RGB crops -> scaled -> the functional forward."""

    def __init__(self, sd):
        super().__init__()
        self.sd = sd

    def forward(self, crops):
        return TR.curricular_forward(self.sd, (crops - 0.5) / 0.5)


@pytest.fixture(scope="module")
def cur(pack, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("hjbcur")
    tiny_faces.make_tiny_pack(root, "hjbcur", seed=2)
    sds = {CUR_FILE: TR.curricular_state_dict(seed=11), OTHER_CUR: TR.curricular_state_dict(seed=12)}
    for name, sd in sds.items():
        torch.save(sd, str(root / "insightface" / name))
    old = folder_paths.folder_names_and_paths.get("insightface")
    folder_paths.folder_names_and_paths["insightface"] = ([str(root / "insightface")], set())
    L = importlib.import_module("likeness_pack.loaders.insightface")
    yield types.SimpleNamespace(
        sd=sds[CUR_FILE], N=importlib.import_module("likeness_pack.nodes.face"),
        H=importlib.import_module("likeness_pack.nodes.hjb"), pack=L.load_pack("hjbcur", "CPU")[0],
        rec=L.load_arcface_torch(f"insightface/{CUR_FILE}"), other=L.load_arcface_torch(f"insightface/{OTHER_CUR}"),
        arc=L.load_arcface_torch("insightface/hjbcur/rec_tiny.onnx"))
    if old is not None:
        folder_paths.folder_names_and_paths["insightface"] = old


def embed(cur, recognizer=None, image=None):
    return cur.N.ArcFaceEmbed.execute(cur.pack, face_image() if image is None else image, recognizer=recognizer).args


def test_reference_embedded_by_curricularface_equals_plain_computation(cur):
    fe, aligned_112, _large, _mask, report = embed(cur, cur.rec)
    assert cur.rec.kind == "curricularface"
    assert len(fe) == 1 and fe.faces[0].bbox.tolist() == [512.0, 96.0, 544.0, 128.0]
    raw, normed = plain_cur_embedding(cur.sd, face_image(), FACE_BOX)
    assert fe.faces[0].embedding.shape == (64,)  # the tiny backbone's width: CurricularFace's output, not the pack's
    torch.testing.assert_close(fe.faces[0].embedding, raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(fe.embeddings(normalized=True)[0], normed, atol=1e-5, rtol=0)
    assert (fe.model_name, fe.recognizer_kind, fe.crop) == (f"insightface/{CUR_FILE}", "curricularface", "box")
    assert f"insightface/{CUR_FILE} (curricularface)" in report
    # the test can tell a crop one pixel off, and a landmark-aligned crop (the pack's ArcFace preprocessing), apart
    _, shifted = plain_cur_embedding(cur.sd, face_image(), (511, 96, 544, 129))
    assert (shifted - normed).abs().max() > 1e-3
    with torch.no_grad():
        al = TR.curricular_forward(cur.sd, (aligned_112.permute(0, 3, 1, 2) - 0.5) / 0.5)[0]
    assert (F.normalize(al, dim=0) - normed).abs().max() > 1e-3


def test_unconnected_recognizer_keeps_the_pack_embedding(cur):
    fe = embed(cur)[0]
    assert (fe.model_name, fe.recognizer_kind, fe.crop) == ("hjbcur/rec_tiny.onnx", "arcface", "aligned")
    assert fe.faces[0].embedding.shape == (512,)


def _hook_args(sigmas, step):
    return {"sigma": torch.tensor([float(sigmas[step])]),
            "model_options": {"transformer_options": {"sample_sigmas": sigmas}}}


class PixelVAE:
    """A VAE whose latent is the image itself (1 px per latent px, frames on the batch axis): what HJB decodes is what
    it was given, so the hook's own boxes, crop and recogniser can be checked against the reference."""

    class Decoder(torch.nn.Module):
        def decode(self, z):
            return z

    def __init__(self):
        self.first_stage_model = self.Decoder()

    def process_output(self, x):
        return x

    def spacial_compression_decode(self):
        return 1


def test_hjb_loss_on_the_reference_image_itself_is_zero(cur):
    """The hook detects the face on the decoded frame and cuts it as the reference was cut: a frame equal to the
    reference image scores cos 1 (loss 0). A reference cut or scaled any other way would not."""
    from likeness_pack.adapters.sampler_hook import HJBFaceGuidance

    fe = embed(cur, cur.rec)[0]
    ref = F.normalize(fe.embeddings(normalized=True).mean(0), dim=-1)
    image = face_image().permute(0, 3, 1, 2).contiguous()  # the "latent" (1, 3, H, W) decodes to the image
    hook = HJBFaceGuidance(PixelVAE(), cur.rec, ref, None, iterations=1, eta=0.1, detector=cur.pack, window_margin=8,
                           precision="fp32", progress=False)
    sigmas = torch.linspace(1, 0, 11)
    model = types.SimpleNamespace(process_latent_out=lambda x: x)
    with torch.inference_mode():
        hook({"denoised": image, "model": model, **_hook_args(sigmas, 0)})
    assert hook._run_boxes.tolist() == [list(FACE_BOX)]
    assert hook.last_losses[-1][1][0] == pytest.approx(0.0, abs=1e-5)
    # a reference embedded by the same CurricularFace from the landmark-aligned crop (the pack's ArcFace cut) is far
    # from the frame's own crop: the zero above needs the reference cut as HJB cuts
    aligned_112 = embed(cur)[1]
    with torch.no_grad():
        wrong = F.normalize(cur.rec(aligned_112.permute(0, 3, 1, 2))[0], dim=0)
    other = HJBFaceGuidance(PixelVAE(), cur.rec, wrong, None, iterations=1, detector=cur.pack, precision="fp32",
                            progress=False)
    with torch.inference_mode():
        other({"denoised": image, "model": model, **_hook_args(sigmas, 0)})
    assert other.last_losses[-1][1][0] > 0.01


@pytest.fixture(scope="module")
def wan(pack):
    import comfy.sd
    from support import tiny_models

    return (comfy.sd.load_diffusion_model_state_dict(tiny_models.tiny_wan_t2v_state_dict()),
            comfy.sd.VAE(sd=tiny_models.tiny_wan_vae_state_dict()))


def plain_first_gradient(model, vae, rec, ref, denoised, box, margin):
    """d loss / d x0 at the first iteration, written out: the latent window, the decode, the crop, the loss.

    The latent goes into the decoder as x * scale + shift per channel, with scale and shift read off
    process_latent_out (it is affine per channel): the same map as process_latent_out, rounded once instead of in
    its own steps. The decoder amplifies that last-bit difference in its input: on ComfyUI 0.33.0 calling
    process_latent_out itself moves this gradient by 3.6e-5 of its largest element (measured), on 0.3.75 by less
    than 1e-5. The hook feeds its decoder the affine form."""
    x1, y1, x2, y2 = box
    r0, r1 = max(y1 // 8 - margin, 0), min(math.ceil(y2 / 8) + margin, denoised.shape[-2])
    c0, c1 = max(x1 // 8 - margin, 0), min(math.ceil(x2 / 8) + margin, denoised.shape[-1])
    decoder = copy.deepcopy(vae.first_stage_model).float().requires_grad_(False)
    z = denoised.clone().float().requires_grad_(True)
    probe = torch.zeros(1, denoised.shape[1], *([1] * (denoised.ndim - 2)))
    shift = model.process_latent_out(probe)
    scale = model.process_latent_out(probe + 1) - shift
    video = decoder.decode(z[..., r0:r1, c0:c1] * scale + shift)
    frames = ((video + 1) / 2).clamp(0, 1)[0].permute(1, 0, 2, 3)
    crops = F.interpolate(frames[:, :, y1 - 8 * r0:y2 - 8 * r0, x1 - 8 * c0:x2 - 8 * c0], size=(112, 112),
                          mode="bilinear", align_corners=False)
    torch.stack([(1 - F.cosine_similarity(e, ref, dim=0)).abs() for e in rec(crops)]).mean().backward()
    return z.grad


@pytest.mark.parametrize("low_memory", [True, False])
def test_hjb_node_with_curricularface_equals_plain_adam_loop(cur, wan, low_memory, monkeypatch):
    """Through the node: CurricularFace as 'arcface', the reference from ArcFace Embed's 'recognizer'; a later step at
    upstream's eta 0.1 and 3 iterations, strength 0.5, an off-centre face box from face_mask, margin 1: every
    iteration's loss equals the plain Adam loop's (the plain CurricularFace forward, the plainly computed reference),
    and so does the gradient the hook's loss gives at the first iteration.

    The refined latent itself is not compared element by element: Adam's later steps divide the running mean of
    the gradient by the root of its running square, and where an element's gradient changes sign between iterations
    that is a small difference of large numbers, so fp32 rounding is amplified. Measured with the plain loop against
    itself, the reference moved by 1e-7: at this setting a few elements move by 6e-4 (and the hook's result differed
    from the plain loop's by 2.5e-5 on ComfyUI 0.33.0, whose Wan VAE decodes in other time chunks). A wrong update
    shows in the next iteration's loss, which is compared."""
    from likeness_pack.likeness_blocks import hjb as hjb_mod
    from test_wiring_hjb import BOX, LAT_H, LAT_T, LAT_W, plain_hjb_step

    model, vae = wan
    fe = embed(cur, cur.rec)[0]
    mask = torch.zeros(1, 8 * LAT_H, 8 * LAT_W)
    x1, y1, x2, y2 = BOX
    mask[0, y1:y2, x1:x2] = 1
    step, eta, iterations, strength, margin = 3, 0.1, 3, 0.5, 1
    patched = cur.H.LikenessHJBFaceGuidance.execute(
        model, vae, cur.rec, fe, iterations=iterations, eta=eta, strength=strength, start_percent=0.0, end_percent=0.8,
        window_margin=margin, frames_per_iteration=0, low_memory_decode=low_memory, precision="fp32",
        face_mask=mask).args[0]
    hook = patched.model_options["sampler_post_cfg_function"][-1]
    hook.progress = False
    grads, refine = [], hjb_mod.refine_x0

    def spy(x0, loss_fn, *args):  # the hook's own loss at its starting point, back-propagated once more
        z = x0.detach().float().clone().requires_grad_(True)
        loss = loss_fn(z, 0)
        if torch.is_tensor(loss):
            loss.backward()
        grads.append(z.grad.clone())
        return refine(x0, loss_fn, *args)

    monkeypatch.setattr(hjb_mod, "refine_x0", spy)
    denoised = torch.randn(1, 16, LAT_T, LAT_H, LAT_W, generator=torch.Generator().manual_seed(2))
    sigmas = torch.linspace(1, 0, 11)
    with torch.inference_mode():
        out = hook({"denoised": denoised, "model": model.model, **_hook_args(sigmas, step)})
    _, ref = plain_cur_embedding(cur.sd, face_image(), FACE_BOX)
    _, losses = plain_hjb_step(model.model, vae, PlainCur(cur.sd), ref, denoised, BOX, margin, step, 10, iterations,
                               eta, strength)
    assert hook.last_losses[-1][0] == step and len(losses) == iterations
    assert hook.last_losses[-1][1] == pytest.approx(losses, abs=1e-5)
    assert losses[-1] < losses[0] - 0.02  # the optimisation really lowers the CurricularFace loss
    g = plain_first_gradient(model.model, vae, PlainCur(cur.sd), ref, denoised, BOX, margin)
    assert len(grads) == 1 and float(g.abs().max()) > 1e-3
    torch.testing.assert_close(grads[0] / g.abs().max(), g / g.abs().max(), atol=1e-5, rtol=0)
    assert (out - denoised).abs().max() > 0.02  # the step really moved the latent
    # the losses depend on the reference: another one would not match them
    _, bad = plain_hjb_step(model.model, vae, PlainCur(cur.sd), F.normalize(torch.randn(64, generator=torch.Generator()
                            .manual_seed(5)), dim=0), denoised, BOX, margin, step, 10, 1, eta, strength)
    assert abs(bad[0] - losses[0]) > 1e-3


def _node(cur, arcface, reference):
    return cur.H.LikenessHJBFaceGuidance.execute(
        None, None, arcface, reference, iterations=1, eta=0.1, strength=1.0, start_percent=0.0, end_percent=0.8,
        window_margin=4, frames_per_iteration=0)


def test_mismatched_recogniser_and_reference_are_refused(cur, wan):
    pack_ref, cur_ref, other_ref = embed(cur)[0], embed(cur, cur.rec)[0], embed(cur, cur.other)[0]
    arc_ref = embed(cur, cur.arc)[0]  # a torch ArcFace through 'recognizer': box crops, kind arcface
    # ArcFace reference (the pack's) + CurricularFace recogniser
    with pytest.raises(ValueError, match=r"'arcface' is insightface/glint360k\S* \(curricularface\).*"
                                         r"embedded by the InsightFace pack's ArcFace \(hjbcur/rec_tiny.onnx\).*"
                                         r"cannot be compared.*ArcFace Embed's 'recognizer'"):
        _node(cur, cur.rec, pack_ref)
    # CurricularFace reference + ArcFace recogniser
    with pytest.raises(ValueError, match=r"'arcface' is insightface/hjbcur/rec_tiny.onnx \(arcface\).*"
                                         r"embedded by insightface/glint360k.*\(curricularface\).*Unplug ArcFace Embed's "
                                         r"'recognizer'.*or give 'arcface' the curricularface recogniser"):
        _node(cur, cur.arc, cur_ref)
    # the same kind, another file
    with pytest.raises(ValueError, match=rf"embedded by insightface/{OTHER_CUR} \(curricularface\).*'arcface' is "
                                         rf"insightface/{CUR_FILE}.*Connect the same Load Differentiable ArcFace"):
        _node(cur, cur.rec, other_ref)
    # matching pairs pass the check (the node then needs a model: None fails later, at the patch)
    model, vae = wan
    for rec, ref in ((cur.rec, cur_ref), (cur.arc, pack_ref), (cur.arc, arc_ref)):
        cur.H.LikenessHJBFaceGuidance.execute(model, vae, rec, ref, iterations=1, eta=0.1, strength=1.0,
                                              start_percent=0.0, end_percent=0.8, window_margin=4, frames_per_iteration=0)


def test_recogniser_references_are_refused_where_the_pack_embedding_is_meant(cur):
    from likeness_pack.nodes.stableanimator import LikenessStableAnimatorFaceEncoder

    cur_ref = embed(cur, cur.rec)[0]
    with pytest.raises(ValueError, match=r"'reference' was embedded by insightface/glint360k.*\(curricularface, on box "
                                         r"crops\).*ArcFace Embed with 'recognizer' unplugged"):
        cur.N.IdentityMetrics.execute(cur.pack, reference=cur_ref, video=face_image())
    with pytest.raises(ValueError, match=r"face_embeds were made by insightface/glint360k.*'recognizer' unplugged"):
        LikenessStableAnimatorFaceEncoder.execute(None, cur_ref, None, 0)
    with pytest.raises(ValueError, match=r"'recognizer' is a str, not a recogniser"):
        cur.N.ArcFaceEmbed.execute(cur.pack, face_image(), recognizer="glint360k.bin")
