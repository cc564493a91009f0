"""Thin V3 node classes. Every module here that exports NODES (a list of io.ComfyNode
subclasses) is registered; modules starting with '_' are helpers."""

import functools
import importlib
import inspect
import pkgutil

from ..comfy_compat import ComfyExtension
from ..likeness_blocks.finite import check_finite_inputs
from ..loaders.model_folders import register_model_folders

# once, before any node schema lists the pack's model folders
register_model_folders()


def _refuse_non_finite(node_cls):
    """Wraps the node's execute so that every float input (widget or linked FLOAT) is checked finite before the
    node runs: the one place that covers every node, present and future."""
    if node_cls.__dict__.get("_likeness_finite_checked", False):
        return node_cls
    raw = inspect.getattr_static(node_cls, "execute")
    func = raw.__func__ if isinstance(raw, classmethod) else raw
    where = None

    def node_name(cls):
        nonlocal where
        if where is None:
            try:
                where = cls.GET_SCHEMA().display_name or cls.__name__
            except Exception:  # noqa: BLE001 - the name only labels the message
                where = cls.__name__
        return where

    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def execute(cls, *args, **kwargs):
            check_finite_inputs(kwargs, node_name(cls))
            return await func(cls, *args, **kwargs)
    else:
        @functools.wraps(func)
        def execute(cls, *args, **kwargs):
            check_finite_inputs(kwargs, node_name(cls))
            return func(cls, *args, **kwargs)

    node_cls.execute = classmethod(execute)
    node_cls._likeness_finite_checked = True
    return node_cls


def all_nodes():
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f".{info.name}", __name__)
        found.extend(_refuse_non_finite(n) for n in getattr(module, "NODES", ()))
    return found


class LikenessExtension(ComfyExtension):
    async def get_node_list(self):
        return all_nodes()
