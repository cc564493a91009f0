"""FantasyID ID tokens end to end: CLIP hidden states + FLAME vertices -> 115 ID tokens (36 face + 79 vertex)."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .face_abstractor import FaceAbstractor
from .vertex import VertexReducer, VertexSpiralNet, fuse_id_tokens


def face_tokens(face_abstractor: FaceAbstractor, clip_hidden_states: Union[Sequence[torch.Tensor], torch.Tensor]):
    """2D tokens (B, 36, 2048), computed in the abstractor's dtype."""
    p = face_abstractor.proj_out
    if isinstance(clip_hidden_states, torch.Tensor):
        hs = clip_hidden_states.to(device=p.device, dtype=p.dtype)
    else:
        hs = [h.to(device=p.device, dtype=p.dtype) for h in clip_hidden_states]
    return face_abstractor(hs)


def vertex_tokens(
    spiral_net: VertexSpiralNet, reducer: VertexReducer, vertices: torch.Tensor, face_tok: torch.Tensor
) -> torch.Tensor:
    """3D tokens (B, 79, 2048): the vertex network runs in float32 (as upstream forces), the reducer in its dtype."""
    dev = spiral_net.vtx_query.device
    desc = spiral_net(vertices.to(dev, torch.float32), face_tok.to(dev, torch.float32))
    w = reducer.conv_block1.residual_conv.weight
    return reducer(desc.to(device=w.device, dtype=w.dtype))


def encode_id_tokens(face_abstractor, spiral_net, reducer, clip_hidden_states, vertices) -> torch.Tensor:
    f = face_tokens(face_abstractor, clip_hidden_states)
    v = vertex_tokens(spiral_net, reducer, vertices, f)
    return fuse_id_tokens(f, v.to(f.device))
