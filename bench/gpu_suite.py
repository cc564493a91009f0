"""Every real-shape goal in one short run on a CUDA machine: random weights, real architectures, no downloads; each
measurement a ratio within this one run. Prints one table and writes it as JSON.

    python bench/gpu_suite.py                      # CUDA: the real shapes, <= 8 minutes on an H100/H200-class card
    python bench/gpu_suite.py --smoke              # CPU: tiny shapes, proves the script works (not its figures)
    scripts/gpu_carry.sh                           # prepares what the bare GPU machine lacks; prints the command

Parts (each with a time cap; a part over its cap, or out of GPU memory, is reported with the reason):
  hjb_off / hjb_ours / hjb_upstream   SVD-xt (UNet 1.5 B, temporal VAE, iresnet100), 16 frames 576x1024, a 256 px face,
        3 Adam iterations per step, every step refined; the UNet in the dtype ComfyUI picks on the device (fp16 on
        a GPU), the HJB decode in 'auto' precision (bf16); upstream: the plain loop of bench/hjb.py at the same
        decode precision with upstream's decoder gradient checkpointing. Sampling time per step and peak GPU memory,
        each mode in its own process. Goals: ours on/off <= 1.5x, peak <= 16 GB.
  fantasyid       CogVideoX-5B (42 blocks, width 3072), 13 latent frames x 60x90 -> 17550 video + 226 text tokens,
                  one apply_model call (batch 2, CFG) with vs without the layer-aware injection. Goal: overhead <=
                  its FLOP share + 2 points (bench/fantasyid_cogvideox_step.flop_share).
  concat_id       Wan 1.3B (30 blocks), 81x480x832: one model call with vs without the Concat-ID reference.
  stableanimator  SVD-xt, 16 frames 576x1024: a sampling step with vs without the StableAnimator ID adapter.
  face_recognition  iresnet100 ONNX through the pack's InsightFace loader, 81 frames batched vs per frame (goal >= 3x).
  id_tokens       EVA02-CLIP-L-336 -> C-Abstractor -> vertex network -> 115 x 2048 ID tokens, once per generation.
  import_time     the pack's import time (ComfyUI's table and in-process load_custom_node; goal <= 0.3 s).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
for p in (str(BENCH), str(REPO / "tests"), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

# name: (cap in seconds on the GPU, cap in the smoke run). The GPU caps add up to 8 minutes; the order puts the
# headline (HJB) first.
PARTS = {
    "hjb_off": (45, 60), "hjb_ours": (60, 60), "hjb_upstream": (75, 60), "fantasyid": (75, 60), "concat_id": (50, 60),
    "stableanimator": (50, 60), "face_recognition": (45, 60), "id_tokens": (40, 60), "import_time": (40, 60),
}
HJB_MODES = ("off", "ours", "upstream")
SUITE_BUDGET_S = 480


# ----------------------------------------------------------------------------------------------- the parts
def _hjb_cfg(mode, smoke):
    if smoke:
        return dict(device="cpu", model="svd", unet="tiny", recognizer="tiny", width=32, height=32, frames=2, face=16,
                    blocks=1, steps=1, iterations=1, margin=2, precision="fp32", unet_dtype="fp32", mode=mode,
                    upstream_precision="fp32", upstream_checkpoint=True)
    return dict(device="cuda", model="svd", unet="xt", width=1024, height=576, frames=16, face=256, blocks=1,
                steps=2 if mode == "upstream" else 4, iterations=3, margin=4, precision="auto", unet_dtype="auto",
                mode=mode, fill_on_device=True, upstream_precision="auto", upstream_checkpoint=True)


def part_hjb(mode, smoke):
    import hjb
    import torch

    cfg = _hjb_cfg(mode, smoke)
    try:
        r = hjb.run_one(cfg)
    except torch.cuda.OutOfMemoryError as e:
        return {"oom": True, "error": str(e).splitlines()[0], "steps": cfg["steps"],
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"steps": cfg["steps"], "seconds": round(r["seconds"], 3), "s_per_step": round(r["seconds"] / cfg["steps"], 3),
            "peak_gib": round(r["peak_gib"], 3), "peak_kind": "cuda max allocated" if cfg["device"] == "cuda"
            else "process resident memory (CPU)",
            "settings": {k: cfg[k] for k in ("width", "height", "frames", "face", "iterations", "precision",
                                             "unet_dtype", "upstream_precision", "upstream_checkpoint")}}


def part_fantasyid(smoke):
    import torch
    import cogvideox_step
    import fantasyid_cogvideox_step as fid

    extra, thw, text_len = cogvideox_step.PRESETS["tiny" if smoke else "5b"]
    cfg = dict(in_channels=16, out_channels=16, use_rotary_positional_embeddings=True, **extra)
    dtype = torch.float32 if smoke else torch.bfloat16
    return fid.measure(cfg, thw, text_len, dtype, iters=2, fill_device=None if smoke else "cuda")


def part_concat_id(smoke):
    import torch
    import concat_id_overhead

    if smoke:
        return concat_id_overhead.measure(1, 5, 64, 96, repeats=1)
    return concat_id_overhead.measure(30, 81, 480, 832, repeats=3, dtype=torch.bfloat16, fill_device="cuda")


def part_stableanimator(smoke):
    import importlib

    import torch
    import comfy.model_management as mm
    import nodes as comfy_nodes
    import cogvideox_step
    import hjb
    from support import tiny_models

    A = importlib.import_module("likeness_pack.adapters.svd")
    if smoke:
        w, h, frames, steps = 64, 64, 2, 1
        svd = tiny_models.build_tiny_svd()
    else:
        w, h, frames, steps = 1024, 576, 16, 2
        svd = tiny_models.build_tiny_svd(unet_config=tiny_models.SVD_XT_UNET, num_head_channels=64, dtype="auto",
                                         fill_device="cuda")
    g = torch.Generator().manual_seed(1)
    dm = svd.model.diffusion_model
    weights = {}
    for path in A.spatial_block_keys(dm):  # id_to_k / id_to_v: (inner, 1024) per spatial cross-attention
        k = dm.get_submodule(path).attn2.to_k.weight
        weights[path] = (0.02 * torch.randn(k.shape, generator=g), 0.02 * torch.randn(k.shape, generator=g))
    patched, _ = A.apply_id_adapter(svd, weights, torch.randn(1, 4, 1024, generator=g), strength=1.0)
    cond, unc, latent = hjb.svd_conds(w, h, frames)
    mm.load_models_gpu([svd])
    cuda = mm.get_torch_device().type == "cuda"

    def sample(m):
        return lambda: comfy_nodes.common_ksampler(m, 0, steps, 2.5, "euler", "karras", cond, unc, latent)

    with torch.inference_mode():
        t_plain, t_id = cogvideox_step.timed_pair(sample(svd), sample(patched), 1 if smoke else 3,
                                                  torch.cuda.synchronize if cuda else (lambda: None))
    return {"device": str(mm.get_torch_device()), "unet_dtype": str(svd.model.get_dtype()), "frames": frames,
            "size": [h, w], "cfg_batch": 2 * frames, "spatial_cross_attentions": len(weights), "steps_per_sample": steps,
            "plain_s_per_step": round(t_plain / steps, 4), "id_adapter_s_per_step": round(t_id / steps, 4),
            "overhead_pct": round(100 * (t_id / t_plain - 1), 1)}


def part_face_recognition(smoke):
    import identity_metrics

    return identity_metrics.measure("tiny" if smoke else "r100", 4 if smoke else 81, repeats=1 if smoke else 2)


def part_id_tokens(smoke):
    import fantasyid_id_tokens

    return fantasyid_id_tokens.measure(tiny=smoke, repeats=2 if smoke else 6)


def part_import_time(smoke):
    import import_time

    out = {}
    try:
        secs, failed = import_time.printed_by_comfyui()
        out.update(comfyui_table_s=secs, comfyui_import_failed=failed)
    except Exception as e:  # the bare GPU machine may lack the server's own packages: the in-process figure stays
        out["comfyui_table_skipped"] = f"{type(e).__name__}: {e}"[:300]
    dt, ok = import_time.in_process()
    out.update(in_process_s=round(dt, 4), loaded=bool(ok))
    return out


def run_job(name, smoke):
    if name.startswith("hjb_"):
        return part_hjb(name[4:], smoke)
    return globals()["part_" + name](smoke)


def worker(names, smoke):
    """Runs jobs in this process, one RESULT line each as it ends (a process killed at its cap keeps the rest)."""
    from support.comfy_env import import_comfy, import_pack

    import torch

    t0 = time.perf_counter()
    import_comfy(cpu=smoke or not torch.cuda.is_available())
    import_pack()
    print(f"ComfyUI and the pack imported in {time.perf_counter() - t0:.1f} s", flush=True)
    for name in names:
        t = time.perf_counter()
        try:
            res = {"job": name, "status": "ok", "data": run_job(name, smoke)}
            if res["data"].get("oom"):
                res["status"] = "failed"
                res["reason"] = "out of GPU memory: " + res["data"]["error"]
        except Exception as e:
            traceback.print_exc()
            res = {"job": name, "status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}
        res["wall_s"] = round(time.perf_counter() - t, 2)
        print("RESULT " + json.dumps(res), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- the driver
def run_group(names, smoke, timeout):
    """Runs jobs in one child process under a wall-clock cap; jobs it did not finish come back skipped."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(names)] + (["--smoke"] if smoke else [])
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, err, timed_out = proc.stdout, proc.stderr, False
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        timed_out = True
    results = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            results[r.pop("job")] = r
    wall = time.perf_counter() - t
    for n in names:
        if n not in results:
            why = (f"time cap {timeout:.0f} s reached" if timed_out else
                   f"worker ended without a result (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
            results[n] = {"status": "skipped", "reason": why, "wall_s": round(wall, 1)}
        if results[n]["status"] != "ok":
            sys.stderr.write(f"--- {n}: {results[n]['reason']}\n{err[-3000:]}\n")
    return results


def _num(x, nd=2):
    return None if x is None else round(float(x), nd)


def build_rows(res, cuda):
    """(part, measure, value, goal, met, note) rows; value None with the reason as note where not measured."""
    rows = []

    def row(part, measure, value, goal="", met=None, note=""):
        rows.append({"part": part, "measure": measure, "value": value, "goal": goal, "met": met, "note": note})

    def missing(part, jobs, measure):
        reasons = [f"{j}: {res[j].get('reason')}" if j in res else f"{j}: not run"
                   for j in jobs if res.get(j, {}).get("status") != "ok"]
        row(part, measure, None, note="; ".join(reasons) or "not run")

    hj = {m: res.get("hjb_" + m, {}) for m in HJB_MODES}
    ok = {m: hj[m].get("status") == "ok" for m in HJB_MODES}
    for m in ("ours", "upstream"):
        if ok["off"] and ok[m]:
            r = hj[m]["data"]["s_per_step"] / hj["off"]["data"]["s_per_step"]
            row("hjb", f"{m}: sampling time per step HJB-on / HJB-off", _num(r), "<= 1.5x" if m == "ours" else "",
                r <= 1.5 if m == "ours" else None,
                f"{hj[m]['data']['s_per_step']} vs {hj['off']['data']['s_per_step']} s/step")
        else:
            missing("hjb", ["hjb_off", "hjb_" + m], f"{m}: sampling time per step HJB-on / HJB-off")
    for m in HJB_MODES:
        measure = f"{m}: peak GPU memory (GiB)"
        if not cuda:
            note = "CUDA only: a CPU run has no GPU memory"
            if ok[m]:
                note += f" (resident memory {hj[m]['data']['peak_gib']:.2f} GiB here)"
            row("hjb", measure, None, "<= 16 GB" if m == "ours" else "", None, note)
        elif ok[m]:
            gib = hj[m]["data"]["peak_gib"]
            row("hjb", measure, _num(gib), "<= 16 GB" if m == "ours" else "",
                gib * 2**30 <= 16e9 if m == "ours" else None)
        elif hj[m].get("data", {}).get("oom"):
            row("hjb", measure, None, note=f"out of memory at {hj[m]['data']['peak_gib']:.1f} GiB allocated")
        else:
            missing("hjb", ["hjb_" + m], measure)

    f = res.get("fantasyid", {})
    if f.get("status") == "ok":
        d = f["data"]
        row("fantasyid", "injection overhead per step (%)", d["overhead_pct"], f"<= {d['goal_pct']} % (FLOP share "
            f"{d['flop_share_pct']} % + 2)", d["overhead_pct"] <= d["goal_pct"],
            f"{d['blocks']} blocks, {d['video_tokens']} video + {d['text_tokens']} text tokens, {d['dtype']}, "
            f"{d['plain_s']} vs {d['fantasyid_s']} s")
    else:
        missing("fantasyid", ["fantasyid"], "injection overhead per step (%)")

    c = res.get("concat_id", {})
    if c.get("status") == "ok":
        d = c["data"]
        row("concat_id", "time per step with / without the reference", d["ratio"], "", None,
            f"{d['blocks']} blocks, {d['frames']}x{d['height']}x{d['width']}, {d['video_tokens']} + "
            f"{d['reference_tokens']} tokens, {d['dtype']}, {d['plain_s']} vs {d['with_reference_s']} s")
    else:
        missing("concat_id", ["concat_id"], "time per step with / without the reference")

    s = res.get("stableanimator", {})
    if s.get("status") == "ok":
        d = s["data"]
        row("stableanimator", "ID adapter overhead per step (%)", d["overhead_pct"], "", None,
            f"{d['frames']} frames {d['size'][0]}x{d['size'][1]}, {d['unet_dtype']}, {d['plain_s_per_step']} vs "
            f"{d['id_adapter_s_per_step']} s/step")
    else:
        missing("stableanimator", ["stableanimator"], "ID adapter overhead per step (%)")

    fr = res.get("face_recognition", {})
    if fr.get("status") == "ok":
        d = fr["data"]
        row("face_recognition", "batched vs per-frame speed-up", d["speedup"], ">= 3x", d["speedup"] >= 3,
            f"{d['arch']}, {d['frames']} frames on {d['provider']}: {d['batched_s']} vs {d['per_frame_loop_s']} s")
    else:
        missing("face_recognition", ["face_recognition"], "batched vs per-frame speed-up")

    it = res.get("id_tokens", {})
    if it.get("status") == "ok":
        d = it["data"]
        row("id_tokens", "ID-token encoding (ms, once per generation)", _num(1000 * d["id_tokens_s"], 1), "", None,
            f"EVA02 {1000 * d['eva_s']:.1f} ms of it; {d['device']} {d['dtype']}" + (" (tiny shapes)" if d["tiny"] else ""))
    else:
        missing("id_tokens", ["id_tokens"], "ID-token encoding (ms, once per generation)")

    im = res.get("import_time", {})
    if im.get("status") == "ok":
        d = im["data"]
        row("import_time", "pack import, in-process load_custom_node (ms)", _num(1000 * d["in_process_s"], 1),
            "<= 300 ms", d["in_process_s"] <= 0.3,
            f"ComfyUI's table: {d['comfyui_table_s']} s" if "comfyui_table_s" in d else
            f"ComfyUI's table not read: {d.get('comfyui_table_skipped')}")
    else:
        missing("import_time", ["import_time"], "pack import, in-process load_custom_node (ms)")
    return rows


def print_table(rows, meta):
    print(f"\n{meta['gpu'] or 'no GPU'} | torch {meta['torch']} | ComfyUI {meta['comfyui']} | "
          f"{'SMOKE (tiny shapes, CPU: not figures)' if meta['smoke'] else 'real shapes'} | {meta['wall_s']:.0f} s")
    w = max(len(r["part"]) for r in rows)
    m = max(len(r["measure"]) for r in rows)
    for r in rows:
        val = "-" if r["value"] is None else str(r["value"])
        met = "" if r["met"] is None else ("met" if r["met"] else "NOT MET")
        print(f"{r['part']:<{w}}  {r['measure']:<{m}}  {val:>8}  {r['goal']:<14} {met:<7}  {r['note']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, all parts in one process")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    ap.add_argument("--out", default=str(BENCH / "results" / "gpu_suite.json"))
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole suite (default {SUITE_BUDGET_S} on a GPU, 170 with --smoke)")
    ap.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS",
                    help="another time cap for one part (a rerun of a part that reached its cap)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker.split(","), a.smoke)
        return
    import torch

    names = [n.strip() for n in a.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    for c in a.cap:
        name, _, secs = c.partition("=")
        if name not in PARTS or not secs.replace(".", "", 1).isdigit():
            raise SystemExit(f"--cap takes PART=SECONDS with PART one of {', '.join(PARTS)}; got {c!r}")
        PARTS[name] = (float(secs), float(secs))
    cuda = torch.cuda.is_available() and not a.smoke
    if not a.smoke and not cuda:
        raise SystemExit("The full suite needs a CUDA GPU (real shapes); on a CPU run it with --smoke.")
    t0 = time.perf_counter()
    budget = a.budget or (170.0 if a.smoke else float(SUITE_BUDGET_S))
    results = {}
    if a.smoke:  # one process: ComfyUI is imported once; the caps add up to the group's
        results.update(run_group(names, True, min(budget, sum(PARTS[n][1] for n in names))))
    else:  # each part in its own process: its own peak memory, its own cap
        for n in names:
            left = budget - (time.perf_counter() - t0)
            if left < 15:
                results[n] = {"status": "skipped", "reason": f"suite budget of {budget:.0f} s spent"}
                continue
            results.update(run_group([n], False, min(PARTS[n][0], left)))
            r = results[n]
            print(f"{n}: {r['status']} in {r.get('wall_s', 0)} s" + (f" ({r['reason']})" if r["status"] != "ok" else ""),
                  flush=True)
    comfy_version = None
    try:
        from support.paths import comfyui_version

        comfy_version = comfyui_version()
    except Exception:
        pass
    meta = {"smoke": a.smoke, "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "comfyui": comfy_version, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "wall_s": round(time.perf_counter() - t0, 1), "budget_s": budget,
            "caps_s": {n: PARTS[n][1 if a.smoke else 0] for n in names},
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = build_rows(results, cuda)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "parts": results}, indent=1))
    print_table(rows, meta)
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
