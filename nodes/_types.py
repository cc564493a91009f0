"""Socket types the pack adds. Links are checked by these strings, so keep them stable."""

from ..comfy_compat import io

FaceEmbeds = io.Custom("FACE_EMBEDS")  # likeness_blocks.face_types.FaceEmbeds
InsightFace = io.Custom("INSIGHTFACE")  # loaded detection + recognition pack
ArcFaceTorch = io.Custom("ARCFACE_TORCH")  # differentiable ArcFace (torch module)
DecaFlame = io.Custom("DECA_FLAME")  # DECA encoder + FLAME layer
FlameVertices = io.Custom("FLAME_VERTICES")  # vertices (B, 5023, 3) + FLAME parameters
IdTokens = io.Custom("ID_TOKENS")  # identity tokens handed to an injector
ConcatIdWeights = io.Custom("CONCAT_ID_WEIGHTS")  # loaders.concat_id.ConcatIdWeights (variant + AdaLN extras)
StableAnimator = io.Custom("STABLEANIMATOR")  # loaders.stableanimator.StableAnimatorWeights (ID weights, face encoder, PoseNet)
FaceTokens = io.Custom("FACE_TOKENS")  # torch.Tensor (B, 4, 1024): StableAnimator face tokens
FantasyID = io.Custom("FANTASYID")  # loaders.fantasyid.FantasyID (face modules with mesh data, injection interval)
EvaClipVision = io.Custom("EVA_CLIP_VISION")  # timm Eva (EVA02-CLIP visual tower) for FantasyID face tokens
ClipHiddenStates = io.Custom("CLIP_HIDDEN_STATES")  # torch.Tensor (5, B, 1 + N, C): EVA02 block inputs 4/8/12/16/20
FantasyIDFaceTokens = io.Custom("FANTASYID_FACE_TOKENS")  # torch.Tensor (B, 36, 2048): C-Abstractor 2D tokens
FantasyIDVertexTokens = io.Custom("FANTASYID_VERTEX_TOKENS")  # torch.Tensor (B, 314, 128): 3D tokens before fusion
