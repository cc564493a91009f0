"""Set-up help for artists: where the pack looks for its model files."""

import os

import folder_paths

from ..comfy_compat import io
from ..loaders.model_folders import MODEL_FOLDERS


def model_folders_report():
    lines = []
    for key, (_sub, _exts, what) in MODEL_FOLDERS.items():
        lines.append(f"[{key}] {what}")
        for path in folder_paths.get_folder_paths(key):
            state = "exists" if os.path.isdir(path) else "missing (create it)"
            lines.append(f"  folder: {path} ({state})")
        files = folder_paths.get_filename_list(key)
        lines.extend(f"  - {f}" for f in files[:50])
        if not files:
            lines.append("  (no files)")
    return "\n".join(lines)


class LikenessModelFolders(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessModelFolders",
            display_name="Likeness Model Folders",
            category="Likeness/Setup",
            description="Lists every model folder the pack reads (including extra_model_paths.yaml entries) and "
                        "the files found there, so you can see where each download belongs.",
            inputs=[io.Boolean.Input("refresh", default=True, tooltip="Re-scan the folders on every run.")],
            outputs=[io.String.Output(display_name="report", tooltip="One block per folder key: paths and files.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, refresh):
        return float("nan") if refresh else 0

    @classmethod
    def execute(cls, refresh):
        report = model_folders_report()
        return io.NodeOutput(report, ui={"text": [report]})


NODES = [LikenessModelFolders]
