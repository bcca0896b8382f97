"""A stand-in for ComfyUI's ``comfy_api`` package, for running the pack's nodes where ComfyUI is absent.

The pack's nodes declare themselves with ComfyUI's typed node API (``comfy_api.latest.io``), which
ComfyUI ships inside its own source tree (it cannot be pip-installed, and importing it pulls in PyAV
and ComfyUI's execution modules).  The default test tier and the workflow builder run without
ComfyUI, so ``tests/conftest.py`` and ``workflows/graphs/builder.py`` put this folder on
``sys.path`` when no real ``comfy_api`` can be imported.  It implements only what the pack's nodes
use, written for this purpose; the integration tier checks it against the real API
(``tests/integration/test_server.py`` compares every node's ``/object_info`` from a running ComfyUI
with what this stand-in derives from the same class).
"""

STANDIN = True
