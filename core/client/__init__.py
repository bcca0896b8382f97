"""Headless use of a running ComfyUI server: ``python -m core.client run WORKFLOW_API.json ...``.

Needs the ``websocket-client`` package (``import websocket``) for the server's progress
stream; everything else is the standard library.
"""

from .comfy import (
    ComfyClient,
    ComfyError,
    RunResult,
    UnsafePathError,
    describe_error,
    describe_rejection,
    safe_output_path,
)

__all__ = ["ComfyClient", "ComfyError", "RunResult", "UnsafePathError", "describe_error", "describe_rejection",
           "safe_output_path"]
