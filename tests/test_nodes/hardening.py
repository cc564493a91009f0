"""Test-only nodes for the hardening tests (tests/test_hardening_server.py):

- LikenessTestAny: one output whose type is every socket type at once (ComfyUI accepts a link when the types
  overlap), so any node can be queued with placeholder objects on its linked inputs; the pack's input checks run
  before a node touches them.
- LikenessTestSink: an output node that accepts any type, so a node under test is executed.
- With LIKENESS_TEST_AUDIT_LOG set, a Python audit hook records every file or folder access whose path contains
  'likeness_outside' (the sentinel folder outside every model folder) into that log file.
"""

import os
import re
import sys

from comfy_api.latest import io

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
NATIVE = ["IMAGE", "MASK", "MODEL", "VAE", "CLIP", "CONDITIONING", "LATENT", "CLIP_VISION", "CLIP_VISION_OUTPUT",
          "STRING", "INT", "FLOAT", "BOOLEAN", "AUDIO", "VIDEO", "SIGMAS", "NOISE", "SAMPLER", "GUIDER"]


def _pack_types():
    with open(os.path.join(_REPO, "nodes", "_types.py"), encoding="utf-8") as f:
        return re.findall(r'io\.Custom\("([A-Z0-9_]+)"\)', f.read())


ANY = ",".join(dict.fromkeys(NATIVE + _pack_types()))

MARKER = "likeness_outside"
_log = os.environ.get("LIKENESS_TEST_AUDIT_LOG")
_EVENTS = {"open", "os.listdir", "os.scandir", "glob.glob", "os.walk", "shutil.copyfile", "os.rename"}


def _audit(event, args):
    if event not in _EVENTS or not args:
        return
    target = args[0]
    if isinstance(target, bytes):
        target = target.decode(errors="replace")
    if isinstance(target, (str, os.PathLike)) and MARKER in os.fspath(target):
        with open(_log, "a", encoding="utf-8") as f:  # the log's own path has no marker: no recursion
            f.write(f"{event}\t{os.fspath(target)}\n")


if _log and MARKER not in _log:
    sys.addaudithook(_audit)


class Placeholder:
    """What LikenessTestAny hands out: any use of it fails loudly."""

    def __repr__(self):
        return "Placeholder()"


class LikenessTestAny(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessTestAny", display_name="Test Any", category="Likeness/Test",
            description="A placeholder object whose socket type matches every input type.",
            inputs=[], outputs=[io.Custom(ANY).Output()],
        )

    @classmethod
    def execute(cls):
        return io.NodeOutput(Placeholder())


class LikenessTestSink(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessTestSink", display_name="Test Sink", category="Likeness/Test",
            description="An output node that accepts anything (so the node linked to it runs).",
            inputs=[io.Custom(ANY).Input("value")], outputs=[], is_output_node=True,
        )

    @classmethod
    def execute(cls, value):
        return io.NodeOutput()


class LikenessTestTouch(io.ComfyNode):
    """Opens a path for reading: the control that shows the audit hook records what it should."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessTestTouch", display_name="Test Touch", category="Likeness/Test",
            description="Opens a file for reading and closes it (test-only).",
            inputs=[io.String.Input("path")], outputs=[], is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, path):
        return float("nan")  # run every time

    @classmethod
    def execute(cls, path):
        with open(path, "rb"):
            pass
        return io.NodeOutput()


NODES = [LikenessTestAny, LikenessTestSink, LikenessTestTouch]
