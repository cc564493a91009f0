"""bench/gpu_suite.py --smoke: the GPU suite's own code paths (every part, the driver, the table, the JSON) run on the
CPU at tiny shapes, so the one prepared GPU run cannot fail on a bug that a CPU could have shown. Figures are not
checked (tiny shapes on a shared CPU), only that each is there, finite, and the one its part's raw data gives."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_suite  # noqa: E402

# rows that only a CUDA run fills: a CPU run must say so instead of giving a number
GPU_RUN_COMFYUI = "0.33.0"  # scripts/gpu_carry.sh's ARCHIVE_NAME
CUDA_ONLY = {"off: peak GPU memory (GiB)", "ours: peak GPU memory (GiB)", "upstream: peak GPU memory (GiB)"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    # the GPU run ships ComfyUI 0.33.0 (scripts/gpu_carry.sh); its smoke (39-125 s seen here) runs once per suite, there
    from support.paths import comfyui_version

    version = comfyui_version()
    if version != GPU_RUN_COMFYUI:
        pytest.skip(f"not in this ComfyUI version: the GPU suite runs on ComfyUI {GPU_RUN_COMFYUI} (scripts/gpu_carry.sh), "
                    f"this is {version}; its smoke runs in that version's pass of scripts/run_tests.sh")
    out = tmp_path_factory.mktemp("gpu_suite") / "suite.json"
    # a generous budget: the machine running the tests may be shared; the smoke's own time is in meta.wall_s
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--smoke", "--budget", "1200",
                          "--out", str(out)], capture_output=True, text=True, timeout=1500, cwd=str(REPO),
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(out.read_text()), run.stdout


def test_every_part_ran(smoke):
    data, _ = smoke
    assert set(data["parts"]) == set(gpu_suite.PARTS)
    bad = {k: v.get("reason") for k, v in data["parts"].items() if v["status"] != "ok"}
    assert not bad, bad
    assert data["meta"]["smoke"] is True and data["meta"]["gpu"] is None


def test_every_row_has_a_number_or_says_why(smoke):
    data, stdout = smoke
    rows = data["rows"]
    parts = {r["part"] for r in rows}
    assert parts == {"hjb", "fantasyid", "concat_id", "stableanimator", "face_recognition", "id_tokens", "import_time"}
    for r in rows:
        if r["measure"] in CUDA_ONLY:
            assert r["value"] is None and r["note"].startswith("CUDA only"), r
        else:
            assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), r
            assert r["value"] >= 0 or r["measure"].endswith("(%)"), r  # overheads may come out negative in noise
        assert r["measure"] in stdout  # the printed table holds every row
    assert len([r for r in rows if r["measure"] in CUDA_ONLY]) == 3


def test_rows_are_the_parts_own_figures(smoke):
    """The table's ratios are computed from the raw data of the same run (not copied, not swapped)."""
    data, _ = smoke
    p = data["parts"]
    row = {(r["part"], r["measure"]): r["value"] for r in data["rows"]}
    off, ours, up = (p[f"hjb_{m}"]["data"] for m in ("off", "ours", "upstream"))
    assert row[("hjb", "ours: sampling time per step HJB-on / HJB-off")] == round(ours["s_per_step"] / off["s_per_step"], 2)
    assert row[("hjb", "upstream: sampling time per step HJB-on / HJB-off")] == round(up["s_per_step"] / off["s_per_step"], 2)
    # like for like: the upstream loop ran at ours' decode precision with decoder checkpointing
    assert up["settings"]["upstream_precision"] == ours["settings"]["precision"]
    assert up["settings"]["upstream_checkpoint"] is True
    fid = p["fantasyid"]["data"]
    assert row[("fantasyid", "injection overhead per step (%)")] == fid["overhead_pct"]
    # the stored times are rounded to 1e-4 s, the overhead was computed before rounding: it must lie in the range the
    # rounded times allow (at smoke sizes, milliseconds, that range is a few points wide; swapped times fall outside)
    f, p0, h = fid["fantasyid_s"], fid["plain_s"], 5e-5
    lo, hi = 100 * ((f - h) / (p0 + h) - 1), 100 * ((f + h) / (p0 - h) - 1)
    assert lo - 0.05 <= fid["overhead_pct"] <= hi + 0.05, (fid, lo, hi)
    assert row[("concat_id", "time per step with / without the reference")] == p["concat_id"]["data"]["ratio"]
    fr = p["face_recognition"]["data"]
    assert row[("face_recognition", "batched vs per-frame speed-up")] == fr["speedup"]
    loop, batched = fr["per_frame_loop_s"], fr["batched_s"]  # rounded to 1e-4 s after the speed-up was computed
    assert fr["frames"] == 4
    assert (loop - h) / (batched + h) - 5e-4 <= fr["speedup"] <= (loop + h) / (batched - h) + 5e-4, fr


def test_fantasyid_flop_share_at_the_real_shapes():
    """The goal's FLOP share at CogVideoX-5B's real token count, counted by hand here: per block
    24 n d^2 + 4 n^2 d (n = 17550 + 226, d = 3072); the injection 4 N d i + 4 m kv i + 4 N m i (i = 2048, m = 115)."""
    import cogvideox_step
    import fantasyid_cogvideox_step as fid

    extra, thw, text_len = cogvideox_step.PRESETS["5b"]
    n_vid, d, i, m, kv = 13 * 30 * 45, 3072, 2048, 115, 2048
    assert n_vid == 17550
    n = n_vid + text_len
    want = (4 * n_vid * d * i + 4 * m * kv * i + 4 * n_vid * m * i) / (24 * n * d * d + 4 * n * n * d)
    got = fid.flop_share(dict(extra), thw, text_len, *fid.layer_attention_shapes(3072))
    assert got == pytest.approx(want, rel=1e-12)
    assert 0.05 < got < 0.07


def test_gpu_run_ships_the_comfyui_the_smoke_runs_on():
    carry = (REPO / "scripts" / "gpu_carry.sh").read_text()
    assert f"ARCHIVE_NAME=ComfyUI-{GPU_RUN_COMFYUI}.tar.xz" in carry


def test_a_part_over_its_cap_is_reported_skipped():
    """The driver's cap: a worker still importing ComfyUI at 1 s is killed and its part says why."""
    res = gpu_suite.run_group(["import_time"], True, 1)
    assert res["import_time"]["status"] == "skipped"
    assert res["import_time"]["reason"] == "time cap 1 s reached"
    rows = gpu_suite.build_rows(res, cuda=False)
    im = [r for r in rows if r["part"] == "import_time"][0]
    assert im["value"] is None and "time cap 1 s reached" in im["note"]
