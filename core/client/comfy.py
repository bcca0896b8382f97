"""A client of a running ComfyUI server's HTTP and WebSocket API.

Not a re-implementation of ComfyUI's executor: it uploads inputs, queues an API-format
prompt, follows the WebSocket stream (progress, errors, completion) and downloads the
outputs listed in ``/history``.  HTTP is the standard library's; the WebSocket is the
``websocket-client`` package (``import websocket``, as in ComfyUI's own API examples),
a dependency of the pack.

Downloads never leave the output folder.  The ``subfolder`` and ``filename`` of an
output come from the server, so :func:`safe_output_path` refuses (``UnsafePathError``)
a NUL byte, an absolute or drive path, a ``..`` component, a separator in a file name,
and any path that resolves outside the folder, including through a symbolic link
already inside it; nothing is requested or written for such an output.  A download is
written to a temporary file beside its target and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import websocket


class ComfyError(RuntimeError):
    """The server refused or failed a prompt; ``details`` holds the server's report."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class UnsafePathError(ComfyError):
    """The server named an output file that would land outside the output folder."""


_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_output_path(out_dir: str | Path, subfolder, filename) -> Path:
    """Where ``subfolder/filename`` (both from the server) goes under ``out_dir``, checked.

    Raises :class:`UnsafePathError` naming the path unless it is a plain file name in
    zero or more plain folders that stays inside ``out_dir`` once the symbolic links
    already there are followed.  Both ``/`` and ``\\`` separate folders (ComfyUI on
    Windows reports ``a\\b``).  Creates nothing.
    """
    subfolder = "" if subfolder is None else subfolder
    shown = f"{subfolder}/{filename}" if subfolder else f"{filename}"

    def refuse(why: str) -> UnsafePathError:
        return UnsafePathError(f"unsafe output path from the server: {shown!r} ({why}); not saved")

    if not isinstance(subfolder, str) or not isinstance(filename, str):
        raise refuse("subfolder and filename must be strings")
    if "\x00" in shown:
        raise refuse("it contains a NUL byte")
    if subfolder.startswith(("/", "\\")) or filename.startswith(("/", "\\")):
        raise refuse("an absolute path")
    parts = [p for p in re.split(r"[/\\]", subfolder) if p not in ("", ".")]
    for part in [*parts, *re.split(r"[/\\]", filename)]:
        if part == "..":
            raise refuse("a '..' component")
        if _DRIVE.match(part) or (os.name == "nt" and ":" in part):
            raise refuse("a drive letter or a stream name")
    if filename in ("", ".") or "/" in filename or "\\" in filename:
        raise refuse("the file name must be a plain name, without folders")
    root = os.path.realpath(out_dir)
    target = Path(root).joinpath(*parts, filename)
    if os.path.commonpath([root, os.path.realpath(target)]) != root:
        raise refuse(f"it resolves outside {str(out_dir)!r}, through a symbolic link")
    return target


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    seconds: float
    outputs: dict = field(default_factory=dict)  # node id -> ui dict from /history
    error: dict | None = None  # the execution_error message, if any
    messages: list[tuple[str, dict]] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (node id, progress text) shown on nodes
    previews: int = 0  # preview images received


class ComfyClient:
    def __init__(self, server: str = "http://127.0.0.1:8188", timeout: float = 60.0):
        self.base = server.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    # -- plain HTTP -----------------------------------------------------------------------
    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {},
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, socket.timeout) as e:
            raise ComfyError(f"cannot reach ComfyUI at {self.base}: {e}") from None

    def get_json(self, path: str):
        code, body = self._request(path)
        if code != 200:
            raise ComfyError(f"GET {path}: HTTP {code}")
        return json.loads(body) if body else None

    def post_json(self, path: str, payload: dict) -> tuple[int, object]:
        code, body = self._request(path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        try:
            return code, (json.loads(body) if body else None)
        except json.JSONDecodeError:
            return code, body.decode(errors="replace")

    def upload_image(self, path: str | Path, subfolder: str = "", overwrite: bool = True) -> str:
        """Upload into the server's input folder; returns the name to put in a LoadImage input."""
        path = Path(path)
        if not path.is_file():
            raise ComfyError(f"image not found: {path}")
        boundary = uuid.uuid4().hex
        fields = [("overwrite", "true" if overwrite else "false")] + ([("subfolder", subfolder)] if subfolder else [])
        body = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields)
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        code, resp = self._request("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if code != 200:
            raise ComfyError(f"upload of {path.name} failed: HTTP {code} {resp[:200]!r}")
        info = json.loads(resp)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def download(self, image: dict, out_dir: str | Path) -> Path:
        """Fetch one output (an entry of a node's ``images``) into ``out_dir``, atomically.

        Raises :class:`UnsafePathError` before any request or write when the server's
        ``subfolder``/``filename`` would leave ``out_dir``.
        """
        filename, subfolder = image.get("filename"), image.get("subfolder") or ""
        target = safe_output_path(out_dir, subfolder, filename)
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": image.get("type", "output")})
        code, body = self._request(f"/view?{q}")
        if code != 200:
            raise ComfyError(f"download of {filename} failed: HTTP {code}")
        target.parent.mkdir(parents=True, exist_ok=True)
        # check again now that the folders exist: one may have been swapped for a link meanwhile
        target = safe_output_path(out_dir, subfolder, filename)
        # a fresh temporary file beside the target (O_EXCL: never through an existing link), then a rename
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    # -- running a prompt -------------------------------------------------------------------
    def ws_url(self) -> str:
        u = urllib.parse.urlsplit(self.base)
        scheme = "wss" if u.scheme == "https" else "ws"
        return urllib.parse.urlunsplit((scheme, u.netloc, u.path.rstrip("/") + "/ws", f"clientId={self.client_id}", ""))

    def connect(self) -> websocket.WebSocket:
        try:
            # no Origin header: this is not a browser page (and ComfyUI checks Origin against Host)
            return websocket.create_connection(self.ws_url(), timeout=self.timeout, suppress_origin=True)
        except (OSError, websocket.WebSocketException) as e:
            raise ComfyError(f"cannot reach ComfyUI at {self.base}: {e}") from None

    def queue(self, prompt: dict) -> str:
        code, resp = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if code != 200 or (isinstance(resp, dict) and resp.get("node_errors")):
            details = resp if isinstance(resp, dict) else {"error": {"message": str(resp)}}
            raise ComfyError(describe_rejection(details), details)
        return resp["prompt_id"]

    def run(self, prompt: dict, timeout: float = 3600.0,
            on_message: Callable[[str, dict], None] | None = None) -> RunResult:
        """Queue ``prompt`` and follow it on the WebSocket until it finishes (or ``timeout``)."""
        t0 = time.time()
        ws = self.connect()  # connect first: no message can be missed
        try:
            prompt_id = self.queue(prompt)
            messages: list[tuple[str, dict]] = []
            texts: list[tuple[str, str]] = []
            previews = 0
            status, error = None, None
            deadline = t0 + timeout
            while status is None:
                remaining = deadline - time.time()
                if remaining <= 0:
                    self.interrupt()
                    raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s (interrupted)")
                ws.settimeout(min(remaining, 30))
                try:
                    opcode, raw = ws.recv_data()
                except (websocket.WebSocketTimeoutException, socket.timeout):
                    continue
                except (websocket.WebSocketException, OSError) as e:
                    raise ComfyError(f"the WebSocket to the server broke (did it crash?): {e}") from None
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    raise ComfyError("the server closed the WebSocket (did it crash?)")
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    kind_id = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else 0
                    if kind_id == 3 and len(raw) >= 8:  # progress text: node id length, node id, text
                        (n,) = struct.unpack(">I", raw[4:8])
                        texts.append((raw[8 : 8 + n].decode(errors="replace"), raw[8 + n :].decode(errors="replace")))
                    elif kind_id in (1, 2):
                        previews += 1
                    continue
                msg = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
                kind, data = msg.get("type"), msg.get("data", {}) or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                messages.append((kind, data))
                if on_message is not None:
                    on_message(kind, data)
                if kind == "execution_error":
                    status, error = "error", data
                elif kind == "execution_interrupted":
                    status = "interrupted"
                elif kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                                     and data.get("prompt_id") == prompt_id):
                    status = "success"
        finally:
            _close_quickly(ws)
        # the server reports success before it files the prompt's history: wait for the entry
        entry, until = {}, time.time() + 60
        while not entry and time.time() < until:
            entry = (self.get_json(f"/history/{prompt_id}") or {}).get(prompt_id, {})
            if not entry:
                time.sleep(0.2)
        return RunResult(prompt_id, status, time.time() - t0, entry.get("outputs", {}), error, messages, texts,
                         previews)


def _close_quickly(ws: websocket.WebSocket) -> None:
    """Send a close frame and drop the socket without waiting for the server's reply."""
    try:
        ws.send_close()
    except (OSError, websocket.WebSocketException):
        pass
    ws.shutdown()


def describe_rejection(resp: dict) -> str:
    """A readable account of a 400 from /prompt (or of node_errors in a 200)."""
    lines = []
    err = resp.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', 'prompt rejected')}" + (f": {err['details']}" if err.get("details") else ""))
    for node_id, info in (resp.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            name = e.get("extra_info", {}).get("input_name")
            where = f"node {node_id} ({info.get('class_type')})" + (f", input '{name}'" if name else "")
            lines.append(f"  {where}: {e.get('message')}" + (f" - {e['details']}" if e.get("details") else ""))
    return "\n".join(lines) or "prompt rejected"


def describe_error(err: dict) -> str:
    """A readable account of an execution_error message."""
    return (f"node {err.get('node_id')} ({err.get('node_type')}) failed: "
            f"{err.get('exception_type', 'Error')}: {str(err.get('exception_message', '')).strip()}")
