"""Likeness: identity-preserving video for ComfyUI.

Registered through the V3 API only: defining NODE_CLASS_MAPPINGS here as well would make
ComfyUI ignore comfy_entrypoint.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import LikenessExtension

    return LikenessExtension()
