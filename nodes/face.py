"""Face nodes: Load InsightFace, ArcFace Embed, Load Differentiable ArcFace, Identity Metrics."""

import logging

import torch

from ..comfy_compat import SHOWS_RESULT, io, ui
from ._types import ArcFaceTorch, FaceEmbeds, InsightFace

log = logging.getLogger("likeness")
CATEGORY = "Likeness/Face"


def _pack_options():
    from ..loaders.insightface import list_packs

    try:
        packs = list_packs()
    except Exception:  # listing must never break the node list
        packs = []
    return packs or ["antelopev2"]


def _require(value, name, what, fix):
    if value is None:
        raise ValueError(f"'{name}' is not connected: it needs {what}. {fix}")
    return value


class LoadInsightFace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..loaders.insightface import PROVIDERS

        packs = _pack_options()
        return io.Schema(
            node_id="LikenessLoadInsightFace",
            display_name="Load InsightFace",
            category=CATEGORY,
            description=(
                "Loads an InsightFace model pack (face detection + ArcFace recognition) from "
                "ComfyUI/models/insightface/models/<pack>/ and reports which ONNX Runtime provider really runs it."
            ),
            inputs=[
                io.Combo.Input("model_name", options=packs, default="antelopev2" if "antelopev2" in packs else packs[0],
                               tooltip="Pack folder under models/insightface/models/: antelopev2 (glintr100, what FantasyID, "
                                       "StableAnimator and ConsisID use) or buffalo_l; any folder with a detection and a recognition .onnx works."),
                io.Combo.Input("provider", options=list(PROVIDERS), default="auto",
                               tooltip="Where ONNX Runtime runs the models. 'auto' takes the first GPU provider installed, else CPU. "
                                       "A provider that is not installed or fails to start falls back to CPU; the status output says so."),
            ],
            outputs=[
                InsightFace.Output(display_name="insightface"),
                io.String.Output(display_name="status"),
            ],
            **SHOWS_RESULT,
        )

    @classmethod
    def execute(cls, model_name, provider="auto"):
        from ..loaders.insightface import load_pack

        pack, status = load_pack(model_name, provider)
        return io.NodeOutput(pack, status, ui=ui.PreviewText(status))


class ArcFaceEmbed(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..likeness_blocks.face_embed import FACE_CHOICES

        return io.Schema(
            node_id="LikenessArcFaceEmbed",
            display_name="ArcFace Embed",
            category=CATEGORY,
            description=(
                "Finds faces in reference images and computes their ArcFace identity embeddings (FACE_EMBEDS), "
                "with aligned 112x112 crops, larger aligned crops and a face mask. Retries detection at smaller sizes."
            ),
            inputs=[
                InsightFace.Input("insightface", tooltip="The pack from Load InsightFace."),
                io.Image.Input("image", tooltip="Reference image(s) of the person. RGB, RGBA (alpha ignored) or grayscale; every image in the batch is used."),
                io.Combo.Input("face_choice", options=list(FACE_CHOICES), default="largest",
                               tooltip="Which face to keep per image: the largest, the one at face_index counting from the left, "
                                       "or all faces (several identities)."),
                io.Int.Input("face_index", default=0, min=0, max=63,
                             tooltip="With 'by index': 0 = leftmost face, 1 = the next one to its right, ..."),
                io.Combo.Input("on_no_face", options=["error", "skip image"], default="error",
                               tooltip="'error' stops with the index of the image that has no (such) face; 'skip image' "
                                       "drops it and lists it in the report (at least one face must remain)."),
                io.Int.Input("det_size", default=640, min=160, max=1280, step=32,
                             tooltip="Detector input size. If nothing is found, detection is retried at 480 and 320 "
                                     "(helps with faces that fill the frame)."),
                io.Float.Input("threshold", default=0.5, min=0.05, max=0.99, step=0.01,
                               tooltip="Detection confidence threshold; lower it for hard faces (profile, blur, small)."),
                io.Int.Input("crop_size", default=512, min=112, max=2048, step=16,
                             tooltip="Size of the larger aligned crop output (same alignment as the 112 crop, scaled)."),
            ],
            outputs=[
                FaceEmbeds.Output(display_name="face_embeds"),
                io.Image.Output(display_name="aligned_112"),
                io.Image.Output(display_name="aligned_crop"),
                io.Mask.Output(display_name="face_mask"),
                io.String.Output(display_name="report"),
            ],
            **SHOWS_RESULT,
        )

    @classmethod
    def execute(cls, insightface, image, face_choice="largest", face_index=0, on_no_face="error", det_size=640,
                threshold=0.5, crop_size=512):
        from ..likeness_blocks.face_embed import embed_faces

        _require(insightface, "insightface", "an InsightFace pack", "Connect a Load InsightFace node.")
        _require(image, "image", "a reference image", "Connect a Load Image node.")
        fe, crops, large, masks, report = embed_faces(
            insightface, image, face_choice=face_choice, face_index=int(face_index),
            skip_missing=(on_no_face == "skip image"), det_size=int(det_size), threshold=float(threshold),
            crop_size=int(crop_size), input_name="image",
        )
        if fe.skipped:
            log.warning("Likeness ArcFace Embed skipped images without a face: %s", fe.skipped)
        return io.NodeOutput(fe, crops, large, masks, report, ui=ui.PreviewText(report))


class LoadDifferentiableArcFace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..loaders.insightface import list_arcface_sources

        try:
            sources = list_arcface_sources()
        except Exception:
            sources = []
        sources = sources or ["insightface/antelopev2/glintr100.onnx"]
        return io.Schema(
            node_id="LikenessLoadDifferentiableArcFace",
            display_name="Load Differentiable ArcFace",
            category=CATEGORY,
            description=(
                "A torch ArcFace recogniser that gradients can flow through (for StableAnimator's HJB face optimisation), "
                "converted from the pack's recognition ONNX or loaded from a torch iresnet checkpoint (glintr100_torch.pth)."
            ),
            inputs=[
                io.Combo.Input("source", options=sources, default=sources[0],
                               tooltip="insightface/<pack>/<file>.onnx converts that recognition ONNX to torch (its embeddings match "
                                       "onnxruntime's); stableanimator/glintr100_torch.pth (or any iresnet state dict) loads safely "
                                       "with weights_only."),
            ],
            outputs=[ArcFaceTorch.Output(display_name="arcface")],
        )

    @classmethod
    def execute(cls, source):
        from ..loaders.insightface import load_arcface_torch

        return io.NodeOutput(load_arcface_torch(source))


class IdentityMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessIdentityMetrics",
            display_name="Identity Metrics",
            category=CATEGORY,
            description=(
                "Measures how well a video keeps the reference identity: per-frame ArcFace cosine similarity to the "
                "reference (FantasyID RS / StableAnimator CSIM / Concat-ID ArcSim), inter-frame similarity, face motion "
                "(optical flow inside the face box) and frames without a face, as numbers, a JSON table and a chart."
            ),
            is_output_node=True,
            inputs=[
                InsightFace.Input("insightface", tooltip="The same pack that made the reference embeddings."),
                FaceEmbeds.Input("reference", tooltip="Reference faces from ArcFace Embed; several faces are averaged into one identity."),
                io.Image.Input("video", tooltip="The generated frames (an IMAGE batch, e.g. from VAE Decode or Load Video)."),
                io.Int.Input("det_size", default=640, min=160, max=1280, step=32,
                             tooltip="Detector input size for the frames (retried at 480 and 320 when a frame has no face)."),
                io.Float.Input("threshold", default=0.5, min=0.05, max=0.99, step=0.01,
                               tooltip="Detection confidence threshold for the frames."),
                io.Int.Input("batch_size", default=64, min=1, max=1024, optional=True,
                             tooltip="Faces per recognition batch; 1 runs frame by frame (slower)."),
            ],
            outputs=[
                io.Float.Output(display_name="similarity_mean"),
                io.Float.Output(display_name="inter_frame_mean"),
                io.Float.Output(display_name="face_motion_mean"),
                io.Int.Output(display_name="frames_without_face"),
                io.String.Output(display_name="table_json"),
                io.Image.Output(display_name="plot"),
            ],
        )

    @classmethod
    def execute(cls, insightface, reference, video, det_size=640, threshold=0.5, batch_size=None):
        from ..likeness_blocks import metrics as M
        from ..likeness_blocks.face_embed import frame_embeddings, largest_face_per_frame, to_bgr_uint8, to_rgb

        _require(insightface, "insightface", "an InsightFace pack", "Connect a Load InsightFace node.")
        _require(reference, "reference", "reference FACE_EMBEDS", "Connect ArcFace Embed's face_embeds output.")
        _require(video, "video", "the video frames", "Connect an IMAGE batch.")
        if len(reference) == 0:
            raise ValueError("'reference' holds no face; run ArcFace Embed on an image with a face.")
        rec_name = getattr(insightface, "rec_name", "")
        if reference.model_name and rec_name and reference.model_name != rec_name:
            raise ValueError(
                f"'reference' was embedded with {reference.model_name} but this pack recognises with {rec_name}; "
                "embeddings of different recognisers cannot be compared. Use the same Load InsightFace for both."
            )
        rgb = to_rgb(video, "video")
        dets = largest_face_per_frame(insightface, rgb, int(det_size), float(threshold))
        ids, emb = frame_embeddings(insightface, rgb, dets, batch_size=int(batch_size or 64))
        ref = M.reference_vector(reference.embeddings(normalized=True))
        if emb.shape[0] and emb.shape[1] != ref.shape[0]:
            raise ValueError(f"Reference embeddings have {ref.shape[0]} values but the pack gives {emb.shape[1]}; use the same pack.")
        cos = M.cosine_to_reference(emb, ref)
        ifs = M.inter_frame_similarity(emb, ids)
        gray = [to_bgr_uint8(rgb[t]).mean(axis=2).astype("uint8") for t in range(rgb.shape[0])]
        fm = M.face_motion(gray, [d[0] if d is not None else None for d in dets])
        summary, rows = M.summarize(rgb.shape[0], ids, cos.tolist(), ifs, fm, [dets[t][2] for t in ids])
        table = M.table_json(summary, rows)
        plot = torch.from_numpy(M.plot_metrics(summary, rows).copy()).float().div(255.0).unsqueeze(0)
        text = (f"similarity to reference {summary['similarity_to_reference_mean']:.4f}, IFS {summary['inter_frame_similarity_mean']:.4f}, "
                f"face motion {summary['face_motion_mean']:.3f} px/frame, frames without face {summary['frames_without_face']}/{summary['frames']}")
        return io.NodeOutput(
            float(summary["similarity_to_reference_mean"]), float(summary["inter_frame_similarity_mean"]),
            float(summary["face_motion_mean"]), int(summary["frames_without_face"]), table, plot,
            ui={"images": ui.PreviewImage(plot, cls=cls).as_dict()["images"], "text": (text,)},
        )


NODES = [LoadInsightFace, ArcFaceEmbed, LoadDifferentiableArcFace, IdentityMetrics]
