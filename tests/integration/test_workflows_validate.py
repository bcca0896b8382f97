"""Every bundled API workflow passes a real ComfyUI server's prompt validation (needs COMFYUI_DIR).

``POST /prompt`` validates a graph synchronously (node types, input types and ranges, combo values such as
file names, links) and answers ``node_errors`` before anything runs. Each graph is posted with the
execution tier's overrides (the random test models in place of the shipped file names, CPU sizes); once every
graph is accepted the queue is cleared and the running prompt interrupted, so this check costs seconds, not
the minutes of executing them (``test_workflows_execute.py`` does that).
"""

from __future__ import annotations

import json
import time

import pytest
from test_workflows_execute import OVERRIDES, SDXL_CKPT, WF, apply_overrides, server  # noqa: F401  (server: fixture)

from comfy_server import skip_reason

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


def test_every_api_workflow_validates(server):  # noqa: F811
    accepted, refused = [], {}
    for path in sorted(WF.glob("*.json")):
        overrides = OVERRIDES[path.stem]
        if overrides.get("CheckpointLoaderSimple") == SDXL_CKPT["CheckpointLoaderSimple"]:
            # validation checks the graph, not the model: the SDXL twins are validated against the random SD 1.5
            # the server lists (test_sdxl_workflows.py executes them on the random SDXL)
            overrides = {**overrides, "CheckpointLoaderSimple": {"ckpt_name": "random_sd15.safetensors"}}
        prompt = apply_overrides(json.loads(path.read_text()), overrides)
        status, body = server.post("/prompt", {"prompt": prompt, "client_id": "sie-validate"})
        if status == 200 and not (body or {}).get("node_errors"):
            accepted.append(path.stem)
        else:
            refused[path.stem] = body
    # stop what was queued: validation was the point
    server.post("/queue", {"clear": True})
    server.post("/interrupt", {})
    deadline = time.time() + 120
    while time.time() < deadline:
        queue = server.get("/queue")
        if not queue.get("queue_running") and not queue.get("queue_pending"):
            break
        time.sleep(0.5)
    assert not refused, json.dumps(refused, indent=1)[:6000]
    assert len(accepted) == len(OVERRIDES), accepted
