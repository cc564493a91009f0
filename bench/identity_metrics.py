"""Bench: Identity Metrics' recognition over frames, batched vs a per-frame loop.

Builds an InsightFace-style pack at run time (the tiny SCRFD-interface square detector and an
arcface_torch iresnet recogniser with random weights, real layout: r18/r50/r100 or tiny), loads it
through the pack's own loader, and times the same frames with batch_size=N and batch_size=1.

    LIKENESS_COMFYUI=/path/to/ComfyUI python bench/identity_metrics.py --arch r50 --frames 32

Writes bench/results/identity_metrics.json (git-ignored) and prints the ratio.
"""

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def measure(arch="r50", frames=32, repeats=3, provider="auto"):
    """Seconds to embed `frames` faces batched and in a per-frame loop (best of repeats after a warm-up), through the
    pack's own InsightFace loader; ComfyUI and the pack already imported."""
    import onnx
    import torch

    from support import tiny_faces
    import folder_paths

    from likeness_pack.likeness_blocks.arcface import IRESNET_DEPTHS

    tmp = Path(tempfile.mkdtemp(prefix="likeness_bench_"))
    pack_dir = tmp / "insightface" / "models" / "bench"
    pack_dir.mkdir(parents=True)
    onnx.save(tiny_faces.build_square_detector(), str(pack_dir / "det.onnx"))
    if arch == "tiny":
        sd = tiny_faces.iresnet_state_dict()
    else:
        sd = tiny_faces.iresnet_state_dict(layers=IRESNET_DEPTHS[arch], widths=(64, 128, 256, 512))
    model = tiny_faces.build_iresnet_onnx(sd)
    onnx.save(model, str(pack_dir / "rec.onnx"), save_as_external_data=model.ByteSize() > 1.8e9)
    folder_paths.folder_names_and_paths["insightface"] = ([str(tmp / "insightface")], set())

    L = importlib.import_module("likeness_pack.loaders.insightface")
    FE = importlib.import_module("likeness_pack.likeness_blocks.face_embed")
    pack, status = L.load_pack("bench", provider)

    # frames: a 32 px "face" moving over a 320x320 frame
    images = []
    for t in range(frames):
        x = 32 * (t % 8)
        images.append(torch.from_numpy(tiny_faces.squares_image((320, 320), [(x, 96 + 32 * ((t // 8) % 4), 32)])).float() / 255)
    rgb = torch.stack(images)
    dets = FE.largest_face_per_frame(pack, rgb, 320, 0.5)
    assert all(d is not None for d in dets)

    def timed(bs):
        FE.frame_embeddings(pack, rgb[:2], dets[:2], batch_size=bs)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ids, emb = FE.frame_embeddings(pack, rgb, dets, batch_size=bs)
            best = min(best, time.perf_counter() - t0)
        return best, emb

    t_batched, e1 = timed(frames)
    t_loop, e2 = timed(1)
    assert torch.allclose(e1, e2, atol=1e-3 * float(e1.abs().max())), "batched and per-frame embeddings differ"
    provider = pack.providers["recognition"]
    del pack
    shutil.rmtree(tmp, ignore_errors=True)  # an r100 ONNX file is 250 MB
    return {
        "arch": arch,
        "frames": frames,
        "provider": provider,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "batched_s": round(t_batched, 4),
        "per_frame_loop_s": round(t_loop, 4),
        "speedup": round(t_loop / t_batched, 3),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="r50", choices=["tiny", "r18", "r50", "r100"])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--provider", default="auto")
    args = ap.parse_args()
    from support.comfy_env import import_pack

    import_pack()
    result = measure(args.arch, args.frames, args.repeats, args.provider)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "identity_metrics.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
