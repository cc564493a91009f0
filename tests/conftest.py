import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from support.ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401  (CI: no skips)
from support.server import ComfyServer  # noqa: E402


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI 0.3.75 imported in-process on the CPU; returns its `nodes` module."""
    from support.comfy_env import import_comfy

    return import_comfy()


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack imported in-process as the package `likeness_pack`."""
    from support.comfy_env import import_pack

    return import_pack()


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory, comfy):
    """The shared tiny base models, written once per session into a models folder."""
    from support import tiny_models

    models = tmp_path_factory.mktemp("comfy_base") / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "vae").mkdir()
    tiny_models.save_tiny_wan_t2v(models / "diffusion_models" / "tiny_wan_t2v.safetensors")
    tiny_models.save_tiny_wan_vae(models / "vae" / "tiny_wan_vae.safetensors")
    return models


@pytest.fixture(scope="session")
def server(tiny_model_files):
    """One real ComfyUI server for the session, with the pack and the test-only nodes."""
    srv = ComfyServer(tiny_model_files.parent)
    srv.start()
    yield srv
    srv.stop()
