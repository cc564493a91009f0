"""ComfyUI 0.3.75 imported in-process on the CPU, and the pack imported as `likeness_pack`."""

import asyncio
import importlib.util
import sys

from .paths import REPO, comfyui_dir

PACK_NAME = "likeness_pack"
_state = {}


def import_comfy(cpu=True):
    if "comfy" in _state:
        return _state["comfy"]
    root = str(comfyui_dir())
    if root not in sys.path:
        sys.path.insert(0, root)
    # args are not parsed when ComfyUI is a library: ask for the CPU before model_management loads
    from comfy.cli_args import args

    args.cpu = cpu
    import comfy.model_management  # noqa: F401
    import utils.extra_config  # noqa: F401  (ComfyUI's utils package, as main.py imports it first;
    # nodes.py puts comfy/ on sys.path, where comfy/utils.py would shadow it)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _state["comfy"] = nodes
    return nodes


def import_pack():
    """The repo imported as a package (relative imports work as under ComfyUI's loader)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    import_comfy()
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    importlib.import_module(f"{PACK_NAME}.loaders.model_folders").register_model_folders()
    return module
