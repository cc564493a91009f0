"""A differentiable ArcFace recogniser in plain torch.

Two ways in, one module out (`ArcFaceTorch`):

* `IResNet`: the arcface_torch "iresnet" layout (iresnet100 = glintr100's architecture, as in
  StableAnimator's `glintr100_torch.pth`), with the original state-dict key names, so such a
  checkpoint loads strictly. Depth and widths are read from the state dict.
* `OnnxGraphModule`: runs an ONNX recognition graph (the user's `glintr100.onnx`,
  `w600k_r50.onnx`, ...) with torch ops, node by node, weights as buffers. Gradients flow to the
  input. Only the operators such models use are implemented; anything else is reported by name.

Both take the recogniser's own input scaling, (pixel_0_255 - mean) / std, RGB, NCHW.
"""

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# iresnet (arcface_torch layout)

_BN_EPS = 1e-5


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (downsampled) input."""

    def __init__(self, inplanes, planes, stride=1, downsample=False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=_BN_EPS)
            )

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        skip = x if self.downsample is None else self.downsample(x)
        return out + skip


IRESNET_DEPTHS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),  # glintr100
    "r200": (6, 26, 60, 6),
}


class IResNet(nn.Module):
    def __init__(self, layers=IRESNET_DEPTHS["r100"], widths=(64, 128, 256, 512), num_features=512, input_size=112):
        super().__init__()
        self.layers_cfg = tuple(int(v) for v in layers)
        self.widths = tuple(int(v) for v in widths)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        inplanes = widths[0]
        for li, (n, planes) in enumerate(zip(self.layers_cfg, self.widths)):
            blocks = [IBasicBlock(inplanes, planes, 2, downsample=True)]
            blocks += [IBasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{li + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        spatial = input_size // 16
        self.fc = nn.Linear(inplanes * spatial * spatial, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=_BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(x.float()))


def iresnet_config_from_state_dict(sd):
    """(layers, widths, num_features, input_size) of an arcface_torch iresnet state dict."""
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        raise ValueError(
            "This checkpoint is not an arcface_torch iresnet state dict (no 'conv1.weight'/'fc.weight' keys); "
            "use a glintr100_torch.pth-style file or the pack's recognition ONNX."
        )
    layers, widths = [], []
    for li in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{li}.")}
        if not blocks:
            raise ValueError(f"iresnet state dict has no 'layer{li}.*' keys; the file is incomplete or another architecture.")
        layers.append(max(blocks) + 1)
        widths.append(int(sd[f"layer{li}.0.conv1.weight"].shape[0]))
    num_features, fc_in = sd["fc.weight"].shape
    spatial = math.isqrt(fc_in // widths[-1])
    if spatial * spatial * widths[-1] != fc_in:
        raise ValueError(f"iresnet fc.weight has {fc_in} inputs, which is not {widths[-1]} x s x s for a square feature map.")
    return tuple(layers), tuple(widths), int(num_features), spatial * 16


def iresnet_from_state_dict(sd):
    """Build an IResNet matching `sd` and load it strictly (num_batches_tracked may be absent)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    layers, widths, nf, size = iresnet_config_from_state_dict(sd)
    net = IResNet(layers, widths, nf, size)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"iresnet checkpoint does not match the arcface_torch iresnet layout "
            f"(blocks per stage {layers}): missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}."
        )
    return net.eval()


# ---------------------------------------------------------------------------------------------
# ONNX graph -> torch


def _attrs(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


_ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool,
                10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def _pad_nd(x, pads, value=0.0):
    """ONNX pads [b1, b2, ..., e1, e2, ...] over the last len(pads)//2 dims -> F.pad."""
    n = len(pads) // 2
    torch_pads = []
    for i in reversed(range(n)):
        torch_pads += [int(pads[i]), int(pads[i + n])]
    if any(torch_pads):
        x = F.pad(x, torch_pads, value=value)
    return x


def _check_auto_pad(node, a):
    ap = a.get("auto_pad", b"NOTSET")
    ap = ap.decode() if isinstance(ap, bytes) else ap
    if ap not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"ONNX node {node.name or node.op_type} uses auto_pad={ap}, which is not supported.")
    return ap


def _axes_arg(node, inputs, a, pos=1):
    if len(inputs) > pos and inputs[pos] is not None:
        return [int(v) for v in inputs[pos].tolist()]
    return [int(v) for v in a.get("axes", [])]


def _op_conv(node, x, a):
    w = x[1]
    b = x[2] if len(x) > 2 else None
    nd = w.dim() - 2
    pads = list(a.get("pads", [0] * (2 * nd)))
    if _check_auto_pad(node, a) == "VALID":
        pads = [0] * (2 * nd)
    strides = a.get("strides", [1] * nd)
    dil = a.get("dilations", [1] * nd)
    group = a.get("group", 1)
    inp = x[0]
    if pads[:nd] == pads[nd:]:
        padding = pads[:nd]
    else:
        inp, padding = _pad_nd(inp, pads), [0] * nd
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return [conv(inp, w, b, stride=strides, padding=padding, dilation=dil, groups=group)]


def _op_bn(node, x, a):
    inp, scale, bias, mean, var = x[:5]
    shape = [1, -1] + [1] * (inp.dim() - 2)
    eps = a.get("epsilon", 1e-5)
    inv = scale.view(shape) / torch.sqrt(var.view(shape) + eps)
    return [(inp - mean.view(shape)) * inv + bias.view(shape)]


def _op_gemm(node, x, a):
    A, B = x[0], x[1]
    if a.get("transA", 0):
        A = A.transpose(-1, -2)
    if a.get("transB", 0):
        B = B.transpose(-1, -2)
    y = a.get("alpha", 1.0) * (A @ B)
    if len(x) > 2 and x[2] is not None:
        y = y + a.get("beta", 1.0) * x[2]
    return [y]


def _op_reshape(node, x, a):
    shape = [int(v) for v in x[1].tolist()]
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


def _op_flatten(node, x, a):
    axis = a.get("axis", 1)
    if axis < 0:
        axis += x[0].dim()
    lead = 1
    for s in x[0].shape[:axis]:
        lead *= s
    return [x[0].reshape(lead, -1)]


def _op_pool(node, x, a, kind):
    nd = x[0].dim() - 2
    k = a["kernel_shape"]
    strides = a.get("strides", [1] * nd)
    pads = list(a.get("pads", [0] * (2 * nd)))
    if _check_auto_pad(node, a) == "VALID":
        pads = [0] * (2 * nd)
    ceil = bool(a.get("ceil_mode", 0))
    inp = x[0]
    if kind == "max":
        if pads[:nd] != pads[nd:]:
            inp, pads = _pad_nd(inp, pads, value=float("-inf")), [0] * (2 * nd)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        return [fn(inp, k, strides, pads[:nd], a.get("dilations", [1] * nd), ceil_mode=ceil)]
    include = bool(a.get("count_include_pad", 0))
    if pads[:nd] != pads[nd:]:
        if not include:
            raise NotImplementedError(f"ONNX AveragePool {node.name} with asymmetric pads and count_include_pad=0.")
        inp, pads = _pad_nd(inp, pads), [0] * (2 * nd)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    return [fn(inp, k, strides, pads[:nd], ceil_mode=ceil, count_include_pad=include)]


def _op_clip(node, x, a):
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    y = x[0]
    if lo is not None:
        y = torch.maximum(y, torch.as_tensor(lo, dtype=y.dtype, device=y.device))
    if hi is not None:
        y = torch.minimum(y, torch.as_tensor(hi, dtype=y.dtype, device=y.device))
    return [y]


def _op_pad(node, x, a):
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = [int(v) for v in (x[1].tolist() if len(x) > 1 else a["pads"])]
    value = float(x[2].item()) if len(x) > 2 and x[2] is not None and x[2].numel() else float(a.get("value", 0.0))
    if mode != "constant":
        n = len(pads) // 2
        torch_pads = []
        for i in reversed(range(n)):
            torch_pads += [pads[i], pads[i + n]]
        # torch pads only the trailing dims for reflect/replicate; drop leading zero pairs
        while len(torch_pads) > 4 and torch_pads[-1] == 0 and torch_pads[-2] == 0:
            torch_pads = torch_pads[:-2]
        return [F.pad(x[0], torch_pads, mode={"reflect": "reflect", "edge": "replicate"}[mode])]
    return [_pad_nd(x[0], pads, value)]


def _op_squeeze(node, x, a):
    axes = _axes_arg(node, x, a)
    y = x[0]
    if not axes:
        return [y.squeeze()]
    for ax in sorted([v % y.dim() for v in axes], reverse=True):
        y = y.squeeze(ax)
    return [y]


def _op_unsqueeze(node, x, a):
    axes = _axes_arg(node, x, a)
    y = x[0]
    out_dim = y.dim() + len(axes)
    for ax in sorted(v % out_dim for v in axes):
        y = y.unsqueeze(ax)
    return [y]


def _op_slice(node, x, a):
    starts = x[1].tolist() if len(x) > 1 else a["starts"]
    ends = x[2].tolist() if len(x) > 2 else a["ends"]
    axes = x[3].tolist() if len(x) > 3 and x[3] is not None else a.get("axes", list(range(len(starts))))
    steps = x[4].tolist() if len(x) > 4 and x[4] is not None else [1] * len(starts)
    y = x[0]
    idx = [slice(None)] * y.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise NotImplementedError("ONNX Slice with a non-positive step is not supported.")
        n = y.shape[ax]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        idx[ax] = slice(s, e, st)
    return [y[tuple(idx)]]


def _op_gather(node, x, a):
    data, idx = x[0], x[1].long()
    axis = a.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return [out.reshape(list(data.shape[:axis]) + list(idx.shape) + list(data.shape[axis + 1:]))]


def _binary(fn):
    return lambda node, x, a: [fn(x[0], x[1])]


def _unary(fn):
    return lambda node, x, a: [fn(x[0])]


_OPS = {
    "Conv": _op_conv,
    "BatchNormalization": _op_bn,
    "PRelu": lambda node, x, a: [torch.where(x[0] >= 0, x[0], x[0] * x[1])],
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "LeakyRelu": lambda node, x, a: [F.leaky_relu(x[0], a.get("alpha", 0.01))],
    "Clip": _op_clip,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Pow": _binary(torch.pow),
    "MatMul": _binary(torch.matmul),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Gemm": _op_gemm,
    "Flatten": _op_flatten,
    "Reshape": _op_reshape,
    "Transpose": lambda node, x, a: [x[0].permute(*a["perm"]) if "perm" in a else x[0].permute(*reversed(range(x[0].dim())))],
    "Identity": _unary(lambda t: t),
    "Dropout": lambda node, x, a: [x[0], torch.ones_like(x[0], dtype=torch.bool)],
    "Shape": lambda node, x, a: [torch.tensor(list(x[0].shape), dtype=torch.int64, device=x[0].device)],
    "Gather": _op_gather,
    "Unsqueeze": _op_unsqueeze,
    "Squeeze": _op_squeeze,
    "Concat": lambda node, x, a: [torch.cat([t for t in x if t is not None], dim=a["axis"])],
    "Cast": lambda node, x, a: [x[0].to(_ONNX_DTYPES[a["to"]])],
    "AveragePool": lambda node, x, a: _op_pool(node, x, a, "avg"),
    "MaxPool": lambda node, x, a: _op_pool(node, x, a, "max"),
    "GlobalAveragePool": lambda node, x, a: [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)],
    "Pad": _op_pad,
    "Slice": _op_slice,
    "Softmax": lambda node, x, a: [torch.softmax(x[0], dim=a.get("axis", -1))],
    "ReduceMean": lambda node, x, a: [x[0].mean(dim=_axes_arg(node, x, a) or list(range(x[0].dim())), keepdim=bool(a.get("keepdims", 1)))],
    "ReduceSum": lambda node, x, a: [x[0].sum(dim=_axes_arg(node, x, a) or list(range(x[0].dim())), keepdim=bool(a.get("keepdims", 1)))],
}


class OnnxGraphModule(nn.Module):
    """Evaluates an ONNX graph with torch ops. Initializers become buffers (they follow .to())."""

    def __init__(self, model):
        super().__init__()
        from onnx import numpy_helper

        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node if n.op_type not in _OPS and n.op_type != "Constant"})
        if unsupported:
            raise NotImplementedError(
                f"The ONNX recognition model uses operators this converter does not implement: {', '.join(unsupported)}. "
                "Use an ArcFace-style model (glintr100, w600k_r50) or a torch iresnet .pth instead."
            )
        self._names = {}
        for i, init in enumerate(graph.initializer):
            t = torch.from_numpy(numpy_helper.to_array(init).copy())
            self.register_buffer(f"init_{i}", t, persistent=True)
            self._names[init.name] = f"init_{i}"
        self._nodes = []
        k = len(graph.initializer)
        for node in graph.node:
            if node.op_type == "Constant":
                a = _attrs(node)
                if "value" not in a:
                    raise NotImplementedError(f"ONNX Constant node {node.name} without a tensor 'value' is not supported.")
                t = torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
                self.register_buffer(f"init_{k}", t, persistent=True)
                self._names[node.output[0]] = f"init_{k}"
                k += 1
                continue
            self._nodes.append((node, _attrs(node)))
        init_names = set(self._names)
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]
        if len(self.input_names) != 1:
            raise ValueError(f"Expected one image input in the ONNX recognition model, found {self.input_names}.")

    def forward(self, x):
        env = {name: getattr(self, buf) for name, buf in self._names.items()}
        env[self.input_names[0]] = x
        for node, a in self._nodes:
            ins = [env[n] if n else None for n in node.input]
            outs = _OPS[node.op_type](node, ins, a)
            for name, val in zip(node.output, outs):
                if name:
                    env[name] = val
        return env[self.output_names[0]]


def onnx_input_normalisation(model):
    """(mean, std) on 0..255 pixels that an insightface recognition ONNX expects.

    Models exported from MXNet carry their own Sub/Mul at the graph start (node names starting
    'Sub'/'_minus' and 'Mul'/'_mul' among the first 8 nodes): they take raw 0..255 pixels.
    The others (PyTorch exports such as glintr100) take (x - 127.5) / 127.5.
    """
    names = [n.name for n in model.graph.node[:8]]
    has_sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    has_mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    return (0.0, 1.0) if (has_sub and has_mul) else (127.5, 127.5)


def onnx_input_size(model):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    h, w = (d.dim_value for d in dims[2:4])
    return int(h) if h > 0 and h == w else 112


# ---------------------------------------------------------------------------------------------


class ArcFaceTorch(nn.Module):
    """images (B, 3, H, W) RGB in [0, 1], already aligned -> (B, D) raw embeddings.

    Other sizes than `input_size` are resized bilinearly. Fully differentiable.
    """

    def __init__(self, net, input_mean=127.5, input_std=127.5, input_size=112, name="", kind="arcface"):
        super().__init__()
        self.kind = kind  # "arcface" or "curricularface": embeddings of different kinds never compare
        self.net = net.eval()
        self.input_mean = float(input_mean)
        self.input_std = float(input_std)
        self.input_size = int(input_size)
        self.name = name
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ArcFaceTorch expects (B, 3, H, W) RGB images, got shape {tuple(images.shape)}.")
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (images * 255.0 - self.input_mean) / self.input_std
        dtype = next(
            (t.dtype for t in itertools.chain(self.net.parameters(), self.net.buffers()) if t.is_floating_point()), x.dtype
        )
        return self.net(x.to(dtype)).float()

    def embed_aligned(self, images, kps):
        """Align (B, 3, H, W) images with (B, 5, 2) landmarks, then embed. Differentiable in both."""
        from .face_align import align_faces

        return self(align_faces(images, kps, self.input_size))

    def embed_boxes(self, images, boxes):
        """Crop (B, 4) boxes, resize to the input size, embed (StableAnimator's HJB reward path)."""
        from .face_align import crop_boxes

        return self(crop_boxes(images, boxes, self.input_size))


def arcface_from_onnx(path_or_model, name=""):
    import onnx

    model = onnx.load(path_or_model) if isinstance(path_or_model, str) else path_or_model
    mean, std = onnx_input_normalisation(model)
    return ArcFaceTorch(OnnxGraphModule(model).eval(), mean, std, onnx_input_size(model), name=name)


def arcface_from_iresnet_state_dict(sd, name=""):
    net = iresnet_from_state_dict(sd)
    size = 16 * math.isqrt(net.fc.in_features // net.widths[-1])
    return ArcFaceTorch(net, 127.5, 127.5, size, name=name)


def recognizer_from_curricularface_state_dict(sd, name=""):
    """CurricularFace IR backbone as an ArcFaceTorch: RGB [0, 1] -> (x * 255 - 127.5) / 127.5, the
    evaluation scripts' x / 255 - 0.5 over 0.5."""
    from .curricularface import curricularface_from_state_dict

    net = curricularface_from_state_dict(sd)
    return ArcFaceTorch(net, 127.5, 127.5, net.input_size, name=name, kind="curricularface")
