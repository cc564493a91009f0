"""A real ComfyUI server (main.py --cpu) driven as users drive it: POST /prompt, the websocket,
/history, /view, /object_info."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import websocket

from .paths import REPO, TEST_NODES, comfyui_dir

PACK_LINK = "likeness"
TEST_PACK_LINK = "likeness_test_nodes"


class PromptFailed(AssertionError):
    def __init__(self, message, history=None, response=None):
        super().__init__(message)
        self.history = history
        self.response = response


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack_import_failures(log_text, pack_dir_name=PACK_LINK):
    """Lines that say a pack failed to load (ComfyUI's exit code is 0 either way)."""
    bad = []
    for line in log_text.splitlines():
        if pack_dir_name not in line:
            continue
        if ("Cannot import" in line or "IMPORT FAILED" in line or "Error while calling comfy_entrypoint" in line
                or "did not return" in line or "Skip " in line and "module for custom nodes" in line):
            bad.append(line.strip())
    return bad


class ComfyServer:
    def __init__(self, base_dir, packs=None, python=None, extra_args=(), comfy_dir=None):
        """base_dir=None runs a ComfyUI in place (its own models/, custom_nodes/, output/)."""
        self.comfy_dir = Path(comfy_dir) if comfy_dir else comfyui_dir()
        self.in_place = base_dir is None
        self.base_dir = self.comfy_dir if self.in_place else Path(base_dir)
        self.models_dir = self.base_dir / "models"
        self.input_dir = self.base_dir / "input"
        self.output_dir = self.base_dir / "output"
        self.custom_nodes = self.base_dir / "custom_nodes"
        self.packs = packs if packs is not None else {PACK_LINK: REPO, TEST_PACK_LINK: TEST_NODES}
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.port = None
        self.proc = None
        self.log_path = (self.base_dir / "server.log") if not self.in_place else Path(
            os.environ.get("TMPDIR", "/tmp")) / f"likeness-comfyui-{os.getpid()}.log"
        self.client_id = uuid.uuid4().hex

    # --- lifecycle -----------------------------------------------------------------------
    def prepare(self):
        for d in (self.models_dir, self.input_dir, self.output_dir, self.custom_nodes):
            d.mkdir(parents=True, exist_ok=True)
        if self.in_place:
            # a pack already installed under another folder name must not be loaded twice
            installed = {p.resolve() for p in self.custom_nodes.iterdir()}
            self.packs = {k: v for k, v in self.packs.items() if Path(v).resolve() not in installed}
        for name, target in self.packs.items():
            link = self.custom_nodes / name
            if not link.exists():
                link.symlink_to(Path(target).resolve(), target_is_directory=True)
        return self

    def start(self, timeout=180):
        self.prepare()
        self.port = free_port()
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--dont-print-server",
            *([] if self.in_place else ["--base-directory", str(self.base_dir)]), *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.object_info()
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- HTTP ----------------------------------------------------------------------------
    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def get_json(self, path):
        return json.loads(self.get(path))

    def object_info(self, node_class=None):
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def post_prompt(self, prompt, extra_data=None):
        """Returns (HTTP status, JSON answer) without raising on a validation error."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        req = urllib.request.Request(self.url + "/prompt", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                return e.code, json.loads(text)
            except json.JSONDecodeError:
                return e.code, {"error": {"message": text}}

    def history(self, prompt_id):
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def view(self, filename, subfolder="", type="output"):
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self.get(f"/view?{q}")

    def run(self, prompt, timeout=300, extra_data=None):
        """Queues an API-format prompt, follows the websocket until it ends and returns its
        /history entry. Raises PromptFailed with the server's message when it fails."""
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=timeout)
        try:
            status, answer = self.post_prompt(prompt, extra_data)
            if status != 200 or "prompt_id" not in answer:
                raise PromptFailed(f"prompt rejected ({status}): {json.dumps(answer)[:3000]}", response=answer)
            if answer.get("node_errors"):
                # newer ComfyUI queues the valid part of a prompt and answers 200 with the refused nodes: a test
                # that passed here would have run a different graph than it sent
                self.interrupt_prompt(answer["prompt_id"])
                raise PromptFailed(f"prompt partly refused (node_errors): {json.dumps(answer['node_errors'])[:3000]}",
                                   response=answer)
            pid = answer["prompt_id"]
            error = None
            deadline = time.time() + timeout
            while True:
                ws.settimeout(max(1.0, deadline - time.time()))
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    self.interrupt()
                    raise PromptFailed(f"prompt {pid} did not finish within {timeout}s")
                if not isinstance(raw, str):
                    continue  # binary preview frames
                msg = json.loads(raw)
                data = msg.get("data", {})
                if data.get("prompt_id") != pid:
                    continue
                if msg["type"] == "execution_error":
                    error = data
                elif msg["type"] == "execution_interrupted":
                    error = {"exception_message": "interrupted", **data}
                if msg["type"] in ("execution_success", "execution_error", "execution_interrupted") or (
                        msg["type"] == "executing" and data.get("node") is None):
                    break
        finally:
            ws.close()
        hist = None
        for _ in range(50):  # history is written right after the last message
            hist = self.history(pid)
            if hist and hist.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.1)
        if error is not None:
            raise PromptFailed(
                f"node {error.get('node_id')} ({error.get('node_type')}) failed: "
                f"{error.get('exception_type')}: {error.get('exception_message')}", history=hist, response=error)
        if not hist or hist.get("status", {}).get("status_str") != "success":
            raise PromptFailed(f"prompt {pid} did not succeed: {json.dumps(hist)[:3000]}", history=hist)
        return hist

    def interrupt_prompt(self, prompt_id):
        """Takes a queued prompt off the queue, or interrupts it if it already runs."""
        req = urllib.request.Request(self.url + "/queue", data=json.dumps({"delete": [prompt_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except OSError:
            pass
        running = self.get_json("/queue").get("queue_running", [])
        if any(len(item) > 1 and item[1] == prompt_id for item in running):
            self.interrupt()
        deadline = time.time() + 60
        while time.time() < deadline:
            q = self.get_json("/queue")
            if not any(len(item) > 1 and item[1] == prompt_id for item in q.get("queue_running", []) + q.get("queue_pending", [])):
                return
            time.sleep(0.1)

    def interrupt(self):
        req = urllib.request.Request(self.url + "/interrupt", data=b"{}", headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except OSError:
            pass

    def output_files(self, hist, node_id=None):
        """(filename, subfolder, type) of every file a prompt's outputs list."""
        found = []
        for nid, out in (hist.get("outputs") or {}).items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for key in ("images", "gifs", "videos", "animated", "files"):
                for item in out.get(key, []) or []:
                    if isinstance(item, dict) and "filename" in item:
                        found.append((item["filename"], item.get("subfolder", ""), item.get("type", "output")))
        return found
