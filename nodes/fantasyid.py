"""FantasyID on native CogVideoX: Load FantasyID, Load EVA02-CLIP, Face CLIP Tokens, C-Abstractor, Vertex Tokens,
Fusion Transformer, Vertex ID Tokens (all-in-one) and the Layer-Aware Injector."""

import os
from contextlib import contextmanager

import torch

from ..comfy_compat import io
from ._types import (
    ClipHiddenStates,
    EvaClipVision,
    FantasyID,
    FantasyIDFaceTokens,
    FantasyIDVertexTokens,
    FlameVertices,
    IdTokens,
)

CATEGORY = "Likeness/FantasyID"
FOLDER = "fantasyid"
FROM_MODEL = "(from model)"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_EXTS = (".safetensors", ".sft", ".pt", ".pth", ".bin")


def _files(exts):
    import folder_paths

    try:
        names = folder_paths.get_filename_list(FOLDER)
    except Exception:  # listing must never break the node list
        names = []
    return [n for n in names if n.lower().endswith(exts)]


def _path(name, what, hint):
    from ..loaders.model_folders import resolve_file

    return resolve_file(FOLDER, name, what, hint)


def _device():
    import comfy.model_management as mm

    return mm.get_torch_device()


@contextmanager
def _on_device(*modules):
    """Run modules on the compute device and put them back on the CPU afterwards."""
    dev = _device()
    for m in modules:
        m.to(dev)
    try:
        yield dev
    finally:
        import comfy.model_management as mm

        off = mm.unet_offload_device()
        for m in modules:
            m.to(off)


# ---------------------------------------------------------------------------------------------------------------------
class LikenessLoadFantasyID(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessLoadFantasyID",
            display_name="Load FantasyID",
            category=CATEGORY,
            description="FantasyID's face modules (face abstractor, vertex SpiralNet + fusion transformer, vertex "
                        "reducer, one LayerAttention per DiT block) from the CogVideoX MODEL that 'Load CogVideoX' "
                        "made of FantasyID's transformer/ (the face keys it set aside), or from a transformer file in "
                        "models/fantasyid; plus FantasyID's mesh-sampling file transform.pkl (read with an "
                        "allow-list unpickler; spirals computed at load time in OpenMesh's neighbour order).",
            inputs=[
                io.Combo.Input("face_modules", options=[FROM_MODEL] + _files(WEIGHT_EXTS), default=FROM_MODEL,
                               tooltip="'(from model)': the face modules set aside when 'Load CogVideoX' loaded "
                                       "FantasyID's transformer/ (connect that MODEL). Else a FantasyID transformer "
                                       "file in models/fantasyid (only its face-module keys are read)."),
                io.Combo.Input("transform", options=_files((".pkl",)),
                               tooltip="FantasyID's assets/transform.pkl (mesh down/up-sampling matrices) in "
                                       "models/fantasyid."),
                io.Combo.Input("dtype", options=list(DTYPES), default="bf16",
                               tooltip="Weight dtype of the face abstractor, reducer and LayerAttention modules (the "
                                       "vertex network always runs in fp32, as upstream)."),
                io.Model.Input("model", optional=True,
                               tooltip="The CogVideoX MODEL loaded from FantasyID's transformer/ (needed for "
                                       "'(from model)')."),
            ],
            outputs=[FantasyID.Output(display_name="fantasyid", tooltip="Face modules for the other FantasyID nodes.")],
        )

    @classmethod
    def execute(cls, face_modules, transform, dtype, model=None):
        from ..loaders.cogvideox import get_extras
        from ..loaders.fantasyid import load_fantasyid, read_face_state_dict

        if not transform:
            raise ValueError("Load FantasyID: no transform.pkl chosen; put FantasyID's assets/transform.pkl in "
                             "models/fantasyid and refresh (R).")
        tpath = _path(transform, "Load FantasyID: transform", "Copy FantasyID's assets/transform.pkl there.")
        interval = None
        if face_modules != FROM_MODEL:
            source = _path(face_modules, "Load FantasyID: face_modules", "Put FantasyID's transformer weights there.")
        if face_modules == FROM_MODEL:
            extras = get_extras(model) if model is not None else None
            if extras is None or not extras.face_state_dict:
                raise ValueError(
                    "Load FantasyID: face_modules is '(from model)' but the connected model has no FantasyID face "
                    "modules. Connect the MODEL of 'Load CogVideoX' loaded from FantasyID's transformer/ folder, or "
                    "pick a FantasyID transformer file in models/fantasyid."
                )
            sd, source = extras.face_state_dict, extras.source
            interval = extras.extra_config.get("cross_attn_interval")
        else:
            sd = read_face_state_dict(source)
        return io.NodeOutput(load_fantasyid(sd, tpath, dtype=DTYPES[dtype], cross_attn_interval=interval,
                                            source=os.path.basename(str(source))))


class LikenessLoadEvaClip(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessLoadEvaClip",
            display_name="Load EVA02-CLIP (FantasyID)",
            category=CATEGORY,
            description="Loads the EVA02-CLIP-L-14-336 visual tower (FantasyID's face_encoder/"
                        "EVA02_CLIP_L_336_psz14_s6B.pt) on timm's EVA02 architecture, mapping EVA-CLIP key names.",
            inputs=[
                io.Combo.Input("eva_clip", options=_files(WEIGHT_EXTS),
                               tooltip="EVA02_CLIP_L_336_psz14_s6B.pt (or a visual-tower .safetensors) in "
                                       "models/fantasyid."),
                io.Combo.Input("dtype", options=list(DTYPES), default="fp32",
                               tooltip="Weight dtype of the CLIP tower."),
            ],
            outputs=[EvaClipVision.Output(display_name="eva_clip", tooltip="EVA02-CLIP visual tower.")],
        )

    @classmethod
    def execute(cls, eva_clip, dtype):
        from ..likeness_blocks.fantasyid.eva_clip import load_eva_visual
        from ..loaders.fantasyid import read_state_dict

        path = _path(eva_clip, "Load EVA02-CLIP: eva_clip", "Copy FantasyID's face_encoder/EVA02_CLIP_L_336_psz14_s6B.pt there.")
        model, _cfg = load_eva_visual(read_state_dict(path, "Load EVA02-CLIP: eva_clip"), DTYPES[dtype])
        return io.NodeOutput(model)


class LikenessFantasyIDFaceClipTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFantasyIDFaceClipTokens",
            display_name="Face CLIP Tokens (FantasyID)",
            category=CATEGORY,
            description="Aligned face crop -> the EVA02-CLIP hidden states FantasyID uses: the inputs of blocks 4, "
                        "8, 12, 16 and 20 (CLS first). The crop is resized (bicubic) to the tower's input size and "
                        "normalised with OpenAI CLIP mean/std.",
            inputs=[
                EvaClipVision.Input("eva_clip", tooltip="From 'Load EVA02-CLIP (FantasyID)'."),
                io.Image.Input("face_image", tooltip="Aligned face crop(s), e.g. ArcFace Embed's aligned_crop (512)."),
            ],
            outputs=[ClipHiddenStates.Output(display_name="clip_hidden_states",
                                             tooltip="(5, B, 1 + patches, width) hidden states.")],
        )

    @classmethod
    def execute(cls, eva_clip, face_image):
        from ..likeness_blocks.fantasyid.eva_clip import block_inputs, preprocess_face

        size = eva_clip.patch_embed.img_size[0]
        with _on_device(eva_clip) as dev, torch.no_grad():
            wd = eva_clip.patch_embed.proj.weight.dtype
            px = preprocess_face(face_image.to(dev), size).to(wd)
            hs = block_inputs(eva_clip, px)
        return io.NodeOutput(hs.float().cpu())


class LikenessFantasyIDCAbstractor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFantasyIDCAbstractor",
            display_name="C-Abstractor (FantasyID)",
            category=CATEGORY,
            description="FantasyID's face abstractor, exactly its effective computation: the last CLIP hidden "
                        "state, the in-place positional-embedding quirk, C-Abstractor (RegStage) + feed-forward, "
                        "projection -> 36 face tokens x 2048.",
            inputs=[
                FantasyID.Input("fantasyid", tooltip="From 'Load FantasyID'."),
                ClipHiddenStates.Input("clip_hidden_states", tooltip="From 'Face CLIP Tokens (FantasyID)'."),
            ],
            outputs=[FantasyIDFaceTokens.Output(display_name="face_tokens", tooltip="(B, 36, 2048) 2D face tokens.")],
        )

    @classmethod
    def execute(cls, fantasyid, clip_hidden_states):
        from ..likeness_blocks.fantasyid import face_tokens

        fa = fantasyid.modules.face_abstractor
        with _on_device(fa), torch.no_grad():
            tok = face_tokens(fa, list(clip_hidden_states.unbind(0)))
        return io.NodeOutput(tok.float().cpu())


def _vertices(fantasyid, flame_vertices):
    v = flame_vertices.vertices
    down = fantasyid.modules.vertex_spiral_net.down
    n = down[0].shape[1] if len(down) else None
    if n is not None and v.shape[1] != n:
        raise ValueError(
            f"flame_vertices have {v.shape[1]} vertices but FantasyID's transform.pkl mesh has {n}; FantasyID needs "
            "the FLAME vertices (5023) from 'DECA FLAME Vertices', 'FLAME Shape Edit' or 'Load FLAME Ply'."
        )
    return v


def _vertex_tokens(fantasyid, flame_vertices):
    net = fantasyid.modules.vertex_spiral_net
    with _on_device(net) as dev, torch.no_grad():
        return net.vertex_tokens(_vertices(fantasyid, flame_vertices).to(dev)).cpu()


def _fuse(fantasyid, face_tok, vertex_tok):
    from ..likeness_blocks.fantasyid import fuse_id_tokens

    mods = fantasyid.modules
    net, red = mods.vertex_spiral_net, mods.vertex_reducer
    if vertex_tok.shape[1:] != (net.num_v_coarse, net.emb_dim):
        raise ValueError(f"vertex_tokens must be (B, {net.num_v_coarse}, {net.emb_dim}), got {tuple(vertex_tok.shape)}.")
    with _on_device(net, red) as dev, torch.no_grad():
        fused = net.fuse(vertex_tok.to(dev, torch.float32), face_tok.to(dev, torch.float32))
        desc = net.decode(fused)
        w = red.conv_block1.residual_conv.weight
        v = red(desc.to(w.dtype))
        ids = fuse_id_tokens(face_tok.to(dev, v.dtype), v)
    return ids.float().cpu()


class LikenessFantasyIDVertexTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFantasyIDVertexTokens",
            display_name="Vertex Tokens (FantasyID)",
            category=CATEGORY,
            description="FLAME vertices -> FantasyID's 3D tokens: pooled to the coarse mesh (314 vertices) with the "
                        "down-sampling matrices, depth sinusoidal encoding of 0.5*z + 0.5 plus the learned query.",
            inputs=[
                FantasyID.Input("fantasyid", tooltip="From 'Load FantasyID'."),
                FlameVertices.Input("flame_vertices", tooltip="5023 FLAME vertices (DECA FLAME Vertices, FLAME Shape "
                                                              "Edit or Load FLAME Ply)."),
            ],
            outputs=[FantasyIDVertexTokens.Output(display_name="vertex_tokens", tooltip="(B, 314, 128) 3D tokens.")],
        )

    @classmethod
    def execute(cls, fantasyid, flame_vertices):
        return io.NodeOutput(_vertex_tokens(fantasyid, flame_vertices))


class LikenessFantasyIDFusion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFantasyIDFusion",
            display_name="Fusion Transformer (FantasyID)",
            category=CATEGORY,
            description="2D face tokens + 3D vertex tokens -> ID tokens: face tokens reduced to 128, 6-layer fusion "
                        "transformer over [vertex, face] tokens, SpiralNet++ decoder back to the full mesh, ResConv1D "
                        "reducer -> 79 vertex tokens; ID tokens = [36 face, 79 vertex] x 2048.",
            inputs=[
                FantasyID.Input("fantasyid", tooltip="From 'Load FantasyID'."),
                FantasyIDFaceTokens.Input("face_tokens", tooltip="From 'C-Abstractor (FantasyID)'."),
                FantasyIDVertexTokens.Input("vertex_tokens", tooltip="From 'Vertex Tokens (FantasyID)'."),
            ],
            outputs=[IdTokens.Output(display_name="id_tokens", tooltip="(B, 115, 2048) fused ID tokens.")],
        )

    @classmethod
    def execute(cls, fantasyid, face_tokens, vertex_tokens):
        return io.NodeOutput(_fuse(fantasyid, face_tokens, vertex_tokens))


class LikenessFantasyIDTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFantasyIDTokens",
            display_name="Vertex ID Tokens (FantasyID)",
            category=CATEGORY,
            description="FLAME vertices + 2D face tokens -> fused ID tokens (115 x 2048) in one node: Vertex Tokens "
                        "then Fusion Transformer. Feed it FLAME Shape Edit's output to widen a face or sharpen a jaw.",
            inputs=[
                FantasyID.Input("fantasyid", tooltip="From 'Load FantasyID'."),
                FantasyIDFaceTokens.Input("face_tokens", tooltip="From 'C-Abstractor (FantasyID)'."),
                FlameVertices.Input("flame_vertices", tooltip="5023 FLAME vertices (DECA FLAME Vertices, FLAME Shape "
                                                              "Edit or Load FLAME Ply)."),
            ],
            outputs=[IdTokens.Output(display_name="id_tokens", tooltip="(B, 115, 2048) fused ID tokens.")],
        )

    @classmethod
    def execute(cls, fantasyid, face_tokens, flame_vertices):
        return io.NodeOutput(_fuse(fantasyid, face_tokens, _vertex_tokens(fantasyid, flame_vertices)))


class LikenessFantasyIDInjector(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFantasyIDInjector",
            display_name="Layer-Aware Injector (FantasyID)",
            category=CATEGORY,
            description="Patches a copy of the CogVideoX MODEL: after every DiT block (every cross_attn_interval-th), "
                        "the video tokens get strength x LayerAttention_i(ID tokens, video tokens); text tokens are "
                        "untouched and both CFG branches get the ID tokens, as upstream. Strength 1 = FantasyID.",
            inputs=[
                io.Model.Input("model", tooltip="CogVideoX MODEL loaded from FantasyID's transformer/ with 'Load "
                                                "CogVideoX'."),
                FantasyID.Input("fantasyid", tooltip="From 'Load FantasyID' (supplies the LayerAttention modules)."),
                IdTokens.Input("id_tokens", tooltip="From 'Vertex ID Tokens' or 'Fusion Transformer' (FantasyID)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Scale of every ID update; 1 = FantasyID, 0 = the plain model."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress at which injection starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress at which injection stops (1 = last step)."),
                io.Int.Input("block_start", default=0, min=0, max=200,
                             tooltip="First DiT block that gets the ID update."),
                io.Int.Input("block_end", default=-1, min=-1, max=200,
                             tooltip="Block index where injection stops (exclusive); -1 = through the last block."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="Patched copy of the MODEL.")],
        )

    @classmethod
    def execute(cls, model, fantasyid, id_tokens, strength, start_percent, end_percent, block_start, block_end):
        from ..adapters.cogvideox_fantasyid import apply_layer_injection

        return io.NodeOutput(apply_layer_injection(
            model, fantasyid.modules.layer_attention, id_tokens, strength=strength, start_percent=start_percent,
            end_percent=end_percent, block_start=block_start, block_end=block_end,
            cross_attn_interval=fantasyid.cross_attn_interval))


NODES = [
    LikenessLoadFantasyID,
    LikenessLoadEvaClip,
    LikenessFantasyIDFaceClipTokens,
    LikenessFantasyIDCAbstractor,
    LikenessFantasyIDVertexTokens,
    LikenessFantasyIDFusion,
    LikenessFantasyIDTokens,
    LikenessFantasyIDInjector,
]
