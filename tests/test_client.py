"""The headless client against no ComfyUI: node selection, error text, and an in-process fake server.

The fake server (``FakeComfy``) speaks just enough of ComfyUI's HTTP API and of its
``/ws`` WebSocket, on 127.0.0.1 only, to drive ``ComfyClient`` and the CLI through a
scripted run: progress, errors, interrupts, and outputs whose names are hostile.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from core.client import __main__ as cli
from core.client.__main__ import apply_sets, select
from core.client.comfy import (
    ComfyClient,
    ComfyError,
    UnsafePathError,
    describe_error,
    describe_rejection,
    safe_output_path,
)

PROMPT = {
    "2": {"class_type": "LoadImage", "inputs": {"image": "a.png"}, "_meta": {"title": "Load Image"}},
    "3": {"class_type": "SIE_SinDDMTrain", "inputs": {"steps": 10, "image": ["2", 0]}, "_meta": {"title": "Train"}},
    "5": {"class_type": "SIE_SinDDMSample", "inputs": {"count": 4}, "_meta": {"title": "A"}},
    "6": {"class_type": "SIE_SinDDMSample", "inputs": {"count": 4}, "_meta": {"title": "B"}},
}


def test_node_selection_by_id_title_or_class():
    assert select(PROMPT, "3") == ["3"] and select(PROMPT, "Train") == ["3"]
    assert select(PROMPT, "SIE_SinDDMSample") == ["5", "6"]
    with pytest.raises(ComfyError, match="no node 'nope'"):
        select(PROMPT, "nope")


def test_set_parses_values_and_checks_inputs():
    prompt = json.loads(json.dumps(PROMPT))
    apply_sets(prompt, ["SIE_SinDDMSample.count=1", "Train.steps=20", "2.image=b.png"])
    assert [prompt[k]["inputs"]["count"] for k in ("5", "6")] == [1, 1]
    assert prompt["3"]["inputs"]["steps"] == 20 and prompt["2"]["inputs"]["image"] == "b.png"
    with pytest.raises(ComfyError, match="has no input 'stpes'"):
        apply_sets(prompt, ["Train.stpes=1"])
    with pytest.raises(ComfyError, match="NODE.input=value"):
        apply_sets(prompt, ["steps"])


def test_error_texts_name_the_node_and_input():
    rejection = {"error": {"message": "Prompt outputs failed validation", "details": ""},
                 "node_errors": {"3": {"class_type": "SIE_SinDDMTrain", "errors": [
                     {"message": "Value 0 smaller than min of 1", "details": "steps",
                      "extra_info": {"input_name": "steps"}}]}}}
    text = describe_rejection(rejection)
    assert "node 3 (SIE_SinDDMTrain), input 'steps'" in text and "smaller than min" in text
    err = {"node_id": "6", "node_type": "SIE_SinDDMInject", "exception_type": "NodeInputError",
           "exception_message": "input 'mask': wrong size. Fix: resize\n"}
    assert describe_error(err) == "node 6 (SIE_SinDDMInject) failed: NodeInputError: input 'mask': wrong size. Fix: resize"


# -- a fake ComfyUI server -------------------------------------------------------------------

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's handshake constant
PID = "prompt-1"  # the id the fake server gives every queued prompt
WAIT = 10.0  # the longest any fake-server step waits for the client


def frame(payload: str | bytes, opcode: int | None = None, fin: bool = True) -> bytes:
    """One unmasked server-to-client WebSocket frame (text for str, binary for bytes)."""
    if opcode is None:
        opcode = 0x1 if isinstance(payload, str) else 0x2
    data = payload.encode() if isinstance(payload, str) else payload
    n = len(data)
    length = bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n) if n < 1 << 16 else \
        bytes([127]) + struct.pack(">Q", n)
    return bytes([(0x80 if fin else 0) | opcode]) + length + data


def msg(kind: str, **data) -> bytes:
    return frame(json.dumps({"type": kind, "data": data}))


class _Handler(BaseHTTPRequestHandler):
    timeout = WAIT  # every socket read of the server side is bounded

    def log_message(self, *args) -> None:
        pass

    def _json(self, obj, code: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        fake: FakeComfy = self.server.fake
        url = urlsplit(self.path)
        fake.requests.append(("GET", self.path))
        if url.path == "/ws":
            return self._websocket(fake)
        if url.path == f"/history/{PID}":
            return self._json({PID: {"outputs": fake.outputs, "status": {"completed": True}}})
        if url.path == "/view":
            name = parse_qs(url.query, keep_blank_values=True).get("filename", [""])[0]
            body = fake.views.get(name, b"EVIL")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None
        self.send_error(404)
        return None

    def do_POST(self) -> None:
        fake: FakeComfy = self.server.fake
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fake.requests.append(("POST", self.path))
        if self.path == "/prompt":
            fake.posted.append(json.loads(body))
            self._json({"prompt_id": PID, "number": 0, "node_errors": {}})
            fake.queued.set()
        elif self.path == "/interrupt":
            fake.interrupted.set()
            self._json({})
        elif self.path == "/upload/image":
            fake.uploads.append(body)
            self._json({"name": "uploaded.png", "subfolder": "", "type": "input"})
        else:
            self.send_error(404)

    def _websocket(self, fake: FakeComfy) -> None:
        fake.ws_headers = {k.lower(): v for k, v in self.headers.items()}
        fake.ws_path = self.path
        key = self.headers["Sec-WebSocket-Key"]
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode())
        self.end_headers()
        self.close_connection = True
        if not fake.queued.wait(WAIT):  # the script starts once the prompt is queued, as on ComfyUI
            return
        try:
            for f in fake.frames:
                self.wfile.write(f)
            if fake.close_ws:
                self.wfile.write(b"\x88\x02\x03\xe8")  # close, 1000
            while len(fake.ws_received) < 1 << 20:  # what the client sends (pong, close) until it hangs up
                chunk = self.connection.recv(4096)
                if not chunk:
                    break
                fake.ws_received += chunk
        except OSError:
            pass


class FakeComfy:
    """A scripted ComfyUI stand-in on 127.0.0.1: ``/prompt``, ``/history``, ``/view``, ``/interrupt``,
    ``/upload/image`` and ``/ws`` (which sends ``frames`` once the prompt is queued)."""

    def __init__(self, frames=(), outputs=None, views=None, close_ws=False):
        self.frames, self.outputs, self.views, self.close_ws = list(frames), outputs or {}, views or {}, close_ws
        self.requests: list[tuple[str, str]] = []
        self.posted: list[dict] = []
        self.uploads: list[bytes] = []
        self.queued, self.interrupted = threading.Event(), threading.Event()
        self.ws_headers: dict = {}
        self.ws_path = ""
        self.ws_received = b""
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def views_requested(self) -> list[str]:
        return [parse_qs(urlsplit(p).query, keep_blank_values=True)["filename"][0]
                for m, p in self.requests if m == "GET" and urlsplit(p).path == "/view"]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(WAIT)


@pytest.fixture
def fake_comfy():
    started: list[FakeComfy] = []

    def start(**kwargs) -> FakeComfy:
        started.append(FakeComfy(**kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


def progress_text(node: str, text: str) -> bytes:
    return frame(struct.pack(">I", 3) + struct.pack(">I", len(node)) + node.encode() + text.encode())


BIG_PREVIEW = struct.pack(">II", 1, 2) + b"\xff" * 70000  # a JPEG preview: 64-bit frame length

SUCCESS = [
    msg("status", status={"exec_info": {"queue_remaining": 1}}, sid="x"),
    msg("execution_start", prompt_id=PID),
    msg("execution_cached", nodes=["2"], prompt_id=PID),
    msg("executing", node="9", prompt_id="someone-else"),  # another client's prompt: ignored
    msg("executing", node="3", display_node="3", prompt_id=PID),
    frame(b"", opcode=0x9),  # a ping, to be answered with a pong
    msg("progress", value=1, max=2, node="3", prompt_id=PID),
    progress_text("3", "loss 0.5"),
    frame(BIG_PREVIEW),
    frame('{"type": "progress", "data": {"value": 2, "max": 2, ', fin=False),  # fragmented text message
    frame('"node": "3", "prompt_id": "' + PID + '"}}', opcode=0x0),
    msg("executing", node="5", display_node="5", prompt_id=PID),
    msg("executed", node="5", output={"images": []}, prompt_id=PID),
    msg("execution_success", prompt_id=PID),
]
GOOD_OUTPUTS = {"5": {"images": [{"filename": "good.png", "subfolder": "sinddm", "type": "output"},
                                 {"filename": "preview.png", "subfolder": "", "type": "temp"}],
                      "text": ["a note"]}}


def tree(root: Path) -> set[str]:
    """Every entry (file, folder, link; links not followed) under ``root``."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    return exc.value.code


def test_run_follows_the_websocket_to_success(fake_comfy):
    server = fake_comfy(frames=SUCCESS, outputs=GOOD_OUTPUTS)
    seen = []
    result = ComfyClient(server.url, timeout=WAIT).run(json.loads(json.dumps(PROMPT)), timeout=30,
                                                       on_message=lambda k, d: seen.append(k))
    assert result.status == "success" and result.prompt_id == PID and result.error is None
    assert result.outputs == GOOD_OUTPUTS
    assert [k for k, _ in result.messages] == seen == [
        "status", "execution_start", "execution_cached", "executing", "progress", "progress", "executing",
        "executed", "execution_success"]
    assert [d["value"] for k, d in result.messages if k == "progress"] == [1, 2]  # the fragments were joined
    assert result.texts == [("3", "loss 0.5")] and result.previews == 1
    assert server.ws_received[:1] == b"\x8a"  # the ping was answered with a (masked) pong
    assert server.ws_path == f"/ws?clientId={server.posted[0]['client_id']}"
    assert "origin" not in server.ws_headers  # a client, not a browser page


def test_cli_prints_progress_and_saves_outputs(fake_comfy, tmp_path, capsys):
    server = fake_comfy(frames=SUCCESS, outputs=GOOD_OUTPUTS, views={"good.png": b"GOOD"})
    workflow, image, out = tmp_path / "wf.json", tmp_path / "in.png", tmp_path / "out"
    workflow.write_text(json.dumps(PROMPT))
    image.write_bytes(b"PNG")
    code = run_cli("run", str(workflow), "--server", server.url, "--image", f"Load Image={image}",
                   "--set", "Train.steps=3", "--out", str(out))
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert (out / "sinddm" / "good.png").read_bytes() == b"GOOD"
    assert tree(out) == {"sinddm", os.path.join("sinddm", "good.png")}  # no temp preview, no leftover .part
    sent = server.posted[0]["prompt"]
    assert sent["2"]["inputs"]["image"] == "uploaded.png" and sent["3"]["inputs"]["steps"] == 3
    assert b"PNG" in server.uploads[0]
    assert "cached: Load Image" in cap.err and "Train [" + "#" * 30 + "] 2/2" in cap.err
    assert "uploaded" in cap.err and "1 file(s)" in cap.err
    assert str(out / "sinddm" / "good.png") in cap.out and "5 (SIE_SinDDMSample): a note" in cap.out


def test_cli_reports_a_node_error(fake_comfy, tmp_path, capsys):
    error = {"prompt_id": PID, "node_id": "3", "node_type": "SIE_SinDDMTrain", "exception_type": "ValueError",
             "exception_message": "steps must be positive\n"}
    server = fake_comfy(frames=[msg("executing", node="3", prompt_id=PID), msg("execution_error", **error)])
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(PROMPT))
    code = run_cli("run", str(workflow), "--server", server.url, "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 1
    assert "error: node 3 (SIE_SinDDMTrain) failed: ValueError: steps must be positive" in err
    assert "failed after" in err and not (tmp_path / "out").exists()


def test_ctrl_c_asks_the_server_to_stop(fake_comfy, tmp_path, capsys, monkeypatch):
    server = fake_comfy(frames=SUCCESS[:7])  # up to the first progress message, then silence
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(PROMPT))
    shown = cli.ProgressPrinter.__call__

    def press_ctrl_c(self, kind, data):
        shown(self, kind, data)
        if kind == "progress":
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.ProgressPrinter, "__call__", press_ctrl_c)
    code = run_cli("run", str(workflow), "--server", server.url, "--out", str(tmp_path / "out"))
    assert code == 130 and server.interrupted.is_set()
    assert "interrupted; asked the server to stop" in capsys.readouterr().err


def test_timeout_interrupts_the_prompt(fake_comfy):
    server = fake_comfy(frames=SUCCESS[:5])  # never finishes
    with pytest.raises(ComfyError, match="did not finish within 1 s"):
        ComfyClient(server.url, timeout=WAIT).run(PROMPT, timeout=1.0)
    assert server.interrupted.is_set()


def test_a_closed_websocket_is_an_error(fake_comfy):
    server = fake_comfy(frames=SUCCESS[:5], close_ws=True)
    with pytest.raises(ComfyError, match="closed the WebSocket"):
        ComfyClient(server.url, timeout=WAIT).run(PROMPT, timeout=30)


def test_an_unreachable_server_is_a_clear_error():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ComfyError, match="cannot reach ComfyUI"):
        ComfyClient(f"http://127.0.0.1:{port}", timeout=5).connect()


def test_websocket_url_follows_the_server_url():
    assert ComfyClient("http://127.0.0.1:8188").ws_url().startswith("ws://127.0.0.1:8188/ws?clientId=")
    assert ComfyClient("https://host/comfy/").ws_url().startswith("wss://host/comfy/ws?clientId=")


# -- outputs never land outside --out ------------------------------------------------------------

@pytest.mark.parametrize("subfolder, filename", [
    ("", "../evil.png"), ("", "/tmp/evil.png"), ("", "C:\\evil.png"), ("", "C:evil.png"), ("", "a\x00b.png"),
    ("../../x", "evil.png"), ("/tmp", "evil.png"), ("\\\\server\\share", "evil.png"), ("a\\..\\..", "evil.png"),
    ("ok/../..", "evil.png"), ("D:", "evil.png"), ("", ".."), ("", ""), ("", "."), ("", "sub/x.png"),
    ("x\x00", "evil.png"), (None, None), (3, "evil.png"),
])
def test_safe_output_path_refuses_escapes(tmp_path, subfolder, filename):
    with pytest.raises(UnsafePathError) as exc:
        safe_output_path(tmp_path / "out", subfolder, filename)
    if filename:
        assert repr(f"{subfolder}/{filename}" if subfolder else filename) in str(exc.value)
    assert tree(tmp_path) == set()


def test_safe_output_path_keeps_plain_names_inside(tmp_path):
    out = tmp_path / "out"
    root = Path(os.path.realpath(out))
    assert safe_output_path(out, "", "a.png") == root / "a.png"
    assert safe_output_path(out, None, "a.png") == root / "a.png"
    assert safe_output_path(out, "sinddm/run 1/", "a..b.png") == root / "sinddm" / "run 1" / "a..b.png"
    assert safe_output_path(out, "win\\sub", "a.png") == root / "win" / "sub" / "a.png"  # ComfyUI on Windows
    assert safe_output_path(out, "./x", "a.png") == root / "x" / "a.png"


def test_safe_output_path_follows_links_inside_out(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "real").mkdir(parents=True)
    outside.mkdir()
    try:
        (out / "escape").symlink_to(outside, target_is_directory=True)
        (out / "alias").symlink_to(out / "real", target_is_directory=True)
        (out / "file.png").symlink_to(outside / "file.png")
    except (OSError, NotImplementedError):
        pytest.skip("no symbolic links here")
    with pytest.raises(UnsafePathError, match="'escape/evil.png'.*symbolic link"):
        safe_output_path(out, "escape", "evil.png")
    with pytest.raises(UnsafePathError, match="'file.png'"):
        safe_output_path(out, "", "file.png")
    assert safe_output_path(out, "alias", "a.png").parent.name == "alias"


HOSTILE = [("", "../evil.png"), ("", "/tmp/evil.png"), ("", "C:\\evil.png"), ("", "a\x00b.png"),
           ("../../x", "evil.png"), ("link", "evil.png")]


def test_cli_refuses_hostile_output_paths(fake_comfy, tmp_path, capsys):
    """A server naming outputs outside --out: those are refused (named in the error, never fetched,
    nothing written anywhere), the good one is saved, and the run exits 1."""
    images = [{"filename": f, "subfolder": s, "type": "output"} for s, f in HOSTILE]
    images.insert(2, {"filename": "good.png", "subfolder": "", "type": "output"})
    server = fake_comfy(frames=[msg("execution_success", prompt_id=PID)], outputs={"9": {"images": images}},
                        views={"good.png": b"GOOD"})
    workflow, out, outside = tmp_path / "wf.json", tmp_path / "run" / "out", tmp_path / "outside"
    workflow.write_text(json.dumps(PROMPT))
    out.mkdir(parents=True)
    outside.mkdir()
    links = True
    try:
        (out / "link").symlink_to(outside, target_is_directory=True)
    except (OSError, NotImplementedError):
        links = False
    abs_evil = Path("/tmp/evil.png")
    abs_before = abs_evil.stat() if os.path.lexists(abs_evil) else None
    before = tree(tmp_path.parent)

    code = run_cli("run", str(workflow), "--server", server.url, "--out", str(out))

    err = capsys.readouterr().err
    assert code == 1
    for subfolder, filename in HOSTILE:
        if filename == "evil.png" and subfolder == "link" and not links:
            continue
        shown = f"{subfolder}/{filename}" if subfolder else filename
        assert f"unsafe output path from the server: {shown!r}" in err, (shown, err)
    assert "1 file(s)" in err and "NOT saved" in err
    assert server.views_requested() == ["good.png"]  # the hostile ones were not even fetched
    assert tree(tmp_path.parent) - before == {os.path.relpath(out / "good.png", tmp_path.parent)}
    assert tree(tmp_path.parent) >= before
    assert (out / "good.png").read_bytes() == b"GOOD" and tree(outside) == set()
    abs_after = abs_evil.stat() if os.path.lexists(abs_evil) else None
    assert (abs_before is None and abs_after is None) or (abs_before is not None and abs_after is not None
                                                          and abs_after.st_mtime_ns == abs_before.st_mtime_ns)


def test_download_refuses_before_fetching(fake_comfy, tmp_path):
    server = fake_comfy()
    client = ComfyClient(server.url, timeout=WAIT)
    for subfolder, filename in HOSTILE[:5]:
        with pytest.raises(UnsafePathError):
            client.download({"filename": filename, "subfolder": subfolder, "type": "output"}, tmp_path / "a" / "out")
    assert server.requests == [] and tree(tmp_path) == set()
    target = client.download({"filename": "x.png", "subfolder": "s", "type": "output"}, tmp_path / "out")
    assert target.read_bytes() == b"EVIL" and tree(tmp_path / "out") == {"s", os.path.join("s", "x.png")}
