"""The canvas picker's mapping functions (web/picker.js), run in Node (tests/js/picker_harness.mjs).

The picker shows the picture of the Load Image node upstream and writes SAM prompts in pixels of the
image that reaches Segment (SAM points / box); between the two it follows only the nodes it knows:
those it maps (ImageScale, ImageScaleBy, ImageScaleToTotalPixels, ImageScaleToMaxDimension, ImageCrop,
ImagePadForOutpaint, ResizeAndPadImage, ImageFlip, ImageRotate) and those known to keep the image as it is.
Any other node (an upscale model, a stitch, a custom node) is unknown: the transform says it is not exact
and names it (the amber note on the canvas).  A click goes into the prompt as the pixel it falls in
(floor, clamped to the image), which is how SAM reads points.

Expected values here are worked out by hand from ComfyUI's node code (cited per case); the integration
tier (tests/integration/test_picker_geometry_comfy.py) checks the same mapping against the real nodes of
both ComfyUI versions.  Needs Node.js >= 20.6 (module hooks); skipped, saying so, without it.
"""

from __future__ import annotations

import math

import pytest
from picker_js import node_skip_reason, run_js

pytestmark = pytest.mark.skipif(node_skip_reason() is not None, reason=node_skip_reason() or "")


def js(call: dict):
    return run_js([call])[0]


def node(ntype: str, widgets: dict | None = None, image_from=None, **extra) -> dict:
    inputs = [{"name": "image", "type": "IMAGE", "from": image_from}] if image_from is not None else []
    return {"type": ntype, "widgets": widgets or {}, "inputs": inputs, **extra}


def chain_call(*nodes: dict, w: int = 250, h: int = 200, points=(), roi: bool = False) -> dict:
    """Load Image (1) -> nodes (2, 3, ...) -> Segment; the picker's walk from Segment's image input."""
    graph = {"1": {"type": "LoadImage", "title": "photo", "picture": True}}
    for i, n in enumerate(nodes, start=2):
        n = dict(n)
        if not any(inp.get("type") == "IMAGE" for inp in n.get("inputs", [])):
            n["inputs"] = [*n.get("inputs", []), {"name": "image", "type": "IMAGE", "from": str(i - 1)}]
        graph[str(i)] = n
    last = len(nodes) + 1
    graph["sam"] = {"type": "SIE_SAMSegment", "inputs": [{"name": "sam", "type": "SIE_SAM"},
                                                         {"name": "image", "type": "IMAGE", "from": str(last)}]}
    return {"fn": "chain", "graph": graph, "node": "sam", "input": "image", "w": w, "h": h,
            "points": [list(p) for p in points], "roi": roi}


def chain(*nodes: dict, **kw) -> dict:
    return js(chain_call(*nodes, **kw))


# ------------------------------------------------------------------------------------------
# Which nodes are followed
# ------------------------------------------------------------------------------------------
def test_a_node_without_width_height_widgets_is_not_assumed_to_keep_the_size():
    """An upscale model (no width / height widgets: its factor is the model's) between the picture and the
    segmenter: the old picker took every such node as keeping the geometry and wrote picture pixels as
    if exact; now the node is unknown, the transform is not exact and names it (the amber note)."""
    upscaler = {"type": "ImageUpscaleWithModel", "title": "Upscale Image (using Model)",
                "inputs": [{"name": "upscale_model", "type": "UPSCALE_MODEL", "from": "9"},
                           {"name": "image", "type": "IMAGE", "from": "1"}]}
    got = chain(upscaler)
    assert got["picture"] == "photo.png"
    assert got["steps"] == [{"kind": "unknown", "title": "Upscale Image (using Model)"}]
    assert got["t"]["exact"] is False and got["t"]["unknown"] == ["Upscale Image (using Model)"]
    # other nodes without size widgets: a stitch, a custom node with no widgets at all, a group/subgraph node
    types = ("ImageStitch", "SomePack_ColorMatch", "b6a7c2e0-subgraph", "ImageUpscaleWithModel")
    steps = run_js([{"fn": "stepOf", "node": node(t)} for t in types])
    assert [s["kind"] for s in steps] == ["unknown"] * len(types), steps
    # and one with them (unchanged from before)
    assert js({"fn": "stepOf", "node": node("SomePack_Resize", {"width": 512, "height": 512})})["kind"] == "unknown"


def test_nodes_known_to_keep_the_image_and_bypassed_nodes_are_passed_over():
    types = ("Reroute", "ImageInvert", "ImageBlur", "ImageCompositeMasked", "ImageBlend")
    answers = run_js([chain_call(node(t, {"blur_radius": 3} if t == "ImageBlur" else {}), points=[(10.5, 20.5)])
                      for t in types])
    for ntype, got in zip(types, answers):
        assert got["steps"][0]["kind"] == "same" and got["t"]["exact"] is True, (ntype, got)
        assert got["t"]["m"] == [1, 0, 0, 1] and got["t"]["o"] == [0, 0] and got["pixel"] == [[10, 20]], ntype
    # a bypassed ImageScale hands its input on unchanged (LiteGraph mode 4); the same node active scales
    scale = {"width": 500, "height": 400, "crop": "disabled", "upscale_method": "nearest-exact"}
    bypassed = chain(node("ImageScale", scale, mode=4), points=[(10.5, 20.5)])
    assert bypassed["t"]["exact"] and bypassed["pixel"] == [[10, 20]], bypassed
    active = chain(node("ImageScale", scale), points=[(10.5, 20.5)])
    assert active["t"]["exact"] and active["pixel"] == [[21, 41]], active


def test_a_mapped_node_fed_through_a_link_is_not_followed():
    flip = node("ImageFlip", {"flip_method": "y-axis: horizontally"})
    flip["inputs"] = [{"name": "flip_method", "type": "COMBO", "from": "7", "widget": True}]
    assert js({"fn": "stepOf", "node": flip})["kind"] == "unknown"
    # an option not known here (a newer ComfyUI's) is not guessed at either
    assert js({"fn": "stepOf", "node": node("ImageScale", {"width": 64, "height": 64, "crop": "top"})})["kind"] \
        == "unknown"


def test_every_node_kept_as_same_is_named_and_every_mapped_kind_is_handled():
    constants = js({"fn": "constants"})
    assert "Reroute" in constants["KEEPS_SIZE"] and "ImageUpscaleWithModel" not in constants["KEEPS_SIZE"]
    for ntype in ("ImageScaleToTotalPixels", "ImagePadForOutpaint", "ImageFlip", "ImageRotate", "ImageScale",
                  "ImageScaleBy", "ImageCrop"):
        assert ntype in constants["GEOMETRY"], ntype
    assert not set(constants["KEEPS_SIZE"]) & set(constants["GEOMETRY"])


# ------------------------------------------------------------------------------------------
# Where a click goes
# ------------------------------------------------------------------------------------------
def test_a_click_goes_to_sam_as_the_pixel_it_falls_in():
    """floor(position), clamped to 0 ... size - 1 (the old picker rounded and clamped to size: a click on the
    right half of pixel 20 gave 21, one on the far edge gave 56, a pixel the 56 px image does not have)."""
    got = chain(w=56, h=40, points=[(20.9, 12.9), (20.1, 12.1), (0.2, 0.7), (55.99, 39.99), (56, 40), (-3, -1)])
    assert got["t"]["exact"] and got["steps"] == []
    assert got["pixel"] == [[20, 12], [20, 12], [0, 0], [55, 39], [55, 39], [0, 0]]
    # through a 2x scale (ImageScaleBy): picture (10.3, 5.2) is at (20.6, 10.4) in the scaled image
    got = chain(node("ImageScaleBy", {"scale_by": 2.0}), w=56, h=40, points=[(10.3, 5.2), (55.9, 39.9)])
    assert got["t"]["size"] == [112, 80] and got["pixel"] == [[20, 10], [111, 79]]


# ------------------------------------------------------------------------------------------
# The mapped nodes, from ComfyUI's code
# ------------------------------------------------------------------------------------------
W, H = 61, 47  # an odd picture size, so that centres, halves and turns are not symmetric by accident


def centre(x: int, y: int) -> tuple[float, float]:
    return (x + 0.5, y + 0.5)


def test_flips_and_quarter_turns():
    """ImageFlip: "x-axis: vertically" is torch.flip(dims=[1]) (rows), "y-axis: horizontally" dims=[2]
    (columns); ImageRotate: torch.rot90(k, dims=[2, 1]) on [B, H, W, C], i.e. k clockwise quarter turns:
    pixel (x, y) of a W x H image goes to (H - 1 - y, x) for 90 degrees, (W - 1 - x, H - 1 - y) for 180 and
    (y, W - 1 - x) for 270."""
    p = centre(5, 7)
    cases = [
        (node("ImageFlip", {"flip_method": "x-axis: vertically"}), [W, H], [5, H - 1 - 7]),
        (node("ImageFlip", {"flip_method": "y-axis: horizontally"}), [W, H], [W - 1 - 5, 7]),
        (node("ImageRotate", {"rotation": "none"}), [W, H], [5, 7]),
        (node("ImageRotate", {"rotation": "90 degrees"}), [H, W], [H - 1 - 7, 5]),
        (node("ImageRotate", {"rotation": "180 degrees"}), [W, H], [W - 1 - 5, H - 1 - 7]),
        (node("ImageRotate", {"rotation": "270 degrees"}), [H, W], [7, W - 1 - 5]),
    ]
    answers = run_js([chain_call(n, w=W, h=H, points=[p]) for n, _, _ in cases])
    for (n, size, pixel), got in zip(cases, answers):
        label = f"{n['type']} {n['widgets']}"
        assert got["t"]["exact"] and got["t"]["size"] == size and got["pixel"] == [pixel], (label, got)
        assert got["back"][0] == pytest.approx(p), label  # the inverse draws the point where it was clicked


def test_scale_to_total_pixels_and_max_dimension_and_pads():
    # ImageScaleToTotalPixels, ComfyUI 0.8.0 (resolution_steps): total = mp * 1024^2 (a float),
    # width = round(W * k / steps) * steps with k = sqrt(total / (W * H))
    k = math.sqrt(0.05 * 1024 * 1024 / (W * H))
    want = [round(W * k / 8) * 8, round(H * k / 8) * 8]
    got = chain(node("ImageScaleToTotalPixels", {"megapixels": 0.05, "resolution_steps": 8}), w=W, h=H)
    assert got["t"]["size"] == want == [264, 200], got["t"]
    assert got["t"]["m"] == pytest.approx([want[0] / W, 0, 0, want[1] / H])
    # ComfyUI 0.3.64 (no resolution_steps widget): total = int(mp * 1024^2), width = round(W * k)
    k = math.sqrt(int(0.05 * 1024 * 1024) / (W * H))
    got = chain(node("ImageScaleToTotalPixels", {"megapixels": 0.05}), w=W, h=H)
    assert got["t"]["size"] == [round(W * k), round(H * k)] == [261, 201], got["t"]
    # ImageScaleToMaxDimension: the longer side to largest_size, the other round(ratio * largest_size)
    got = chain(node("ImageScaleToMaxDimension", {"largest_size": 100}), w=W, h=H)
    assert got["t"]["size"] == [100, round(H / W * 100)]
    # ImagePadForOutpaint: the image at (left, top) of a (W + left + right) x (H + top + bottom) one
    got = chain(node("ImagePadForOutpaint", {"left": 8, "top": 16, "right": 0, "bottom": 24, "feathering": 40}),
                w=W, h=H, points=[centre(5, 7)])
    assert got["t"]["size"] == [W + 8, H + 40] and got["pixel"] == [[13, 23]], got
    # ResizeAndPadImage: scale = min(tw / W, th / H), new = int(W * scale) (truncated: 64.89 -> 64), centred by
    # (t - new) // 2
    got = run_js([chain_call(node("ResizeAndPadImage", {"target_width": tw, "target_height": th}), w=W, h=H,
                             points=[centre(0, 0)]) for tw, th in ((100, 100), (100, 50))])
    for (tw, th), answer in zip(((100, 100), (100, 50)), got):
        s = min(tw / W, th / H)
        nw, nh = int(W * s), int(H * s)
        assert answer["t"]["size"] == [tw, th], answer["t"]
        assert answer["t"]["m"] == pytest.approx([nw / W, 0, 0, nh / H]), answer["t"]
        assert answer["t"]["o"] == [(tw - nw) // 2, (th - nh) // 2] and answer["pixel"] == [answer["t"]["o"]], answer
    assert int(W * min(100 / W, 50 / H)) == 64 != round(W * min(100 / W, 50 / H))  # the case tells them apart


def test_a_chain_composes_and_dims_what_the_crops_cut_away():
    """Crop (5, 7, 40 x 30) -> quarter turn -> pad: a picture pixel inside the crop lands where the three
    steps put it one after the other; the visible part of the picture is the crop's rectangle."""
    got = chain(node("ImageCrop", {"width": 40, "height": 30, "x": 5, "y": 7}),
                node("ImageRotate", {"rotation": "90 degrees"}),
                node("ImagePadForOutpaint", {"left": 8, "top": 0, "right": 8, "bottom": 0}),
                w=W, h=H, points=[centre(10, 12)])
    # crop: (10, 12) -> (5, 5) in a 40 x 30 image; turn: (30 - 1 - 5, 5) = (24, 5) in 30 x 40; pad: (32, 5)
    assert got["t"]["exact"] and got["t"]["size"] == [46, 40] and got["pixel"] == [[32, 5]], got
    assert got["t"]["visible"] == [5, 7, 45, 37]
    assert got["t"]["via"] == ["ImageCrop", "ImageRotate", "ImagePadForOutpaint"]
