"""HJB face optimisation: time and peak memory of sampling with HJB off, with ours (latent window
around the face, frame subsets), and with a plain implementation of the upstream algorithm (full
decode of every frame at each iteration), on the same models, as ratios in one run.

Each configuration runs in its own process so peak memory is its own (CUDA: max allocated;
CPU: peak RSS). Models are random-weight but real-size where it matters for the cost:
the real Wan 2.1 VAE (dim 96) and iresnet100 (glintr100's architecture); the DiT has Wan 1.3B
block shapes with --blocks of its 30 blocks.

    .venv/bin/python bench/hjb.py                      # CPU: 240x416, 9 frames (minutes)
    .venv/bin/python bench/hjb.py --device cuda --width 832 --height 480 --frames 33 --blocks 30
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]


def plain_upstream_hook(vae, recognizer, reference, box, iterations, eta):
    """StableAnimator's step as the notes describe it, written plainly: every frame decoded in full,
    Adam on a detached fp32 x0, |1 - cos| on box crops resized to 112."""
    import copy

    with torch.inference_mode(False):
        dec = copy.deepcopy(vae.first_stage_model)
        rec = copy.deepcopy(recognizer)
    for p in list(dec.parameters()) + list(rec.parameters()):
        p.requires_grad_(False)

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
                video = vae.process_output(dec.decode(z * scale + shift))  # [B, 3, T, H, W]
                frames = video[0].permute(1, 0, 2, 3)
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
    model = comfy.sd.load_diffusion_model_state_dict(
        tiny_models.tiny_wan_t2v_state_dict(dim=1536, layers=cfg["blocks"], ffn_dim=8960))
    vae = comfy.sd.VAE(sd=tiny_models.tiny_wan_vae_state_dict(dim=96))
    rec = ArcFaceTorch(IResNet()).eval()
    ref = F.normalize(torch.randn(512), dim=0)
    w, h, frames = cfg["width"], cfg["height"], cfg["frames"]
    box = [w // 2 - 48, h // 2 - 56, w // 2 + 48, h // 2 + 56]  # a 96x112 face
    if cfg["mode"] == "ours":
        model = apply_hjb(model, HJBFaceGuidance(vae, rec, ref, torch.tensor([box]), iterations=cfg["iterations"],
                                                 eta=0.1, end_percent=1.0, window_margin=cfg["margin"], progress=False))
    elif cfg["mode"] == "upstream":
        model = model.clone()
        model.set_model_sampler_post_cfg_function(plain_upstream_hook(vae, rec, ref, box, cfg["iterations"], 0.1))
    cond = [[torch.randn(1, 16, 4096), {}]]
    unc = [[torch.randn(1, 16, 4096), {}]]
    latent = {"samples": torch.zeros(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8)}
    if cfg["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with torch.inference_mode():
        comfy_nodes.common_ksampler(model, 0, cfg["steps"], 5.0, "euler", "simple", cond, unc, latent)
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": cfg["mode"], "seconds": time.perf_counter() - t, "peak_gib": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--margin", type=int, default=4)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(json.loads(a.one))), flush=True)
        return
    base = {k: getattr(a, k) for k in ("device", "width", "height", "frames", "blocks", "steps", "iterations", "margin")}
    results = {}
    for mode in ("off", "ours", "upstream"):
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps({**base, "mode": mode})],
                             capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"{mode} run failed")
        results[mode] = json.loads(line[0][7:])
        print(f"{mode:9s} {results[mode]['seconds']:8.1f} s   peak {results[mode]['peak_gib']:6.2f} GiB", flush=True)
    off, ours, up = results["off"], results["ours"], results["upstream"]
    print(f"\nsettings: {base}")
    print(f"time   HJB-on/HJB-off: ours {ours['seconds'] / off['seconds']:.2f}x, upstream {up['seconds'] / off['seconds']:.2f}x; "
          f"ours/upstream {ours['seconds'] / up['seconds']:.2f}")
    print(f"memory HJB-on/HJB-off: ours {ours['peak_gib'] / off['peak_gib']:.2f}x, upstream {up['peak_gib'] / off['peak_gib']:.2f}x; "
          f"ours/upstream {ours['peak_gib'] / up['peak_gib']:.2f}")


if __name__ == "__main__":
    main()
