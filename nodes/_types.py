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
