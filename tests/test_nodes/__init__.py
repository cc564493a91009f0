"""Test-only nodes (never shipped): inputs that cannot be made tiny through stock loaders
(umT5/T5 text encoders, CLIP vision, a small SVD that ComfyUI's detection would reject)."""

import os
import sys

import torch
from comfy_api.latest import ComfyExtension, io

_TESTS = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def _seeded(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class LikenessTestTextConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessTestTextConditioning", display_name="Test Text Conditioning", category="Likeness/Test",
            description="Seeded random text-encoder output standing in for umT5/T5 (Wan: 4096 wide).",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="random seed"),
                io.Int.Input("tokens", default=8, min=1, max=512, tooltip="sequence length"),
                io.Int.Input("width", default=4096, min=1, max=8192, tooltip="embedding width"),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed, tokens, width):
        return io.NodeOutput([[_seeded((1, tokens, width), seed), {}]])


class LikenessTestTinySVD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessTestTinySVD", display_name="Test Tiny SVD", category="Likeness/Test",
            description="A tiny native SVD MODEL (real classes) and a tiny TAESD VAE, from a seed.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="random seed of the weights")],
            outputs=[io.Model.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, seed):
        import comfy.sd
        from support import tiny_models

        return io.NodeOutput(tiny_models.build_tiny_svd(seed),
                             comfy.sd.VAE(sd=tiny_models.tiny_taesd_state_dict(seed)))


class LikenessTestSVDConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessTestSVDConditioning", display_name="Test SVD Conditioning", category="Likeness/Test",
            description="SVD_img2vid_Conditioning with a seeded random CLIP image embedding in place of CLIP vision.",
            inputs=[
                io.Vae.Input("vae", tooltip="VAE that encodes the init image"),
                io.Image.Input("init_image", tooltip="first frame"),
                io.Int.Input("width", default=64, min=16, max=1024, step=8, tooltip="width"),
                io.Int.Input("height", default=64, min=16, max=1024, step=8, tooltip="height"),
                io.Int.Input("video_frames", default=4, min=1, max=64, tooltip="frames"),
                io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="seed of the image embedding"),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output()],
        )

    @classmethod
    def execute(cls, vae, init_image, width, height, video_frames, seed):
        import comfy.utils

        pooled = _seeded((1, 1, 1024), seed)
        pixels = comfy.utils.common_upscale(init_image.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
        t = vae.encode(pixels[:, :, :, :3])
        extra = {"motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0}
        positive = [[pooled, {**extra, "concat_latent_image": t}]]
        negative = [[torch.zeros_like(pooled), {**extra, "concat_latent_image": torch.zeros_like(t)}]]
        return io.NodeOutput(positive, negative, {"samples": torch.zeros([video_frames, 4, height // 8, width // 8])})


class LikenessTestFaceEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessTestFaceEmbeds", display_name="Test Face Embeds", category="Likeness/Test",
            description="A FACE_EMBEDS with one seeded random (unnormalised) 512-d ArcFace embedding per face.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="random seed"),
                    io.Int.Input("faces", default=1, min=1, max=16, tooltip="number of faces")],
            outputs=[io.Custom("FACE_EMBEDS").Output()],
        )

    @classmethod
    def execute(cls, seed, faces):
        repo = os.path.dirname(_TESTS)
        if repo not in sys.path:
            sys.path.append(repo)
        from likeness_blocks.face_types import DetectedFace, FaceEmbeds  # pure torch; the pack reads it by duck type

        g = torch.Generator().manual_seed(seed)
        fs = [DetectedFace(image_index=0, bbox=torch.tensor([8.0, 8.0, 56.0, 56.0]), kps=torch.zeros(5, 2),
                           det_score=0.9, embedding=torch.randn(512, generator=g) * 20) for _ in range(faces)]
        return io.NodeOutput(FaceEmbeds(faces=fs, image_sizes=[(64, 64)], model_name="test"))


class LikenessTestClipVisionOutput(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessTestClipVisionOutput", display_name="Test CLIP Vision Output", category="Likeness/Test",
            description="A CLIP_VISION_OUTPUT with seeded random ViT-H image_embeds (1, 1024).",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="random seed")],
            outputs=[io.ClipVisionOutput.Output()],
        )

    @classmethod
    def execute(cls, seed):
        from comfy.clip_vision import Output

        out = Output()
        out["image_embeds"] = _seeded((1, 1024), seed)
        return io.NodeOutput(out)


class LikenessTestNodes(ComfyExtension):
    async def get_node_list(self):
        from .hardening import NODES as HARDENING_NODES

        return [LikenessTestTextConditioning, LikenessTestTinySVD, LikenessTestSVDConditioning,
                LikenessTestFaceEmbeds, LikenessTestClipVisionOutput, *HARDENING_NODES]


async def comfy_entrypoint():
    return LikenessTestNodes()
