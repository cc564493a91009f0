"""CurricularFace's IR backbone (Huang et al., CVPR 2020), as released by TFace and used for
FaceSim-Cur by ConsisID's and OpenS2V's evaluation (`glint360k_curricular_face_r101_backbone.bin`,
IR-101 trained on Glint360K, 112x112 RGB input scaled to [-1, 1], 512-d embedding).

Module and attribute names follow the released state dict, so the file loads strictly:

    input_layer.{0: conv3x3 3->C0, 1: BN, 2: PReLU}
    body.<i>.res_layer.{0: BN(in), 1: conv3x3 in->d, 2: BN, 3: PReLU, 4: conv3x3 d->d (stride), 5: BN}
    body.<i>.shortcut_layer.{0: conv1x1 (stride), 1: BN}   when in != d, else a strided 1x1 max-pool (no keys)
    output_layer.{0: BN2d, 1: dropout, 2: flatten, 3: Linear(C*s*s, 512), 4: BatchNorm1d without affine}

The first unit of every stage has stride 2; IR-101 has 3/13/30/3 units with widths 64/128/256/512.
Depth and widths are read from the state dict, so a small test model with the same layout loads
through the same code.
"""

import math

import torch
import torch.nn as nn

IR101_UNITS = (3, 13, 30, 3)
IR101_WIDTHS = (64, 128, 256, 512)


class BasicBlockIR(nn.Module):
    def __init__(self, in_channel, depth, stride):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class CurricularFaceIR(nn.Module):
    """images normalised to [-1, 1], (B, 3, S, S) RGB -> (B, E) embeddings (not normalised)."""

    def __init__(self, units=IR101_UNITS, widths=IR101_WIDTHS, stem=None, embedding_size=512, input_size=112):
        super().__init__()
        self.units = tuple(int(u) for u in units)
        self.widths = tuple(int(w) for w in widths)
        stem = int(stem if stem is not None else widths[0])
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem))
        blocks, inc = [], stem
        for n, d in zip(self.units, self.widths):
            for k in range(n):
                blocks.append(BasicBlockIR(inc, d, 2 if k == 0 else 1))
                inc = d
        self.body = nn.Sequential(*blocks)
        spatial = int(input_size) // (2 ** len(self.units))
        self.input_size = int(input_size)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(inc), nn.Dropout(0.4), nn.Flatten(),
            nn.Linear(inc * spatial * spatial, embedding_size), nn.BatchNorm1d(embedding_size, affine=False),
        )

    def forward(self, x):
        return self.output_layer(self.body(self.input_layer(x)))


def config_from_state_dict(sd):
    """(units, widths, stem, embedding_size, input_size) of a CurricularFace IR state dict."""
    need = ("input_layer.0.weight", "output_layer.3.weight")
    if any(k not in sd for k in need):
        raise ValueError(
            "This checkpoint is not a CurricularFace/TFace IR backbone (no 'input_layer.0.weight' / 'output_layer.3.weight'); "
            "the FaceSim-Cur file is glint360k_curricular_face_r101_backbone.bin from the ConsisID or OpenS2V weight release."
        )
    ids = sorted({int(k.split(".")[1]) for k in sd if k.startswith("body.")})
    if not ids or ids != list(range(len(ids))):
        raise ValueError(f"CurricularFace state dict has body units {ids[:5]}...; expected body.0 .. body.N without gaps.")
    res_idx = {int(p[3]) for p in (k.split(".") for k in sd) if len(p) > 4 and p[0] == "body" and p[2] == "res_layer"}
    if res_idx - set(range(6)):
        raise ValueError("CurricularFace state dict has res_layer modules beyond 0-5: a bottleneck or SE variant "
                         "(IR-152/200, IR-SE) which this loader does not build; FaceSim-Cur uses IR-101.")
    stem = int(sd["input_layer.0.weight"].shape[0])
    starts = [0] + [i for i in ids if i > 0 and f"body.{i}.shortcut_layer.0.weight" in sd]
    bounds = starts + [len(ids)]
    units = [b - a for a, b in zip(bounds, bounds[1:])]
    widths = [int(sd[f"body.{a}.res_layer.1.weight"].shape[0]) for a in starts]
    emb, fc_in = (int(v) for v in sd["output_layer.3.weight"].shape)
    s = math.isqrt(fc_in // widths[-1])
    if s * s * widths[-1] != fc_in:
        raise ValueError(f"output_layer.3.weight has {fc_in} inputs, not {widths[-1]} x s x s.")
    return tuple(units), tuple(widths), stem, emb, s * 2 ** len(units)


def curricularface_from_state_dict(sd):
    """Build the backbone that matches `sd` and load it strictly (num_batches_tracked may be absent)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    units, widths, stem, emb, size = config_from_state_dict(sd)
    net = CurricularFaceIR(units, widths, stem, emb, size)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"CurricularFace checkpoint does not match the IR layout (units per stage {units}, widths {widths}): "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}."
        )
    return net.eval()


def is_curricularface_state_dict(sd):
    return isinstance(sd, dict) and any(k.endswith("input_layer.0.weight") for k in sd)


def normalise_uint8_rgb(crops):
    """(B, 3, 112, 112) uint8-valued RGB -> the input the evaluation scripts feed: x / 255, - 0.5, / 0.5 (fp32)."""
    return crops.float().div(255).sub(0.5).div(0.5)
