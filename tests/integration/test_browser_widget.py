"""Browser check of the pack's frontend extension (``web/picker.js``): click-to-pick widgets.

A real server with the pack loaded (``WEB_DIRECTORY``) and headless Chromium (Debian's
``chromium``, driven over CDP by ``browser.py``): the server gets ``coffee_250x200.png`` uploaded,
the frontend loads a small workflow, Load Image -> Segment (SAM points / box) and Load Image ->
SinDDM Guide: Region (nothing is executed, the SAM input stays unconnected), and the test

* checks that the extension is loaded and that each node has its picking canvas, drawn with the
  picture of the Load Image node (non-blank pixels, a draw counter the widget exposes);
* clicks and drags on the canvases with real mouse events (``Input.dispatchMouseEvent`` at the
  canvas's on-screen position, after checking that the canvas is what lies under those points):
  a left click, a shift-click and a right-click add points, a drag draws the box, a click on a point
  removes it, a click on the region canvas sets x, y; the ``prompt`` text, the x / y widgets and the API prompt
  (``graphToPrompt``) must say the same, in pixels of the 250x200 picture;
* serializes the graph, loads another one, loads the serialized one back (``loadGraphData``) and
  checks that the points, box and x, y are back in the widgets and drawn (the canvas pixels under
  the points have the points' colours);
* presses "clear points / box" with a real click on the button drawn on the graph canvas;
* loads Load Image -> ImageScale (512x512, crop "center") -> Segment and -> Region, as in the bundled
  LayerDiffusion workflow, and checks that the widgets work in pixels of the 512x512 image the nodes
  get (``common_upscale``'s centre crop, computed here): the cut-off sides of the picture are dimmed, a
  click at the picture's centre writes about [256, 256, 1], a click elsewhere its scaled position (one in
  a dimmed side lands on the image's edge), the region's x, y likewise, and a point and a box typed into
  the prompt are drawn where they lie on the picture.

Screenshots go to ``$SIE_ARTIFACTS`` (default: a folder under pytest's temporary directory; the
paths are printed).  ``SIE_FRONTEND_ROOT`` selects another frontend build, as in test_browser.py.
Needs COMFYUI_DIR and Chromium; skipped, saying which is missing, otherwise.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from browser import Browser, chromium_path
from test_browser import frontend_args

from comfy_server import REPO, ComfyServer, skip_reason
from core.client import ComfyClient

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
              pytest.mark.skipif(chromium_path() is None, reason="no Chromium (apt-get install chromium)")]

IMAGE = REPO / "core" / "sinddm" / "data" / "coffee_250x200.png"
W, H = 250, 200       # its size
PAD = 4               # the widget fits the picture, centred, inside its canvas less this margin (web/picker.js)
EXTENSION = "single-image-edit.picker"
LOAD, SAM, ROI = 1, 2, 3
EMPTY_PROMPT = '{"points": [], "box": null}'
SHIFT = 8             # CDP modifier bit
RENDERERS = ["classic", "nodes2"]
NODES2_FROM = (1, 35)  # first tested frontend where Nodes 2.0 is a user setting (1.27.10 hides it, half-built)


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split(".")[:3])
    except ValueError:
        return (999,)  # unknown: assume new


def scale_center(w0: int, h0: int, w: int, h: int) -> tuple[int, int, float, float]:
    """ImageScale(width=w, height=h, crop="center") as comfy.utils.common_upscale does it: the columns (x) or
    rows (y) cut from each side, then the factors from the rest to w x h."""
    old_aspect, new_aspect = w0 / h0, w / h
    x = y = 0
    if old_aspect > new_aspect:
        x = round((w0 - w0 * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((h0 - h0 * (old_aspect / new_aspect)) / 2)
    return x, y, w / (w0 - 2 * x), h / (h0 - 2 * y)


def workflow() -> dict:
    """Load Image -> Segment (SAM) and Load Image -> Region; a view at scale 1, every node on screen."""
    def node(nid, ntype, pos, size, inputs, outputs, values):
        return {"id": nid, "type": ntype, "pos": pos, "size": size, "flags": {}, "order": nid - 1, "mode": 0,
                "inputs": inputs, "outputs": outputs, "properties": {}, "widgets_values": values}

    image_out = [{"name": "IMAGE", "type": "IMAGE", "links": [1, 2], "slot_index": 0},
                 {"name": "MASK", "type": "MASK", "links": None, "slot_index": 1}]
    nodes = [
        node(LOAD, "LoadImage", [120, 120], [300, 330], [], image_out, [IMAGE.name, "image"]),
        node(SAM, "SIE_SAMSegment", [470, 120], [380, 620],
             [{"name": "sam", "type": "SIE_SAM", "link": None}, {"name": "image", "type": "IMAGE", "link": 1}],
             [{"name": "mask", "type": "MASK", "links": None, "slot_index": 0}], [EMPTY_PROMPT, 0, False]),
        node(ROI, "SIE_SinDDMGuideROI", [900, 120], [340, 420],
             [{"name": "target", "type": "IMAGE", "link": 2}, {"name": "mask", "type": "MASK", "link": None},
              {"name": "guidance", "type": "SIE_SINDDM_GUIDANCE", "link": None}],
             [{"name": "guidance", "type": "SIE_SINDDM_GUIDANCE", "links": None, "slot_index": 0}], [0.8, 0, 0]),
    ]
    links = [[1, LOAD, 0, SAM, 1, "IMAGE"], [2, LOAD, 0, ROI, 0, "IMAGE"]]
    return {"last_node_id": 3, "last_link_id": 2, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}


SCALE = 4              # the ImageScale node of scaled_workflow()
SCALED = (512, 512)    # its size, crop "center": the bundled LayerDiffusion workflow's photo


def scaled_workflow() -> dict:
    """Load Image -> ImageScale (lanczos, 512x512, crop center) -> Segment and -> Region."""
    wf = workflow()
    load_node, sam, roi = wf["nodes"]
    load_node["outputs"][0]["links"] = [1]
    sam["inputs"][1]["link"] = 2
    roi["inputs"][0]["link"] = 3
    wf["nodes"].append({"id": SCALE, "type": "ImageScale", "pos": [120, 500], "size": [300, 130], "flags": {},
                        "order": 1, "mode": 0, "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
                        "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2, 3], "slot_index": 0}],
                        "properties": {}, "widgets_values": ["lanczos", *SCALED, "center"]})
    wf["links"] = [[1, LOAD, 0, SCALE, 0, "IMAGE"], [2, SCALE, 0, SAM, 1, "IMAGE"], [3, SCALE, 0, ROI, 0, "IMAGE"]]
    wf["last_node_id"], wf["last_link_id"] = SCALE, 3
    return wf


FLIP, UPSCALE = 4, 5  # the nodes of flip_workflow()


def flip_workflow() -> dict:
    """Load Image -> ImageFlip (horizontally) -> Segment; Load Image -> ImageUpscaleWithModel (no model: never
    run) -> Region."""
    wf = workflow()
    load_node, sam, roi = wf["nodes"]
    load_node["outputs"][0]["links"] = [1, 3]
    sam["inputs"][1]["link"] = 2
    roi["inputs"][0]["link"] = 4
    wf["nodes"] += [
        {"id": FLIP, "type": "ImageFlip", "pos": [120, 500], "size": [300, 90], "flags": {}, "order": 1, "mode": 0,
         "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2], "slot_index": 0}],
         "properties": {}, "widgets_values": ["y-axis: horizontally"]},
        {"id": UPSCALE, "type": "ImageUpscaleWithModel", "pos": [120, 640], "size": [300, 60], "flags": {},
         "order": 2, "mode": 0, "inputs": [{"name": "upscale_model", "type": "UPSCALE_MODEL", "link": None},
                                           {"name": "image", "type": "IMAGE", "link": 3}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [4], "slot_index": 0}], "properties": {}},
    ]
    wf["links"] = [[1, LOAD, 0, FLIP, 0, "IMAGE"], [2, FLIP, 0, SAM, 1, "IMAGE"], [3, LOAD, 0, UPSCALE, 1, "IMAGE"],
                   [4, UPSCALE, 0, ROI, 0, "IMAGE"]]
    wf["last_node_id"], wf["last_link_id"] = UPSCALE, 4
    return wf


@pytest.fixture(scope="module")
def server():
    with ComfyServer(extra_args=frontend_args()) as srv:
        ComfyClient(srv.url).upload_image(IMAGE)
        code, _ = srv.post("/settings/Comfy.TutorialCompleted", True)
        assert code == 200
        listed = srv.get("/extensions")
        assert any(p.endswith("/picker.js") for p in listed), f"web/picker.js not served: {listed}"
        yield srv


@pytest.fixture(scope="module", params=RENDERERS)
def page(server, request):
    """The frontend in one renderer: the classic LiteGraph canvas, or Nodes 2.0 (Vue components, setting
    Comfy.VueNodes.Enabled), which re-mounts the same DOM widgets in its own node elements."""
    vue = request.param == "nodes2"
    code, _ = server.post("/settings/Comfy.VueNodes.Enabled", vue)
    assert code == 200
    browser = Browser(chromium_path())
    try:
        browser.navigate(server.url)
        browser.wait_for("window.app && window.app.graph && window.LiteGraph", timeout=120)
        version = browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
        print(f"frontend {version} ({os.environ.get('SIE_FRONTEND_ROOT') or 'the checkout own'}), {request.param}")
        if vue and version_tuple(version) < NODES2_FROM:
            pytest.skip(f"frontend {version}: Nodes 2.0 is a hidden experiment there that mounts no DOM widget "
                        "(core's or a pack's); checked from 1.35 on")
        browser.renderer = request.param
        yield browser
    finally:
        if browser.console:
            print("browser console errors:\n" + "\n".join(browser.console[-20:]))
        browser.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    d = Path(os.environ.get("SIE_ARTIFACTS") or tmp_path_factory.mktemp("browser_widget"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# ------------------------------------------------------------------------------------------
# page helpers
# ------------------------------------------------------------------------------------------
def js_node(nid: int) -> str:
    return f"window.app.graph.getNodeById({nid})"


def load(page, wf: dict) -> None:
    page.evaluate(f"window.app.loadGraphData({json.dumps(wf)}, true, true, 'sie_picker_test')")
    page.wait_for(f"window.app.graph._nodes.length === {len(wf['nodes'])}", timeout=60)
    # the newer frontends' toasts and dialogs would sit over the canvas
    page.evaluate("document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button').forEach(b => b.click())")
    for nid in (SAM, ROI):
        page.wait_for(f"{js_node(nid)}?.siePicker?.canvas.dataset.state === 'ready'", timeout=60)
    page.evaluate("new Promise(r => setTimeout(r, 500))")  # let sizes and the view settle


def widget_value(page, nid: int, name: str):
    return page.evaluate(f"{js_node(nid)}.widgets.find(w => w.name === {json.dumps(name)}).value")


def geometry(page, nid: int) -> dict:
    """The picking canvas on screen: its client rect, layout size and device pixel ratio."""
    return page.evaluate(f"""(() => {{
        const c = {js_node(nid)}.siePicker.canvas, r = c.getBoundingClientRect();
        return {{left: r.left, top: r.top, width: r.width, height: r.height,
                 cw: c.clientWidth, ch: c.clientHeight, dpr: window.devicePixelRatio || 1}};
    }})()""")


def to_screen(g: dict, x: float, y: float) -> tuple[float, float, float, float]:
    """Picture pixel (x, y) -> (screen x, screen y, canvas layout x, canvas layout y), computed here from
    the documented fit (picture centred, scaled to the canvas less PAD), not taken from the widget."""
    s = min((g["cw"] - 2 * PAD) / W, (g["ch"] - 2 * PAD) / H)
    lx, ly = (g["cw"] - W * s) / 2 + x * s, (g["ch"] - H * s) / 2 + y * s
    return g["left"] + lx * g["width"] / g["cw"], g["top"] + ly * g["height"] / g["ch"], lx, ly


def picture_scale(g: dict) -> float:
    """Screen pixels per picture pixel."""
    return min((g["cw"] - 2 * PAD) / W, (g["ch"] - 2 * PAD) / H) * g["width"] / g["cw"]


def mouse(page, kind: str, x: float, y: float, button: str = "left", modifiers: int = 0) -> None:
    buttons = {"left": 1, "right": 2, "none": 0}[button]
    page.call("Input.dispatchMouseEvent", {
        "type": kind, "x": x, "y": y, "button": button, "modifiers": modifiers,
        "buttons": 0 if kind == "mouseReleased" else buttons if kind == "mousePressed" else buttons,
        "clickCount": 1 if kind in ("mousePressed", "mouseReleased") else 0})


def click(page, x, y, button="left", modifiers=0) -> None:
    mouse(page, "mouseMoved", x, y, "none")
    mouse(page, "mousePressed", x, y, button, modifiers)
    mouse(page, "mouseReleased", x, y, button, modifiers)


def drag(page, a, b, steps=8) -> None:
    mouse(page, "mouseMoved", *a, "none")
    mouse(page, "mousePressed", *a)
    for i in range(1, steps + 1):
        mouse(page, "mouseMoved", a[0] + (b[0] - a[0]) * i / steps, a[1] + (b[1] - a[1]) * i / steps)
    mouse(page, "mouseReleased", *b)


def assert_hits(page, nid: int, points) -> None:
    """Every screen point lands on the node's picking canvas (nothing of the frontend lies over it)."""
    for x, y in points:
        hit = page.evaluate(f"document.elementFromPoint({x}, {y}) === {js_node(nid)}.siePicker.canvas")
        assert hit, f"({x:.0f}, {y:.0f}) is not on node {nid}'s canvas: " + page.evaluate(
            f"(e => e && (e.tagName + '.' + e.className))(document.elementFromPoint({x}, {y}))")


def pixel(page, nid: int, lx: float, ly: float) -> list[int]:
    """RGBA of the picking canvas at layout position (lx, ly)."""
    return page.evaluate(f"""(() => {{
        const c = {js_node(nid)}.siePicker.canvas, k = c.width / c.clientWidth;
        return Array.from(c.getContext('2d').getImageData(Math.round({lx} * k), Math.round({ly} * k), 1, 1).data);
    }})()""")


def patch_means(page, nid: int, g: dict, x: float, y: float, r: float = 3) -> tuple[float, float]:
    """Mean R + G + B over picture pixels [x - r, x + r] x [y - r, y + r]: as drawn on the picking canvas,
    and in the picture itself (drawn unscaled on a scratch canvas)."""
    a, b = to_screen(g, x - r, y - r)[2:], to_screen(g, x + r, y + r)[2:]
    return tuple(page.evaluate(f"""(() => {{
        const st = {js_node(nid)}.siePicker, c = st.canvas, k = c.width / c.clientWidth;
        const mean = (d) => {{ let t = 0; for (let i = 0; i < d.length; i += 4) t += d[i] + d[i + 1] + d[i + 2];
                               return t / (d.length / 4); }};
        const x0 = Math.round({a[0]} * k), y0 = Math.round({a[1]} * k);
        const shown = c.getContext('2d').getImageData(x0, y0, Math.max(1, Math.round({b[0]} * k) - x0),
                                                      Math.max(1, Math.round({b[1]} * k) - y0)).data;
        const s = document.createElement('canvas');
        s.width = st.img.naturalWidth; s.height = st.img.naturalHeight;
        const ctx = s.getContext('2d');
        ctx.drawImage(st.img, 0, 0);
        const src = ctx.getImageData({round(x - r)}, {round(y - r)}, {round(2 * r)}, {round(2 * r)}).data;
        return [mean(shown), mean(src)];
    }})()"""))


def near(a, b, tol) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def check_prompt(prompt: dict, expect_points, expect_box, tol) -> None:
    assert set(prompt) == {"points", "box"}, prompt
    assert len(prompt["points"]) == len(expect_points), prompt
    for got, (x, y, label) in zip(prompt["points"], expect_points):
        assert got[2] == label and near(got[:2], (x, y), tol), (got, (x, y, label))
        assert all(isinstance(v, int) for v in got), got
    if expect_box is None:
        assert prompt["box"] is None
    else:
        x0, y0, x1, y1 = prompt["box"]
        assert x0 < x1 and y0 < y1 and near(prompt["box"], expect_box, tol), (prompt["box"], expect_box)


# Screen position of the SAM node's clear button: a DOM button in Nodes 2.0, else where LiteGraph draws it
CLEAR_BUTTON_AT = f"""(() => {{
    const el = [...document.querySelectorAll('[data-node-id="{SAM}"] button')]
        .find(b => b.textContent.trim() === 'clear points / box');
    if (el) {{ const r = el.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; }}
    const n = window.app.graph.getNodeById({SAM}), w = n.widgets.find(w => w.name === 'clear points / box');
    const c = window.app.canvas, r = c.canvas.getBoundingClientRect();
    const h = w.computedHeight || window.LiteGraph.NODE_WIDGET_HEIGHT || 20;
    const gx = n.pos[0] + n.size[0] / 2, gy = n.pos[1] + w.y + Math.min(h, 20) / 2;
    const k = r.width / c.canvas.clientWidth;
    return [r.left + (gx + c.ds.offset[0]) * c.ds.scale * k, r.top + (gy + c.ds.offset[1]) * c.ds.scale * k];
}})()"""


def green(rgba) -> bool:
    return rgba[1] > 150 and rgba[0] < 100 and rgba[2] < 150


def red(rgba) -> bool:
    return rgba[0] > 180 and rgba[1] < 110 and rgba[2] < 110


# ------------------------------------------------------------------------------------------
def test_picker_widgets(page, artifacts):
    assert page.evaluate(f"window.app.extensions.some(e => e.name === {json.dumps(EXTENSION)})"), \
        "the pack's extension is not registered"
    wf = workflow()
    load(page, wf)
    vue = page.evaluate(f"!!document.querySelector('[data-node-id=\"{SAM}\"]')")
    assert vue == (page.renderer == "nodes2"), f"{page.renderer} renderer expected, Vue nodes on the page: {vue}"
    shot = lambda name: page.screenshot(artifacts / f"picker_{page.renderer}_{name}.png")  # noqa: E731
    shots = [shot("loaded")]

    # each node has its canvas (and SAM its clear button); neither is serialized
    for nid in (SAM, ROI):
        names = page.evaluate(f"{js_node(nid)}.widgets.map(w => w.name)")
        assert "sie_picker" in names, names
    assert "clear points / box" in page.evaluate(f"{js_node(SAM)}.widgets.map(w => w.name)")
    # drawn on the Load Image picture: drawn at least once, and far from a blank canvas
    for nid in (SAM, ROI):
        stats = page.evaluate(f"""(() => {{
            const st = {js_node(nid)}.siePicker, c = st.canvas;
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const colours = new Set();
            for (let i = 0; i < d.length; i += 4 * 7) colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
            return {{draws: st.draws, colours: colours.size, view: JSON.parse(c.dataset.view), url: st.url,
                     size: [c.width, c.height]}};
        }})()""")
        print(f"node {nid} canvas: {stats}")
        assert stats["draws"] >= 1 and stats["colours"] > 500, stats
        assert "coffee_250x200.png" in stats["url"] and stats["view"]["w"] == W and stats["view"]["h"] == H, stats
        assert stats["size"][0] >= 200 and stats["size"][1] >= 150, f"canvas too small to use: {stats}"

    # drawn once per change, not in a loop (nor on every frame of the graph canvas)
    draws = page.evaluate(f"[{SAM}, {ROI}].map(id => window.app.graph.getNodeById(id).siePicker.draws)")
    page.evaluate("new Promise(r => setTimeout(r, 1000))")
    assert page.evaluate(f"[{SAM}, {ROI}].map(id => window.app.graph.getNodeById(id).siePicker.draws)") == draws

    # --- SAM: left click, shift-click, right-click, drag -----------------------------------
    g = geometry(page, SAM)
    tol = 1.0 / picture_scale(g) + 1  # a screen pixel of rounding, in picture pixels, plus the integer rounding
    clicks = [((100, 80), "left", 0, 1), ((200, 150), "left", SHIFT, 0), ((50, 160), "right", 0, 0)]
    box = (30, 20, 180, 140)
    corners = [to_screen(g, *box[:2])[:2], to_screen(g, *box[2:])[:2]]
    assert_hits(page, SAM, [to_screen(g, *xy)[:2] for xy, *_ in clicks] + corners)
    inside = to_screen(g, 150, 40)[2:]  # in the box, away from the points
    before = pixel(page, SAM, *inside)
    for (x, y), button, mods, _ in clicks:
        click(page, *to_screen(g, x, y)[:2], button=button, modifiers=mods)
    drag(page, *corners)
    extra = to_screen(g, 150, 100)[:2]  # a click on a point removes it: add one and take it away again
    assert_hits(page, SAM, [extra])
    click(page, *extra)
    assert len(json.loads(widget_value(page, SAM, "prompt"))["points"]) == len(clicks) + 1
    click(page, *extra)
    shots.append(shot("sam_clicked"))
    text = widget_value(page, SAM, "prompt")
    print(f"prompt after the clicks and the drag: {text}")
    expected = [(x, y, label) for (x, y), _, _, label in clicks]
    check_prompt(json.loads(text), expected, box, tol)
    for (x, y), _, _, label in clicks:  # drawn where clicked, in the points' colours
        rgba = pixel(page, SAM, *to_screen(g, x, y)[2:])
        assert (green if label else red)(rgba), (x, y, label, rgba)
    after = pixel(page, SAM, *inside)  # the box is only lightly tinted: the picture shows through
    assert near(before, after, 60), (before, after)

    # --- Region: a click sets x, y -----------------------------------------------------------
    gr = geometry(page, ROI)
    target = (60, 50)
    assert_hits(page, ROI, [to_screen(gr, *target)[:2]])
    click(page, *to_screen(gr, *target)[:2])
    xy = [widget_value(page, ROI, "x"), widget_value(page, ROI, "y")]
    print(f"region x, y after the click: {xy}")
    assert near(xy, target, 1.0 / picture_scale(gr) + 1) and all(isinstance(v, int) for v in xy), xy

    # the API prompt carries the same values, and nothing of the widgets themselves
    api = page.evaluate("window.app.graphToPrompt().then(p => p.output)")
    sam_in, roi_in = api[str(SAM)]["inputs"], api[str(ROI)]["inputs"]
    assert sam_in["prompt"] == text, sam_in
    assert [roi_in["x"], roi_in["y"]] == xy, roi_in
    assert not {"sie_picker", "clear points / box"} & (set(sam_in) | set(roi_in)), (sam_in, roi_in)
    shots.append(shot("roi_clicked"))

    # --- serialize, load something else, load it back ---------------------------------------
    saved = page.evaluate("window.app.graph.serialize()")
    by_id = {int(n["id"]): n for n in saved["nodes"]}
    assert by_id[SAM]["widgets_values"][:3] == [text, 0, False] and len(by_id[SAM]["widgets_values"]) == 3, \
        by_id[SAM]["widgets_values"]
    assert by_id[ROI]["widgets_values"] == [0.8, *xy], by_id[ROI]["widgets_values"]
    other = workflow()
    other["nodes"] = other["nodes"][:1]
    other["links"] = []
    other["nodes"][0]["outputs"][0]["links"] = []
    page.evaluate(f"window.app.loadGraphData({json.dumps(other)}, true, true, 'sie_other')")
    page.wait_for("window.app.graph._nodes.length === 1")
    load(page, saved)
    assert widget_value(page, SAM, "prompt") == text
    assert [widget_value(page, ROI, "x"), widget_value(page, ROI, "y")] == xy
    state = page.evaluate(f"""[{SAM}, {ROI}].map(id => {{
        const c = window.app.graph.getNodeById(id).siePicker.canvas;
        return {{draws: Number(c.dataset.draws), drawn: c.dataset.drawn}};
    }})""")
    print(f"after reload: {state}")
    assert state[0]["draws"] >= 1 and json.loads(state[0]["drawn"]) == json.loads(text), state
    assert json.loads(state[1]["drawn"])["x"] == xy[0] and json.loads(state[1]["drawn"])["y"] == xy[1], state
    g = geometry(page, SAM)
    for (x, y), _, _, label in clicks:
        rgba = pixel(page, SAM, *to_screen(g, x, y)[2:])
        assert (green if label else red)(rgba), ("after reload", x, y, label, rgba)
    shots.append(shot("reloaded"))

    # --- the clear button: drawn by the graph canvas (classic) or a <button> (Nodes 2.0) ------
    button = page.evaluate(CLEAR_BUTTON_AT)
    assert button, "no clear button on the page"
    click(page, *button)
    page.wait_for(f"{js_node(SAM)}.widgets.find(w => w.name === 'prompt').value === {json.dumps(EMPTY_PROMPT)}",
                  timeout=10)
    assert json.loads(page.evaluate(f"{js_node(SAM)}.siePicker.canvas.dataset.drawn")) == json.loads(EMPTY_PROMPT)
    shots.append(shot("cleared"))
    for s in shots:
        print(f"screenshot: {s}")
        assert s.stat().st_size > 10_000


def test_new_nodes_have_room_and_follow_their_links(page, artifacts):
    """Nodes added from the menu get a usable canvas; it says what is missing until a picture is connected,
    and shows the picture as soon as a Load Image node is linked."""
    empty = {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [], "config": {},
             "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}
    page.evaluate(f"window.app.loadGraphData({json.dumps(empty)}, true, true, 'sie_new_nodes')")
    page.wait_for("window.app.graph._nodes.length === 0")
    ids = page.evaluate("""(() => [['LoadImage', 120], ['SIE_SAMSegment', 470], ['SIE_SinDDMGuideROI', 900]].map(([t, x]) => {
        const n = window.LiteGraph.createNode(t);
        n.pos = [x, 120];
        window.app.graph.add(n);
        return n.id;
    }))()""")
    load_id, sam_id, roi_id = ids
    for nid in (sam_id, roi_id):
        page.wait_for(f"{js_node(nid)}.siePicker.canvas.dataset.state === 'no-image'", timeout=30)
    sizes = page.evaluate(f"[{sam_id}, {roi_id}].map(id => (c => [c.clientWidth, c.clientHeight])"
                          "(window.app.graph.getNodeById(id).siePicker.canvas))")
    print(f"new nodes' canvases: {sizes}")
    assert all(w >= 250 and h >= 120 for w, h in sizes), sizes
    page.evaluate(f"""(() => {{
        const src = {js_node(load_id)};
        src.widgets.find(w => w.name === 'image').value = {json.dumps(IMAGE.name)};
        src.connect(0, {js_node(sam_id)}, {js_node(sam_id)}.findInputSlot('image'));
        src.connect(0, {js_node(roi_id)}, {js_node(roi_id)}.findInputSlot('target'));
    }})()""")
    for nid in (sam_id, roi_id):
        page.wait_for(f"{js_node(nid)}.siePicker.canvas.dataset.state === 'ready'", timeout=30)
    shot = page.screenshot(artifacts / f"picker_{page.renderer}_new_nodes.png")
    print(f"screenshot: {shot}")


def test_picker_maps_through_image_scale(page, artifacts):
    """Load Image (250x200) -> ImageScale (512x512, crop center) -> Segment / Region: the picture shown is the
    250x200 one, the numbers are in pixels of the 512x512 image the nodes get."""
    load(page, scaled_workflow())
    shot = lambda name: page.screenshot(artifacts / f"picker_{page.renderer}_scaled_{name}.png")  # noqa: E731
    shots = [shot("loaded")]
    cx, cy, kx, ky = scale_center(W, H, *SCALED)
    assert (cx, cy) == (25, 0)  # 250x200 -> 512x512: 25 columns cut from each side, then 200x200 -> 512x512

    def to_node(x: float, y: float) -> list[int]:
        """Picture position -> the pixel of the scaled image it falls in (floor, inside it), as SAM gets it."""
        return [min(max(math.floor((x - cx) * kx), 0), SCALED[0] - 1),
                min(max(math.floor((y - cy) * ky), 0), SCALED[1] - 1)]

    def to_corner(x: float, y: float) -> list[int]:
        """Picture position -> the nearest pixel corner of the scaled image, as the region's x, y."""
        return [round((x - cx) * kx), round((y - cy) * ky)]

    def to_picture(x: float, y: float) -> tuple[float, float]:
        return x / kx + cx, y / ky + cy

    for nid in (SAM, ROI):
        t = json.loads(page.evaluate(f"{js_node(nid)}.siePicker.canvas.dataset.transform"))
        print(f"node {nid} transform: {t}")
        assert t["exact"] and t["size"] == list(SCALED), t
        assert near(t["m"], (kx, 0, 0, ky), 1e-9) and near(t["o"], (-cx * kx, -cy * ky), 1e-9), t
    sam_t = json.loads(page.evaluate(f"{js_node(SAM)}.siePicker.canvas.dataset.transform"))
    assert near(sam_t["visible"], (cx, cy, W - cx, H - cy), 1e-9), sam_t

    # the sides ImageScale cuts off are dimmed, the rest is the picture as it is
    g = geometry(page, SAM)
    for x, y in ((12, 40), (W - 12, 100)):
        shown, source = patch_means(page, SAM, g, x, y)
        print(f"cut-off side at ({x}, {y}): shown {shown:.0f}, picture {source:.0f}")
        assert source > 200 and shown < 0.6 * source, (x, y, shown, source)
    for x, y in ((40, 40), (175, 50), (200, 150)):
        shown, source = patch_means(page, SAM, g, x, y)
        assert abs(shown - source) < 0.15 * source + 20, ("kept part", x, y, shown, source)

    # --- SAM: clicks write pixels of the 512x512 image -------------------------------------
    tol = kx / picture_scale(g) + 1  # a screen pixel, in scaled pixels, plus the integer rounding
    clicks = [((W / 2, H / 2), 0, 1), ((60, 50), 0, 1), ((200, 170), SHIFT, 0), ((10, 100), 0, 1)]
    assert_hits(page, SAM, [to_screen(g, *xy)[:2] for xy, *_ in clicks])
    for (x, y), mods, _ in clicks:
        click(page, *to_screen(g, x, y)[:2], modifiers=mods)
    text = widget_value(page, SAM, "prompt")
    print(f"prompt after clicks on the scaled picture: {text}")
    expected = [(*to_node(x, y), label) for (x, y), _, label in clicks]
    assert expected[0] == (256, 256, 1) and expected[3][0] == 0, expected  # the centre; the dimmed side's edge
    check_prompt(json.loads(text), expected, None, tol)
    shots.append(shot("sam_clicked"))
    # a click on a drawn point still removes it (hit test on the picture, through the inverse transform)
    click(page, *to_screen(g, *clicks[1][0])[:2])
    assert len(json.loads(widget_value(page, SAM, "prompt"))["points"]) == len(clicks) - 1

    # --- a point and a box typed into the prompt are drawn where they lie on the picture ------
    typed = {"points": [[384, 128, 1], [128, 400, 0]], "box": [64, 32, 448, 480]}
    box_at = page.evaluate(f"""(() => {{  // the prompt's text box: the widget's own, or Nodes 2.0's
        const el = document.querySelector('[data-node-id="{SAM}"] textarea')
                   || {js_node(SAM)}.widgets.find(w => w.name === 'prompt').element;
        el.focus();
        el.select();
        const r = el.getBoundingClientRect();
        return document.activeElement === el && [r.left + r.width / 2, r.top + r.height / 2];
    }})()""")
    assert box_at, "the prompt's text box cannot be focused"
    page.call("Input.insertText", {"text": json.dumps(typed)})  # typed: the text box's own input events
    page.wait_for(f"{js_node(SAM)}.widgets.find(w => w.name === 'prompt').value === {json.dumps(json.dumps(typed))}",
                  timeout=10)
    page.wait_for(f"(d => d && JSON.stringify(JSON.parse(d)) === {json.dumps(json.dumps(typed, separators=(',', ':')))})"
                  f"({js_node(SAM)}.siePicker.canvas.dataset.drawn)", timeout=10)
    for x, y, label in typed["points"]:  # drawn on the centre of the pixel SAM reads
        px, py = to_picture(x + 0.5, y + 0.5)
        rgba = pixel(page, SAM, *to_screen(g, px, py)[2:])
        print(f"typed point {x, y} -> picture ({px:.1f}, {py:.1f}): {rgba}")
        assert (green if label else red)(rgba), (x, y, label, px, py, rgba)
    x0, y0, x1, y1 = typed["box"]
    (a, b), (c, d) = to_picture(x0 + 0.5, y0 + 0.5), to_picture(x1 + 0.5, y1 + 0.5)
    for ex, ey in (((a + c) / 2, b), ((a + c) / 2, d), (a, (b + d) / 2), (c, (b + d) / 2)):  # its edges
        rgba = pixel(page, SAM, *to_screen(g, ex, ey)[2:])
        assert rgba[2] > 150 and rgba[2] > rgba[0] + 40, ("box edge", ex, ey, rgba)
    shots.append(shot("sam_typed"))

    # --- the region: x, y in the scaled image's pixels ---------------------------------------
    gr = geometry(page, ROI)
    target = (60, 50)
    assert_hits(page, ROI, [to_screen(gr, *target)[:2]])
    click(page, *to_screen(gr, *target)[:2])
    xy = [widget_value(page, ROI, "x"), widget_value(page, ROI, "y")]
    print(f"region x, y after a click at picture {target}: {xy}")
    assert near(xy, to_corner(*target), kx / picture_scale(gr) + 1) and all(isinstance(v, int) for v in xy), xy
    drawn = json.loads(page.evaluate(f"{js_node(ROI)}.siePicker.canvas.dataset.drawn"))
    assert drawn["size"] == list(SCALED), drawn  # the target is the whole 512x512 image

    api = page.evaluate("window.app.graphToPrompt().then(p => p.output)")
    assert api[str(SAM)]["inputs"]["prompt"] == json.dumps(typed), api[str(SAM)]
    assert [api[str(ROI)]["inputs"]["x"], api[str(ROI)]["inputs"]["y"]] == xy, api[str(ROI)]
    shots.append(shot("roi_clicked"))
    for s in shots:
        print(f"screenshot: {s}")
        assert s.stat().st_size > 10_000


def test_picker_maps_flips_and_flags_nodes_it_cannot_follow(page, artifacts):
    """Through the real frontend's nodes: an ImageFlip is mapped (a click lands on the mirrored pixel), an
    upscale model, which has no size widgets, is not followed (the amber note names it), and a bypassed
    ImageFlip hands the picture on unchanged."""
    load(page, flip_workflow())
    g = geometry(page, SAM)
    tol = 1.0 / picture_scale(g) + 1
    target = (60.5, 50.5)  # the centre of picture pixel (60, 50): pixel (189, 50) of the flipped image
    assert_hits(page, SAM, [to_screen(g, *target)[:2]])
    click(page, *to_screen(g, *target)[:2])
    text = widget_value(page, SAM, "prompt")
    print(f"prompt after a click on picture pixel (60, 50): {text}")
    check_prompt(json.loads(text), [(W - 1 - 60, 50, 1)], None, tol)
    rgba = pixel(page, SAM, *to_screen(g, *target)[2:])  # drawn back where it was clicked
    assert green(rgba), rgba
    t = json.loads(page.evaluate(f"{js_node(SAM)}.siePicker.canvas.dataset.transform"))
    print(f"through ImageFlip: {t}")
    assert page.evaluate(f"{js_node(SAM)}.siePicker.canvas.dataset.note").startswith("points in the 250")
    assert t["exact"] and t["m"] == [-1, 0, 0, 1] and t["o"] == [W, 0] and t["size"] == [W, H], t

    roi = json.loads(page.evaluate(f"{js_node(ROI)}.siePicker.canvas.dataset.transform"))
    note = page.evaluate(f"{js_node(ROI)}.siePicker.canvas.dataset.note")
    print(f"through ImageUpscaleWithModel: {roi}; note: {note}")
    assert roi["exact"] is False and note.startswith("not followed:") and "Upscale" in note, (roi, note)
    page.screenshot(artifacts / f"picker_{page.renderer}_flip_upscale.png")

    page.evaluate(f"{js_node(FLIP)}.mode = 4; {js_node(SAM)}.siePicker && {js_node(SAM)}.onConnectionsChange?.()")
    page.wait_for(f"JSON.parse({js_node(SAM)}.siePicker.canvas.dataset.transform || '{{}}').m?.join() === '1,0,0,1'",
                  timeout=10)
    assert page.evaluate(f"{js_node(SAM)}.siePicker.canvas.dataset.note") == ""
