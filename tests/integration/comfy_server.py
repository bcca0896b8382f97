"""Start and talk to a real ComfyUI server for the integration tier.

The server runs from the checkout named by ``COMFYUI_DIR`` with that checkout's own
Python (``COMFYUI_PYTHON``, else ``$COMFYUI_DIR/.venv/bin/python`` or
``$COMFYUI_DIR/venv/bin/python``), on 127.0.0.1, with a throw-away
``--base-directory`` so that the user's checkout is never written to: its
``custom_nodes`` holds a link to this repository (and nothing else), its ``models``
folder links whatever test models a case needs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "comfyui-single-image-edit"


def comfyui_dir() -> Path | None:
    d = os.environ.get("COMFYUI_DIR")
    return Path(d).resolve() if d else None


def comfyui_python(root: Path) -> Path | None:
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return Path(env)
    for cand in (root / ".venv" / "bin" / "python", root / "venv" / "bin" / "python"):
        if cand.exists():
            return cand
    return None


def skip_reason() -> str | None:
    """Why the integration tier cannot run here, or None when it can."""
    root = comfyui_dir()
    if root is None:
        return "COMFYUI_DIR is not set (point it at a ComfyUI checkout with its own Python environment)"
    if not (root / "main.py").is_file():
        return f"COMFYUI_DIR={root} has no main.py"
    if comfyui_python(root) is None:
        return f"no Python environment in {root} (.venv/ or venv/); set COMFYUI_PYTHON"
    return None


def comfyui_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Prepended to every script run_in_comfyui runs: ComfyUI on the CPU, the pack imported as ComfyUI imports it.
PRELUDE = """
import json, sys, importlib.util
import comfy.options
comfy.options.enable_args_parsing(False)
from comfy.cli_args import args
args.cpu = True
import torch
_spec = importlib.util.spec_from_file_location("sie_pack", sys.argv[1] + "/__init__.py",
                                               submodule_search_locations=[sys.argv[1]])
pack = importlib.util.module_from_spec(_spec)
sys.modules["sie_pack"] = pack
_spec.loader.exec_module(pack)


def rel(p, q):  # the largest difference relative to the largest value of q
    return float((p - q).abs().max() / q.abs().max())


def enc(clip, text):  # what CLIP Text Encode gives
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def digest(module):  # a module's weights, hashed
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def error(call):  # the node-input error a call raises, as the user reads it ("no error" if none)
    from sie_pack.nodes.common import NodeInputError
    try:
        call()
        return "no error"
    except NodeInputError as e:
        return str(e)
"""


def run_in_comfyui(script: str, *args: str, timeout: float = 900, tmp_dir: Path | None = None) -> dict:
    """Run ``script`` with ComfyUI's Python (cwd and PYTHONPATH = COMFYUI_DIR; ``sys.argv[1]`` is this
    repository, then ``args``; :data:`PRELUDE` runs first) and return the JSON it prints on a line starting
    with ``RESULT ``; the prelude also defines the helpers the scripts share: ``rel``, ``enc``, ``digest``,
    ``error``)."""
    root = comfyui_dir()
    folder = Path(tmp_dir or tempfile.mkdtemp(prefix="sie_script_"))
    path = folder / "check.py"
    path.write_text(PRELUDE + script)
    run = subprocess.run([str(comfyui_python(root)), str(path), str(REPO), *args], cwd=root, capture_output=True,
                         text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1"))
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise AssertionError(f"script failed (exit {run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-6000:]}")
    return json.loads(lines[0][len("RESULT "):])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI process with this pack linked in; use as a context manager."""

    def __init__(self, with_pack: bool = True, extra_args: list[str] | None = None,
                 models: dict[str, list[Path]] | None = None, base: Path | None = None,
                 env: dict[str, str] | None = None):
        self.root = comfyui_dir()
        self.python = comfyui_python(self.root)
        self.with_pack = with_pack
        self.extra_args = extra_args or []
        self.models = models or {}
        self.env = dict(env or {})  # added to the server's environment
        self._tmp = None if base else tempfile.TemporaryDirectory(prefix="sie_comfy_")
        self.base = Path(base) if base else Path(self._tmp.name)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "ComfyServer":
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        if self.with_pack:
            link = self.base / "custom_nodes" / PACK_DIR_NAME
            if not link.exists():
                link.symlink_to(REPO, target_is_directory=True)
        for folder, files in self.models.items():
            d = self.base / "models" / folder
            d.mkdir(parents=True, exist_ok=True)
            for f in files:
                if not (d / Path(f).name).exists():
                    (d / Path(f).name).symlink_to(Path(f).resolve())
        cmd = [str(self.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **self.env)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"ComfyUI did not start within 180 s:\n{self.log()[-4000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- HTTP ------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 60) -> object:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def post(self, path: str, payload: dict, timeout: float = 60) -> tuple[int, object]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            return e.code, (json.loads(body) if body else None)


def main() -> None:
    """`python tests/integration/comfy_server.py contract OUT.json`: dump ComfyUI's core node schemas."""
    if len(sys.argv) != 3 or sys.argv[1] != "contract":
        sys.exit("usage: comfy_server.py contract OUT.json")
    if skip_reason():
        sys.exit(skip_reason())
    with ComfyServer(with_pack=False) as srv:
        info = srv.get("/object_info")
        stats = srv.get("/system_stats")
    keep = ("input", "input_order", "output", "output_is_list", "output_name", "name", "display_name",
            "category", "output_node", "python_module")
    nodes = {k: {f: v[f] for f in keep if f in v} for k, v in sorted(info.items())
             if not str(v.get("python_module", "")).startswith("custom_nodes")}
    out = {
        "comfyui_commit": comfyui_commit(srv.root),
        "comfyui_version": stats.get("system", {}).get("comfyui_version"),
        "note": "GET /object_info of a ComfyUI server with no custom nodes (tests/integration/comfy_server.py contract). "
                "File-list combos (checkpoints, loras, images) reflect that server's empty folders.",
        "nodes": nodes,
    }
    Path(sys.argv[2]).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(nodes)} core nodes from ComfyUI {out['comfyui_version']} ({out['comfyui_commit'][:8]})")


if __name__ == "__main__":
    main()
