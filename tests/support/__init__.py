"""Test support: the pinned ComfyUI, a real server harness and tiny real-architecture models."""
