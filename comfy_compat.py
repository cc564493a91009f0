"""The one place the pack touches ComfyUI's node API, so a newer or older ComfyUI fails here
with a clear message instead of deep inside a node."""

try:
    from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401
except ImportError as exc:  # ComfyUI before the V3 node API (0.3.4x and older)
    raise ImportError(
        "Likeness needs ComfyUI 0.3.75 or newer (the V3 node API, comfy_api.latest). "
        "Update ComfyUI, then restart it."
    ) from exc

import dataclasses as _dataclasses

# Newer ComfyUI's default cache resends a cached non-output node's UI (text, plots) to /history and the editor only
# when its schema sets has_intermediate_output; 0.3.75 has no such field (and never resends a cached one's UI).
SHOWS_RESULT = (
    {"has_intermediate_output": True}
    if "has_intermediate_output" in {f.name for f in _dataclasses.fields(io.Schema)}
    else {}
)
