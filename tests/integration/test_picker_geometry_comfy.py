"""The canvas picker's geometry (web/picker.js, run in Node.js) against the real nodes of a ComfyUI server.

The picker writes SAM prompts in pixels of the image that reaches Segment (SAM points / box), which it
knows only from the widget values of the nodes between the picture and the segmenter.  Here every node it
maps runs in a real ComfyUI (alone and in chains) on a picture whose pixels encode their own position
(R = 4x + 2, G = 4y + 2, B = 200; resized with "nearest-exact", which copies pixels), and for every pixel q
of each result the picker's inverse transform of q's centre must fall in the picture pixel that ComfyUI put
there (the padding, which shows no picture pixel, must map outside the picture), and the picker's size must be
the result's (and the part of the picture it says the crops keep is the part that shows).  Every node the picker passes over as keeping the image (KEEPS_SIZE) runs too, on the picture
and other inputs of another size, and must give out an image of the picture's size.

Needs COMFYUI_DIR and Node.js >= 20.6; skipped, saying which is missing, otherwise.
"""

from __future__ import annotations

import io
import json
import urllib.parse
import urllib.request

import numpy as np
import pytest
from picker_js import node_skip_reason, run_js
from PIL import Image

from comfy_server import ComfyServer, skip_reason
from core.client import ComfyClient

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
              pytest.mark.skipif(node_skip_reason() is not None, reason=node_skip_reason() or "")]

W, H = 61, 47  # odd, and not square: centres, halves and turns are not symmetric by accident
PICTURE = "sie_position_61x47.png"
MARK = 200     # the blue of every picture pixel (the paddings are 0.5 grey, black or white)

# (name, [(node type, widget values), ...]) run from the picture, in order; "nearest-exact" copies pixels
SCALE = {"upscale_method": "nearest-exact"}
CASES = [
    ("scale_center", [("ImageScale", {**SCALE, "width": 80, "height": 80, "crop": "center"})]),
    ("scale_aspect", [("ImageScale", {**SCALE, "width": 0, "height": 100, "crop": "disabled"})]),
    ("scale_down_center", [("ImageScale", {**SCALE, "width": 40, "height": 20, "crop": "center"})]),
    ("scale_by", [("ImageScaleBy", {**SCALE, "scale_by": 1.7})]),
    ("total_pixels", [("ImageScaleToTotalPixels", {**SCALE, "megapixels": 0.02, "resolution_steps": 8})]),
    ("max_dimension", [("ImageScaleToMaxDimension", {**SCALE, "largest_size": 90})]),
    ("crop", [("ImageCrop", {"width": 30, "height": 20, "x": 5, "y": 7})]),
    ("crop_clipped", [("ImageCrop", {"width": 100, "height": 100, "x": 50, "y": 40})]),
    ("pad", [("ImagePadForOutpaint", {"left": 8, "top": 16, "right": 0, "bottom": 24, "feathering": 0})]),
    ("resize_pad", [("ResizeAndPadImage", {"target_width": 100, "target_height": 50, "padding_color": "black",
                                           "interpolation": "nearest-exact"})]),
    ("flip_rows", [("ImageFlip", {"flip_method": "x-axis: vertically"})]),
    ("flip_columns", [("ImageFlip", {"flip_method": "y-axis: horizontally"})]),
    ("rotate_90", [("ImageRotate", {"rotation": "90 degrees"})]),
    ("rotate_180", [("ImageRotate", {"rotation": "180 degrees"})]),
    ("rotate_270", [("ImageRotate", {"rotation": "270 degrees"})]),
    ("chain", [("ImageCrop", {"width": 50, "height": 40, "x": 3, "y": 2}),
               ("ImageRotate", {"rotation": "90 degrees"}),
               ("ImageScale", {**SCALE, "width": 64, "height": 96, "crop": "center"}),
               ("ImagePadForOutpaint", {"left": 8, "top": 0, "right": 16, "bottom": 8, "feathering": 0}),
               ("ImageFlip", {"flip_method": "y-axis: horizontally"}),
               ("ImageInvert", {}), ("ImageInvert", {})]),
]


def position_picture() -> Image.Image:
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    rgb = np.stack([4 * x + 2, 4 * y + 2, np.full_like(x, MARK)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def decode(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(picture pixel [h, w, 2] as (x, y), is-picture [h, w]) of a result (8-bit rounding tolerated)."""
    rgb = rgb.astype(np.int64)
    inside = np.abs(rgb[..., 2] - MARK) <= 3
    return np.rint((rgb[..., :2] - 2) / 4).astype(np.int64), inside


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("picture") / PICTURE
    position_picture().save(path)
    with ComfyServer() as srv:
        ComfyClient(srv.url).upload_image(path)
        yield srv


def inputs_of(info: dict, ntype: str) -> dict:
    return info[ntype]["input"].get("required", {})


def options(decl) -> list | None:
    """A COMBO input's options in either /object_info form, else None."""
    if isinstance(decl[0], list):
        return decl[0]
    if decl[0] == "COMBO":
        return (decl[1] if len(decl) > 1 else {}).get("options")
    return None


def run(server, prompt: dict) -> dict:
    result = ComfyClient(server.url).run(prompt, timeout=600)
    assert result.status == "success", result.error
    return result.outputs


def fetch(server, image: dict) -> np.ndarray:
    q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                "type": image.get("type", "output")})
    with urllib.request.urlopen(f"{server.url}/view?{q}", timeout=60) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def test_mapped_nodes_agree_with_comfyui_pixel_for_pixel(server):
    info = server.get("/object_info")
    version = server.get("/system_stats")["system"].get("comfyui_version", "?")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": PICTURE}}}
    chains = {}
    for c, (name, steps) in enumerate(CASES):
        upstream, nodes = ["1", 0], []
        for s, (ntype, values) in enumerate(steps):
            have = inputs_of(info, ntype)
            values = {k: v for k, v in values.items() if k in have}  # e.g. resolution_steps, 0.8.0 only
            missing = [k for k, d in have.items() if k not in values and k != "image" and d[0] != "IMAGE"]
            assert not missing, f"{name}: {ntype} on ComfyUI {version} also needs {missing}"
            nid = f"{c + 2}_{s}"
            prompt[nid] = {"class_type": ntype, "inputs": {"image": upstream, **values}}
            upstream = [nid, 0]
            nodes.append({"type": ntype, "widgets": values})
        prompt[f"save_{c}"] = {"class_type": "SaveImage", "inputs": {"images": upstream, "filename_prefix": name}}
        chains[name] = nodes
    outputs = run(server, prompt)

    calls, results = [], {}
    for c, (name, _) in enumerate(CASES):
        rgb = fetch(server, outputs[f"save_{c}"]["images"][0])
        results[name] = rgb
        h, w = rgb.shape[:2]
        graph = {"1": {"type": "LoadImage", "title": "picture", "picture": True}}
        for i, n in enumerate(chains[name], start=2):
            graph[str(i)] = {**n, "inputs": [{"name": "image", "type": "IMAGE", "from": str(i - 1)}]}
        graph["sam"] = {"type": "SIE_SAMSegment",
                        "inputs": [{"name": "image", "type": "IMAGE", "from": str(len(chains[name]) + 1)}]}
        centres = [[x + 0.5, y + 0.5] for y in range(h) for x in range(w)]
        calls.append({"fn": "chain", "graph": graph, "node": "sam", "input": "image", "w": W, "h": H,
                      "nodePoints": centres})
    answers = run_js(calls)

    report = []
    for (name, _), got in zip(CASES, answers):
        rgb = results[name]
        h, w = rgb.shape[:2]
        t = got["t"]
        assert t["exact"], (name, t)
        assert t["size"] == [w, h], f"{name}: picker says {t['size']}, ComfyUI {version} gives {w}x{h}"
        src, inside = decode(rgb)
        pic = np.floor(np.asarray(got["pic"], dtype=np.float64).reshape(h, w, 2)).astype(np.int64)
        x0, y0, x1, y1 = t["visible"]  # the part of the picture the crops keep
        on_picture = (pic[..., 0] >= x0) & (pic[..., 0] < x1) & (pic[..., 1] >= y0) & (pic[..., 1] < y1)
        assert np.array_equal(on_picture, inside), \
            f"{name}: {int((on_picture != inside).sum())} pixels where picture and padding disagree"
        wrong = inside & np.any(pic != src, axis=-1)
        report.append(f"{name}: {w}x{h}, {int(inside.sum())} picture pixels, {int(wrong.sum())} off")
        assert not wrong.any(), (f"{name}: the picker maps {int(wrong.sum())} pixels elsewhere than ComfyUI "
                                 f"{version}, e.g. node pixel {np.argwhere(wrong)[0][::-1].tolist()}")
    print(f"ComfyUI {version}:\n  " + "\n  ".join(report))


def test_nodes_kept_as_the_same_image_keep_its_size(server):
    info = server.get("/object_info")
    keep = run_js([{"fn": "constants"}])[0]["KEEPS_SIZE"]
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": PICTURE}},
              "other": {"class_type": "EmptyImage", "inputs": {"width": 33, "height": 29, "batch_size": 1,
                                                               "color": 0}}}
    checked, absent = [], []
    for ntype in keep:
        if ntype == "Reroute":  # a frontend-only node: never reaches the server
            continue
        if ntype not in info:
            absent.append(ntype)
            continue
        values, first = {}, True
        for name, decl in inputs_of(info, ntype).items():
            opts = options(decl)
            if decl[0] == "IMAGE":
                values[name] = ["1", 0] if first else ["other", 0]
                first = False
            elif decl[0] == "MASK":
                values[name] = ["1", 1]
            elif opts is not None:
                values[name] = opts[0]
            elif decl[0] in ("INT", "FLOAT", "BOOLEAN", "STRING"):
                spec = decl[1] if len(decl) > 1 else {}
                values[name] = spec.get("default", spec.get("min", 0 if decl[0] != "STRING" else ""))
            else:
                pytest.fail(f"{ntype}: cannot feed its required input {name} ({decl[0]})")
        assert not first, f"{ntype} takes no IMAGE"
        prompt[ntype] = {"class_type": ntype, "inputs": values}
        prompt[f"save_{ntype}"] = {"class_type": "SaveImage", "inputs": {"images": [ntype, 0],
                                                                         "filename_prefix": f"keep_{ntype}"}}
        checked.append(ntype)
    outputs = run(server, prompt)
    sizes = {n: fetch(server, outputs[f"save_{n}"]["images"][0]).shape[:2] for n in checked}
    print(f"kept the {W}x{H} size: {sorted(sizes)}; not on this ComfyUI: {absent}")
    assert all(s == (H, W) for s in sizes.values()), sizes
    assert len(checked) >= len(keep) - 1 - 2, f"too many of {keep} are not on this server: {absent}"
