"""HJB decode precision: how much faster the decode-and-backward runs in reduced precision, and how far it
moves the optimisation, at SVD's real sizes (the temporal VAE and iresnet100, random weights).

One HJB step (Adam, --iterations) on the same latent with precision fp32 and with the reduced one, the same
hook the node builds (the latent window around the face, channels-last decoder, checkpointed resnet blocks).
Reported: seconds per step, the per-iteration identity losses, the cosine between the two gradients of the
loss with respect to the latent, and how the refined latents compare.

    .venv/bin/python bench/hjb_precision.py                       # CPU: 576x1024, 4 frames, 256 px face
    .venv/bin/python bench/hjb_precision.py --device cuda --frames 16
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=576)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--face", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--margin", type=int, default=4)
    ap.add_argument("--reduced", default="bf16", choices=["bf16", "fp16"])
    a = ap.parse_args()

    from support.comfy_env import import_comfy, import_pack
    from support import tiny_models

    import_comfy(cpu=a.device == "cpu")
    import_pack()
    import comfy.sd
    from likeness_pack.adapters.sampler_hook import HJBFaceGuidance
    from likeness_pack.likeness_blocks import hjb
    from likeness_pack.likeness_blocks.arcface import ArcFaceTorch, IResNet

    dev = torch.device(a.device)
    torch.manual_seed(0)
    svd = tiny_models.build_tiny_svd()  # only for SVD's latent format
    vae = comfy.sd.VAE(sd=tiny_models.svd_vae_state_dict())
    rec = ArcFaceTorch(IResNet()).eval()
    ref = F.normalize(torch.randn(512), dim=0)
    w, h, fs = a.width, a.height, a.face
    box = torch.tensor([[w // 2 - fs // 2, h // 2 - fs // 2, w // 2 + fs // 2, h // 2 + fs // 2]])
    x0 = torch.randn(a.frames, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(1)).to(dev)
    sigmas = torch.linspace(10, 0, 26)
    runs = {}
    for precision in ("fp32", a.reduced):
        hook = HJBFaceGuidance(vae, rec, ref, face_boxes=box, iterations=a.iterations, window_margin=a.margin,
                               progress=False, precision=precision)
        dec, r = hook._decoder(dev)
        # the gradient of the first iteration, through the hook's own decode path
        y0, y1, xa, xb = hjb.latent_window(box, 8, a.margin, h // 8, w // 8)
        shifted = box.clone()
        shifted[:, [0, 2]] -= xa * 8
        shifted[:, [1, 3]] -= y0 * 8
        z = x0.clone().requires_grad_(True)
        frames, _ = hook._frames(dec, z[..., y0:y1, xa:xb] / 0.18215)
        hjb.identity_loss(r(hjb.crop_faces(frames, shifted.expand(len(frames), -1))), ref.to(dev)).backward()
        args = {"denoised": x0, "model": svd.model, "sigma": torch.tensor([float(sigmas[0])]),
                "model_options": {"transformer_options": {"sample_sigmas": sigmas}}}
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = hook(args)
        if a.device == "cuda":
            torch.cuda.synchronize()
        runs[precision] = {"seconds": time.perf_counter() - t, "losses": hook.last_losses[-1][1],
                           "grad": z.grad.detach().flatten(), "update": (out - x0).flatten()}
        print(f"{precision:5s} {runs[precision]['seconds']:7.1f} s per HJB step   losses "
              + " ".join(f"{v:.6f}" for v in runs[precision]["losses"]), flush=True)
    full, red = runs["fp32"], runs[a.reduced]
    moved = full["update"] != 0
    report = {
        "settings": vars(a),
        "speedup": full["seconds"] / red["seconds"],
        "max_loss_difference": max(abs(p - q) for p, q in zip(full["losses"], red["losses"])),
        "loss_drop": {"fp32": full["losses"][0] - full["losses"][-1], a.reduced: red["losses"][0] - red["losses"][-1]},
        "gradient_cosine": float(F.cosine_similarity(full["grad"], red["grad"], dim=0)),
        "update_cosine": float(F.cosine_similarity(full["update"], red["update"], dim=0)),
        "update_sign_agreement": float((full["update"].sign() == red["update"].sign())[moved].float().mean()),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
