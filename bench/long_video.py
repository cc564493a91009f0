"""Long videos through ComfyUI's context windows: peak memory and time per frame at 81, 161 and 241 frames.

The whole sampler runs (comfy.sample.sample, CFG on, cond and uncond batched as ComfyUI chooses) on a Wan 2.1 T2V
model with the real architecture and random weights, patched with Concat-ID (AdaLN variant, one reference frame) and
followed by ComfyUI's own WAN Context Windows node (windows of 81 frames overlapping 16, static schedule, pyramid
fusion). Each frame count runs in its own process; memory is the peak resident memory during sampling above what the
process held just before it (polled every 2 ms), time is the sampling wall time. Ratios are within one run of this
script; nothing here is a timed test.

What to expect: at 81 frames one window covers the video (ComfyUI skips the windowing); at 161 and 241 the model runs
on one window at a time, so the peak stays at one window's working memory plus the few full-length latents the
sampler keeps, and the time grows with the number of windows (3 and 4 windows of 21 latent frames).

On a CPU the model is tiny (default --dim 128 --blocks 2, 256x256 pixels, 2 steps): the same code path, toy sizes. On a GPU
use e.g. --dim 1536 --blocks 30 --heads 12 --width 832 --height 480 (Wan 1.3B shapes; memory from the allocator).

  python bench/long_video.py                      # CPU, tiny
  python bench/long_video.py --device cuda --dim 1536 --blocks 30 --heads 12 --width 832 --height 480 --steps 4
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory while the block runs, polled in a thread."""

    def __init__(self, every=0.002):
        self.every = every
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = _rss_bytes()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def child(a):
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    os.environ["LIKENESS_COMFYUI"] = a.comfyui
    from support.comfy_env import import_comfy, import_pack

    if a.device == "cpu":
        import_comfy()
    else:  # GPU: do not force --cpu
        sys.path.insert(0, a.comfyui)
        import comfy.model_management  # noqa: F401
        import nodes

        import asyncio

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    import_pack()
    import importlib

    import comfy.sample
    import comfy.sd
    import comfy_extras.nodes_context_windows as ncw
    from support.tiny_models import fill_random_

    loader = importlib.import_module("likeness_pack.loaders.concat_id")
    wan = importlib.import_module("likeness_pack.adapters.wan")
    torch.manual_seed(0)
    import comfy.ldm.wan.model
    import comfy.ops

    with torch.device("meta"):
        m = comfy.ldm.wan.model.WanModel(model_type="t2v", dim=a.dim, ffn_dim=a.dim * 4, num_heads=a.heads,
                                         num_layers=a.blocks, in_dim=16, out_dim=16, text_dim=4096,
                                         operations=comfy.ops.manual_cast)
    sd = fill_random_({k: torch.empty(v.shape) for k, v in m.state_dict().items()}, seed=0, scale=0.5)
    sd["time_projection_ref.1.weight"] = torch.randn(6 * a.dim, a.dim) / a.dim ** 0.5
    sd["time_projection_ref.1.bias"] = torch.zeros(6 * a.dim)
    for i in range(a.blocks):
        sd[f"blocks.{i}.modulation_ref"] = 0.1 * torch.randn(1, 6, a.dim)
    main_sd, adaln = loader.split_concat_id_state_dict(sd)
    model = comfy.sd.load_diffusion_model_state_dict(main_sd, model_options={"dtype": getattr(torch, a.dtype)})
    patched = wan.apply_concat_id(model, adaln=adaln)
    kw = dict(model=patched, context_length=81, context_overlap=16, context_schedule="standard_static",
              context_stride=1, closed_loop=False, fuse_method="pyramid")
    import inspect

    if "freenoise" in inspect.signature(ncw.WanContextWindowsManualNode.execute).parameters:
        kw["freenoise"] = False
    out = ncw.WanContextWindowsManualNode.execute(**kw)
    windowed = out.args[0] if hasattr(out, "args") else out[0]
    lh, lw = a.height // 8, a.width // 8
    g = torch.Generator().manual_seed(1)
    refs = torch.randn(1, 16, 1, lh, lw, generator=g)
    pos = [[torch.randn(1, 16, 4096, generator=g), {"time_dim_concat": refs}]]
    neg = [[torch.randn(1, 16, 4096, generator=g), {"time_dim_concat": refs}]]

    def run(frames, steps):
        latent = torch.zeros(1, 16, (frames - 1) // 4 + 1, lh, lw)
        noise = comfy.sample.prepare_noise(latent, 0)
        with torch.inference_mode():
            return comfy.sample.sample(windowed, noise, steps, 5.0, "euler", "simple", pos, neg, latent,
                                       disable_pbar=True, seed=0)

    run(81, 1)  # warm-up: model load, kernels, caches
    if a.device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, peaks = [], []
    for _ in range(a.repeats):  # fastest time (a busy machine only adds), largest peak
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            res = run(a.frames, a.steps)
            if a.device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        assert torch.isfinite(res).all()
        peaks.append((torch.cuda.max_memory_allocated() - base) if a.device != "cpu" else (rss.peak - rss.base))
    print("RESULT " + json.dumps({"frames": a.frames, "seconds": min(times), "peak_bytes": max(peaks)}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="*", default=[81, 161, 241])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--comfyui", default=os.environ.get("LIKENESS_COMFYUI", str(REPO / ".comfyui" / "ComfyUI")))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.frames = a.frames[0]
        return child(a)
    rows = []
    for f in a.frames:
        cmd = [sys.executable, __file__, "--child", "--frames", str(f)] + [
            x for k in ("dim", "heads", "blocks", "width", "height", "steps", "repeats", "device", "dtype", "comfyui")
            for x in (f"--{k}", str(getattr(a, k)))]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"the {f}-frame run failed")
        rows.append(json.loads(line[0][7:]))
    first = rows[0]
    print(f"Wan T2V dim {a.dim}, {a.blocks} blocks, {a.width}x{a.height}, {a.steps} steps, CFG 5, {a.device} {a.dtype}; "
          "Concat-ID (AdaLN, 1 reference) + WAN Context Windows 81/16")
    print(f"{'frames':>7} {'latent':>7} {'time s':>9} {'s/frame':>9} {'peak MiB':>9} {'time x':>7} {'s/frame x':>9} "
          f"{'peak x':>7}")
    for r in rows:
        print(f"{r['frames']:>7} {(r['frames'] - 1) // 4 + 1:>7} {r['seconds']:>9.2f} {r['seconds'] / r['frames']:>9.4f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {r['seconds'] / first['seconds']:>7.2f} "
              f"{(r['seconds'] / r['frames']) / (first['seconds'] / first['frames']):>9.2f} "
              f"{r['peak_bytes'] / max(first['peak_bytes'], 1):>7.2f}")


if __name__ == "__main__":
    main()
