"""Per-step cost of FantasyID's layer-aware injection on the pack's native CogVideoX MODEL.

One BaseModel.apply_model call (batch 2 = CFG) of the plain MODEL vs the clone patched by
adapters.cogvideox_fantasyid (one LayerAttention per block, 115 ID tokens, the released LayerAttention shapes scaled
with the model width: dim_head 128 x 16 heads at 3072, kv 2048). Includes the wrapper / hook overhead.

    LIKENESS_COMFYUI=/path/to/ComfyUI python bench/fantasyid_cogvideox_step.py --preset medium
Presets as bench/cogvideox_step.py: tiny (CI smoke), medium (CPU-sized), 5b (CogVideoX-5B shapes). On a CPU, the 5B
block shapes with a few blocks and fewer latent frames (fewer tokens make the injection's share larger, not smaller):
    ... --preset 5b --layers 2 --latent-frames 3 --iters 3 --clock cpu
"""

import importlib
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cogvideox_step import preset_args, timed_pair  # noqa: E402


def flop_share(cfg, thw, text_len, la_heads, la_dh, kv, id_tokens=115):
    """FLOPs the injection adds per step over the plain transformer's (multiply-add = 2), from the shapes alone:
    a CogVideoX block on n = video + text tokens of width d is QKV + out projections 8nd^2, attention 4n^2d and the
    GELU MLP (4d) 16nd^2; one LayerAttention on the N video tokens is to_q and to_out 4Ndi (i = heads x dim_head),
    to_kv 4 m kv i on the m ID tokens and its attention 4Nmi. Norms, adaLN and the patch embedding are left out
    of both (small)."""
    t, h, w = thw
    p = cfg.get("patch_size", 2)
    n_vid = t * (h // p) * (w // p)
    n = n_vid + text_len
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    i = la_heads * la_dh
    block = 24 * n * d * d + 4 * n * n * d
    inject = 4 * n_vid * d * i + 4 * id_tokens * kv * i + 4 * n_vid * id_tokens * i
    return inject / block  # the same count of blocks and injections: the per-block ratio is the step's


def layer_attention_shapes(width):
    """The released LayerAttention shapes (16 heads x 128 at width 3072, kv 2048) scaled with the model width."""
    scale = width / 3072
    return 16, max(4, int(round(128 * scale))), max(16, int(round(2048 * scale)))


def measure(cfg, thw, text_len, dtype, iters, clock=time.perf_counter, fill_device=None):
    """Median seconds per apply_model call (batch 2) plain and with the injection, interleaved; ComfyUI and the
    pack already imported. fill_device: draw the random weights there (a GPU: billions of parameters)."""
    import comfy.model_management as mm
    from diffusers import CogVideoXTransformer3DModel
    from support.tiny_models import fill_random_

    L = importlib.import_module("likeness_pack.loaders.cogvideox")
    F = importlib.import_module("likeness_pack.adapters.cogvideox_fantasyid")
    from likeness_pack.likeness_blocks.fantasyid import LayerAttention

    t, h, w = thw
    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    with torch.device("meta"):  # shapes and key names only: random values are drawn below, where asked
        net = CogVideoXTransformer3DModel(**cfg)
    sd = fill_random_({k: torch.empty(v.shape) for k, v in net.state_dict().items()}, seed=0, device=fill_device)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    del net
    patcher = L.build_model_patcher(cfg, sd, weight_dtype=dtype, source="bench")
    del sd
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    la_heads, la_dh, kv = layer_attention_shapes(width)
    las = nn.ModuleList(LayerAttention(dim=width, dim_head=la_dh, heads=la_heads, kv_dim=kv)
                        for _ in range(cfg["num_layers"])).to(dtype).eval()
    ids = torch.randn(1, 115, kv)
    patched = F.apply_layer_injection(patcher, las, ids, strength=1.0)
    mm.load_models_gpu([patched] + patched.get_nested_additional_models())
    model = patcher.model

    x = torch.randn(2, 16, t, h, w, device=dev)
    ctx = torch.randn(2, text_len, cfg["text_embed_dim"], device=dev)
    sigma = model.model_sampling.sigmas[500].reshape(1).repeat(2).to(dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    plain_to = {"sigmas": sigma}
    fid_to = {"sigmas": sigma, "wrappers": patched.wrappers}
    with torch.inference_mode():
        t_plain, t_fid = timed_pair(
            lambda: model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=plain_to),
            lambda: model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=fid_to), iters, sync, clock=clock)
    p = cfg.get("patch_size", 2)
    share = flop_share(cfg, thw, text_len, la_heads, la_dh, kv)
    return {"device": str(dev), "dtype": str(dtype), "latent": [2, 16, t, h, w],
            "video_tokens": t * (h // p) * (w // p), "text_tokens": text_len, "blocks": cfg["num_layers"],
            "width": width, "layer_attention": {"heads": la_heads, "dim_head": la_dh, "kv_dim": kv, "id_tokens": 115},
            "threads": torch.get_num_threads(), "plain_s": round(t_plain, 4), "fantasyid_s": round(t_fid, 4),
            "overhead_pct": round(100 * (t_fid / t_plain - 1), 1), "flop_share_pct": round(100 * share, 1),
            "goal_pct": round(100 * share + 2, 1)}


def main():
    a, cuda, dtype, cfg, thw, text_len = preset_args(__doc__)
    res = measure(cfg, thw, text_len, dtype, a.iters, clock=time.process_time if a.clock == "cpu" else time.perf_counter,
                  fill_device="cuda" if cuda else None)
    print(json.dumps({"preset": a.preset, "clock": a.clock, **res}))


if __name__ == "__main__":
    main()
