"""Thin V3 node classes. Every module here that exports NODES (a list of io.ComfyNode
subclasses) is registered; modules starting with '_' are helpers."""

import importlib
import pkgutil

from ..comfy_compat import ComfyExtension
from ..loaders.model_folders import register_model_folders

# once, before any node schema lists the pack's model folders
register_model_folders()


def all_nodes():
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f".{info.name}", __name__)
        found.extend(getattr(module, "NODES", ()))
    return found


class LikenessExtension(ComfyExtension):
    async def get_node_list(self):
        return all_nodes()
