"""The headless client's pieces that need no ComfyUI: WebSocket framing, node selection, error text."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading

import pytest

from core.client.__main__ import apply_sets, select
from core.client.comfy import ComfyError, describe_error, describe_rejection
from core.client.ws import GUID, WebSocket, WebSocketClosed


def _serve_once(listener: socket.socket, replies: list[bytes]) -> None:
    """A one-connection WebSocket server: handshake, echo one client message, send frames, close."""
    conn, _ = listener.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key"))
    accept = base64.b64encode(hashlib.sha1(key + GUID.encode()).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    b0, b1 = conn.recv(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", conn.recv(2))
    mask = conn.recv(4)
    payload = b""
    while len(payload) < n:
        payload += conn.recv(n - len(payload))
    echoed = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert b1 & 0x80, "client frames must be masked"
    header = bytes([0x81, len(echoed)]) if len(echoed) < 126 else bytes([0x81, 126]) + struct.pack(">H", len(echoed))
    conn.sendall(header + echoed)
    for frame in replies:
        conn.sendall(frame)
    conn.sendall(b"\x88\x00")
    conn.settimeout(10)  # let the client read everything (and answer the ping) before closing
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass
    conn.close()


def test_websocket_client_frames():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    big = b"x" * 70000
    replies = [
        b"\x89\x00",  # a ping, answered with a pong and skipped
        bytes([0x01, 3]) + b"hel" + bytes([0x80, 2]) + b"lo",  # a fragmented text message
        bytes([0x82, 127]) + struct.pack(">Q", len(big)) + big,  # a 64-bit-length binary message
    ]
    server = threading.Thread(target=_serve_once, args=(listener, replies), daemon=True)
    server.start()
    port = listener.getsockname()[1]
    with WebSocket(f"ws://127.0.0.1:{port}/ws?clientId=x", timeout=10) as ws:
        ws.send_json({"hello": "x" * 200})  # > 125 bytes: 16-bit length
        assert json.loads(ws.recv()) == {"hello": "x" * 200}
        assert ws.recv() == "hello"
        assert ws.recv() == big
        with pytest.raises(WebSocketClosed):
            ws.recv()
    server.join(5)
    with pytest.raises(ValueError):
        WebSocket("wss://example.invalid/")


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
