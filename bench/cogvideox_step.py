"""Step time of the pack's native CogVideoX MODEL vs calling diffusers' transformer directly.

Same random weights, same latents / timestep / text embeddings, batch 2 (CFG). "ours" is one
BaseModel.apply_model call (input scaling, timestep lookup, layout permutes, RoPE cache, comfy ops
layers, v-prediction -> x0); "direct" is CogVideoXTransformer3DModel.forward with RoPE computed once.

    LIKENESS_COMFYUI=/path/to/ComfyUI python bench/cogvideox_step.py --preset medium
Presets: tiny (CI smoke), medium (CPU-sized), 5b (CogVideoX-5B shapes, 49x480x720; needs a GPU).
"""

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "tiny": (dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, time_embed_dim=32, text_embed_dim=64,
                  sample_width=16, sample_height=12, max_text_seq_length=8), (3, 6, 8), 8),
    "medium": (dict(num_attention_heads=8, attention_head_dim=64, num_layers=4, time_embed_dim=512, text_embed_dim=4096),
               (5, 30, 44), 226),
    "5b": (dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, time_embed_dim=512, text_embed_dim=4096),
           (13, 60, 90), 226),
}


def setup(cpu):
    """ComfyUI in-process (LIKENESS_COMFYUI or the pinned copy) and the pack as `likeness_pack`."""
    sys.path[:0] = [os.path.join(REPO, "tests"), REPO]
    from support.comfy_env import import_comfy, import_pack

    import_comfy(cpu=cpu)
    import_pack()


def preset_args(description):
    """The options both CogVideoX benches take -> (args, cuda, dtype, transformer config, (t, h, w), text length)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--layers", type=int, default=None,
                    help="override the preset's block count (per-block ratios on a CPU: the 5b widths with a few blocks)")
    ap.add_argument("--latent-frames", type=int, default=None, help="override the preset's latent frame count")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU time (a CPU run on a machine shared with other jobs)")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    setup(cpu=not cuda)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype or ("bf16" if cuda else "fp32")]
    extra, thw, text_len = PRESETS[a.preset]
    cfg = dict(in_channels=16, out_channels=16, use_rotary_positional_embeddings=True, **extra)
    if a.layers:
        cfg["num_layers"] = a.layers
    if a.latent_frames:
        thw = (a.latent_frames,) + tuple(thw[1:])
    return a, cuda, dtype, cfg, thw, text_len


def timed_pair(fa, fb, iters, sync, clock=time.perf_counter):
    """Median seconds of fa and fb, measured interleaved (a, b, a, b, ...) so that load changes on a
    shared machine hit both alike. clock=time.process_time (CPU runs): this process's CPU seconds, which
    other jobs on a busy machine disturb far less than wall time."""
    for _ in range(2):
        fa()
        fb()
    sync()
    ta, tb = [], []
    for _ in range(iters):
        for f, acc in ((fa, ta), (fb, tb)):
            t0 = clock()
            f()
            sync()
            acc.append(clock() - t0)
    return statistics.median(ta), statistics.median(tb)


def main():
    a, cuda, dtype, cfg, (t, h, w), text_len = preset_args(__doc__)
    import comfy.model_management as mm
    from diffusers import CogVideoXTransformer3DModel

    L = importlib.import_module("likeness_pack.loaders.cogvideox")
    A = importlib.import_module("likeness_pack.adapters.cogvideox")
    dev = mm.get_torch_device()
    torch.manual_seed(0)
    direct = CogVideoXTransformer3DModel(**cfg).to(dev, dtype).eval()
    sd = {k: v.detach().clone() for k, v in direct.state_dict().items()}
    patcher = L.build_model_patcher(cfg, sd, weight_dtype=dtype, source="bench")
    mm.load_models_gpu([patcher])
    model = patcher.model

    x = torch.randn(2, 16, t, h, w, device=dev)
    ctx = torch.randn(2, text_len, cfg["text_embed_dim"], device=dev)
    step = 500
    sigma = model.model_sampling.sigmas[step].reshape(1).repeat(2).to(dev)
    p = cfg.get("patch_size", 2)
    rope = model.diffusion_model.rotary_embedding(t, h // p, w // p, dev)
    xin = (x / (sigma.reshape(-1, 1, 1, 1, 1) ** 2 + 1) ** 0.5).to(dtype).movedim(1, 2).contiguous()
    ts = torch.tensor([step, step], device=dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    with torch.inference_mode():
        ours_out = model.apply_model(x, sigma, c_crossattn=ctx)
        v = direct(hidden_states=xin, encoder_hidden_states=ctx.to(dtype), timestep=ts, image_rotary_emb=rope,
                   return_dict=False)[0]
        ab = (1 / (sigma.double() ** 2 + 1)).float().reshape(-1, 1, 1, 1, 1)
        ref = ab.sqrt() * xin.float().movedim(2, 1) - (1 - ab).sqrt() * v.float().movedim(2, 1)
        err = ((ours_out - ref).abs().max() / ref.abs().max()).item()
        t_ours, t_direct = timed_pair(
            lambda: model.apply_model(x, sigma, c_crossattn=ctx),
            lambda: direct(hidden_states=xin, encoder_hidden_states=ctx.to(dtype), timestep=ts, image_rotary_emb=rope,
                           return_dict=False), a.iters, sync,
            clock=time.process_time if a.clock == "cpu" else time.perf_counter)
    res = {"preset": a.preset, "device": str(dev), "dtype": str(dtype), "latent": [2, 16, t, h, w],
           "tokens": t * (h // p) * (w // p) + text_len, "threads": torch.get_num_threads(), "clock": a.clock,
           "ours_s": round(t_ours, 4), "direct_s": round(t_direct, 4), "ratio": round(t_ours / t_direct, 3),
           "max_rel_diff": err}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
