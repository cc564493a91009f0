"""Test-time face recognisers for the benchmark-protocol tests (no weights downloaded or committed).

* CurricularFace IR backbone state dicts with the key names of the released
  glint360k_curricular_face_r101_backbone.bin (TFace's Backbone(input_size=[112, 112], mode="ir")),
  fewer units and channels, random weights; and a plain functional forward written from those key
  names (the tests' independent reference, not the pack's module).
* `centre_outputs`: moves a final BatchNorm1d's running mean onto the mean embedding of some sample
  inputs, so a random recogniser gives cosines of both signs (a random net maps every face close to
  one direction otherwise, and the benchmarks' max(0, cos) clipping would never be exercised).
"""

import numpy as np
import torch
import torch.nn.functional as F

BN_EPS = 1e-5


def _bn(sd, p, c, g):
    sd[f"{p}.weight"] = 1.0 + 0.1 * torch.randn(c, generator=g)
    sd[f"{p}.bias"] = 0.05 * torch.randn(c, generator=g)
    sd[f"{p}.running_mean"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{p}.running_var"] = 0.5 + torch.rand(c, generator=g)
    sd[f"{p}.num_batches_tracked"] = torch.tensor(0)


def _conv(cout, cin, k, g):
    return torch.randn(cout, cin, k, k, generator=g) * (1.0 / (cin * k * k)) ** 0.5


def curricular_state_dict(units=(1, 2, 1, 1), widths=(8, 16, 24, 32), embedding=64, seed=0):
    """IR layout: units per stage, widths per stage (stage 1 width = stem width, so its first unit
    has the max-pool shortcut as in IR-101), 112 px input -> 7 x 7 before the Linear."""
    g = torch.Generator().manual_seed(seed)
    sd = {"input_layer.0.weight": _conv(widths[0], 3, 3, g)}
    _bn(sd, "input_layer.1", widths[0], g)
    sd["input_layer.2.weight"] = 0.25 + 0.05 * torch.randn(widths[0], generator=g)
    i, cin = 0, widths[0]
    for n, d in zip(units, widths):
        for _ in range(n):
            p = f"body.{i}"
            if cin != d:
                sd[f"{p}.shortcut_layer.0.weight"] = _conv(d, cin, 1, g)
                _bn(sd, f"{p}.shortcut_layer.1", d, g)
            _bn(sd, f"{p}.res_layer.0", cin, g)
            sd[f"{p}.res_layer.1.weight"] = _conv(d, cin, 3, g)
            _bn(sd, f"{p}.res_layer.2", d, g)
            sd[f"{p}.res_layer.3.weight"] = 0.25 + 0.05 * torch.randn(d, generator=g)
            sd[f"{p}.res_layer.4.weight"] = _conv(d, d, 3, g)
            _bn(sd, f"{p}.res_layer.5", d, g)
            i, cin = i + 1, d
    _bn(sd, "output_layer.0", cin, g)
    sd["output_layer.3.weight"] = torch.randn(embedding, cin * 49, generator=g) * (1.0 / (cin * 49)) ** 0.5
    sd["output_layer.3.bias"] = 0.05 * torch.randn(embedding, generator=g)
    sd["output_layer.4.running_mean"] = torch.zeros(embedding)
    sd["output_layer.4.running_var"] = 0.5 + torch.rand(embedding, generator=g)
    sd["output_layer.4.num_batches_tracked"] = torch.tensor(0)
    return sd


def _apply_bn(sd, p, x, affine=True):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"],
                        sd[f"{p}.weight"] if affine else None, sd[f"{p}.bias"] if affine else None, False, 0.0, BN_EPS)


def curricular_forward(sd, x):
    """Plain eval-mode forward from the state dict: a unit's first conv of a new stage... every unit
    whose index starts a stage (unit 0 and each unit with a shortcut conv) has stride 2."""
    x = _apply_bn(sd, "input_layer.1", F.conv2d(x, sd["input_layer.0.weight"], padding=1))
    x = F.prelu(x, sd["input_layer.2.weight"])
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
    for i in range(n):
        p = f"body.{i}"
        conv_short = f"{p}.shortcut_layer.0.weight" in sd
        stride = 2 if (i == 0 or conv_short) else 1
        r = _apply_bn(sd, f"{p}.res_layer.0", x)
        r = F.conv2d(r, sd[f"{p}.res_layer.1.weight"], padding=1)
        r = F.prelu(_apply_bn(sd, f"{p}.res_layer.2", r), sd[f"{p}.res_layer.3.weight"])
        r = _apply_bn(sd, f"{p}.res_layer.5", F.conv2d(r, sd[f"{p}.res_layer.4.weight"], stride=stride, padding=1))
        if conv_short:
            s = _apply_bn(sd, f"{p}.shortcut_layer.1", F.conv2d(x, sd[f"{p}.shortcut_layer.0.weight"], stride=stride))
        else:
            s = x[:, :, ::stride, ::stride]  # MaxPool2d(kernel 1, stride)
        x = r + s
    x = _apply_bn(sd, "output_layer.0", x).flatten(1)
    x = F.linear(x, sd["output_layer.3.weight"], sd["output_layer.3.bias"])
    return _apply_bn(sd, "output_layer.4", x, affine=False)


def centre_outputs(sd, prefix, forward, samples, fraction=1.0):
    """Set `prefix`.running_mean (and `prefix`.bias to 0 if present) so the mean output over
    `samples` is zero. forward(sd, samples) -> outputs."""
    sd = dict(sd)
    sd[f"{prefix}.running_mean"] = torch.zeros_like(sd[f"{prefix}.running_mean"])
    if f"{prefix}.bias" in sd:
        sd[f"{prefix}.bias"] = torch.zeros_like(sd[f"{prefix}.bias"])
    with torch.no_grad():
        y0 = forward(sd, samples)
    scale = torch.sqrt(sd[f"{prefix}.running_var"] + BN_EPS)
    if f"{prefix}.weight" in sd:
        scale = scale / sd[f"{prefix}.weight"]
    sd[f"{prefix}.running_mean"] = (fraction * y0.mean(0) * scale).float()
    return sd


def iresnet_forward(sd, x):
    """Eval forward of an arcface_torch iresnet state dict (via the pack's strict loader; only used to
    centre the test pack's outputs, the pack's ONNX copy is what the tests score with)."""
    from likeness_blocks.arcface import iresnet_from_state_dict

    return iresnet_from_state_dict(sd)(x)


def uint8_rgb_to_unit(x):
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
