"""HJB face optimisation (StableAnimator) as a MODEL patch for any base model."""

import torch
import torch.nn.functional as F

from ..comfy_compat import io
from ._types import ArcFaceTorch, FaceEmbeds, InsightFace


HOW_TO_EMBED = ("Connect the same Load Differentiable ArcFace to both HJB Face Guidance's 'arcface' and ArcFace Embed's "
                "'recognizer' input (the reference is then embedded by it, cropped as HJB crops the frames)")


def check_reference_recognizer(arcface, reference):
    """HJB compares the recogniser's embedding of each decoded face with the reference's: both must come from the same
    recogniser (embeddings of two recognisers live in different spaces; the cosine would be meaningless)."""
    rec_kind = getattr(arcface, "kind", "arcface")
    rec_name = getattr(arcface, "name", "") or "the connected recogniser"
    ref_kind = getattr(reference, "recognizer_kind", "arcface")
    ref_by_rec = getattr(reference, "crop", "aligned") == "box"  # made through ArcFace Embed's 'recognizer'
    ref_name = reference.model_name or ("a recogniser" if ref_by_rec else "an InsightFace pack")
    ref_desc = (f"by {ref_name} ({ref_kind}) through ArcFace Embed's 'recognizer'" if ref_by_rec
                else f"by the InsightFace pack's ArcFace ({ref_name})")
    if rec_kind != ref_kind:
        fix = HOW_TO_EMBED if rec_kind != "arcface" else (
            "Unplug ArcFace Embed's 'recognizer' (an ArcFace 'arcface' also takes the pack's ArcFace reference) or "
            f"connect this same recogniser to it; or give 'arcface' the {ref_kind} recogniser that made the reference")
        raise ValueError(
            f"HJB Face Guidance: 'arcface' is {rec_name} ({rec_kind}) but 'reference' was embedded {ref_desc}; "
            f"embeddings of different recognisers cannot be compared. {fix}.")
    if ref_by_rec and reference.model_name != getattr(arcface, "name", ""):
        raise ValueError(
            f"HJB Face Guidance: 'reference' was embedded {ref_desc} but 'arcface' is {rec_name}; HJB needs the "
            f"reference embedded by the recogniser it optimises. {HOW_TO_EMBED}.")


class LikenessHJBFaceGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessHJBFaceGuidance",
            display_name="HJB Face Guidance",
            category="Likeness/Sampling",
            description="StableAnimator's HJB face optimisation inside any sampler: at each active step the "
                        "predicted clean video is refined with Adam so its decoded faces match the reference "
                        "ArcFace (or CurricularFace) embedding. Works with Wan, SVD and the pack's CogVideoX through their VAEs. "
                        "Costs extra decoder and recogniser passes per active step. With context windows (Context "
                        "Windows / WAN Context Windows) it works on the fused prediction, after the windows are "
                        "merged and CFG applied, in pieces no longer than one window, each decoded and refined on "
                        "its own with the face boxes of its frames: memory follows the window, not the video.",
            inputs=[
                io.Model.Input("model", tooltip="The video model to guide (patched on a copy)."),
                io.Vae.Input("vae", tooltip="The VAE that decodes this model's latents."),
                ArcFaceTorch.Input("arcface", tooltip="Differentiable recogniser from Load Differentiable ArcFace: ArcFace "
                                                      "(glintr100 / w600k ONNX or .pth) or CurricularFace IR-101 (.bin). "
                                                      "CurricularFace needs a reference embedded by it: connect it to "
                                                      "ArcFace Embed's 'recognizer' too."),
                FaceEmbeds.Input("reference", tooltip="Reference face(s) from ArcFace Embed; several are averaged. Made by "
                                                      "the recogniser given to 'arcface' (ArcFace Embed's 'recognizer'), "
                                                      "or, with an ArcFace recogniser, by the pack's ArcFace."),
                io.Mask.Input("face_mask", optional=True,
                              tooltip="Face region per output frame at OUTPUT resolution (one mask = every frame). "
                                      "Its bounding box is cropped each frame. Unconnected: boxes from the insightface "
                                      "detector, else whole frames."),
                InsightFace.Input("insightface", optional=True,
                                  tooltip="Face detector for per-frame boxes, run on a preview decode at the first "
                                          "active step (used when face_mask is unconnected)."),
                io.Int.Input("iterations", default=3, min=0, max=50, tooltip="Adam iterations per active step (upstream: 3)."),
                io.Float.Input("eta", default=0.1, min=0.0, max=10.0, step=0.01,
                               tooltip="Learning rate at the first step; decays as eta*(1 - step/steps) (upstream: 0.1)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Blend of the refined prediction: 0 = off, 1 = the algorithm as published."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First active step as a fraction of the steps."),
                io.Float.Input("end_percent", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Last active step as a fraction (0.8 of 25 steps = the first 21, as upstream)."),
                io.Int.Input("window_margin", default=4, min=0, max=256,
                             tooltip="Latent pixels decoded around the face boxes. Larger = closer to a full decode, "
                                     "more memory. 256 decodes whole frames (the upstream cost)."),
                io.Boolean.Input("low_memory_decode", default=True,
                                 tooltip="Back-propagate the decode piece by piece: Wan's causal VAE one latent frame "
                                         "at a time (checkpointed along time, one extra decode); SVD's temporal VAE "
                                         "one 4-frame decode chunk (upstream's chunk size) at a time. Same result, "
                                         "less memory. Off: everything at once, as upstream."),
                io.Int.Input("frames_per_iteration", default=0, min=0, max=1024,
                             tooltip="For models with frames on the batch axis (SVD): frames decoded per iteration, "
                                     "rotating. 0 = all frames (upstream)."),
                io.Combo.Input("precision", options=["auto", "fp32", "bf16", "fp16"], default="auto",
                               tooltip="Precision of the decode inside the optimisation (ArcFace, loss and Adam stay "
                                       "fp32). auto: bf16 where the device has bf16 units (NVIDIA Ampere or newer, "
                                       "CPUs with AVX512-BF16 or AMX), else fp32. fp32: the exact computation. "
                                       "See docs/hjb.md for how far bf16 moves the result."),
            ],
            outputs=[io.Model.Output(tooltip="The model with HJB guidance in its sampler.")],
        )

    @classmethod
    def execute(cls, model, vae, arcface, reference, iterations, eta, strength, start_percent, end_percent,
                window_margin, frames_per_iteration, low_memory_decode=True, precision="auto", face_mask=None,
                insightface=None):
        from ..adapters.sampler_hook import HJBFaceGuidance, apply_hjb
        from ..likeness_blocks.hjb import MIN_FACE_BOX, boxes_from_masks

        if end_percent < start_percent:
            raise ValueError(f"end_percent ({end_percent}) is before start_percent ({start_percent}): swap them.")
        check_reference_recognizer(arcface, reference)
        ref = F.normalize(reference.embeddings(normalized=True).mean(0), dim=-1)
        boxes = None
        if face_mask is not None:
            mask = face_mask if face_mask.ndim == 3 else face_mask[None]
            boxes, present = boxes_from_masks(mask.float().cpu())
            if not bool(present.any()):
                raise ValueError("face_mask is empty in every frame: paint the face region, or unplug it to use whole frames.")
            sizes = boxes[:, 2:] - boxes[:, :2]
            small = [i for i in range(len(boxes)) if bool(present[i]) and int(sizes[i].min()) < MIN_FACE_BOX]
            if small:
                w, h = (int(x) for x in sizes[small[0]])
                raise ValueError(
                    f"HJB Face Guidance: face_mask frame {small[0]} marks a face region of only {w}x{h} pixels (at least "
                    f"{MIN_FACE_BOX}x{MIN_FACE_BOX} is needed; masks are at output resolution). Paint the whole face, "
                    "or unplug face_mask to use detected boxes or whole frames.")
            # frames whose mask is empty keep the whole-frame box (upstream's fallback)
        hook = HJBFaceGuidance(vae, arcface, ref, boxes, iterations=iterations, eta=eta, strength=strength,
                               start_percent=start_percent, end_percent=end_percent, window_margin=window_margin,
                               frames_per_iteration=frames_per_iteration, detector=insightface,
                               framewise=low_memory_decode, precision=precision)
        return io.NodeOutput(apply_hjb(model, hook))


NODES = [LikenessHJBFaceGuidance]
