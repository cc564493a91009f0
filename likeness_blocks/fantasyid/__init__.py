"""FantasyID building blocks (pure torch; timm for the C-Abstractor's RegStage blocks).

Module and parameter names follow the released FantasyID transformer checkpoint, so the face-module keys
(`face_abstractor.*`, `vertex_spiral_net.*`, `vertex_reducer.*`, `layer_attention.N.*`) load without renaming.
"""

from .face_abstractor import CAbstractor, FaceAbstractor, face_feed_forward, face_mapping
from .layer_attention import LayerAttention
from .vertex import (
    FusionTransformer,
    SpiralConv,
    SpiralDecoder,
    VertexReducer,
    VertexSpiralNet,
    depth_sin_encoding,
    fuse_id_tokens,
    sparse_pool,
)
from .pipeline import encode_id_tokens, face_tokens, vertex_tokens
from .spirals import HalfedgeTriMesh, extract_spirals
from .transform_pkl import MeshTransform, load_transform_pkl, mesh_data_for_network

__all__ = [
    "CAbstractor",
    "FaceAbstractor",
    "face_feed_forward",
    "face_mapping",
    "LayerAttention",
    "FusionTransformer",
    "SpiralConv",
    "SpiralDecoder",
    "VertexReducer",
    "VertexSpiralNet",
    "depth_sin_encoding",
    "fuse_id_tokens",
    "sparse_pool",
    "encode_id_tokens",
    "face_tokens",
    "vertex_tokens",
    "HalfedgeTriMesh",
    "extract_spirals",
    "MeshTransform",
    "load_transform_pkl",
    "mesh_data_for_network",
]
