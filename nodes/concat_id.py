"""Concat-ID on native Wan 2.1: loader, reference preparation, VAE-concat conditioner, model patch."""

import logging

import torch

from ..comfy_compat import io
from ._types import ConcatIdWeights, FaceEmbeds

CATEGORY = "Likeness/Concat-ID"
MULTI_REF_WARNING = (
    "Several references (identities) are supported, each as its own latent frame and RoPE slot, but the released "
    "Concat-ID Wan weights were trained with exactly one reference: more than one is an untrained extension."
)


class ConcatIDLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="LikenessConcatIDLoader",
            display_name="Concat-ID Wan Loader",
            category=CATEGORY,
            description=(
                "Loads Concat-ID's Wan 2.1 checkpoint (first_stage.pt or second_stage_adaln.pt from models/concat_id) "
                "as a native Wan MODEL plus the Concat-ID weights (the AdaLN variant's extra parameters). "
                "first_stage.pt also loads with the stock Load Diffusion Model node."
            ),
            inputs=[
                io.Combo.Input("concat_id_name", options=folder_paths.get_filename_list("concat_id"),
                               tooltip="A file in models/concat_id: first_stage.pt (first-stage model) or "
                                       "second_stage_adaln.pt (AdaLN model, adds time_projection_ref and modulation_ref)."),
                io.Combo.Input("weight_dtype", options=["default", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"], default="default",
                               tooltip="Storage dtype of the Wan weights (default: chosen by ComfyUI for your device)."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                ConcatIdWeights.Output(display_name="concat_id_weights"),
            ],
        )

    @classmethod
    def execute(cls, concat_id_name, weight_dtype="default") -> io.NodeOutput:
        from ..loaders.concat_id import load_concat_id
        from ..loaders.model_folders import resolve_file

        opts = {}
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn,
                  "fp8_e5m2": torch.float8_e5m2}
        if weight_dtype in dtypes:
            opts["dtype"] = dtypes[weight_dtype]
        path = resolve_file("concat_id", concat_id_name, "Concat-ID Wan Loader: concat_id_name",
                            "Put Concat-ID's first_stage.pt or second_stage_adaln.pt in models/concat_id.")
        model, weights = load_concat_id(path, model_options=opts)
        return io.NodeOutput(model, weights)


class ConcatIDPrepareReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessConcatIDPrepareReference",
            display_name="Concat-ID Prepare Reference",
            category=CATEGORY,
            description=(
                "Prepares reference faces as Concat-ID does: aligns the largest face of each image to 448 px with its "
                "5 keypoints (ArcFace template x4), optionally blanks the background with a mask, then resizes, pads "
                "with black and centre-crops to the video size. One output image per input image."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Reference photo(s); one prepared reference per image in the batch."),
                FaceEmbeds.Input("face_embeds", tooltip="Faces found in 'image' (from ArcFace Embed); the largest face "
                                                        "of each image is aligned with its 5 keypoints."),
                io.Int.Input("width", default=832, min=16, max=8192, step=16,
                             tooltip="Video width in pixels (the same as in the conditioner). Concat-ID was trained at 832."),
                io.Int.Input("height", default=480, min=16, max=8192, step=16,
                             tooltip="Video height in pixels (the same as in the conditioner). Concat-ID was trained at 480."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: 1 keeps, 0 blanks to black (Concat-ID keeps face and hair, blanks "
                                      "background, hat, ears, neck, clothes). Either the size of 'image' or 448x448 "
                                      "(already aligned). Any face-parsing or hand-drawn mask works."),
            ],
            outputs=[
                io.Image.Output(display_name="reference"),
                io.Image.Output(display_name="aligned_face"),
            ],
        )

    @classmethod
    def execute(cls, image, face_embeds, width, height, mask=None) -> io.NodeOutput:
        from ..likeness_blocks.concat_id import CONCAT_ID_FACE_SIZE, align_face, resize_pad_crop

        if image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError(f"'image' must be an IMAGE batch (N, H, W, 3), got shape {tuple(image.shape)}.")
        n, ih, iw = image.shape[:3]
        sizes = list(getattr(face_embeds, "image_sizes", None) or [])
        if sizes and len(sizes) != n:
            raise ValueError(
                f"face_embeds were made from {len(sizes)} image(s) but 'image' has {n}: connect the same IMAGE to "
                "ArcFace Embed and to this node."
            )
        for i, hw in enumerate(sizes):
            if (int(hw[0]), int(hw[1])) != (ih, iw):
                raise ValueError(
                    f"face_embeds were detected on a {int(hw[1])}x{int(hw[0])} image but image {i} is {iw}x{ih}: they "
                    "come from another image. Connect the same IMAGE to ArcFace Embed and to this node."
                )
        if mask is not None:
            if mask.ndim == 2:
                mask = mask[None]
            if mask.shape[0] not in (1, n):
                raise ValueError(f"'mask' has {mask.shape[0]} masks for {n} images; give one mask or one per image.")
            if tuple(mask.shape[1:]) not in ((ih, iw), (CONCAT_ID_FACE_SIZE, CONCAT_ID_FACE_SIZE)):
                raise ValueError(
                    f"'mask' is {mask.shape[2]}x{mask.shape[1]}; it must match 'image' ({iw}x{ih}) or the aligned face "
                    f"({CONCAT_ID_FACE_SIZE}x{CONCAT_ID_FACE_SIZE})."
                )
        aligned = []
        for i in range(n):
            img = image[i, :, :, :3].float()
            faces = [f for f in face_embeds.faces if f.image_index == i]
            mk = None if mask is None else mask[min(i, mask.shape[0] - 1)].float()
            source_mask = mk if mk is not None and tuple(mk.shape) == (ih, iw) else None
            if faces:
                def area(f):
                    b = f.bbox.float()
                    return float((b[2] - b[0]) * (b[3] - b[1]))
                face = max(faces, key=area)
                out, out_mask = align_face(img, face.kps, CONCAT_ID_FACE_SIZE, source_mask)
            else:
                logging.warning("Likeness Concat-ID: no face in reference image %d; using the whole image, as Concat-ID "
                                "does when no face is detected.", i)
                out, out_mask = img, source_mask
            if mk is not None and out_mask is None:
                out_mask = mk
            if out_mask is not None:
                if out_mask.shape != out.shape[:2]:
                    raise ValueError("A 448x448 'mask' can only be used with images where a face was found.")
                out = out * out_mask.clamp(0, 1)[..., None]
            aligned.append(out)
        refs = torch.cat([resize_pad_crop(a[None], height, width) for a in aligned], 0)
        preview = torch.cat([resize_pad_crop(a[None], CONCAT_ID_FACE_SIZE, CONCAT_ID_FACE_SIZE) for a in aligned], 0)
        return io.NodeOutput(refs, preview)


class ConcatIDConditioner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessConcatIDConditioner",
            display_name="Concat-ID Wan Conditioning",
            category=CATEGORY,
            description=(
                "VAE-encodes each prepared reference as one clean latent frame and attaches the frames to both "
                "positive and negative (both CFG branches carry the references, as in Concat-ID); outputs an empty "
                "video latent. Use with the Concat-ID Model Patch (Wan or CogVideoX: give it that model's VAE). "
                + MULTI_REF_WARNING
            ),
            inputs=[
                io.Conditioning.Input("positive", tooltip="Positive text conditioning (Wan umT5)."),
                io.Conditioning.Input("negative", tooltip="Negative text conditioning (Wan umT5)."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE, or the CogVideoX VAE for Concat-ID's CogVideoX model."),
                io.Image.Input("references", tooltip="Prepared reference(s) from Concat-ID Prepare Reference; each image "
                                                     "in the batch becomes its own latent frame (one identity each)."),
                io.Int.Input("width", default=832, min=16, max=8192, step=16, tooltip="Video width in pixels."),
                io.Int.Input("height", default=480, min=16, max=8192, step=16, tooltip="Video height in pixels."),
                io.Int.Input("length", default=81, min=1, max=8192, step=4,
                             tooltip="Number of video frames (4n+1; 81 as Concat-ID). The references are not part of "
                                     "the output video."),
                io.Int.Input("batch_size", default=1, min=1, max=64, optional=True,
                             tooltip="Number of videos per run (default 1)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.Latent.Output(display_name="latent"),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, vae, references, width, height, length, batch_size=None) -> io.NodeOutput:
        import comfy.model_management
        import node_helpers

        from ..likeness_blocks.concat_id import resize_pad_crop

        batch_size = 1 if batch_size is None else int(batch_size)
        if references.ndim != 4 or references.shape[0] < 1:
            raise ValueError(f"'references' must be an IMAGE batch with at least one image, got {tuple(references.shape)}.")
        if references.shape[0] > 1:
            logging.warning("Likeness Concat-ID: %d references. %s", references.shape[0], MULTI_REF_WARNING)
        refs = references[..., :3]
        if tuple(refs.shape[1:3]) != (height, width):
            refs = resize_pad_crop(refs, height, width)
        lat = []
        for i in range(refs.shape[0]):
            z = vae.encode(refs[i:i + 1])
            if z.ndim != 5 or z.shape[2] != 1:
                raise ValueError(f"The VAE encoded one reference image to shape {tuple(z.shape)}; Concat-ID needs a "
                                 "Wan 2.1 or CogVideoX VAE (one latent frame per image).")
            lat.append(z)
        ref_latent = torch.cat(lat, dim=2)
        positive = node_helpers.conditioning_set_values(positive, {"time_dim_concat": ref_latent})
        negative = node_helpers.conditioning_set_values(negative, {"time_dim_concat": ref_latent})
        latent = torch.zeros([batch_size, 16, ((length - 1) // 4) + 1, height // 8, width // 8],
                             device=comfy.model_management.intermediate_device())
        return io.NodeOutput(positive, negative, {"samples": latent})


class ConcatIDModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..likeness_blocks.concat_id import PLACEMENTS

        return io.Schema(
            node_id="LikenessConcatIDModelPatch",
            display_name="Concat-ID Model Patch (Wan)",
            category=CATEGORY,
            description=(
                "Patches a native Wan 2.1 MODEL (on a clone) to run Concat-ID's forward for the reference frames: "
                "RoPE slot right after the last video frame and shifted one frame-width to the right, no text "
                "cross-attention for the references, reference output cut off before the sampler step; with the "
                "AdaLN weights the references get their own modulation (second_stage_adaln.pt). Long videos: put "
                "WAN Context Windows (Manual) after this node; every window then gets the same references, in their "
                "slot right after that window's frames, and no reference frame reaches the output. " + MULTI_REF_WARNING
            ),
            inputs=[
                io.Model.Input("model", tooltip="A native Wan 2.1 T2V MODEL, ideally loaded from a Concat-ID checkpoint."),
                ConcatIdWeights.Input("concat_id_weights", optional=True,
                                      tooltip="From Concat-ID Wan Loader. With second_stage_adaln.pt this turns on the "
                                              "AdaLN variant; without it (or with first_stage.pt) the first-stage forward is used."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Multiplies the attention every token pays to the reference tokens (a log(strength) "
                                       "bias on their attention logits). 1.0 = Concat-ID exactly; 0 = references ignored; "
                                       "above 1 pulls harder toward the reference (and its pose/lighting)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling at which the references start being attended (0 = "
                                       "from the first step). Before it, the model runs as plain text-to-video."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling after which the references are no longer attended "
                                       "(1 = until the last step). Ending early keeps the identity but frees late details."),
                io.Combo.Input("multi_reference_placement", options=list(PLACEMENTS), default="next_frames",
                               tooltip="Only for 2+ references (untrained): next_frames puts reference k at time T+k "
                                       "(each shifted right by one frame width, like the first); side_by_side puts all "
                                       "at time T, reference k at columns (k+1)w..(k+2)w-1. The first reference always "
                                       "gets Concat-ID's trained slot."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, concat_id_weights=None, strength=1.0, start_percent=0.0, end_percent=1.0,
                multi_reference_placement="next_frames") -> io.NodeOutput:
        from ..adapters.wan import apply_concat_id

        adaln = None
        if concat_id_weights is not None:
            adaln = getattr(concat_id_weights, "adaln", None)
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}); set start <= end.")
        m = apply_concat_id(model, adaln=adaln, strength=strength, start_percent=start_percent,
                            end_percent=end_percent, placement=multi_reference_placement)
        return io.NodeOutput(m)


NODES = [ConcatIDLoader, ConcatIDPrepareReference, ConcatIDConditioner, ConcatIDModelPatch]
