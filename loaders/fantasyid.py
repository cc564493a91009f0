"""FantasyID: split the face modules out of the released transformer state dict and build them.

The released `transformer/` checkpoint is a CogVideoX transformer whose state dict also holds FantasyID's face
modules under `face_abstractor.*`, `vertex_spiral_net.*`, `vertex_reducer.*` and `layer_attention.N.*`. Those go
to `FantasyIDFaceModules` (sizes read from the tensors' shapes); everything else is returned for the CogVideoX loader.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from ..likeness_blocks.fantasyid import (
    FaceAbstractor,
    LayerAttention,
    MeshTransform,
    VertexReducer,
    VertexSpiralNet,
    mesh_data_for_network,
)

FACE_PREFIXES = ("face_abstractor.", "vertex_spiral_net.", "vertex_reducer.", "layer_attention.")


class FantasyIDFaceModules(nn.Module):
    """Container whose state-dict keys are exactly the released face-module keys."""

    def __init__(self, face_abstractor, vertex_spiral_net, vertex_reducer, layer_attention: Iterable[nn.Module]):
        super().__init__()
        self.face_abstractor = face_abstractor
        self.vertex_spiral_net = vertex_spiral_net
        self.vertex_reducer = vertex_reducer
        self.layer_attention = nn.ModuleList(layer_attention)


def split_fantasyid_state_dict(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(face-module keys, the rest). Keys keep their full names."""
    face, rest = {}, {}
    for k, v in sd.items():
        (face if k.startswith(FACE_PREFIXES) else rest)[k] = v
    return face, rest


def _count(sd, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def _need(sd, key):
    if key not in sd:
        raise ValueError(
            f"FantasyID checkpoint has no '{key}'; this is not FantasyID's transformer (or its face modules were "
            "stripped). Load the `transformer/` folder of the released FantasyID weights."
        )
    return sd[key]


def infer_face_config(sd: Dict[str, torch.Tensor]) -> dict:
    """Module sizes from tensor shapes (head counts are not visible in shapes: the released 4 / 16 heads are used)."""
    pe = _need(sd, "face_abstractor.proj_out")
    dim, out_dim = pe.shape
    n_layers = _count(sd, r"face_abstractor\.layers\.(\d+)\.")
    n_scales = _count(sd, r"face_abstractor\.mapping_(\d+)\.")
    face = dict(
        dim=dim,
        output_dim=out_dim,
        depth=n_layers,
        num_scales=n_scales,
        vision_dim=_need(sd, "face_abstractor.mapping_0.0.weight").shape[1],
        num_queries=_need(sd, "face_abstractor.latents").shape[1],
        id_dim=_need(sd, "face_abstractor.id_embedding_mapping.0.weight").shape[1],
        num_id_token=_need(sd, "face_abstractor.id_embedding_mapping.6.weight").shape[0] // dim,
        ff_mult=_need(sd, "face_abstractor.layers.0.1.1.weight").shape[0] // dim,
        num_input_tokens=_need(sd, "face_abstractor.layers.0.0.pos_emb").shape[1],
        cabs_hidden=_need(sd, "face_abstractor.layers.0.0.readout.0.weight").shape[1],
    )
    q = _need(sd, "vertex_spiral_net.vtx_query")
    emb = q.shape[2]
    n_hw = _count(sd, r"vertex_spiral_net\.hw_down\.(\d+)\.")
    hw_dims = [_need(sd, f"vertex_spiral_net.hw_down.{i}.fc1.weight").shape[1] for i in range(n_hw)]
    hw_dims.append(_need(sd, f"vertex_spiral_net.hw_down.{n_hw - 1}.fc2.weight").shape[0])
    n_de = _count(sd, r"vertex_spiral_net\.vtx_upsampler\.de_layers\.(\d+)\.")
    vertex = dict(
        emb_dim=emb,
        num_v_coarse=q.shape[1],
        hw_dims=tuple(hw_dims),
        depth=_count(sd, r"vertex_spiral_net\.transformer\.layers\.(\d+)\."),
        heads=4,
        mlp_mult=_need(sd, "vertex_spiral_net.transformer.layers.0.1.fn.net.0.weight").shape[0] // emb,
        seq_length=_need(sd, f"vertex_spiral_net.vtx_upsampler.de_layers.{n_de - 1}.layer.weight").shape[1] // emb,
        num_levels=n_de - 1,
    )
    reducer = [_need(sd, "vertex_reducer.conv_block1.conv_in.conv1d.weight").shape[1]]
    reducer += [_need(sd, f"vertex_reducer.conv_block{i}.conv_in.conv1d.weight").shape[0] for i in range(1, 5)]
    n_la = _count(sd, r"layer_attention\.(\d+)\.")
    tq = _need(sd, "layer_attention.0.to_q.weight")
    la = dict(
        count=n_la, dim=tq.shape[1], heads=16, dim_head=tq.shape[0] // 16,
        kv_dim=_need(sd, "layer_attention.0.to_kv.weight").shape[1],
    )
    return dict(face_abstractor=face, vertex_spiral_net=vertex, vertex_reducer=tuple(reducer), layer_attention=la)


def build_face_modules(cfg: dict, device="cpu") -> FantasyIDFaceModules:
    la = dict(cfg["layer_attention"])
    count = la.pop("count")
    with torch.device(device):
        return FantasyIDFaceModules(
            FaceAbstractor(**cfg["face_abstractor"]),
            VertexSpiralNet(**cfg["vertex_spiral_net"]),
            VertexReducer(cfg["vertex_reducer"]),
            [LayerAttention(**la) for _ in range(count)],
        )


def load_face_modules(
    sd: Dict[str, torch.Tensor],
    transform: Optional[MeshTransform] = None,
    dtype: torch.dtype = torch.float32,
    drop_unused: bool = False,
) -> Tuple[FantasyIDFaceModules, Dict[str, torch.Tensor]]:
    """Build the face modules from a full FantasyID transformer state dict.

    Returns (modules, remaining CogVideoX keys). Missing or unexpected face keys raise a ValueError that lists them.
    The vertex network runs in float32 as upstream forces; `dtype` applies to the other modules.
    `drop_unused` frees the face-abstractor parameters that cannot affect the output (144M -> 18M at full size).
    """
    face_sd, rest = split_fantasyid_state_dict(sd)
    if not face_sd:
        raise ValueError(
            "this checkpoint has no FantasyID face modules (face_abstractor.*, vertex_spiral_net.*, vertex_reducer.*, "
            "layer_attention.N.*); load the `transformer/` weights of the released FantasyID model."
        )
    cfg = infer_face_config(face_sd)
    modules = build_face_modules(cfg, device="meta")
    missing, unexpected = modules.load_state_dict(face_sd, strict=False, assign=True)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:8])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:8])})")
        raise ValueError(
            "FantasyID face modules do not match the released layout: " + "; ".join(parts)
            + ". The checkpoint is incomplete or from a different FantasyID version."
        )
    _materialize_meta_buffers(modules)
    modules.face_abstractor.to(dtype)
    modules.vertex_reducer.to(dtype)
    modules.layer_attention.to(dtype)
    modules.vertex_spiral_net.float()
    if drop_unused:
        modules.face_abstractor.drop_unused()
    if transform is not None:
        modules.vertex_spiral_net.set_mesh(*mesh_data_for_network(
            transform, num_levels=cfg["vertex_spiral_net"]["num_levels"],
            seq_length=cfg["vertex_spiral_net"]["seq_length"],
        ))
    return modules, rest


def _materialize_meta_buffers(module: nn.Module) -> None:
    """Buffers not in the checkpoint (mesh data placeholders) were built on the meta device: make them real."""
    for m in module.modules():
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device="cpu")


def _weight_files(path: str):
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".sft")))
    if not files:
        files = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")))
    if not files:
        from .model_folders import display_path

        raise FileNotFoundError(
            f"no .safetensors or .bin weights in '{display_path(path)}'; point at FantasyID's transformer/ folder."
        )
    return files


def _transformer_folder(path: str) -> str:
    """A release folder -> its transformer_ema/ when present, else transformer/ (FantasyID's infer.py makes the same
    choice); a folder that itself holds weights is used as it is."""
    if any(f.endswith((".safetensors", ".sft", ".bin")) for f in os.listdir(path)):
        return path
    for sub in ("transformer_ema", "transformer"):
        if os.path.isdir(os.path.join(path, sub)):
            return os.path.join(path, sub)
    return path


def read_state_dict(path: str, what: str = "FantasyID weights") -> Dict[str, torch.Tensor]:
    """A .safetensors file, a diffusers folder of shards, or a torch file (weights_only)."""
    from .safe_files import load_state_dict, require_state_dict

    if os.path.isdir(path):
        sd = {}
        for f in _weight_files(path):
            sd.update(read_state_dict(os.path.join(path, f), what))
        return sd
    return require_state_dict(load_state_dict(path, what, "Use the released file."), path, what)


# ---------------------------------------------------------------------------------------------------------------------
# for the nodes: face-module keys only (the 5B transformer's other weights are not read), transform.pkl cache
# ---------------------------------------------------------------------------------------------------------------------
def read_face_state_dict(path: str, what: str = "Load FantasyID: face_modules") -> Dict[str, torch.Tensor]:
    """Only the face-module tensors of a FantasyID transformer file/folder (.safetensors read lazily)."""
    from .safe_files import load_state_dict, reading, require_state_dict

    if os.path.isdir(path):
        path = _transformer_folder(path)
        sd = {}
        for f in _weight_files(path):
            sd.update(read_face_state_dict(os.path.join(path, f), what))
        return sd
    fix = "Use FantasyID's transformer weights (diffusion_pytorch_model*.safetensors)."
    if path.endswith((".safetensors", ".sft")):
        from safetensors import safe_open

        out = {}
        with reading(path, what, fix), safe_open(path, framework="pt", device="cpu") as fh:
            for k in fh.keys():
                name = k[len("transformer."):] if k.startswith("transformer.") else k
                if name.startswith(FACE_PREFIXES):
                    out[name] = fh.get_tensor(k)
        return out
    sd = require_state_dict(load_state_dict(path, what, fix), path, what, fix)
    return {k: v for k, v in sd.items() if isinstance(k, str) and k.startswith(FACE_PREFIXES)}


_MESH_CACHE: Dict[tuple, tuple] = {}


def mesh_data_cached(transform_path: str, num_levels: int, seq_length: int):
    """(spirals, down, up) of a transform.pkl, computed once per file version (spirals take a few seconds)."""
    from ..likeness_blocks.fantasyid import load_transform_pkl

    st = os.stat(transform_path)
    key = (os.path.realpath(transform_path), st.st_mtime_ns, st.st_size, num_levels, seq_length)
    hit = _MESH_CACHE.get(key)
    if hit is None:
        if len(_MESH_CACHE) > 4:
            _MESH_CACHE.clear()
        from .safe_files import reading

        with reading(transform_path, "Load FantasyID: transform", "Use FantasyID's assets/transform.pkl."):
            transform = load_transform_pkl(transform_path)
        hit = mesh_data_for_network(transform, num_levels=num_levels, seq_length=seq_length)
        _MESH_CACHE[key] = hit
    return hit


class FantasyID:
    """What the FANTASYID socket carries: the face modules (mesh attached) and the injection interval."""

    def __init__(self, modules: FantasyIDFaceModules, cross_attn_interval=None, source: str = ""):
        self.modules = modules
        self.cross_attn_interval = cross_attn_interval
        self.source = source

    def __repr__(self):
        return f"FantasyID({self.source}, {len(self.modules.layer_attention)} layer_attention)"


def load_fantasyid(face_sd: Dict[str, torch.Tensor], transform_path: str, dtype=torch.float32,
                   cross_attn_interval=None, source: str = "") -> FantasyID:
    cfg = infer_face_config(split_fantasyid_state_dict(face_sd)[0]) if face_sd else None
    if cfg is None:
        raise ValueError(
            "no FantasyID face modules found (face_abstractor.*, vertex_spiral_net.*, vertex_reducer.*, "
            "layer_attention.N.*): load FantasyID's transformer/ with 'Load CogVideoX' or pick the transformer file."
        )
    modules, _ = load_face_modules(dict(face_sd), dtype=dtype, drop_unused=True)
    v = cfg["vertex_spiral_net"]
    modules.vertex_spiral_net.set_mesh(*mesh_data_cached(transform_path, v["num_levels"], v["seq_length"]))
    modules.eval().requires_grad_(False)
    return FantasyID(modules, cross_attn_interval, source)
