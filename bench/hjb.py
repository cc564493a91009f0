"""HJB face optimisation: time and peak memory of sampling with HJB off, with ours (latent window
around the face, frame subsets), and with a plain implementation of the upstream algorithm (full
decode of every frame at each iteration), on the same models, as ratios in one run.

Each configuration runs in its own process so peak memory is its own (CUDA: max allocated;
CPU: peak resident memory while sampling, weights included). Models are loaded before the clock starts. Models are random-weight but real-size where it matters for the cost:
the real Wan 2.1 VAE (dim 96) and iresnet100 (glintr100's architecture); the DiT has Wan 1.3B
block shapes with --blocks of its 30 blocks.

    .venv/bin/python bench/hjb.py                      # CPU: 240x416, 9 frames (minutes)
    .venv/bin/python bench/hjb.py --device cuda --width 832 --height 480 --frames 33 --blocks 30
    .venv/bin/python bench/hjb.py --model svd --width 1024 --height 576 --frames 4 --face 256 --iterations 3 \
        --modes off,ours                            # SVD-xt sizes; a 4-frame decode chunk on a CPU
    .venv/bin/python bench/hjb.py --device cuda --model svd --width 1024 --height 576 --frames 16 --face 256 \
        --iterations 3 --steps 25                  # the SVD-xt run of the issue (GPU)

With --steps N every step is active (end_percent 1); upstream's default refines the first 21 of 25.

The 'upstream' run is the plain upstream loop (every frame decoded whole at each iteration, SVD in upstream's chunks
of 4), compared like with like by default: its decode runs in the same precision as ours (--precision, 'auto' resolved
on this device) and with decoder gradient checkpointing on, as upstream runs HJB (`--gradient_checkpointing`; here on
the SD-family decoder's resnet blocks, the blocks the pack checkpoints; Wan's causal VAE has none). So the ratio
ours/upstream measures the latent window and the chunk-by-chunk backward only. `--upstream-as-released` runs the
upstream loop as the release does instead (fp32 decode, which is what its pipeline uses) and the printout says so.
--unet-dtype auto samples in the dtype ComfyUI picks (fp16 on a GPU). bench/gpu_suite.py runs the SVD-xt modes like
for like on a GPU.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]


def plain_upstream_hook(vae, recognizer, reference, box, iterations, eta, precision="fp32", checkpoint=False):
    """StableAnimator's step as the notes describe it, written plainly: every frame decoded in full,
    Adam on a detached fp32 x0, |1 - cos| on box crops resized to 112.
    Like for like with ours (GPU suite): precision autocasts the decode as ours does ('auto', 'bf16', ...) and
    checkpoint turns on gradient checkpointing of the decoder's resnet blocks, as upstream's --gradient_checkpointing."""
    import contextlib
    import copy

    from likeness_pack.adapters.sampler_hook import _checkpoint_resnet_blocks, decode_dtype

    with torch.inference_mode(False):
        dec = copy.deepcopy(vae.first_stage_model).float()
        rec = copy.deepcopy(recognizer)
    for p in list(dec.parameters()) + list(rec.parameters()):
        p.requires_grad_(False)
    if checkpoint:
        _checkpoint_resnet_blocks(dec)

    def autocast(device):
        dtype = decode_dtype(precision, device)
        return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    def hook(args):
        sigmas = args["model_options"]["transformer_options"]["sample_sigmas"]
        i = int(torch.argmin((sigmas - args["sigma"][0]).abs()))
        lr = eta * (1 - i / (len(sigmas) - 1))
        model, x0 = args["model"], args["denoised"]
        with torch.inference_mode(False), torch.enable_grad():
            ref = reference.clone()
            z = x0.clone().float().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            probe = torch.zeros_like(x0[:1, ..., :1, :1])
            shift = model.process_latent_out(probe).clone()
            scale = model.process_latent_out(probe + 1).clone() - shift
            for _ in range(iterations):
                opt.zero_grad()
                with autocast(z.device):
                    if z.ndim == 5:  # Wan [B, C, T, h, w] -> [B, 3, T, H, W]
                        frames = vae.process_output(dec.decode(z * scale + shift).float())[0].permute(1, 0, 2, 3)
                    else:  # SVD: frames on the batch axis, decoded in upstream's chunks of 4 (decode_chunk_size)
                        frames = torch.cat([vae.process_output(dec.decode(c * scale + shift).float())
                                            for c in z.split(4)])
                x1, y1, x2, y2 = box
                crops = F.interpolate(frames[:, :, y1:y2, x1:x2], size=(112, 112), mode="bilinear", align_corners=False)
                e = rec(crops)
                loss = (1 - F.cosine_similarity(e, ref[None].expand_as(e), dim=-1)).abs().mean()
                loss.backward()
                opt.step()
        return z.detach().to(x0.dtype)

    return hook


def run_one(cfg):
    from support.comfy_env import import_comfy, import_pack
    from support import tiny_models

    import_comfy(cpu=cfg["device"] == "cpu")
    import_pack()
    import comfy.sd
    import nodes as comfy_nodes
    from likeness_pack.adapters.sampler_hook import HJBFaceGuidance, apply_hjb
    from likeness_pack.likeness_blocks.arcface import ArcFaceTorch, IResNet

    torch.manual_seed(0)
    w, h, frames = cfg["width"], cfg["height"], cfg["frames"]
    if cfg["mode"] == "hook":
        return run_hook_only(cfg)
    fill = cfg["device"] if cfg.get("fill_on_device") else None
    if cfg["model"] == "svd":
        unet = tiny_models.SVD_XT_UNET if cfg.get("unet", "xt") == "xt" else tiny_models.TINY_SVD_UNET
        model = tiny_models.build_tiny_svd(unet_config=unet, num_head_channels=64 if unet is tiny_models.SVD_XT_UNET else 16,
                                           dtype=UNET_DTYPES[cfg.get("unet_dtype", "fp32")], fill_device=fill)
        vae = comfy.sd.VAE(sd=tiny_models.svd_vae_state_dict())
    else:
        model = comfy.sd.load_diffusion_model_state_dict(
            tiny_models.tiny_wan_t2v_state_dict(dim=1536, layers=cfg["blocks"], ffn_dim=8960))
        vae = comfy.sd.VAE(sd=tiny_models.tiny_wan_vae_state_dict(dim=96))
    # smoke runs: a small iresnet (the real one is iresnet100, 65 M parameters)
    rec = ArcFaceTorch(IResNet() if cfg.get("recognizer", "r100") == "r100" else
                       IResNet(layers=(1, 1, 1, 1), widths=(8, 16, 16, 32))).eval()
    ref = F.normalize(torch.randn(512), dim=0)
    fs = cfg["face"]
    box = [w // 2 - fs // 2, h // 2 - fs // 2, w // 2 + fs // 2, h // 2 + fs // 2]
    if cfg["mode"] == "ours":
        model = apply_hjb(model, HJBFaceGuidance(vae, rec, ref, torch.tensor([box]), iterations=cfg["iterations"],
                                                 eta=0.1, end_percent=1.0, window_margin=cfg["margin"], progress=False,
                                                 precision=cfg["precision"]))
    elif cfg["mode"] == "upstream":
        model = model.clone()
        model.set_model_sampler_post_cfg_function(plain_upstream_hook(
            vae, rec, ref, box, cfg["iterations"], 0.1, precision=cfg.get("upstream_precision", "fp32"),
            checkpoint=cfg.get("upstream_checkpoint", False)))
    if cfg["model"] == "svd":
        cond, unc, latent = svd_conds(w, h, frames)
    else:
        cond = [[torch.randn(1, 16, 4096), {}]]
        unc = [[torch.randn(1, 16, 4096), {}]]
        latent = {"samples": torch.zeros(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8)}
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])  # weights in place before the clock starts
    if cfg["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss = RssPeak()  # CPU: the process's resident memory while sampling (building the models peaks higher)
    t = time.perf_counter()
    with torch.inference_mode(), rss:
        comfy_nodes.common_ksampler(model, 0, cfg["steps"], 2.5 if cfg["model"] == "svd" else 5.0, "euler",
                                    "karras" if cfg["model"] == "svd" else "simple", cond, unc, latent)
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = rss.peak / 2**30
    from likeness_pack.adapters.sampler_hook import decode_dtype

    prec = cfg.get("upstream_precision", "fp32") if cfg["mode"] == "upstream" else cfg["precision"]
    used = decode_dtype(prec, torch.device(cfg["device"]))
    return {"mode": cfg["mode"], "seconds": time.perf_counter() - t, "peak_gib": peak,
            "decode_dtype": str(used).replace("torch.", "")}


UNET_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "auto": "auto"}


def svd_conds(w, h, frames):
    """SVD_img2vid conditioning as the stock node makes it (CLIP image embedding, init-image latent,
    micro-conditioning; zeros for the negative) and an empty latent with frames on the batch axis."""
    extra = {"motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0}
    cond = [[torch.randn(1, 1, 1024), {**extra, "concat_latent_image": torch.randn(1, 4, h // 8, w // 8)}]]
    unc = [[torch.zeros(1, 1, 1024), {**extra, "concat_latent_image": torch.zeros(1, 4, h // 8, w // 8)}]]
    return cond, unc, {"samples": torch.zeros(frames, 4, h // 8, w // 8)}


def run_hook_only(cfg):
    """One HJB step on a random latent, without the denoiser: what the hook itself costs and how its peak memory
    above the loaded models changes with the frame count (SVD: one 4-frame chunk at a time)."""
    import comfy.sd
    from support import tiny_models
    from likeness_pack.adapters.sampler_hook import HJBFaceGuidance
    from likeness_pack.likeness_blocks.arcface import ArcFaceTorch, IResNet

    w, h, frames, fs = cfg["width"], cfg["height"], cfg["frames"], cfg["face"]
    if cfg["model"] == "svd":
        model = tiny_models.build_tiny_svd().model  # SVD's latent format only
        vae = comfy.sd.VAE(sd=tiny_models.svd_vae_state_dict())
        x0 = torch.randn(frames, 4, h // 8, w // 8)
    else:
        model = comfy.sd.load_diffusion_model_state_dict(tiny_models.tiny_wan_t2v_state_dict()).model
        vae = comfy.sd.VAE(sd=tiny_models.tiny_wan_vae_state_dict(dim=96))
        x0 = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8)
    box = [w // 2 - fs // 2, h // 2 - fs // 2, w // 2 + fs // 2, h // 2 + fs // 2]
    hook = HJBFaceGuidance(vae, ArcFaceTorch(IResNet()).eval(), F.normalize(torch.randn(512), dim=0),
                           torch.tensor([box]), iterations=cfg["iterations"], window_margin=cfg["margin"],
                           progress=False, precision=cfg["precision"])
    dev = torch.device(cfg["device"])
    x0 = x0.to(dev)
    hook._decoder(dev)  # the private decoder and recogniser copies, made before the clock starts
    sigmas = torch.linspace(10, 0, 26)
    args = {"denoised": x0, "model": model, "sigma": sigmas[:1],
            "model_options": {"transformer_options": {"sample_sigmas": sigmas}}}
    rss = RssPeak()
    with rss:
        loaded = rss.peak
        if cfg["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
            loaded = torch.cuda.memory_allocated()
        t = time.perf_counter()
        with torch.inference_mode():
            hook(args)
        if cfg["device"] == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cfg["device"] == "cuda" else rss.peak
    return {"mode": "hook", "seconds": seconds, "peak_gib": peak / 2**30, "above_loaded_gib": (peak - loaded) / 2**30}


class RssPeak:
    """Peak resident set size (bytes) between enter and exit, polled every 10 ms from /proc/self/statm."""

    def __enter__(self):
        import os
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _now(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="wan", choices=["wan", "svd"],
                    help="wan: Wan 1.3B blocks + the real Wan VAE; svd: SVD-xt's UNet and VAE at their real sizes")
    ap.add_argument("--face", type=int, default=112, help="face box side in output pixels")
    ap.add_argument("--modes", default="off,ours,upstream",
                    help="which runs (upstream decodes every frame in full: it needs the most memory); 'hook': "
                         "one HJB step alone, no denoiser (its time and its memory above the loaded models)")
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--margin", type=int, default=4)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="ours: the HJB decode's precision (auto: bf16 where the device has bf16 units)")
    ap.add_argument("--upstream-as-released", action="store_true",
                    help="the upstream run as released (fp32 decode, no decoder checkpointing) instead of like with like")
    ap.add_argument("--unet-dtype", default="fp32", choices=sorted(UNET_DTYPES),
                    help="SVD UNet dtype (auto: what ComfyUI picks on this device, fp16 on a GPU)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(json.loads(a.one))), flush=True)
        return
    base = {k: getattr(a, k) for k in ("device", "model", "face", "width", "height", "frames", "blocks", "steps",
                                       "iterations", "margin", "precision", "unet_dtype")}
    if a.upstream_as_released:
        base.update(upstream_precision="fp32", upstream_checkpoint=False)
    else:  # like with like: ours' decode precision, upstream's decoder checkpointing
        base.update(upstream_precision=a.precision, upstream_checkpoint=True)
    results = {}

    def run_in_own_process(mode):
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps({**base, "mode": mode})],
                             capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"{mode} run failed")
        return json.loads(line[0][7:])

    if a.modes == "hook":  # the hook alone: no 'off' run to compare with
        r = run_in_own_process("hook")
        print(f"settings: {base}\nhook alone, one step: {r['seconds']:.1f} s, peak {r['peak_gib']:.2f} GiB, "
              f"{r['above_loaded_gib']:.2f} GiB above the loaded models")
        return
    for mode in a.modes.split(","):
        results[mode] = run_in_own_process(mode)
        print(f"{mode:9s} {results[mode]['seconds']:8.1f} s   peak {results[mode]['peak_gib']:6.2f} GiB", flush=True)
    print(f"\nsettings: {base}")
    if "upstream" in results:
        print("upstream run: " + ("as released (fp32 decode, no decoder checkpointing)" if a.upstream_as_released else
                                  f"like ours (decode in {results['upstream'].get('decode_dtype')}, as ours "
                                  f"with --precision {a.precision} on this device; decoder resnet blocks checkpointed)"))
    off = results["off"]
    for mode in ("ours", "upstream"):
        if mode in results:
            r = results[mode]
            print(f"{mode:9s} HJB-on/HJB-off: time {r['seconds'] / off['seconds']:.2f}x, peak memory "
                  f"{r['peak_gib'] / off['peak_gib']:.2f}x")
    if "ours" in results and "upstream" in results:
        ours, up = results["ours"], results["upstream"]
        print(f"ours/upstream: time {ours['seconds'] / up['seconds']:.2f}, peak memory {ours['peak_gib'] / up['peak_gib']:.2f}")

if __name__ == "__main__":
    main()
