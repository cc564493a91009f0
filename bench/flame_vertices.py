"""Per-image DECA -> FLAME vertex extraction time on CPU, after warm-up, at real sizes.

Random weights in the real structures (ResNet-50 E_flame with 236 outputs, FLAME with 5023 vertices,
400 shape+expression components, 5 joints), written to a temporary folder in the user's formats
(deca_model.tar, generic_model.pkl) and loaded through the pack's own loaders. Times the whole node
path per image: crop to 224 -> E_flame -> FLAME LBS.

    python bench/flame_vertices.py [--runs 20] [--threads N] [--crop fantasyid|box]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from _flame_synth import save_synthetic_deca_tar, save_synthetic_flame_pkl  # noqa: E402
from likeness_blocks.deca import DecaFlame, crop_square, deca_box_square, load_deca_encoder, resize_whole  # noqa: E402
from likeness_blocks.flame import FlameLayer  # noqa: E402
from likeness_blocks.flame_file import read_flame_file  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--crop", choices=["fantasyid", "box"], default="fantasyid")
    ap.add_argument("--image", type=int, default=512, help="input image side in pixels")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_synthetic_flame_pkl(os.path.join(tmp, "generic_model.pkl"))
        save_synthetic_deca_tar(os.path.join(tmp, "deca_model.tar"))
        t1 = time.perf_counter()
        model = DecaFlame(load_deca_encoder(os.path.join(tmp, "deca_model.tar")),
                          FlameLayer(read_flame_file(os.path.join(tmp, "generic_model.pkl"))))
        t2 = time.perf_counter()
    n_params = sum(p.numel() for p in model.encoder.parameters())
    image = torch.rand(1, 3, args.image, args.image)

    def one():
        if args.crop == "fantasyid":
            x = resize_whole(image)
        else:
            s = args.image
            x = crop_square(image[0], *deca_box_square((0.3 * s, 0.25 * s, 0.7 * s, 0.75 * s)))[None]
        codes = model.encode(x)
        return model.vertices(codes)

    for _ in range(args.warmup):
        v = one()
    times, cpu = [], []
    for _ in range(args.runs):
        t, c = time.perf_counter(), time.process_time()
        v = one()
        times.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    res = {
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "crop": args.crop,
        "encoder_params": n_params, "vertices": list(v.shape), "runs": args.runs,
        "median_ms": round(statistics.median(times), 1), "mean_ms": round(statistics.mean(times), 1),
        "min_ms": round(min(times), 1), "max_ms": round(max(times), 1),
        # CPU seconds this process used per image (all threads): on a busy shared machine, cpu_ms / threads
        # is a lower bound of the uncontended wall time, wall time an upper bound
        "cpu_ms_median": round(statistics.median(cpu), 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "write_files_s": round(t1 - t0, 2), "load_s": round(t2 - t1, 2), "goal_ms": 200,
    }
    print(json.dumps(res, indent=1))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "flame_vertices.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
