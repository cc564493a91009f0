"""Tiny InsightFace-style ONNX models made at test time (no weights are downloaded or committed).

* Detection: an SCRFD-interface graph (input 'input.1' [1, 3, H, W] dynamic, 9 outputs: scores,
  boxes, keypoints for strides 8/16/32 with 2 anchors per location), which insightface's model zoo
  routes as detection. Instead of random weights it computes something meaningful and exact: at
  stride s it fires on an isolated bright s x s square aligned to the s-pixel grid on a dark
  background (centre-surround contrast of s x s cell means), and reports the box = that cell and
  five face-like keypoints inside it. So a test image with white squares has known faces:
  a 32 px square at (x, y) (multiples of 32) is a face with box (x, y, x+32, y+32).
  Squares of 2s at stride s or s/2 do not fire, so a 64 px square is found only after the image is
  scaled down by 2 (the 640 -> 320 retry).
* Recognition: an arcface_torch iresnet with random weights and small widths, written as an ONNX
  graph the way a PyTorch export looks (conv + following BN folded into a biased Conv), input
  'input.1' [N, 3, 112, 112], output [N, 512]; plus the same weights as a state dict with the
  real iresnet key names (for .pth loading and for parity).
"""

import os

import numpy as np
import torch

# keypoints inside a detection cell, in cell units (eyes, nose, mouth corners)
CELL_KPS = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], dtype=np.float32)
STRIDES = (8, 16, 32)


def _model(graph, opset=13):
    from onnx import helper

    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="likeness-tests")
    m.ir_version = 8
    return m


def build_square_detector():
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32 if np.asarray(arr).dtype.kind == "f" else np.int64), name))
        return name

    const("gray_w", np.full((1, 3, 1, 1), 1.0 / 3.0, dtype=np.float32))
    nodes.append(helper.make_node("Conv", ["input.1", "gray_w"], ["gray"], name="Conv_gray", kernel_shape=[1, 1]))
    const("gain", np.array(11.25, dtype=np.float32))
    const("offset", np.array(16.0, dtype=np.float32))
    const("zero", np.array(0.0, dtype=np.float32))
    const("col", np.array([-1, 1], dtype=np.int64))
    const("box_const", np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32))
    const("kps_const", CELL_KPS.reshape(1, 10))
    outs = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        nodes += [
            helper.make_node("AveragePool", ["gray"], [f"cell{s}"], kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("AveragePool", [f"cell{s}"], [f"ring{s}"], kernel_shape=[3, 3], strides=[1, 1],
                             pads=[1, 1, 1, 1], count_include_pad=1),
            helper.make_node("Sub", [f"cell{s}", f"ring{s}"], [f"diff{s}"]),
            helper.make_node("Mul", [f"diff{s}", "gain"], [f"g{s}"]),
            helper.make_node("Sub", [f"g{s}", "offset"], [f"z{s}"]),
            helper.make_node("Sigmoid", [f"z{s}"], [f"p{s}"]),
            helper.make_node("Reshape", [f"p{s}", "col"], [f"pc{s}"]),
            helper.make_node("Concat", [f"pc{s}", f"pc{s}"], [f"pa{s}"], axis=1),
            helper.make_node("Reshape", [f"pa{s}", "col"], [f"score_{s}"]),
            helper.make_node("Mul", [f"score_{s}", "zero"], [f"zeros{s}"]),
            helper.make_node("Add", [f"zeros{s}", "box_const"], [f"bbox_{s}"]),
            helper.make_node("Add", [f"zeros{s}", "kps_const"], [f"kps_{s}"]),
        ]
        outs["score"].append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [f"n{s}", 1]))
        outs["bbox"].append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [f"n{s}", 4]))
        outs["kps"].append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, [f"n{s}", 10]))
    graph = helper.make_graph(
        nodes, "tiny_square_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outs["score"] + outs["bbox"] + outs["kps"], initializer=inits,
    )
    return _model(graph)


def iresnet_state_dict(layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), num_features=512, seed=0):
    """Random weights for the arcface_torch iresnet layout with its real key names."""
    from likeness_blocks.arcface import IResNet

    g = torch.Generator().manual_seed(seed)
    net = IResNet(layers, widths, num_features)
    sd = net.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("running_mean"):
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k == "features.weight":
            out[k] = torch.ones_like(v)
        elif k.endswith(".weight") and v.dim() == 1 and "prelu" not in k:  # BN scale
            out[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif "prelu" in k:
            out[k] = 0.25 + 0.05 * torch.randn(v.shape, generator=g)
        elif k.endswith(".bias"):
            out[k] = 0.05 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel()
            out[k] = torch.randn(v.shape, generator=g) * (1.0 / fan_in) ** 0.5
    return out


def build_iresnet_onnx(sd, batch_dim="N"):
    """ONNX graph of an iresnet state dict, conv+BN folded like a torch export (no Sub/Mul at the start)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    counter = [0]

    def name(op):
        counter[0] += 1
        return f"{op}_{counter[0]}"

    def init(arr):
        n = f"w{len(inits)}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), n))
        return n

    def bn_affine(prefix):
        g = sd[f"{prefix}.weight"].double()
        b = sd[f"{prefix}.bias"].double()
        m = sd[f"{prefix}.running_mean"].double()
        v = sd[f"{prefix}.running_var"].double()
        scale = g / torch.sqrt(v + 1e-5)
        return scale, b - m * scale

    def conv_bn(x, conv, bn, stride, pad):
        w = sd[f"{conv}.weight"].double()
        scale, shift = bn_affine(bn)
        wf = (w * scale[:, None, None, None]).numpy()
        k = w.shape[-1]
        y = name("Conv")
        nodes.append(helper.make_node("Conv", [x, init(wf), init(shift.numpy())], [y], name=y,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        return y

    def bn(x, prefix):
        y = name("BatchNormalization")
        ins = [x] + [init(sd[f"{prefix}.{p}"].numpy()) for p in ("weight", "bias", "running_mean", "running_var")]
        nodes.append(helper.make_node("BatchNormalization", ins, [y], name=y, epsilon=1e-5))
        return y

    def prelu(x, prefix):
        y = name("PRelu")
        nodes.append(helper.make_node("PRelu", [x, init(sd[f"{prefix}.weight"].numpy().reshape(-1, 1, 1))], [y], name=y))
        return y

    x = prelu(conv_bn("input.1", "conv1", "bn1", 1, 1), "prelu")
    for li in range(1, 5):
        nblocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"layer{li}."))
        for bi in range(nblocks):
            p = f"layer{li}.{bi}"
            stride = 2 if bi == 0 else 1
            out = bn(x, f"{p}.bn1")
            out = prelu(conv_bn(out, f"{p}.conv1", f"{p}.bn2", 1, 1), f"{p}.prelu")
            out = conv_bn(out, f"{p}.conv2", f"{p}.bn3", stride, 1)
            skip = conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", stride, 0) if f"{p}.downsample.0.weight" in sd else x
            y = name("Add")
            nodes.append(helper.make_node("Add", [out, skip], [y], name=y))
            x = y
    x = bn(x, "bn2")
    y = name("Flatten")
    nodes.append(helper.make_node("Flatten", [x], [y], name=y, axis=1))
    g = name("Gemm")
    nodes.append(helper.make_node("Gemm", [y, init(sd["fc.weight"].numpy()), init(sd["fc.bias"].numpy())], [g], name=g, transB=1))
    f = bn(g, "features")
    nodes.append(helper.make_node("Identity", [f], ["embedding"], name="Identity_out"))
    nf = sd["fc.weight"].shape[0]
    graph = helper.make_graph(
        nodes, "tiny_iresnet",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch_dim, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch_dim, nf])], initializer=inits,
    )
    return _model(graph)


def make_tiny_pack(models_root, name="tiny", seed=0, nested=False):
    """Write <models_root>/insightface/models/<name>/{det_tiny.onnx, rec_tiny.onnx}; returns (pack_dir, state_dict)."""
    import onnx

    pack = os.path.join(str(models_root), "insightface", "models", name)
    if nested:
        pack = os.path.join(pack, name)
    os.makedirs(pack, exist_ok=True)
    sd = iresnet_state_dict(seed=seed)
    onnx.save(build_square_detector(), os.path.join(pack, "det_tiny.onnx"))
    onnx.save(build_iresnet_onnx(sd), os.path.join(pack, "rec_tiny.onnx"))
    return pack, sd


def squares_image(size_hw, squares, background=0, value=255):
    """uint8 RGB image (H, W, 3) with white squares [(x, y, side), ...]."""
    h, w = size_hw
    img = np.full((h, w, 3), background, dtype=np.uint8)
    for x, y, side in squares:
        img[y:y + side, x:x + side] = value
    return img
