"""Per-step overhead of Concat-ID's reference frame on native Wan 2.1 (1.3B block shapes).

Times one diffusion-model call (one sampler step, one CFG branch) of a Wan model with the 1.3B
block shapes (dim 1536, FFN 8960, 12 heads, umT5 context of 512 tokens) and random weights:
  * plain text-to-video (no reference), and
  * with the Concat-ID patch and one reference latent frame (AdaLN variant: the heavier one).
Reports the ratio. On a CPU use fewer blocks (--blocks); the ratio per block is what matters since
every block sees the same token counts.

  python bench/concat_id_overhead.py --blocks 1 --frames 81 --height 480 --width 832
  python bench/concat_id_overhead.py --frames 9 --height 240 --width 416 --repeats 3 --clock cpu   # shared CPU
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]


def measure(blocks, frames, height, width, repeats=1, dtype=torch.float32, fill_device=None, clock=time.perf_counter):
    """Seconds per diffusion-model call without and with the reference (best of `repeats`, after a warm-up on a
    GPU or when repeating); ComfyUI and the pack already imported. fill_device: draw the random weights there.
    clock=time.process_time (CPU): this process's CPU seconds, which other jobs on a shared machine disturb less."""
    import importlib

    import comfy.model_management as mm
    import comfy.ldm.wan.model
    import comfy.ops
    import comfy.patcher_extension
    import comfy.sd
    from support.tiny_models import fill_random_

    wan = importlib.import_module("likeness_pack.adapters.wan")
    dim, ffn, heads = 1536, 8960, 12
    with torch.device("meta"):
        m = comfy.ldm.wan.model.WanModel(model_type="t2v", dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=blocks,
                                         in_dim=16, out_dim=16, text_dim=4096, operations=comfy.ops.manual_cast)
    sd = fill_random_({k: torch.empty(v.shape) for k, v in m.state_dict().items()}, seed=0, device=fill_device)
    sd = {k: v.cpu() for k, v in sd.items()}
    g = torch.Generator().manual_seed(0)
    adaln = wan.ConcatIdAdaLNWeights(sd["time_projection.1.weight"].clone(), sd["time_projection.1.bias"].clone(),
                                     [0.02 * torch.randn(1, 6, dim, generator=g) for _ in range(blocks)])
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    del sd
    patched = wan.apply_concat_id(patcher, adaln=adaln)
    dev = mm.get_torch_device()
    dm = patcher.model.diffusion_model.to(dev)
    t_lat, h_lat, w_lat = (frames - 1) // 4 + 1, height // 8, width // 8
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
        t0 = clock()
        with torch.inference_mode():
            out = dm(x, t, ctx, time_dim_concat=refs, transformer_options=opts(p))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape == x.shape
        return clock() - t0

    if repeats > 1 or dev.type == "cuda":
        step(patcher, None), step(patched, ref)  # warm-up
    base = min(step(patcher, None) for _ in range(repeats))
    with_ref = min(step(patched, ref) for _ in range(repeats))
    return {"device": str(dev), "dtype": str(dtype), "blocks": blocks, "frames": frames, "height": height,
            "width": width, "video_tokens": t_lat * (h_lat // 2) * (w_lat // 2),
            "reference_tokens": (h_lat // 2) * (w_lat // 2), "threads": torch.get_num_threads(),
            "plain_s": round(base, 4), "with_reference_s": round(with_ref, 4), "ratio": round(with_ref / base, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: process CPU time (both threads), less disturbed by other jobs on a shared machine")
    ap.add_argument("--comfyui", default=None,
                    help="ComfyUI folder (default: LIKENESS_COMFYUI, else the repo's .comfyui/ComfyUI)")
    a = ap.parse_args()
    if a.comfyui:
        os.environ["LIKENESS_COMFYUI"] = a.comfyui
    from support.comfy_env import import_comfy, import_pack

    import_comfy(cpu=a.device == "cpu")
    import_pack()
    r = measure(a.blocks, a.frames, a.height, a.width, a.repeats, getattr(torch, a.dtype),
                fill_device="cuda" if a.device == "cuda" else None,
                clock=time.process_time if a.clock == "cpu" else time.perf_counter)
    print(f"device {r['device']} ({r['threads']} threads), {a.dtype}, {a.clock} clock, "
          f"{a.blocks} block(s) of Wan 1.3B shape, "
          f"{a.frames} frames {a.height}x{a.width}: {r['video_tokens']} video tokens + {r['reference_tokens']} "
          "reference tokens")
    print(f"no reference: {r['plain_s']:.3f} s/step   with Concat-ID reference: {r['with_reference_s']:.3f} s/step   "
          f"ratio {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
