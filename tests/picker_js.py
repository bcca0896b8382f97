"""Run web/picker.js's mapping functions in Node.js (tests/js/picker_harness.mjs) from the tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from helpers import ROOT

HARNESS = ROOT / "tests" / "js" / "picker_harness.mjs"
# another copy of picker.js to test (e.g. an older one, to see the tests fail on it)
PICKER = Path(os.environ.get("SIE_PICKER_JS") or ROOT / "web" / "picker.js")


def node_skip_reason() -> str | None:
    """Why the picker's code cannot run here, or None when it can (Node.js >= 20.6: module.register)."""
    node = shutil.which("node")
    if node is None:
        return "Node.js is not installed (apt-get install nodejs): the picker's mapping runs in it"
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        major, minor = (int(v) for v in version.lstrip("v").split(".")[:2])
    except (OSError, ValueError, subprocess.SubprocessError):
        return "cannot tell the Node.js version"
    if (major, minor) < (20, 6):
        return f"Node.js {version} lacks module.register (needs >= 20.6)"
    return None


def run_js(calls: list[dict], picker: Path = PICKER) -> list:
    """The harness's answers to ``calls`` (see tests/js/picker_harness.mjs); an error in any call fails."""
    run = subprocess.run(["node", str(HARNESS), str(picker)], input=json.dumps(calls), capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    answers = json.loads(run.stdout)
    for call, answer in zip(calls, answers):
        assert not (isinstance(answer, dict) and "error" in answer), (call.get("fn"), answer["error"])
    return answers
