"""StableAnimator on native SVD: Load StableAnimator, Face Encoder, ID Adapter, PoseNet."""

import folder_paths
import torch

from ..comfy_compat import io
from ._types import FaceEmbeds, FaceTokens, StableAnimator

CATEGORY = "Likeness/StableAnimator"


def _files():
    return folder_paths.get_filename_list("stableanimator")


def _path(name, what):
    from ..loaders.model_folders import resolve_file

    return resolve_file("stableanimator", name, f"Load StableAnimator: {what}",
                        "Put StableAnimator's Animation/unet.pth, face_encoder.pth and pose_net.pth there.")


class LikenessStableAnimatorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = _files()
        return io.Schema(
            node_id="LikenessStableAnimatorLoader",
            display_name="Load StableAnimator",
            category=CATEGORY,
            description="Applies StableAnimator's fine-tuned UNet (Animation/unet.pth, diffusers key names) onto a "
                        "native SVD-xt MODEL (from Image Only Checkpoint Loader) and loads the ID adapter weights, "
                        "the face encoder and the PoseNet. The report lists keys that did not map.",
            inputs=[
                io.Model.Input("model", tooltip="SVD-xt MODEL from Image Only Checkpoint Loader (svd_xt.safetensors)."),
                io.Combo.Input("unet", options=files, tooltip="Animation/unet.pth from FrancisRing/StableAnimator, "
                                                             "in models/stableanimator."),
                io.Combo.Input("face_encoder", options=files, tooltip="Animation/face_encoder.pth (content-aware "
                                                                     "face encoder)."),
                io.Combo.Input("pose_net", options=files, tooltip="Animation/pose_net.pth (PoseNet)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="SVD MODEL with StableAnimator's UNet weights."),
                StableAnimator.Output(display_name="stableanimator",
                                      tooltip="ID adapter weights, face encoder and PoseNet for the other nodes."),
                io.String.Output(display_name="report", tooltip="How many weights were set; keys that did not map."),
            ],
        )

    @classmethod
    def execute(cls, model, unet, face_encoder, pose_net):
        from ..loaders.stableanimator import load_stableanimator

        m, sa = load_stableanimator(model, _path(unet, "unet"), _path(face_encoder, "face_encoder"),
                                    _path(pose_net, "pose_net"))
        return io.NodeOutput(m, sa, sa.report)


class LikenessStableAnimatorFaceEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessStableAnimatorFaceEncoder",
            display_name="StableAnimator Face Encoder",
            category=CATEGORY,
            description="Content-aware face encoder: the ArcFace embedding of the reference face, refined by the "
                        "CLIP image embedding of the reference image, becomes 4 face tokens for the ID Adapter.",
            inputs=[
                StableAnimator.Input("stableanimator", tooltip="From Load StableAnimator."),
                FaceEmbeds.Input("face_embeds", tooltip="ArcFace embedding of the reference face (ArcFace Embed, "
                                                        "antelopev2 / glintr100 as upstream)."),
                io.ClipVisionOutput.Input("clip_vision_output", tooltip="CLIP Vision Encode of the reference image "
                                                                         "with SVD's ViT-H (1024-wide image_embeds)."),
                io.Int.Input("face_index", default=0, min=0, max=4096,
                             tooltip="Which detected face of face_embeds to use (0 = the first)."),
            ],
            outputs=[FaceTokens.Output(display_name="face_tokens", tooltip="(1, 4, 1024) face tokens.")],
        )

    @classmethod
    def execute(cls, stableanimator, face_embeds, clip_vision_output, face_index):
        if len(face_embeds) == 0:
            raise ValueError("StableAnimator Face Encoder: face_embeds holds no face; use a reference image with a "
                             "visible face.")
        if face_index >= len(face_embeds):
            raise ValueError(f"StableAnimator Face Encoder: face_index {face_index} but face_embeds holds "
                             f"{len(face_embeds)} face(s).")
        if getattr(face_embeds, "crop", "aligned") != "aligned":
            raise ValueError(
                f"StableAnimator Face Encoder: face_embeds were made by {face_embeds.model_name or 'a connected recogniser'} "
                f"({getattr(face_embeds, 'recognizer_kind', '?')}) through ArcFace Embed's 'recognizer' input, which is "
                "for HJB Face Guidance; the face encoder was trained on the pack's ArcFace (antelopev2) embeddings. "
                "Use an ArcFace Embed with 'recognizer' unplugged here.")
        face = face_embeds.faces[face_index]
        embeds = getattr(clip_vision_output, "image_embeds", None)
        if embeds is None:
            raise ValueError("StableAnimator Face Encoder: clip_vision_output has no image_embeds; use CLIP Vision "
                             "Encode with the SVD checkpoint's CLIP vision (ViT-H).")
        clip = embeds[min(face.image_index, embeds.shape[0] - 1)].reshape(1, 1, -1).float().cpu()
        ident = face.embedding.reshape(1, -1).float().cpu()  # raw (unnormalised) ArcFace output, as upstream
        enc = stableanimator.face_encoder
        with torch.no_grad():
            dev = next(enc.parameters()).device
            tokens = enc(ident.to(dev), clip.to(dev))
        return io.NodeOutput(tokens.float().cpu())


class LikenessStableAnimatorIDAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessStableAnimatorIDAdapter",
            display_name="StableAnimator ID Adapter",
            category=CATEGORY,
            description="Distribution-aware ID adapter: every spatial cross-attention of the SVD UNet also attends "
                        "to the face tokens; that output is re-normalised to the image attention's mean/std per frame "
                        "and added with the strength. Temporal attention and the negative branch's face (zeros) "
                        "follow upstream.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Load StableAnimator."),
                StableAnimator.Input("stableanimator", tooltip="From Load StableAnimator (id_to_k/id_to_v weights)."),
                FaceTokens.Input("face_tokens", tooltip="From StableAnimator Face Encoder."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Scale of the face attention (1.0 = upstream; 0 = off, identical to no adapter)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress where the adapter starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress where the adapter stops (1 = last step)."),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with the ID adapter (a patched clone).")],
        )

    @classmethod
    def execute(cls, model, stableanimator, face_tokens, strength, start_percent, end_percent):
        from ..adapters.svd import apply_id_adapter

        m, _ = apply_id_adapter(model, stableanimator.id_weights, face_tokens, strength=strength,
                                start_percent=start_percent, end_percent=end_percent)
        return io.NodeOutput(m)


class LikenessStableAnimatorPose(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessStableAnimatorPose",
            display_name="StableAnimator PoseNet",
            category=CATEGORY,
            description="Encodes pose frames (e.g. DWPose skeleton images) with StableAnimator's PoseNet and adds them "
                        "after the UNet's first convolution, on the positive branch only. One pose frame per video "
                        "frame.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Load StableAnimator (or the ID Adapter)."),
                StableAnimator.Input("stableanimator", tooltip="From Load StableAnimator (PoseNet)."),
                io.Image.Input("pose_images", tooltip="Pose frames, as many as video_frames, at the video size (resized "
                                                      "to it otherwise)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Scale of the pose latents (1.0 = upstream; 0 = off)."),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with pose guidance (a patched clone).")],
        )

    @classmethod
    def execute(cls, model, stableanimator, pose_images, strength):
        from ..adapters.svd import apply_pose

        m, _ = apply_pose(model, stableanimator.pose_net, pose_images, strength=strength)
        return io.NodeOutput(m)


class LikenessStableAnimatorTiles(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessStableAnimatorTiles",
            display_name="StableAnimator Long Video",
            category=CATEGORY,
            description="Animates pose sequences longer than SVD's window as StableAnimator does: the frames are run "
                        "in overlapping tiles that all include frame 0 (the reference), blended with triangular "
                        "weights at every step. Put it last, after the ID Adapter and PoseNet.",
            inputs=[
                io.Model.Input("model", tooltip="The StableAnimator MODEL (after ID Adapter / PoseNet)."),
                io.Int.Input("tile_size", default=16, min=3, max=128,
                             tooltip="Frames per tile, frame 0 included (16 = upstream). Videos this long or "
                                     "shorter run as one tile."),
                io.Int.Input("tile_overlap", default=4, min=1, max=126,
                             tooltip="Frames shared by neighbouring tiles (4 = upstream); below tile_size - 1."),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL sampling in tiles (a patched clone).")],
        )

    @classmethod
    def execute(cls, model, tile_size, tile_overlap):
        from ..adapters.svd import apply_tiling

        return io.NodeOutput(apply_tiling(model, tile_size=tile_size, overlap=tile_overlap))


NODES = [LikenessStableAnimatorLoader, LikenessStableAnimatorFaceEncoder, LikenessStableAnimatorIDAdapter,
         LikenessStableAnimatorPose, LikenessStableAnimatorTiles]
