"""Pure-torch building blocks of FantasyID, StableAnimator and Concat-ID.

Imports without ComfyUI: nothing in this package may import comfy, folder_paths or nodes.
"""
