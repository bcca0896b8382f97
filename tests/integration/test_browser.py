"""Browser check: every UI workflow loads in ComfyUI's own frontend, with no missing node and all widgets,
laid out readably.

Headless Chromium (Debian's ``chromium``; no browser download) opens the frontend of a
real server with the pack loaded, loads each ``workflows/*.json`` through the
frontend's own loading path (``app.loadGraphData``), and checks that every node type
is registered, that every node was created without errors, that each ``SIE_`` node
shows a widget for every widget input of its schema, and, from the live LiteGraph
graph (``node.pos``/``node.size`` plus the title bar), that no two nodes overlap, that
every group holds its nodes whole, that every node but the notes is in a group, and
that the view restored on load shows the whole graph.  A screenshot per workflow is
written to ``$SIE_ARTIFACTS`` (default: a ``browser`` folder under pytest's temporary
directory; the path is printed).

``SIE_FRONTEND_ROOT`` points the server at another frontend build (ComfyUI's
``--front-end-root``: the ``static`` folder of a ``comfyui-frontend-package``
installed anywhere, e.g. ``pip install --target DIR comfyui-frontend-package``), so
the newest frontend can be checked without touching the checkout's environment.
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
UI_ONLY = {"Note", "MarkdownNote"}


def frontend_args() -> list[str]:
    root = os.environ.get("SIE_FRONTEND_ROOT")
    if not root:
        return []
    root = Path(root).resolve()
    if not (root / "index.html").is_file() and (root / "static" / "index.html").is_file():
        root = root / "static"  # the package folder given instead of its static folder
    assert (root / "index.html").is_file(), f"SIE_FRONTEND_ROOT={root} holds no frontend build (index.html)"
    return ["--front-end-root", str(root)]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with ComfyServer(extra_args=frontend_args()) as srv:
        # a fresh user would get the "Get Started with a Template" dialog over the canvas
        code, _ = srv.post("/settings/Comfy.TutorialCompleted", True)
        assert code == 200
        browser = Browser(chromium_path())
        try:
            browser.navigate(srv.url)
            browser.wait_for("window.app && window.app.graph && window.LiteGraph", timeout=120)
            version = browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
            print(f"frontend {version} ({os.environ.get('SIE_FRONTEND_ROOT') or 'the checkout own'})")
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    d = Path(os.environ.get("SIE_ARTIFACTS") or tmp_path_factory.mktemp("browser"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {d}")
    return d


def widget_inputs(cls) -> list[str]:
    spec = cls.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            if isinstance(decl[0], list) or decl[0] in WIDGETS:
                names.append(name)
    return names


# Node ids are numbers in the older frontends and strings in the newer ones: compared as strings.
# has_errors is also set by the newer frontends on a node whose file combo names a file the server does not
# have (the workflows name images and checkpoints a fresh profile lacks): such a node counts as an error only
# when something else is wrong, i.e. when every combo value is among its options and it is still flagged.
STATE = """(() => {
  const th = LiteGraph.NODE_TITLE_HEIGHT || 30;
  const nodes = window.app.graph._nodes.map(n => {
    const missing = (n.widgets || []).filter(w => w.type === 'combo' && w.options && Array.isArray(w.options.values)
        && !w.options.values.includes(w.value)).map(w => `${w.name}=${w.value}`);
    return {id: String(n.id), type: n.type, title: n.title, widgets: (n.widgets || []).map(w => w.name),
            errors: !!n.has_errors, missing_files: missing,
            box: [n.pos[0], n.pos[1] - th, n.size[0], n.size[1] + th]};
  });
  const groups = (window.app.graph._groups || window.app.graph.groups || []).map(g => {
    const b = g._bounding || g.bounding;
    return {title: g.title, box: [b[0], b[1], b[2], b[3]]};
  });
  const c = window.app.canvas;
  return {nodes, groups, scale: c.ds.scale, offset: [c.ds.offset[0], c.ds.offset[1]],
          view: [c.canvas.clientWidth, c.canvas.clientHeight]};
})()"""


def overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def inside(inner, outer) -> bool:
    return (outer[0] <= inner[0] and inner[0] + inner[2] <= outer[0] + outer[2]
            and outer[1] <= inner[1] and inner[1] + inner[3] <= outer[1] + outer[3])


def centre_in(box, outer) -> bool:
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return outer[0] <= cx <= outer[0] + outer[2] and outer[1] <= cy <= outer[1] + outer[3]


def check_layout(name: str, state: dict, workflow: dict) -> None:
    nodes, groups = state["nodes"], state["groups"]
    label = {n["id"]: f"{n['id']} ({n['title']})" for n in nodes}
    clashes = [(label[a["id"]], label[b["id"]]) for i, a in enumerate(nodes) for b in nodes[i + 1:]
               if overlap(a["box"], b["box"])]
    assert not clashes, f"{name}: overlapping nodes {clashes}"
    assert sorted(g["title"] for g in groups) == sorted(g["title"] for g in workflow["groups"])
    assert len(groups) >= 2, f"{name}: fewer than two stage groups"
    for n in nodes:
        homes = [g["title"] for g in groups if centre_in(n["box"], g["box"])]
        if n["type"] in UI_ONLY:
            assert not homes, f"{name}: note {label[n['id']]} inside group {homes}"
            continue
        assert len(homes) == 1, f"{name}: node {label[n['id']]} is in groups {homes} (want exactly one)"
        group = next(g for g in groups if g["title"] == homes[0])
        assert inside(n["box"], group["box"]), f"{name}: node {label[n['id']]} sticks out of group {homes[0]!r}"
    for a_i, a in enumerate(groups):
        for b in groups[a_i + 1:]:
            assert not overlap(a["box"], b["box"]), f"{name}: groups {a['title']!r} and {b['title']!r} overlap"
    # the view restored on load shows every node and group (LiteGraph draws p at (p + offset) * scale)
    s, (ox, oy), (w, h) = state["scale"], state["offset"], state["view"]
    for box in [n["box"] for n in nodes] + [g["box"] for g in groups]:
        x0, y0 = (box[0] + ox) * s, (box[1] + oy) * s
        x1, y1 = (box[0] + box[2] + ox) * s, (box[1] + box[3] + oy) * s
        assert 0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h, \
            f"{name}: {box} is drawn at {[round(x0), round(y0), round(x1), round(y1)]}, outside the {w}x{h} canvas"


@pytest.mark.parametrize("path", UI, ids=[p.stem for p in UI])
def test_workflow_loads_in_the_frontend(page, artifacts, path):
    workflow = json.loads(path.read_text())
    types = sorted({n["type"] for n in workflow["nodes"]})
    missing = page.evaluate(f"{json.dumps(types)}.filter(t => !(t in LiteGraph.registered_node_types))")
    assert missing == [], f"node types missing in the frontend: {missing}"
    page.evaluate(f"window.app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(path.stem)})")
    page.wait_for(f"window.app.graph._nodes.length === {len(workflow['nodes'])}", timeout=60)
    # dialogs and toasts (the newer frontends' "Media input missing", "2 issues found") would hide the graph in
    # the screenshot
    page.evaluate("document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button').forEach(b => b.click());"
                  "document.querySelectorAll('button[aria-label=\"Close\"]').forEach(b => {"
                  "  if (/issue|missing/i.test(b.parentElement.textContent)) b.click(); })")
    page.evaluate("new Promise(r => setTimeout(r, 500))")  # let the frontend settle sizes and the view
    state = page.evaluate(STATE)
    nodes = state["nodes"]
    shot = page.screenshot(artifacts / f"{path.stem}.png")
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert sorted(n["id"] for n in nodes) == sorted(str(n["id"]) for n in workflow["nodes"])
    errors = [n for n in nodes if n["errors"] and not n["missing_files"]]
    assert not errors, f"{path.stem}: nodes with errors {errors}"
    pack = load_pack()
    for node in nodes:
        if node["type"].startswith("SIE_"):
            want = widget_inputs(pack.NODE_CLASS_MAPPINGS[node["type"]])
            absent = [w for w in want if w not in node["widgets"]]
            assert not absent, f"{path.stem}: node {node['id']} ({node['type']}) lacks widgets {absent}"
    check_layout(path.stem, state, workflow)
