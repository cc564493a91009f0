"""The pack's import time as ComfyUI prints it ("Import times for custom nodes", 0.1 s
resolution), plus a finer in-process measurement of nodes.load_custom_node. Goal: <= 0.3 s.

    .venv/bin/python bench/import_time.py
"""

import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support.paths import comfyui_dir  # noqa: E402


def printed_by_comfyui():
    with tempfile.TemporaryDirectory() as base:
        (Path(base) / "custom_nodes").mkdir()
        (Path(base) / "custom_nodes" / "likeness").symlink_to(REPO, target_is_directory=True)
        run = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", base,
                              "--database-url", "sqlite:///:memory:"], cwd=comfyui_dir(), capture_output=True, text=True)
    for line in (run.stdout + run.stderr).splitlines():
        m = re.match(r"\s*([\d.]+) seconds( \(IMPORT FAILED\))?: .*likeness$", line)
        if m:
            return float(m.group(1)), bool(m.group(2))
    raise RuntimeError("ComfyUI printed no import time for the pack")


def in_process(repeats=1):
    from support.comfy_env import import_comfy

    nodes = import_comfy()
    t = time.perf_counter()
    ok = asyncio.run(nodes.load_custom_node(str(REPO)))
    return time.perf_counter() - t, ok


if __name__ == "__main__":
    secs, failed = printed_by_comfyui()
    print(f"ComfyUI's import-time table: {secs:.1f} s{' (IMPORT FAILED)' if failed else ''}")
    dt, ok = in_process()
    print(f"in-process load_custom_node (import + entrypoint + node schemas): {dt * 1000:.0f} ms, loaded={ok}")
    print("goal: <= 300 ms")
