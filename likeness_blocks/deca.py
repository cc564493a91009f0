"""DECA's coarse encoder (E_flame) and the image crops it expects, in pure torch.

E_flame: a ResNet-50 trunk (global average of the 7x7x2048 map of a 224x224 RGB image in
[0, 1], no mean/std normalisation) -> Linear 2048->1024 -> ReLU -> Linear 1024->236. The 236
numbers are, in order: shape 100, tex 50, exp 50, pose 6 (global + jaw axis-angle), cam 3,
light 27. State-dict names follow DECA's checkpoint: `encoder.conv1.weight`,
`encoder.layer1.0.downsample.0.weight`, ..., `layers.0.weight`, `layers.2.weight`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .flame import FlameLayer

DECA_PARAM_LAYOUT = (("shape", 100), ("tex", 50), ("exp", 50), ("pose", 6), ("cam", 3), ("light", 27))
DECA_INPUT_SIZE = 224


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.downsample = None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


class ResNet50Trunk(nn.Module):
    """ResNet-50 without its classifier: (B,3,H,W) -> (B,2048) global-average features."""

    def __init__(self, blocks=(3, 4, 6, 3), base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        cin = base_width
        for i, n in enumerate(blocks):
            width = base_width * 2**i
            layer = []
            for k in range(n):
                layer.append(_Bottleneck(cin, width, stride=(1 if i == 0 or k > 0 else 2)))
                cin = width * _Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.out_features = cin

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


class DecaEncoder(nn.Module):
    """E_flame: image (B,3,224,224) in [0,1] -> (B, outsize) parameter vector."""

    def __init__(self, outsize=236, hidden=1024, blocks=(3, 4, 6, 3), base_width=64):
        super().__init__()
        self.encoder = ResNet50Trunk(blocks, base_width)
        self.layers = nn.Sequential(nn.Linear(self.encoder.out_features, hidden), nn.ReLU(), nn.Linear(hidden, outsize))

    def forward(self, images):
        return self.layers(self.encoder(images))


def split_params(code, layout=DECA_PARAM_LAYOUT):
    out, start = {}, 0
    for name, n in layout:
        out[name] = code[:, start : start + n]
        start += n
    if start != code.shape[1]:
        raise ValueError(f"The DECA encoder outputs {code.shape[1]} numbers; the parameter layout needs {start}.")
    out["light"] = out["light"].reshape(code.shape[0], -1, 3)
    return out


@torch.no_grad()
def fold_batchnorm(encoder: DecaEncoder):
    """Folds every eval-mode BatchNorm into the convolution before it (in place; same outputs up to
    float rounding, fewer passes over memory). The folded module no longer has DECA's key names."""

    def fold(conv, bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(scale[:, None, None, None])
        bias = bn.bias - bn.running_mean * scale
        conv.bias = nn.Parameter(bias if conv.bias is None else conv.bias * scale + bias, requires_grad=False)

    trunk = encoder.encoder
    fold(trunk.conv1, trunk.bn1)
    trunk.bn1 = nn.Identity()
    for i in range(1, 5):
        for block in getattr(trunk, f"layer{i}"):
            for k in (1, 2, 3):
                fold(getattr(block, f"conv{k}"), getattr(block, f"bn{k}"))
                setattr(block, f"bn{k}", nn.Identity())
            if block.downsample is not None:
                fold(block.downsample[0], block.downsample[1])
                block.downsample[1] = nn.Identity()
    return encoder


class DecaFlame(nn.Module):
    """DECA E_flame + FLAME layer (the DECA_FLAME socket payload)."""

    def __init__(self, encoder: DecaEncoder, flame: FlameLayer, layout=DECA_PARAM_LAYOUT, sliders=None, fuse=True):
        super().__init__()
        if fuse:
            encoder = fold_batchnorm(encoder.eval())
        # channels_last: oneDNN's fast convolution path (about 4x faster than NCHW on CPU)
        self.encoder = encoder.eval().to(memory_format=torch.channels_last)
        self.flame = flame
        self.layout = tuple(layout)
        self.sliders = sliders or {}  # name -> dict(direction (K,), unit text)

    @property
    def n_shape(self):
        return dict(self.layout)["shape"]

    @property
    def n_exp(self):
        return dict(self.layout)["exp"]

    @torch.no_grad()
    def encode(self, images):
        """images (B,3,224,224) in [0,1] -> dict of DECA parameters."""
        if images.shape[-2:] != (DECA_INPUT_SIZE, DECA_INPUT_SIZE):
            raise ValueError(f"DECA takes 224x224 crops; got {tuple(images.shape[-2:])}.")
        p = next(self.encoder.parameters())
        x = images.to(p.device, p.dtype).contiguous(memory_format=torch.channels_last)
        code = self.encoder(x)
        return split_params(code.float(), self.layout)

    @torch.no_grad()
    def vertices(self, codes, keep_pose_expression=True):
        shape = codes["shape"]
        if keep_pose_expression:
            return self.flame(shape=shape, expression=codes["exp"], pose=codes["pose"])
        return self.flame(shape=shape)


# ----------------------------------------------------------------------------------------- crops


def resize_whole(images_bchw, size=DECA_INPUT_SIZE):
    """FantasyID's crop: the whole image resized to size x size (antialiased bilinear, like PIL's Resize)."""
    return F.interpolate(images_bchw, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def deca_box_square(box, kind="bbox", scale=1.25):
    """DECA's square crop around a face box (x1, y1, x2, y2) in pixels -> (cx, cy, size).

    kind 'bbox' (a face detector's box): size = mean(w, h), centre moved down 0.12 * size;
    kind 'kpt68' (min/max of 68 landmarks): size = 1.1 * mean(w, h), centre unchanged.
    The square side is int(size * scale)."""
    x1, y1, x2, y2 = [float(v) for v in box]
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    if kind == "bbox":
        old = (w + h) / 2.0
        cy += old * 0.12
    elif kind == "kpt68":
        old = (w + h) / 2.0 * 1.1
    else:
        raise ValueError(f"unknown box kind {kind!r}")
    return cx, cy, float(int(old * scale))


def crop_square(image_chw, cx, cy, size, out=DECA_INPUT_SIZE):
    """Similarity warp of the square [cx +- size/2, cy +- size/2] onto out x out pixels
    (corner pixel centres map to corner pixel centres, bilinear, black outside)."""
    _, h, w = image_chw.shape
    u = torch.arange(out, dtype=torch.float32, device=image_chw.device) * (size / (out - 1))
    xs = cx - size / 2.0 + u
    ys = cy - size / 2.0 + u
    gx = 2.0 * xs / max(w - 1, 1) - 1.0
    gy = 2.0 * ys / max(h - 1, 1) - 1.0
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    return F.grid_sample(image_chw[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


# ---------------------------------------------------------------------------------- loading


def _architecture_from_keys(sd):
    """Reads the trunk depth/width and regressor sizes from the state dict (DECA: (3,4,6,3), 64, 1024, 236)."""
    blocks = []
    for i in range(1, 5):
        ids = {int(k.split(".")[2]) for k in sd if k.startswith(f"encoder.layer{i}.")}
        if not ids:
            raise ValueError(f"encoder.layer{i} is missing")
        blocks.append(max(ids) + 1)
    base_width = sd["encoder.conv1.weight"].shape[0]
    hidden, outsize = sd["layers.0.weight"].shape[0], sd["layers.2.weight"].shape[0]
    return tuple(blocks), base_width, hidden, outsize


def extract_e_flame(ckpt, name="checkpoint"):
    """Finds the E_flame state dict in a DECA checkpoint (nested {'E_flame': ...}, flat 'E_flame.' keys, or bare)."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"'{name}' holds a {type(ckpt).__name__}, not a DECA checkpoint dict.")
    if isinstance(ckpt.get("E_flame"), dict):
        sd = ckpt["E_flame"]
    elif any(str(k).startswith("E_flame.") for k in ckpt):
        sd = {k[len("E_flame."):]: v for k, v in ckpt.items() if str(k).startswith("E_flame.")}
    elif "encoder.conv1.weight" in ckpt and "layers.2.weight" in ckpt:
        sd = ckpt
    else:
        raise ValueError(
            f"'{name}' has no E_flame weights (top-level keys: {sorted(map(str, ckpt))[:8]}). "
            "Use DECA's deca_model.tar, which holds 'E_flame', 'E_detail' and 'D_detail'."
        )
    sd = {k[len("module."):] if str(k).startswith("module.") else k: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def _numpy_safe_globals():
    """numpy arrays/scalars that training scripts leave in checkpoints (epoch counters, stats). Still loaded by
    torch's weights_only unpickler: anything an array could contain must itself pass that allow-list."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    allowed = [np.ndarray, np.dtype, _reconstruct, scalar]
    allowed += sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"} - {np.dtype}, key=str)
    aliases = [(_reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar")]
    return allowed, aliases


def _torch_load_safe(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:
        allowed, aliases = _numpy_safe_globals()
        for extra in (aliases, []):  # name aliases need torch >= 2.6's (obj, name) form
            try:
                with torch.serialization.safe_globals(allowed + extra):
                    return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                continue
        raise first


def load_deca_encoder(path, dtype=torch.float32, name=None):
    """deca_model.tar (torch.save, zip or legacy format) or .safetensors -> DecaEncoder in eval mode. `path` may
    also be the checkpoint dict already read (by a loader that reports file problems itself).

    Loaded with torch.load(weights_only=True): tensors and plain containers only."""
    import os

    name = name or ("DECA checkpoint" if isinstance(path, dict) else os.path.basename(str(path)))
    if isinstance(path, dict):
        ckpt = path
    elif str(path).lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        ckpt = load_file(str(path))
    else:
        try:
            ckpt = _torch_load_safe(str(path))
        except Exception as exc:  # pickle.UnpicklingError and friends
            raise ValueError(
                f"Could not load '{name}' safely with torch.load(weights_only=True): {str(exc).splitlines()[0]}. "
                "Only plain tensor checkpoints are accepted; use DECA's original deca_model.tar."
            ) from None
    sd = extract_e_flame(ckpt, name)
    try:
        blocks, base_width, hidden, outsize = _architecture_from_keys(sd)
    except (KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"'{name}': E_flame is not DECA's ResNet-50 encoder ({exc}).") from None
    enc = DecaEncoder(outsize=outsize, hidden=hidden, blocks=blocks, base_width=base_width)
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"'{name}': E_flame keys do not match DECA's encoder (missing {missing[:5]}, unexpected {unexpected[:5]})."
        )
    if outsize != sum(n for _, n in DECA_PARAM_LAYOUT):
        raise ValueError(f"'{name}': E_flame outputs {outsize} numbers; DECA's layout needs 236.")
    return enc.to(dtype).eval().requires_grad_(False)
