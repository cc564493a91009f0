import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_NODES = REPO / "tests" / "test_nodes"


def comfyui_dir() -> Path:
    """The pinned test ComfyUI made by scripts/setup_comfyui.sh (or LIKENESS_COMFYUI)."""
    d = Path(os.environ.get("LIKENESS_COMFYUI", REPO / ".comfyui" / "ComfyUI"))
    if not (d / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI at {d}: run `make setup` (scripts/setup_comfyui.sh) first")
    return d


def comfyui_version() -> str:
    """The version of the ComfyUI under test, from its comfyui_version.py (read, not imported)."""
    ns = {}
    exec((comfyui_dir() / "comfyui_version.py").read_text(), ns)
    return ns["__version__"]
