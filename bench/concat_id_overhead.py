"""Per-step overhead of Concat-ID's reference frame on native Wan 2.1 (1.3B block shapes).

Times one diffusion-model call (one sampler step, one CFG branch) of a Wan model with the 1.3B
block shapes (dim 1536, FFN 8960, 12 heads, umT5 context of 512 tokens) and random weights:
  * plain text-to-video (no reference), and
  * with the Concat-ID patch and one reference latent frame (AdaLN variant: the heavier one).
Reports the ratio. On a CPU use fewer blocks (--blocks); the ratio per block is what matters since
every block sees the same token counts.

  python bench/concat_id_overhead.py --blocks 1 --frames 81 --height 480 --width 832
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--comfyui", default=os.environ.get("LIKENESS_COMFYUI", "/work/main/.comfyui/ComfyUI"))
    a = ap.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    os.environ["LIKENESS_COMFYUI"] = a.comfyui
    from support.comfy_env import import_comfy, import_pack

    if a.device == "cpu":
        import_comfy()
    else:  # GPU: do not force --cpu
        sys.path.insert(0, a.comfyui)
        import comfy.model_management  # noqa: F401
    import_pack()
    import importlib

    import comfy.patcher_extension
    import comfy.sd
    from support.tiny_models import fill_random_
    import comfy.ldm.wan.model
    import comfy.ops

    wan = importlib.import_module("likeness_pack.adapters.wan")
    dim, ffn, heads = 1536, 8960, 12
    with torch.device("meta"):
        m = comfy.ldm.wan.model.WanModel(model_type="t2v", dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=a.blocks,
                                         in_dim=16, out_dim=16, text_dim=4096, operations=comfy.ops.manual_cast)
    sd = fill_random_({k: torch.empty(v.shape) for k, v in m.state_dict().items()}, seed=0)
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    adaln = wan.ConcatIdAdaLNWeights(sd["time_projection.1.weight"].clone(), sd["time_projection.1.bias"].clone(),
                                     [0.02 * torch.randn(1, 6, dim, generator=g) for _ in range(a.blocks)])
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    patched = wan.apply_concat_id(patcher, adaln=adaln)
    dev = torch.device(a.device)
    dm = patcher.model.diffusion_model.to(dev)
    t_lat, h_lat, w_lat = (a.frames - 1) // 4 + 1, a.height // 8, a.width // 8
    x = torch.randn(1, 16, t_lat, h_lat, w_lat, generator=g).to(dev, dtype)
    ref = torch.randn(1, 16, 1, h_lat, w_lat, generator=g).to(dev, dtype)
    ctx = torch.randn(1, 512, 4096, generator=g).to(dev, dtype)
    t = torch.tensor([500.0], device=dev)

    def opts(p):
        to = dict(p.model_options["transformer_options"])
        to["wrappers"] = comfy.patcher_extension.merge_nested_dicts({}, p.wrappers, copy_dict1=False)
        return to

    def step(p, refs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = dm(x, t, ctx, time_dim_concat=refs, transformer_options=opts(p))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape == x.shape
        return time.perf_counter() - t0

    tokens = t_lat * (h_lat // 2) * (w_lat // 2)
    print(f"device {a.device} ({torch.get_num_threads()} threads), {a.dtype}, {a.blocks} block(s) of Wan 1.3B shape, "
          f"{a.frames} frames {a.height}x{a.width}: {tokens} video tokens + {(h_lat // 2) * (w_lat // 2)} reference tokens")
    if a.repeats > 1 or dev.type == "cuda":
        step(patcher, None), step(patched, ref)  # warm-up
    base = min(step(patcher, None) for _ in range(a.repeats))
    with_ref = min(step(patched, ref) for _ in range(a.repeats))
    print(f"no reference: {base:.3f} s/step   with Concat-ID reference: {with_ref:.3f} s/step   ratio {with_ref / base:.3f}")


if __name__ == "__main__":
    main()
