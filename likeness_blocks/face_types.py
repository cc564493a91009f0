"""What ArcFace Embed hands to every identity method (the FACE_EMBEDS socket type)."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class DetectedFace:
    image_index: int  # index in the IMAGE batch the face came from
    bbox: torch.Tensor  # (4,) x1, y1, x2, y2 in that image's pixels
    kps: torch.Tensor  # (5, 2) eyes, nose, mouth corners (ArcFace order), image pixels
    det_score: float
    embedding: torch.Tensor  # (512,) raw ArcFace output, float32

    @property
    def normed_embedding(self):
        return F.normalize(self.embedding, dim=-1)


@dataclass
class FaceEmbeds:
    faces: list  # list[DetectedFace], in image order
    image_sizes: list  # (height, width) of every input image
    skipped: list = field(default_factory=list)  # image indices without a face (skip mode)
    model_name: str = ""  # the recognition model that made the embeddings
    # which recogniser family made them ("arcface" or "curricularface": embeddings of two families never compare)
    recognizer_kind: str = "arcface"
    # how the faces were cut before embedding: "aligned" (landmark-aligned crop, the InsightFace pack's recogniser)
    # or "box" (the detected box resized bilinearly, as HJB Face Guidance crops decoded frames; ArcFace Embed's
    # 'recognizer' input)
    crop: str = "aligned"

    def embeddings(self, normalized=True):
        """(N, 512) float32."""
        if not self.faces:
            raise ValueError("FACE_EMBEDS holds no face")
        e = torch.stack([f.embedding for f in self.faces]).float()
        return F.normalize(e, dim=-1) if normalized else e

    def __len__(self):
        return len(self.faces)
