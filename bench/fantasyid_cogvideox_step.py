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


def main():
    a, cuda, dtype, cfg, (t, h, w), text_len = preset_args(__doc__)
    import comfy.model_management as mm
    from diffusers import CogVideoXTransformer3DModel

    L = importlib.import_module("likeness_pack.loaders.cogvideox")
    F = importlib.import_module("likeness_pack.adapters.cogvideox_fantasyid")
    from likeness_pack.likeness_blocks.fantasyid import LayerAttention

    dev = mm.get_torch_device()
    torch.manual_seed(0)
    net = CogVideoXTransformer3DModel(**cfg).eval()
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    del net
    patcher = L.build_model_patcher(cfg, sd, weight_dtype=dtype, source="bench")
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    scale = width / 3072
    la_heads, la_dh, kv = 16, max(4, int(round(128 * scale))), max(16, int(round(2048 * scale)))
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
            lambda: model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=fid_to), a.iters, sync,
            clock=time.process_time if a.clock == "cpu" else time.perf_counter)
    p = cfg.get("patch_size", 2)
    res = {"preset": a.preset, "device": str(dev), "dtype": str(dtype), "latent": [2, 16, t, h, w],
           "video_tokens": t * (h // p) * (w // p), "text_tokens": text_len, "blocks": cfg["num_layers"],
           "width": width, "layer_attention": {"heads": la_heads, "dim_head": la_dh, "kv_dim": kv, "id_tokens": 115},
           "threads": torch.get_num_threads(), "clock": a.clock, "plain_s": round(t_plain, 4), "fantasyid_s": round(t_fid, 4),
           "overhead_pct": round(100 * (t_fid / t_plain - 1), 1)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
