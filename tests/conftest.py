"""Shared test set-up: import paths (``import core``, ``import helpers``) and offline model hubs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "integration"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# The nodes declare themselves with ComfyUI's typed node API (comfy_api.latest.io), which only a ComfyUI
# checkout provides: without one, tests/standin gives the part of it the nodes use (its docstring says how
# the integration tier checks it against the real one).
from helpers import use_comfy_api_standin  # noqa: E402

use_comfy_api_standin()

# No test may reach a model hub: fail fast instead of hanging on the closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")



@pytest.fixture
def one_thread():
    """Tiny networks run far faster on one thread (and do not fight a busy machine for cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The part of the integration tier that CI runs (SIE_INTEGRATION_PART=ci, set by .ci/run when it provides the
# ComfyUI snapshot itself): the server starts with the pack, every SIE_ node is listed with our schema, every API
# workflow passes the server's validation, every UI workflow loads in the frontend, the picker maps what ComfyUI's
# image nodes do, and one workflow per method executes with CPU-sized overrides. Everything else in
# tests/integration/ is skipped there, saying so; unset the variable (or set it to "all") for the whole tier.
CI_INTEGRATION_PART = (
    "tests/integration/test_server.py::",
    "tests/integration/test_workflows_validate.py::",
    "tests/integration/test_browser.py::",
    "tests/integration/test_picker_geometry_comfy.py::",
    "tests/integration/test_workflows_execute.py::test_every_workflow_has_overrides",
    "tests/integration/test_workflows_execute.py::test_workflow_executes[sinddm_random_samples]",
    "tests/integration/test_workflows_execute.py::test_workflow_executes[imagic]",
    "tests/integration/test_workflows_execute.py::test_workflow_executes[sine_edit]",
    "tests/integration/test_workflows_execute.py::test_workflow_executes[layerdiffusion]",
    "tests/integration/test_workflows_execute.py::test_workflow_executes[rectifier_reconstruct]",
)


def pytest_collection_modifyitems(config, items):
    part = os.environ.get("SIE_INTEGRATION_PART", "all")
    if part == "all":
        return
    if part != "ci":
        raise pytest.UsageError(f"SIE_INTEGRATION_PART={part!r}: use 'ci' or 'all'")
    skip = pytest.mark.skip(reason="not in the part of the integration tier CI runs (SIE_INTEGRATION_PART=ci; "
                                   "unset it for the whole tier)")
    for item in items:
        nodeid = item.nodeid.replace("\\", "/")
        if nodeid.startswith("tests/integration/") and not nodeid.startswith(CI_INTEGRATION_PART):
            item.add_marker(skip)


_TIER_SECONDS: dict[str, float] = {}
_TIER_OUTCOMES: dict[str, dict[str, int]] = {}


def pytest_runtest_logreport(report):
    tier = "integration" if report.nodeid.replace("\\", "/").startswith("tests/integration/") else "default"
    _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + report.duration
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcomes = _TIER_OUTCOMES.setdefault(tier, {})
        outcomes[report.outcome] = outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    """One line per tier with its time, so a CI log shows what the integration tier cost and what it ran against."""
    comfy = os.environ.get("COMFYUI_DIR") or "not set"
    part = os.environ.get("SIE_INTEGRATION_PART", "all")
    for tier in sorted(_TIER_SECONDS):
        counts = ", ".join(f"{n} {k}" for k, n in sorted(_TIER_OUTCOMES.get(tier, {}).items()))
        extra = f" (COMFYUI_DIR={comfy}, part: {part})" if tier == "integration" else ""
        terminalreporter.write_line(f"{tier} tier: {counts} in {_TIER_SECONDS[tier]:.0f} s{extra}")
