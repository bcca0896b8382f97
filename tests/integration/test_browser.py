"""Browser check: every UI workflow loads in ComfyUI's own frontend, with no missing node and all widgets.

Headless Chromium (Debian's ``chromium``; no browser download) opens the frontend of a
real server with the pack loaded, loads each ``workflows/*.json`` through the
frontend's own loading path (``app.loadGraphData``), and checks that every node type
is registered, that every node was created, and that each ``SIE_`` node shows a widget
for every widget input of its schema.  A screenshot per workflow is written to
``$SIE_ARTIFACTS`` (default: a ``browser`` folder under pytest's temporary directory).
Needs COMFYUI_DIR and Chromium; skipped, saying which is missing, otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from browser import Browser, chromium_path

from comfy_server import REPO, ComfyServer, skip_reason
from helpers import load_pack

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
              pytest.mark.skipif(chromium_path() is None, reason="no Chromium (apt-get install chromium)")]

UI = sorted((REPO / "workflows").glob("*.json"))
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with ComfyServer() as srv:
        # a fresh user would get the "Get Started with a Template" dialog over the canvas
        code, _ = srv.post("/settings/Comfy.TutorialCompleted", True)
        assert code == 200
        browser = Browser(chromium_path())
        try:
            browser.navigate(srv.url)
            browser.wait_for("window.app && window.app.graph && window.LiteGraph", timeout=120)
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    d = Path(os.environ.get("SIE_ARTIFACTS") or tmp_path_factory.mktemp("browser"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def widget_inputs(cls) -> list[str]:
    spec = cls.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            if isinstance(decl[0], list) or decl[0] in WIDGETS:
                names.append(name)
    return names


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_workflow_loads_in_the_frontend(page, artifacts, path):
    workflow = json.loads(path.read_text())
    types = sorted({n["type"] for n in workflow["nodes"]})
    missing = page.evaluate(f"{json.dumps(types)}.filter(t => !(t in LiteGraph.registered_node_types))")
    assert missing == [], f"node types missing in the frontend: {missing}"
    page.evaluate(f"window.app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(path.stem)})")
    page.wait_for(f"window.app.graph._nodes.length === {len(workflow['nodes'])}", timeout=60)
    nodes = page.evaluate("window.app.graph._nodes.map(n => ({id: n.id, type: n.type, "
                          "widgets: (n.widgets || []).map(w => w.name), errors: !!n.has_errors}))")
    assert sorted(n["id"] for n in nodes) == sorted(n["id"] for n in workflow["nodes"])
    assert not [n for n in nodes if n["errors"]], nodes
    pack = load_pack()
    for node in nodes:
        if node["type"].startswith("SIE_"):
            want = widget_inputs(pack.NODE_CLASS_MAPPINGS[node["type"]])
            absent = [w for w in want if w not in node["widgets"]]
            assert not absent, f"{path.stem}: node {node['id']} ({node['type']}) lacks widgets {absent}"
    page.evaluate("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click())")
    shot = page.screenshot(artifacts / f"{path.stem}.png")
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
