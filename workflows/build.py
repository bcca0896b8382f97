"""Generate the bundled workflows: each graph once, written in both formats.

    python workflows/build.py            # rewrite workflows/*.json and workflows/api/*.json

A graph is described once below (node types, widget values by input name, links) and
written as the UI (litegraph, version 0.4) workflow that ComfyUI shows as a template and
as its API-format twin that ``POST /prompt`` takes.  Widget order and the extra
widget values the frontend stores (the "control after generate" value of seeds, the
upload button of image loaders) come from the node schemas: ours from the pack, core
nodes' from tests/data/comfyui_object_info.json.  The API twins live in
``workflows/api/`` so that ComfyUI's template scanner (which reads ``workflows/*.json``)
does not offer them as templates.  tests/test_workflows.py re-checks every file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "tests" / "data" / "comfyui_object_info.json"
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY = {"Note", "MarkdownNote"}
PICKERS = {"SIE_SAMSegment", "SIE_SinDDMGuideROI"}  # nodes with the canvas picker


def load_schemas() -> dict[str, dict]:
    """{node type: {"order": [names], "inputs": {name: (type, opts)}, "outputs": [(name, type)]}}."""
    core = json.loads(CONTRACT.read_text())["nodes"]
    schemas = {}
    for name, info in core.items():
        inputs = {}
        order = []
        for section in ("required", "optional"):
            for inp in info.get("input_order", {}).get(section, []):
                decl = info["input"][section][inp]
                inputs[inp] = (decl[0], decl[1] if len(decl) > 1 else {})
                order.append(inp)
        schemas[name] = {"order": order, "inputs": inputs, "display": info.get("display_name", name),
                         "outputs": list(zip(info.get("output_name", []), info.get("output", [])))}
    spec = importlib.util.spec_from_file_location("sie_pack_build", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["sie_pack_build"] = pack
    spec.loader.exec_module(pack)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        decls = cls.INPUT_TYPES()
        inputs, order = {}, []
        for section in ("required", "optional"):
            for inp, decl in decls.get(section, {}).items():
                inputs[inp] = (decl[0], decl[1] if len(decl) > 1 else {})
                order.append(inp)
        names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
        schemas[node_id] = {"order": order, "inputs": inputs, "display": pack.NODE_DISPLAY_NAME_MAPPINGS[node_id],
                            "outputs": list(zip(names, cls.RETURN_TYPES))}
    return schemas


def is_widget(typ, opts) -> bool:
    return (isinstance(typ, list) or typ in WIDGETS) and not opts.get("forceInput")


def extra_widget_values(name: str, typ, opts) -> list:
    """Values the frontend stores after a widget's own value."""
    if typ == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        return ["fixed"]
    if opts.get("image_upload"):
        return ["image"]
    return []


@dataclass(frozen=True)
class Out:
    node: int
    slot: int


@dataclass
class Node:
    id: int
    type: str
    values: dict
    title: str | None = None
    text: str | None = None  # for notes
    stage: str | None = None  # the UI group (a stage of the paper's method) the node is drawn in

    def out(self, slot: int = 0) -> Out:
        return Out(self.id, slot)


@dataclass
class Graph:
    name: str
    nodes: list[Node] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    columns: dict[str, int] = field(default_factory=dict)

    def stage(self, title: str, columns: int | None = None) -> None:
        """Nodes added from here on are drawn in the group titled ``title`` (a title used again goes back to its
        group); groups stand left to right in the order their titles first appear.  ``columns`` caps the group's
        columns: nodes deeper than that stack in its last column, which keeps a long chain from growing wide."""
        self.stages.append(title)
        if columns:
            self.columns[title] = columns

    def add(self, type_: str, title: str | None = None, **values) -> Node:
        node = Node(len(self.nodes) + 1, type_, values, title, stage=self.stages[-1] if self.stages else None)
        self.nodes.append(node)
        return node

    def note(self, text: str) -> Node:
        node = Node(len(self.nodes) + 1, "Note", {}, "Note", text)
        self.nodes.append(node)
        return node

    # -- output ------------------------------------------------------------------------
    def resolve(self, schemas) -> dict[int, dict]:
        """Per node: {"widgets": [(name, value)], "links": {name: Out}} with defaults filled in."""
        out = {}
        for n in self.nodes:
            if n.type in UI_ONLY:
                continue
            sch = schemas[n.type]
            unknown = set(n.values) - set(sch["inputs"])
            if unknown:
                raise KeyError(f"{self.name}: {n.type} has no inputs {sorted(unknown)}")
            widgets, links = [], {}
            for name in sch["order"]:
                typ, opts = sch["inputs"][name]
                v = n.values.get(name)
                if isinstance(v, Out):
                    links[name] = v
                    if is_widget(typ, opts):
                        widgets.append((name, None))
                    continue
                if is_widget(typ, opts):
                    if v is None:
                        v = opts.get("default", typ[0] if isinstance(typ, list) and typ else "")
                    widgets.append((name, v))
            out[n.id] = {"widgets": widgets, "links": links}
        return out

    def api(self, schemas) -> dict:
        resolved = self.resolve(schemas)
        prompt = {}
        for n in self.nodes:
            if n.type in UI_ONLY:
                continue
            r = resolved[n.id]
            inputs = {name: v for name, v in r["widgets"] if name not in r["links"]}
            inputs.update({name: [str(o.node), o.slot] for name, o in r["links"].items()})
            prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs,
                                 "_meta": {"title": n.title or schemas[n.type]["display"]}}
        return prompt

    def ui(self, schemas) -> dict:
        resolved = self.resolve(schemas)
        links, link_id = [], 0
        out_links: dict[tuple[int, int], list[int]] = {}
        in_links: dict[tuple[int, str], int] = {}
        for n in self.nodes:
            if n.type in UI_ONLY:
                continue
            sch = schemas[n.type]
            for name, o in resolved[n.id]["links"].items():
                link_id += 1
                src_type = schemas[self.nodes[o.node - 1].type]["outputs"][o.slot][1]
                target_slot = self._input_slots(n, sch, resolved).index(name)
                links.append([link_id, o.node, o.slot, n.id, target_slot, src_type])
                out_links.setdefault((o.node, o.slot), []).append(link_id)
                in_links[(n.id, name)] = link_id
        sizes = {n.id: self._size(n, schemas, resolved) for n in self.nodes}
        pos, groups = self.layout(resolved, sizes)
        nodes = []
        for order, n in enumerate(self.nodes):
            if n.type in UI_ONLY:
                nodes.append({"id": n.id, "type": n.type, "pos": pos[n.id], "size": sizes[n.id], "flags": {},
                              "order": order, "mode": 0, "properties": {"text": ""}, "widgets_values": [n.text],
                              "color": "#432", "bgcolor": "#653"})
                continue
            sch = schemas[n.type]
            r = resolved[n.id]
            inputs = []
            for name in self._input_slots(n, sch, resolved):
                typ, opts = sch["inputs"][name]
                entry = {"name": name, "type": "COMBO" if isinstance(typ, list) else typ,
                         "link": in_links.get((n.id, name))}
                if is_widget(typ, opts):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            outputs = [{"name": oname, "type": otype, "links": out_links.get((n.id, i), []), "slot_index": i}
                       for i, (oname, otype) in enumerate(sch["outputs"])]
            widgets_values = []
            for name, v in r["widgets"]:
                typ, opts = sch["inputs"][name]
                widgets_values.append(v if v is not None else opts.get("default"))
                widgets_values.extend(extra_widget_values(name, typ, opts))
            node = {"id": n.id, "type": n.type, "pos": pos[n.id], "size": sizes[n.id], "flags": {}, "order": order,
                    "mode": 0, "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": n.type},
                    "widgets_values": widgets_values}
            if n.title:
                node["title"] = n.title
            nodes.append(node)
        return {"last_node_id": len(self.nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
                "groups": groups, "config": {}, "extra": {"ds": fit_view(nodes, groups)}, "version": 0.4}

    @staticmethod
    def _size(n: Node, schemas, resolved) -> list[int]:
        """Generous node size: the frontend grows a node that is too small for its widgets, never shrinks it."""
        if n.type in UI_ONLY:
            return [NODE_W, 60 + 17 * (len(n.text) // 44 + n.text.count("\n"))]
        sch = schemas[n.type]
        rows = max(len(Graph._input_slots(n, sch, resolved)), len(sch["outputs"]))
        height = 10 + SLOT_H * rows
        for name, _ in resolved[n.id]["widgets"]:
            typ, opts = sch["inputs"][name]
            height += MULTILINE_H if opts.get("multiline") else WIDGET_H
            height += WIDGET_H * len(extra_widget_values(name, typ, opts))
        if n.type == "LoadImage":
            height += 160  # room for the image preview
        if n.type == "SaveImage":
            height += 100
        if n.type in PICKERS:
            height += 240  # the point / box picker (web/picker.js) fills the height left under the widgets
        return [NODE_W, height]

    def layout(self, resolved, sizes) -> tuple[dict[int, list[int]], list[dict]]:
        """One group per stage; the notes, then the groups, in reading order: left to right, a group going under the
        previous one when it is no wider and the two stay within HEIGHT (columns of a newspaper), so that the graph
        fits a screen at a zoom where LiteGraph still draws titles and widgets.

        Inside a group, columns by depth within the group (capped by ``stage(columns=)``); a node sits level with
        the first node of its group that feeds it, or lower, so a sampler and the node saving its result read as
        one row."""
        blocks = []  # (stage or None for the notes, width, height, {node id: position relative to the block})
        notes = [n for n in self.nodes if n.type in UI_ONLY]
        if notes:
            rel, y = {}, 0
            for n in notes:
                rel[n.id] = [0, y + TITLE_H]
                y += TITLE_H + sizes[n.id][1] + GAP
            blocks.append((None, max(sizes[n.id][0] for n in notes), y - GAP, rel))
        for stage in dict.fromkeys(n.stage for n in self.nodes if n.type not in UI_ONLY):
            members = [n for n in self.nodes if n.type not in UI_ONLY and n.stage == stage]
            ids = {n.id for n in members}
            srcs = {n.id: [o.node for o in resolved[n.id]["links"].values() if o.node in ids] for n in members}
            depth: dict[int, int] = {}
            for n in members:  # a node's sources were added before it
                depth[n.id] = 1 + max((depth[s_] for s_ in srcs[n.id]), default=-1)
            depth = {i: min(d, self.columns.get(stage, d + 1) - 1) for i, d in depth.items()}
            ncols = max(depth.values()) + 1
            col_y = [GROUP_TITLE_H + GROUP_PAD] * ncols
            rel = {}
            for n in members:
                c = depth[n.id]
                y = max([col_y[c]] + [rel[srcs[n.id][0]][1] - TITLE_H for _ in srcs[n.id][:1]])
                rel[n.id] = [GROUP_PAD + c * (NODE_W + COL_GAP), y + TITLE_H]
                col_y[c] = y + TITLE_H + sizes[n.id][1] + GAP
            blocks.append((stage, 2 * GROUP_PAD + ncols * NODE_W + (ncols - 1) * COL_GAP,
                           max(col_y) - GAP + GROUP_PAD, rel))
        pos: dict[int, list[int]] = {}
        groups = []
        col_x, col_w, col_bottom = MARGIN, 0, None
        for stage, w, h, rel in blocks:
            if col_bottom is not None and w <= col_w and col_bottom + GROUP_GAP + h <= HEIGHT:
                x, y = col_x, col_bottom + GROUP_GAP
            else:
                x, y = (col_x + col_w + GROUP_GAP if col_bottom is not None else MARGIN), MARGIN
                col_x, col_w = x, w
            col_bottom = y + h
            for i, (rx, ry) in rel.items():
                pos[i] = [x + rx, y + ry]
            if stage is not None:
                groups.append({"id": len(groups) + 1, "title": stage, "bounding": [x, y, w, h],
                               "color": GROUP_COLORS[len(groups) % len(GROUP_COLORS)], "font_size": 24, "flags": {}})
        return pos, groups

    @staticmethod
    def _input_slots(n: Node, sch, resolved) -> list[str]:
        """Input sockets of the node: every link-type input, plus widget inputs that are linked."""
        links = resolved[n.id]["links"]
        return [name for name in sch["order"]
                if not is_widget(*sch["inputs"][name]) or name in links]


# Layout, in canvas units.  TITLE_H is LiteGraph's NODE_TITLE_HEIGHT: a node's title bar is drawn above node.pos.
NODE_W, SLOT_H, WIDGET_H, MULTILINE_H, TITLE_H = 300, 22, 26, 100, 30
GAP, COL_GAP, GROUP_GAP, MARGIN, GROUP_PAD, GROUP_TITLE_H = 24, 50, 40, 20, 16, 46
HEIGHT = 1230  # canvas units: at LiteGraph's 0.6 zoom (below it titles and widgets are not drawn) about 720 px
GROUP_COLORS = ["#3f789e", "#8a6f3a", "#5a7a3a", "#7a4a7a", "#3a7a72"]
# Where the whole graph is shown when loaded, in canvas pixels (left, top, right, bottom): a 1920x1080 screen's
# browser window (the browser check's Chromium) holds a canvas of about 1920x937 in the newer frontends, which draw
# their side bar (70 px), tab bar and menu (90 px) over it, and of 1856x859 beside those bars in the older ones.
VIEW = (70, 90, 1836, 839)


def fit_view(nodes: list[dict], groups: list[dict]) -> dict:
    """The saved view ("ds": scale, offset) that shows the whole graph; LiteGraph draws canvas point p at
    (p + offset) * scale."""
    boxes = [(n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes]
    boxes += [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
               g["bounding"][1] + g["bounding"][3]) for g in groups]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    scale = math.floor(min(1.0, (VIEW[2] - VIEW[0]) / (x1 - x0), (VIEW[3] - VIEW[1]) / (y1 - y0)) * 1000) / 1000
    return {"scale": scale, "offset": [round(VIEW[0] / scale - x0, 1), round(VIEW[1] / scale - y0, 1)]}


# ======================================================================================
# The graphs
# ======================================================================================
PAPER_TRAIN = dict(steps=120000, batch_size=32, width=160, learning_rate=0.001, seed=0, preview_every=1000,
                   precision="auto")
CPU_HINT = ("Paper settings: 120,000 steps, batch 32, width 160 (the paper: about 7 h on an A6000). "
            "On a CPU set steps 2000, batch 8, width 64 (about 20 minutes for this 250x200 image; rough results).")
BUNDLED = "bundled with the pack in core/sinddm/data (CC0)"


def sinddm_files(images: str, clip: bool = False, saved: bool = False) -> str:
    """The note's paragraph saying which file goes where (issue 19, point 17)."""
    text = f"\n\nFiles: {images}"
    if clip:
        text += ("; an OpenCLIP checkpoint in ComfyUI/models/open_clip (open_clip_vit_b32.safetensors here: "
                 "ViT-B-32 with OpenAI weights, the paper's CLIP, e.g. open_clip_model.safetensors of "
                 "timm/vit_base_patch32_clip_224.openai saved under that name, or pick yours in Load OpenCLIP; "
                 "needs the open_clip_torch package)")
    text += ". Images larger than 50,000 pixels are trained at that size (the official cap)."
    if saved:
        text += (" Save SinDDM Model writes the trained model to ComfyUI/models/single_image_edit/sinddm; next time "
                 "load it with Load SinDDM Model instead of training again.")
    return text + " Results go to ComfyUI/output/sinddm."


TRAINING_IMAGE = f"the training image in ComfyUI/input (coffee_250x200.png here, {BUNDLED}, or your own)"


def sinddm_random_samples() -> Graph:
    g = Graph("sinddm_random_samples")
    g.note("SinDDM: train a diffusion model on ONE image, then draw random samples of any size.\n\n"
           f"{CPU_HINT}\n\nWhile ComfyUI keeps running, unchanged nodes are cached: sampling again does not retrain."
           + sinddm_files(TRAINING_IMAGE, saved=True))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.add("SIE_SaveSinDDM", model=train.out(0), filename_prefix="coffee")
    g.add("SaveImage", title="Loss curve", images=train.out(1), filename_prefix="sinddm/loss")
    g.stage("2. Sample (any size)")
    same = g.add("SIE_SinDDMSample", title="Same size", model=train.out(0), count=4, seed=0)
    g.add("SaveImage", title="Samples (training size)", images=same.out(0), filename_prefix="sinddm/samples")
    wide = g.add("SIE_SinDDMSample", title="Twice as wide", model=train.out(0), count=2, seed=100, width_scale=2.0)
    g.add("SaveImage", title="Samples (2x wide)", images=wide.out(0), filename_prefix="sinddm/wide")
    tall = g.add("SIE_SinDDMSample", title="Exact pixel size", model=train.out(0), count=2, seed=200, width=200,
                 height=320)
    g.add("SaveImage", title="Samples (200x320)", images=tall.out(0), filename_prefix="sinddm/tall")
    return g


def sinddm_roi_outpaint() -> Graph:
    g = Graph("sinddm_roi_outpaint")
    g.note("SinDDM region guidance (paper eq. 2).\n\nTop: outpainting - the whole training image is the region, "
           "placed in the middle of an output twice as wide; SinDDM invents the sides.\n\nBottom: two copies of a "
           "crop of the image (the cup) are forced at chosen places; the rest is generated around them. A region's "
           "target, mask and x, y are in pixels of the training image as loaded (a click on the region node's "
           "picture sets x, y); a larger image is scaled down with them.\n\n" + CPU_HINT
           + sinddm_files(TRAINING_IMAGE))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.stage("2. Guidance: regions (eq. 2)", columns=2)
    whole = g.add("SIE_SinDDMGuideROI", title="Region: whole image (outpaint)", target=img.out(0), strength=0.8,
                  x=125, y=0)
    g.stage("3. Sample with guidance")
    wide = g.add("SIE_SinDDMSample", title="Outpaint to 2x width", model=train.out(0), guidance=whole.out(0), count=2,
                 seed=0, width_scale=2.0)
    g.add("SaveImage", title="Outpainted", images=wide.out(0), filename_prefix="sinddm/outpaint")
    g.stage("2. Guidance: regions (eq. 2)")
    crop = g.add("ImageCrop", image=img.out(0), width=110, height=100, x=60, y=40)
    roi1 = g.add("SIE_SinDDMGuideROI", title="Region 1", target=crop.out(0), strength=0.8, x=10, y=20)
    roi2 = g.add("SIE_SinDDMGuideROI", title="Region 2", target=crop.out(0), strength=0.8, x=130, y=80,
                 guidance=roi1.out(0))
    g.stage("3. Sample with guidance")
    two = g.add("SIE_SinDDMSample", title="Two regions", model=train.out(0), guidance=roi2.out(0), count=2, seed=10)
    g.add("SaveImage", title="Region-guided", images=two.out(0), filename_prefix="sinddm/roi")
    return g


def sinddm_harmonization() -> Graph:
    g = Graph("sinddm_harmonization")
    g.note("SinDDM harmonization: a pasted object is blended into the look of the image the model was trained on "
           "(paper Sec. 4, injected at t = 5 of the finest scale).\n\nThis example pastes a flat orange square onto "
           "the training image and harmonizes it.\n\n" + CPU_HINT
           + sinddm_files(f"{TRAINING_IMAGE}; for your own edit, the composite and the mask of the pasted object "
                          "(white = object, the composite's size) in ComfyUI/input, each through a Load Image node "
                          "(the mask from its alpha or a channel) into SinDDM Harmonize's image and mask"))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.stage("2. Paste an object (composite + mask)")
    patch = g.add("EmptyImage", width=50, height=40, batch_size=1, color=0xE07020)
    comp = g.add("ImageCompositeMasked", destination=img.out(0), source=patch.out(0), x=170, y=120,
                 resize_source=False)
    base = g.add("SolidMask", value=0.0, width=250, height=200)
    obj = g.add("SolidMask", value=1.0, width=50, height=40)
    mask = g.add("MaskComposite", destination=base.out(0), source=obj.out(0), x=170, y=120, operation="add")
    g.add("SaveImage", title="Naive composite", images=comp.out(0), filename_prefix="sinddm/composite")
    g.stage("3. Harmonize (inject at t = 5)")
    harm = g.add("SIE_SinDDMInject", model=train.out(0), image=comp.out(0), mask=mask.out(0), mode="harmonization",
                 t_start=0, count=2, seed=0, match_colors=True)
    g.add("SaveImage", title="Harmonized", images=harm.out(0), filename_prefix="sinddm/harmonized")
    return g


def sinddm_style_transfer() -> Graph:
    g = Graph("sinddm_style_transfer")
    g.note("SinDDM style transfer: the model is trained on the STYLE image; the content image is colour-matched to it "
           "and injected at t = 15 of the finest scale (paper Sec. 4), so its layout stays and its textures change.\n\n"
           "The second node injects it one scale lower ('scale' = -2; the paper allows any scale): the finest scale "
           f"then re-renders it, so more of the style shows.\n\n{CPU_HINT}"
           + sinddm_files(f"the style (training) image and the content image in ComfyUI/input (coffee_250x200.png and "
                          f"coffee_128x100.png here, both {BUNDLED}, or your own)"))
    g.stage("1. Train on the style image", columns=1)
    style = g.add("LoadImage", title="Style image (training)", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=style.out(0), **PAPER_TRAIN)
    g.stage("2. Content image")
    content = g.add("LoadImage", title="Content image", image="coffee_128x100.png")
    flip = g.add("ImageFlip", image=content.out(0), flip_method="y-axis: horizontally")
    g.stage("3. Inject (style transfer)")
    out = g.add("SIE_SinDDMInject", model=train.out(0), image=flip.out(0), mode="style_transfer", t_start=0, count=2,
                seed=0, match_colors=True)
    g.add("SaveImage", title="Style transfer", images=out.out(0), filename_prefix="sinddm/style_transfer")
    lower = g.add("SIE_SinDDMInject", title="Injected one scale down", model=train.out(0), image=flip.out(0),
                  mode="style_transfer", t_start=0, count=2, seed=0, match_colors=True, scale=-2)
    g.add("SaveImage", title="Style transfer (one scale down)", images=lower.out(0),
          filename_prefix="sinddm/style_transfer_coarser")
    return g


def sinddm_text_guided() -> Graph:
    g = Graph("sinddm_text_guided")
    g.note("SinDDM text guidance with CLIP (paper Sec. 4). Content: CLIP changes what appears in a part of the "
           "image ('fill_factor'); style: the look of the finest scale.\n\nSlow on a CPU: every guided "
           f"step runs CLIP on 16 views.\n\n{CPU_HINT}" + sinddm_files(TRAINING_IMAGE, clip=True))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.stage("2. Guidance: text (CLIP)")
    clip = g.add("SIE_LoadOpenCLIP", clip_name="open_clip_vit_b32.safetensors", arch="ViT-B-32")
    content = g.add("SIE_SinDDMGuideText", title="Text: content", clip=clip.out(0), text="latte art heart",
                    mode="content", strength=0.3, fill_factor=0.3, seed=0)
    g.stage("3. Sample with guidance")
    s1 = g.add("SIE_SinDDMSample", title="Content-guided", model=train.out(0), guidance=content.out(0), count=2, seed=0)
    g.add("SaveImage", title="Text-guided content", images=s1.out(0), filename_prefix="sinddm/text_content")
    g.stage("2. Guidance: text (CLIP)")
    style = g.add("SIE_SinDDMGuideText", title="Text: style", clip=clip.out(0), text="Van Gogh", mode="style",
                  strength=0.3, fill_factor=1.0, seed=0)
    g.stage("3. Sample with guidance")
    s2 = g.add("SIE_SinDDMSample", title="Style-guided", model=train.out(0), guidance=style.out(0), count=2, seed=0)
    g.add("SaveImage", title="Text-guided style", images=s2.out(0), filename_prefix="sinddm/text_style")
    return g


def sinddm_text_roi() -> Graph:
    g = Graph("sinddm_text_roi")
    g.note("SinDDM text in a region (paper Sec. 4, Figs. 2 and S3; the official clip_roi): the pixels inside the mask "
           "(here a box over the coffee) are optimised with CLIP for 100 steps, pasted back, and 3 denoising steps "
           "of the finest scale blend them in; the rest of the image is kept.\n\nTop: the training image itself "
           "(SinDDM Edit Training Image, start = training_image). Bottom: the same guidance on random samples "
           "(it chains with other SinDDM guides).\n\nEach CLIP step runs 16 views: about a minute on a CPU for 100 "
           f"steps.\n\n{CPU_HINT}" + sinddm_files(TRAINING_IMAGE, clip=True))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.stage("2. Guidance: text in a region")
    clip = g.add("SIE_LoadOpenCLIP", clip_name="open_clip_vit_b32.safetensors", arch="ViT-B-32")
    base = g.add("SolidMask", value=0.0, width=250, height=200)
    box = g.add("SolidMask", value=1.0, width=90, height=50)
    mask = g.add("MaskComposite", title="Region: the coffee", destination=base.out(0), source=box.out(0), x=75,
                 y=45, operation="add")
    region = g.add("SIE_SinDDMGuideTextRegion", title="Text in region", clip=clip.out(0), text="latte art heart",
                   mask=mask.out(0), strength=0.1, iterations=100, denoise_steps=3, seed=0)
    g.stage("3. Edit and sample")
    edit = g.add("SIE_SinDDMEditTrainingImage", title="Edit the training image", model=train.out(0),
                 guidance=region.out(0), start="training_image", t_start=0, count=2, seed=0)
    g.add("SaveImage", title="Training image, region edited", images=edit.out(0), filename_prefix="sinddm/text_roi")
    samples = g.add("SIE_SinDDMSample", title="Random samples, region edited", model=train.out(0),
                    guidance=region.out(0), count=2, seed=0)
    g.add("SaveImage", title="Samples, region edited", images=samples.out(0),
          filename_prefix="sinddm/text_roi_samples")
    return g


def sinddm_text_style() -> Graph:
    g = Graph("sinddm_text_style")
    g.note("SinDDM text-guided style of the training image itself (paper Sec. 4 and Fig. S9; the official "
           "clip_style_trans): the training image one scale down is re-rendered at the finest scale while CLIP "
           "steers the style ('Van Gogh' + ' Style'), so the layout stays and the textures change.\n\n"
           f"{CPU_HINT}" + sinddm_files(TRAINING_IMAGE, clip=True))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.stage("2. Guidance: text style (CLIP)")
    clip = g.add("SIE_LoadOpenCLIP", clip_name="open_clip_vit_b32.safetensors", arch="ViT-B-32")
    style = g.add("SIE_SinDDMGuideText", title="Text: style", clip=clip.out(0), text="Van Gogh", mode="style",
                  strength=0.3, fill_factor=1.0, seed=0)
    g.stage("3. Re-render the training image")
    edit = g.add("SIE_SinDDMEditTrainingImage", title="Restyle the training image", model=train.out(0),
                 guidance=style.out(0), start="coarser_scale", t_start=0, count=2, seed=0)
    g.add("SaveImage", title="Training image, text style", images=edit.out(0), filename_prefix="sinddm/text_style_trans")
    return g


def imagic() -> Graph:
    g = Graph("imagic")
    g.note("Imagic (Kawar et al., CVPR 2023): edit ONE real photo from a target text.\n\n"
           "1. Optimize Text Embedding: e_tgt -> e_opt that reconstructs the photo (500 steps, lr 1e-3).\n"
           "2. Fine-Tune Model at e_opt (lora: adapters, lr 1e-4; full: every UNet weight, as the paper and the "
           "diffusers port, lr 2e-6; 1000 steps).\n3. Interpolate: e = eta*e_tgt + (1-eta)*e_opt, then sample with "
           "DDIM. SD needs eta about 0.9-1.2; the Eta Sweep renders several etas with one seed so you can pick by "
           "eye.\n\n"
           "Files: an SD 1.x checkpoint in ComfyUI/models/checkpoints (v1-5-pruned-emaonly.safetensors here); the "
           "photo in ComfyUI/input (coffee_250x200.png here, bundled with the pack in core/sinddm/data (CC0), or your "
           "own). Save Trained writes the edit (the weight delta + e_opt; precision fp16 halves a full fine-tune, "
           "3.4 -> 1.7 GB) to ComfyUI/models/single_image_edit/trained, where Load Trained and ComfyUI's Load LoRA "
           "find it; images go to ComfyUI/output/imagic.\n\n"
           "The SD ports report 5-10 minutes per edit on an A100 or a 3090; on a CPU it takes many hours.")
    g.stage("Inputs: model and photo", columns=1)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    img = g.add("LoadImage", image="coffee_250x200.png")
    scaled = g.add("ImageScale", image=img.out(0), upscale_method="lanczos", width=512, height=512, crop="center")
    g.stage("1. Target text")
    target = g.add("CLIPTextEncode", title="Target text (e_tgt)", clip=ckpt.out(1),
                   text="a photo of a cup of green matcha tea")
    negative = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    g.stage("2. Optimise embedding (stage 1)", columns=1)
    emb = g.add("SIE_OptimizeEmbedding", model=ckpt.out(0), vae=ckpt.out(2), image=scaled.out(0),
                conditioning=target.out(0), steps=500, learning_rate=0.001, seed=0)
    g.add("SaveImage", title="Embedding loss", images=emb.out(1), filename_prefix="imagic/embedding_loss")
    g.stage("3. Fine-tune (stage 2)", columns=1)
    ft = g.add("SIE_FineTune", model=ckpt.out(0), vae=ckpt.out(2), image=scaled.out(0), conditioning=emb.out(0),
               mode="lora", steps=1000, learning_rate=0.0, rank=8, seed=0)
    g.add("SaveImage", title="Fine-tuning loss", images=ft.out(1), filename_prefix="imagic/finetune_loss")
    g.add("SIE_SaveTrained", trained=ft.out(2), filename_prefix="imagic/edit")
    g.stage("4. Interpolate and sample (stage 3)", columns=3)
    mix = g.add("SIE_InterpolateConditioning", target=target.out(0), optimized=emb.out(0), eta=1.0)
    empty = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    ks = g.add("KSampler", model=ft.out(0), positive=mix.out(0), negative=negative.out(0), latent_image=empty.out(0),
               seed=0, steps=50, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    dec = g.add("VAEDecode", samples=ks.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Edited image", images=dec.out(0), filename_prefix="imagic/edit")
    sweep = g.add("SIE_EtaSweep", model=ft.out(0), target=target.out(0), optimized=emb.out(0),
                  negative=negative.out(0), latent_image=empty.out(0), etas="0.7, 0.8, 0.9, 1.0, 1.1", seed=0,
                  steps=50, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform")
    dec2 = g.add("VAEDecode", samples=sweep.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Eta sweep (0.7 ... 1.1)", images=dec2.out(0), filename_prefix="imagic/eta_sweep")
    return g


SINE_NOTE = ("SINE (Zhang et al., CVPR 2023): fine-tune SD on ONE image, then edit it with model-based guidance "
             "(eq. 3): for t > K the fine-tuned model's prediction at the fine-tune prompt c^ is mixed into the "
             "pretrained model's, w (v e(z_t, c) + (1 - v) e^(z_t, c^)) + (1 - w) e(z_t); plain CFG for t <= K.\n\n")
SINE_FILES = ("\n\nFiles: an SD 1.x checkpoint in ComfyUI/models/checkpoints (v1-5-pruned-emaonly.safetensors here); the "
              "photo in ComfyUI/input (coffee_250x200.png here, bundled with the pack in core/sinddm/data (CC0), or "
              "your own). Save SINE writes the fine-tune to ComfyUI/models/single_image_edit/sine (reload it with "
              "SINE: Load Fine-Tuned Model, which also gives back the c^ training used); images go to "
              "ComfyUI/output/sine. The fine-tune prompt is typed once, in the 'Fine-tune prompt' node: the recipe, "
              "the conditioning training uses and the guider's c^ all read it.")


def sine_inputs(g: Graph, image: str = "coffee_250x200.png"):
    g.stage("Inputs: model and photo", columns=1)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    img = g.add("LoadImage", image=image)
    scaled = g.add("ImageScale", image=img.out(0), upscale_method="lanczos", width=512, height=512, crop="center")
    return ckpt, scaled


def sine_finetune(g: Graph, ckpt: Node, image: Node, prompt: str, patches: bool, steps: int, title: str,
                  prefix: str) -> tuple[Node, Node]:
    """Recipe -> shared fine-tune node -> the fine-tune prompt through the node's CLIP output.  The prompt is
    one PrimitiveString read by the recipe and both text encodes: one source of truth for c^."""
    text = g.add("PrimitiveString", title=f"Fine-tune prompt ({title})", value=prompt)
    c_hat = g.add("CLIPTextEncode", title=f"c^ ({title})", clip=ckpt.out(1), text=text.out(0))
    recipe = g.add("SIE_SineRecipe", title=f"Recipe ({title})", prompt=text.out(0), patches=patches,
                   train_text_encoder=False, pooled_x0_weight=0.0, whole_fraction=0.0, text_learning_rate=0.0,
                   text_encoder_mode="full")
    ft = g.add("SIE_FineTune", title=f"Fine-tune ({title})", model=ckpt.out(0), vae=ckpt.out(2), image=image.out(0),
               conditioning=c_hat.out(0), mode="lora", steps=steps, learning_rate=0.0, rank=8, seed=0,
               recipe=recipe.out(0), clip=ckpt.out(1))
    g.add("SaveImage", title=f"Loss ({title})", images=ft.out(1), filename_prefix=f"{prefix}_loss")
    g.add("SIE_SaveSine", trained=ft.out(2), filename_prefix=prefix)
    # c^ through the fine-tuned CLIP (the input CLIP unless the recipe trains the text encoder)
    c_hat_ft = g.add("CLIPTextEncode", title=f"c^, tuned CLIP ({title})", clip=ft.out(3), text=text.out(0))
    return ft, c_hat_ft


def sine_sample(g: Graph, ckpt: Node, guider: Node, width: int, height: int, prefix: str, title: str) -> None:
    noise = g.add("RandomNoise", noise_seed=0)
    sampler = g.add("KSamplerSelect", sampler_name="ddim")
    sigmas = g.add("BasicScheduler", model=ckpt.out(0), scheduler="ddim_uniform", steps=100, denoise=1.0)
    empty = g.add("EmptyLatentImage", width=width, height=height, batch_size=1)
    out = g.add("SamplerCustomAdvanced", noise=noise.out(0), guider=guider.out(0), sampler=sampler.out(0),
                sigmas=sigmas.out(0), latent_image=empty.out(0))
    dec = g.add("VAEDecode", samples=out.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title=title, images=dec.out(0), filename_prefix=prefix)


def sine_edit() -> Graph:
    g = Graph("sine_edit")
    g.note(SINE_NOTE + "This graph: the paper's setting without patches: fine-tune on the 512x512 photo for 800 "
           "steps (lora here; the paper's full fine-tune: mode full, AdamW lr 1e-6), then DDIM 100 steps, cfg 7.5, "
           "v 0.7, K 400 at 512x512. The sweep renders a K x v grid from one noise (Figs. 7, 8, 19-21) so you can "
           "pick the trade-off by eye. Save SINE keeps the fine-tune (LoRA + prompt) for SINE: Load Fine-Tuned "
           "Model.\n\nThe official code also trains the text encoder, every parameter of it: turn "
           "train_text_encoder on in the recipe (text_encoder_mode full, lr 1e-6; the fine-tune node's clip output "
           "then carries it)." + SINE_FILES)
    ckpt, image = sine_inputs(g)
    g.stage("1. Fine-tune on the photo", columns=2)
    ft, c_hat = sine_finetune(g, ckpt, image, "a photo of a sks cup", False, 800, "whole image", "sine/edit")
    g.stage("2. Edit with model-based guidance", columns=3)
    target = g.add("CLIPTextEncode", title="Target text c", clip=ckpt.out(1), text="a photo of a cup of green matcha tea")
    negative = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    guider = g.add("SIE_ModelGuidance", model=ckpt.out(0), finetuned_model=ft.out(0), positive=target.out(0),
                   finetune_positive=c_hat.out(0), negative=negative.out(0), cfg=7.5, v=0.7, K=400)
    sine_sample(g, ckpt, guider, 512, 512, "sine/edit", "Edited image (v 0.7, K 400)")
    g.stage("3. K x v sweep, one noise", columns=3)
    empty = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    sweep = g.add("SIE_GuidanceSweep", model=ckpt.out(0), finetuned_model=ft.out(0), positive=target.out(0),
                  finetune_positive=c_hat.out(0), negative=negative.out(0), latent_image=empty.out(0),
                  K_values="200, 400, 600", v_values="0.5, 0.7, 0.9", seed=0, steps=100, cfg=7.5, sampler_name="ddim",
                  scheduler="ddim_uniform")
    dec = g.add("VAEDecode", samples=sweep.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Sweep (K rows, v columns)", images=dec.out(0),
          filename_prefix="sine/sweep")
    return g


def sine_any_resolution() -> Graph:
    g = Graph("sine_any_resolution")
    g.note(SINE_NOTE + "This graph: patch-based fine-tuning (paper Sec. 3.3, 10,000 steps): random crops of the photo "
           "resized to 1024x1024 (sides 10-100%, resized to 512), each with its positional map F(v). The fine-tuned "
           "MODEL carries F(v) of the whole grid, resized to any latent size, so the edit can be rendered at other "
           "resolutions and aspect ratios than the 512x512 source: here 1024x768 and 1024x512 (width x height; the "
           "paper's Figs. 4 and 13-18). The pretrained branch sees no map, as in the official code." + SINE_FILES)
    ckpt, image = sine_inputs(g)
    g.stage("1. Fine-tune on patches", columns=2)
    ft, c_hat = sine_finetune(g, ckpt, image, "a photo of a sks cup", True, 10000, "patches", "sine/patches")
    g.stage("2. Edit at other sizes", columns=3)
    target = g.add("CLIPTextEncode", title="Target text c", clip=ckpt.out(1),
                   text="a photo of a cup of coffee on a wooden table in a garden")
    negative = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    guider = g.add("SIE_ModelGuidance", model=ckpt.out(0), finetuned_model=ft.out(0), positive=target.out(0),
                   finetune_positive=c_hat.out(0), negative=negative.out(0), cfg=7.5, v=0.7, K=400)
    sine_sample(g, ckpt, guider, 1024, 768, "sine/wide_1024x768", "Edit at 1024x768")
    sine_sample(g, ckpt, guider, 1024, 512, "sine/wide_1024x512", "Edit at 1024x512")
    return g


def sine_multi_model() -> Graph:
    g = Graph("sine_multi_model")
    g.note(SINE_NOTE + "This graph: multi-model guidance (official DDIMMultiSampler, its style-transfer script, the "
           "paper's Fig. 11c): two fine-tuned models, one on the content photo ('a photo of a sks cup') and one on "
           "a painting ('a painting in the sks style'), each with its own weight. The official example gives the "
           "fine-tuned models 0.4 and 0.5 (range_t_min 400): here v = 0.1 for the pretrained model, weight_2 = 0.5 "
           "for the second model, so the first gets 1 - v - weight_2 = 0.4, both for t > K = 400. More models, each "
           "with its own weight and K: chain SINE: Add Fine-Tuned Model nodes into more_models.\n\nThe style "
           "painting is generated in the graph by the pretrained model (an expressionist oil painting: no image "
           "file needed); to use your own painting, put it in ComfyUI/input and feed a Load Image node into the "
           "style fine-tune's ImageScale instead." + SINE_FILES)
    ckpt, image = sine_inputs(g)
    g.stage("Style painting, generated", columns=2)
    painting = g.add("CLIPTextEncode", title="Painting text", clip=ckpt.out(1),
                     text="an expressionist oil painting of a landscape, thick impasto brush strokes, swirling "
                          "blue and yellow sky, canvas texture")
    no_text = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    style_guider = g.add("CFGGuider", model=ckpt.out(0), positive=painting.out(0), negative=no_text.out(0), cfg=7.5)
    noise = g.add("RandomNoise", noise_seed=7)
    sampler = g.add("KSamplerSelect", sampler_name="ddim")
    sigmas = g.add("BasicScheduler", model=ckpt.out(0), scheduler="ddim_uniform", steps=50, denoise=1.0)
    empty = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    style_latent = g.add("SamplerCustomAdvanced", noise=noise.out(0), guider=style_guider.out(0),
                         sampler=sampler.out(0), sigmas=sigmas.out(0), latent_image=empty.out(0))
    style = g.add("VAEDecode", title="Style painting", samples=style_latent.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Style painting", images=style.out(0), filename_prefix="sine/style_painting")
    style_scaled = g.add("ImageScale", image=style.out(0), upscale_method="lanczos", width=512, height=512,
                         crop="center")
    g.stage("1. Fine-tune two models", columns=2)
    ft1, c1 = sine_finetune(g, ckpt, image, "a photo of a sks cup", False, 800, "content", "sine/content")
    ft2, c2 = sine_finetune(g, ckpt, style_scaled, "a painting in the sks style", False, 800, "style", "sine/style")
    g.stage("2. Mix both into the pretrained model", columns=3)
    target = g.add("CLIPTextEncode", title="Target text c", clip=ckpt.out(1), text="a painting of a cup of coffee")
    negative = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    guider = g.add("SIE_ModelGuidance", model=ckpt.out(0), finetuned_model=ft1.out(0), positive=target.out(0),
                   finetune_positive=c1.out(0), negative=negative.out(0), cfg=7.5, v=0.1, K=400,
                   finetuned_model_2=ft2.out(0), finetune_positive_2=c2.out(0), weight_2=0.5)
    sine_sample(g, ckpt, guider, 512, 512, "sine/multi_model", "Two-model edit")
    return g


LAYER_NOTE = ("LayerDiffusion (Li, Huang, Ding, Li, SIGGRAPH Asia 2023 TC; not the LayerDiffuse transparency project): "
              "put the subject of ONE photo into a new background and edit it from one target text T = T_a + T_b.\n"
              "1. Optimize Text Embedding (with conditioning_b and the photo's SAM mask): eq. 2 as the paper writes "
              "it, one prediction with [e_a, e_b] (T_a and T_b, 154 tokens) under the photo's object mask, both "
              "optimised (Adam lr 1e-3, 500 steps). Outputs: e_opt / ê_a (here ê_a) and ê_b. The recipe's reading "
              "offers the other interpretations; separate_reference trains e_b on the reference's background "
              "(the reference image and mask are already wired to the optimiser for it).\n"
              "2. ConditioningAverage: e_opt = 0.7 ê_a + 0.3 ê_b (eq. 3; ComfyUI's node computes exactly this).\n"
              "3. Fine-Tune Model at e_opt: 2 L_obj under the photo's mask + 1 L_bg outside the reference's mask "
              "(paper: full, lr 2e-6, 250 steps; lora here). The recipe's object_mask 'target' takes L_obj's mask "
              "from O_t, as the paper writes (target_mask input).\n"
              "4. Iterative Guidance: DDIM 50 steps alternating ê_a and e_opt by step index.\n\n"
              "Files: an SD 1.x checkpoint in ComfyUI/models/checkpoints (v1-5-pruned-emaonly.safetensors here); "
              "a Segment Anything checkpoint in ComfyUI/models/sams (sam_vit_b_01ec64.pth here; needs the "
              "segment-anything package); the photo in ComfyUI/input (coffee_250x200.png here, bundled with the "
              "pack in core/sinddm/data, or your own). Masks: click points and drag a box on the Segment node's "
              "picture, or edit its JSON prompt.")


def layer_stages(g: Graph, ckpt: Node, photo: Node, sam: Node, reference: Node, reference_mask: Node,
                 t_a: str, t_b: str, prefix: str, target_mask: Node | None = None) -> None:
    g.stage("1. Layered text embeddings", columns=2)
    mask = g.add("SIE_SAMSegment", title="Object mask of the photo", sam=sam.out(0), image=photo.out(0),
                 prompt='{"points": [[256, 256, 1]], "box": [96, 64, 416, 480]}', dilate=0, invert=False)
    e_a = g.add("CLIPTextEncode", title="T_a (object)", clip=ckpt.out(1), text=t_a)
    e_b = g.add("CLIPTextEncode", title="T_b (background)", clip=ckpt.out(1), text=t_b)
    recipe = g.add("SIE_LayerRecipe", lambda_obj=2.0, lambda_bg=1.0, object_source="image",
                   background_source="reference", reading="concat", reduction="image", mask_rule="area",
                   object_mask="image")
    emb = g.add("SIE_OptimizeEmbedding", title="Layered embeddings ê_a, ê_b", model=ckpt.out(0),
                vae=ckpt.out(2), image=photo.out(0), conditioning=e_a.out(0), steps=500, learning_rate=0.001, seed=0,
                conditioning_b=e_b.out(0), mask=mask.out(0), recipe=recipe.out(0), reference_image=reference.out(0),
                reference_mask=reference_mask.out(0))
    g.add("SaveImage", title="Embedding loss", images=emb.out(1), filename_prefix=f"{prefix}_embedding_loss")
    g.stage("2. Interpolate and fine-tune", columns=2)
    e_opt = g.add("ConditioningAverage", title="e_opt = 0.7 ê_a + 0.3 ê_b", conditioning_to=emb.out(0),
                  conditioning_from=emb.out(2), conditioning_to_strength=0.7)
    targets = {} if target_mask is None else {"target_mask": target_mask.out(0)}
    ft = g.add("SIE_FineTune", model=ckpt.out(0), vae=ckpt.out(2), image=photo.out(0), conditioning=e_opt.out(0),
               mode="lora", steps=250, learning_rate=0.0, rank=8, seed=0, recipe=recipe.out(0), mask=mask.out(0),
               reference_image=reference.out(0), reference_mask=reference_mask.out(0), **targets)
    g.add("SaveImage", title="Fine-tuning loss", images=ft.out(1), filename_prefix=f"{prefix}_finetune_loss")
    g.add("SIE_SaveTrained", trained=ft.out(2), filename_prefix=prefix)
    g.stage("3. Iterative guidance", columns=3)
    negative = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    guider = g.add("SIE_IterativeGuidance", model=ft.out(0), object_positive=emb.out(0), positive=e_opt.out(0),
                   negative=negative.out(0), cfg=7.5, start_parity="auto")
    noise = g.add("RandomNoise", noise_seed=0)
    sampler = g.add("KSamplerSelect", sampler_name="ddim")
    sigmas = g.add("BasicScheduler", model=ft.out(0), scheduler="ddim_uniform", steps=50, denoise=1.0)
    empty = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    out = g.add("SamplerCustomAdvanced", noise=noise.out(0), guider=guider.out(0), sampler=sampler.out(0),
                sigmas=sigmas.out(0), latent_image=empty.out(0))
    dec = g.add("VAEDecode", samples=out.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Edited image", images=dec.out(0), filename_prefix=prefix)


def layerdiffusion() -> Graph:
    g = Graph("layerdiffusion")
    g.note(LAYER_NOTE + "\n\nThis graph: the target text through SD gives the target image O_t, which serves as "
           "the background reference; SAM masks the subject in the photo and in O_t (that mask is both the "
           "reference mask M_r and Fine-Tune Model's target_mask). No other file is needed.")
    g.stage("Inputs: model, photo, SAM", columns=1)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    img = g.add("LoadImage", title="Photo (its subject is kept)", image="coffee_250x200.png")
    photo = g.add("ImageScale", image=img.out(0), upscale_method="lanczos", width=512, height=512, crop="center")
    sam = g.add("SIE_LoadSAM", sam_name="sam_vit_b_01ec64.pth")
    g.stage("0. Target image O_t from T", columns=2)
    target = g.add("CLIPTextEncode", title="Target text T", clip=ckpt.out(1),
                   text="a cup of coffee on a wooden table in a forest")
    empty_neg = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    empty = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    ks = g.add("KSampler", model=ckpt.out(0), positive=target.out(0), negative=empty_neg.out(0),
               latent_image=empty.out(0), seed=0, steps=50, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform",
               denoise=1.0)
    o_t = g.add("VAEDecode", title="O_t", samples=ks.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Target image O_t", images=o_t.out(0), filename_prefix="layerdiffusion/target")
    m_r = g.add("SIE_SAMSegment", title="Object mask of O_t", sam=sam.out(0), image=o_t.out(0),
                prompt='{"points": [[256, 256, 1]], "box": null}', dilate=0, invert=False)
    layer_stages(g, ckpt, photo, sam, o_t, m_r, "a cup of coffee", "on a wooden table in a forest",
                 "layerdiffusion/edit", target_mask=m_r)
    return g


LAYER_BACKGROUND = "table_by_the_sea_512.png"  # bundled in core/layerdiffusion/data (our own drawing, MIT)


def layerdiffusion_reference_background() -> Graph:
    g = Graph("layerdiffusion_reference_background")
    g.note(LAYER_NOTE + "\n\nThis graph: a reference background image of your own (paper Fig. 4), with no object "
           f"in it, so its mask is all black (Solid Mask 0). The placeholder {LAYER_BACKGROUND} (an empty wooden "
           "table by the sea, drawn procedurally; bundled with the pack in core/layerdiffusion/data) goes into "
           "ComfyUI/input next to the photo; replace it with a background photo taken from a camera angle close "
           "to your photo's (the paper's failure cases come from a mismatch). For the paper's M_t from O_t "
           "(recipe object_mask 'target'), generate O_t from the whole target text, segment its subject and "
           "connect that mask to Fine-Tune Model's target_mask, as the layerdiffusion workflow does.")
    g.stage("Inputs: model, photo, background, SAM", columns=1)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    img = g.add("LoadImage", title="Photo (its subject is kept)", image="coffee_250x200.png")
    photo = g.add("ImageScale", image=img.out(0), upscale_method="lanczos", width=512, height=512, crop="center")
    bg = g.add("LoadImage", title="Reference background (no object)", image=LAYER_BACKGROUND)
    background = g.add("ImageScale", image=bg.out(0), upscale_method="lanczos", width=512, height=512,
                       crop="center")
    no_object = g.add("SolidMask", title="Reference mask (no object)", value=0.0, width=512, height=512)
    sam = g.add("SIE_LoadSAM", sam_name="sam_vit_b_01ec64.pth")
    layer_stages(g, ckpt, photo, sam, background, no_object, "a cup of coffee", "on a wooden table by the sea",
                 "layerdiffusion/reference_background")
    return g


RECTIFIER_NOTE = ("High-Fidelity rectifier (Hou, Wei, Chen, AAAI 2024): a hypernetwork R(x_0, P_t, t) modulates the "
                  "frozen SD UNet's middle and output-block convolutions at every step, theta (1 + Delta), from the "
                  "image x_0 and the model's own x_0 estimate P_t, to keep reconstructions and edits faithful.\n"
                  "Reconstruction training (eq. 3): the usual noise-prediction loss of the rectified model; Adam lr "
                  "1e-3 x 0.9 every 5,000 steps, weight decay 1e-5. The paper trains on a domain (about 100 images, "
                  "e.g. faces): replace the small training set here (three crops of the left part of the bundled "
                  "photo) with yours, scaled to 512x512, and raise batch to what your GPU holds (8 here). (Image "
                  "Batch is marked deprecated in newer ComfyUI but still works; Batch Images does the same there.)\n"
                  "Inference (the paper's 'N inversion and denoising steps'): the held-out image (the right part of "
                  "the photo, which no training crop contains) is VAE-encoded, inverted to x_T by DDIM Inversion "
                  "(50 steps) and sampled back by SamplerCustom (add_noise off, euler = DDIM eta 0, cfg 1, the "
                  "inversion's sigmas); the rectified MODEL from Apply Rectifier gets the image as x_0 at every "
                  "step. Use the prompt the rectifier was trained under (empty here) for the inversion and the "
                  "samplers.\n\n"
                  "Files: an SD 1.x checkpoint in models/checkpoints (v1-5-pruned-emaonly.safetensors here); "
                  "coffee_250x200.png (bundled with the pack in core/sinddm/data) in ComfyUI's input folder; trained "
                  "rectifiers are saved to models/single_image_edit/rectifier (Load Rectifier reads them).")


def rectifier_inputs(g: Graph) -> tuple[Node, Node]:
    g.stage("Inputs: model and text", columns=1)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    empty = g.add("CLIPTextEncode", title="Empty prompt", clip=ckpt.out(1), text="")
    return ckpt, empty


def rectifier_photo(g: Graph) -> Node:
    g.stage("Photo", columns=1)
    return g.add("LoadImage", title="Photo (250x200)", image="coffee_250x200.png")


def rectifier_training_set(g: Graph, photo: Node) -> Node:
    """Three 512x512 views of the left part of the photo (columns 0-129) as one IMAGE batch (stands in for a
    domain of ~100 images); the held-out crop (columns 130-249) is none of them."""
    g.stage("Training set: left part of the photo (your images here)", columns=3)
    top = g.add("ImageCrop", title="Left, top", image=photo.out(0), width=130, height=130, x=0, y=0)
    bottom = g.add("ImageCrop", title="Left, bottom", image=photo.out(0), width=130, height=130, x=0, y=70)
    top_512 = g.add("ImageScale", title="Left, top, 512", image=top.out(0), upscale_method="lanczos", width=512,
                    height=512, crop="center")
    bottom_512 = g.add("ImageScale", title="Left, bottom, 512", image=bottom.out(0), upscale_method="lanczos",
                       width=512, height=512, crop="center")
    flip = g.add("ImageFlip", title="Left, top, mirrored", image=top_512.out(0), flip_method="y-axis: horizontally")
    two = g.add("ImageBatch", title="Batch of 2", image1=top_512.out(0), image2=bottom_512.out(0))
    return g.add("ImageBatch", title="Batch of 3", image1=two.out(0), image2=flip.out(0))


def rectifier_held_out(g: Graph, photo: Node) -> Node:
    g.stage("Held-out image x_0: right part of the photo", columns=1)
    crop = g.add("ImageCrop", title="Right (never trained on)", image=photo.out(0), width=120, height=120, x=130,
                 y=40)
    held = g.add("ImageScale", title="Held-out, 512", image=crop.out(0), upscale_method="lanczos", width=512,
                 height=512, crop="center")
    g.add("SaveImage", title="Held-out image", images=held.out(0), filename_prefix="rectifier/held_out")
    return held


def rectifier_inversion(g: Graph, model, ckpt: Node, empty: Node, encoded: Node, title: str) -> Node:
    """DDIM Inversion of the held-out latent by ``model`` (LATENT x_T, SIGMAS)."""
    return g.add("SIE_DDIMInversion", title=f"DDIM Inversion ({title})", model=model, positive=empty.out(0),
                 latent=encoded.out(0), steps=50)


def rectifier_sample_back(g: Graph, model, ckpt: Node, empty: Node, inversion: Node, sampler: Node, title: str,
                          prefix: str) -> None:
    """SamplerCustom from the inverted x_T over the inversion's sigmas (add_noise off, euler = DDIM eta 0, cfg 1)."""
    sc = g.add("SamplerCustom", title=f"Sample back ({title})", model=model, add_noise=False, noise_seed=0, cfg=1.0,
               positive=empty.out(0), negative=empty.out(0), sampler=sampler.out(0), sigmas=inversion.out(1),
               latent_image=inversion.out(0))
    dec = g.add("VAEDecode", samples=sc.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title=title, images=dec.out(0), filename_prefix=prefix)


def rectifier_reconstruct() -> Graph:
    g = Graph("rectifier_reconstruct")
    g.note(RECTIFIER_NOTE + "\n\nThis graph: reconstruction training (5,000 steps, batch 8) on the left part of the "
           "photo, saved as rectifier/recon_*.safetensors (rectifier_edit loads it); then the held-out right part "
           "reconstructed: inverted and sampled back by the rectified MODEL (a DDIM round trip is faithful when one "
           "model runs both halves; the rectifier makes that model better on the image), next to the plain model's "
           "own round trip.")
    ckpt, empty = rectifier_inputs(g)
    photo = rectifier_photo(g)
    held = rectifier_held_out(g, photo)
    images = rectifier_training_set(g, photo)
    g.stage("1. Train (eq. 3)", columns=2)
    train = g.add("SIE_TrainRectifier", model=ckpt.out(0), vae=ckpt.out(2), images=images.out(0), mode="recon",
                  steps=5000, lr=0.001, seed=0, conditioning=empty.out(0), batch=8, estimate="base")
    g.add("SIE_SaveRectifier", rectifier=train.out(0), filename_prefix="rectifier/recon")
    g.add("SaveImage", title="Loss", images=train.out(1), filename_prefix="rectifier/recon_loss")
    g.stage("2. Reconstruct: DDIM inversion, then sampling back", columns=3)
    encoded = g.add("VAEEncode", title="Held-out latent", pixels=held.out(0), vae=ckpt.out(2))
    apply = g.add("SIE_ApplyRectifier", model=ckpt.out(0), rectifier=train.out(0), image=held.out(0), strength=1.0,
                  vae=ckpt.out(2), estimate="base")
    euler = g.add("KSamplerSelect", title="euler (= DDIM, eta 0)", sampler_name="euler")
    inv = rectifier_inversion(g, apply.out(0), ckpt, empty, encoded, "rectified")
    rectifier_sample_back(g, apply.out(0), ckpt, empty, inv, euler, "Rectified", "rectifier/recon_rectified")
    inv_plain = rectifier_inversion(g, ckpt.out(0), ckpt, empty, encoded, "plain")
    rectifier_sample_back(g, ckpt.out(0), ckpt, empty, inv_plain, euler, "Plain model", "rectifier/recon_plain")
    return g


def rectifier_edit() -> Graph:
    g = Graph("rectifier_edit")
    g.note(RECTIFIER_NOTE + "\n\nThis graph: editing training (Alg. 1) continued from a saved reconstruction "
           "rectifier (run rectifier_reconstruct first; Load Rectifier picks its file): directional CLIP loss from "
           "the source to the target text + L1 to the original, on x0_hat (clipped to the latent range) from each "
           "step of the original trajectory (200 steps, lr 1e-3 x 0.9 every 10 steps; the paper lowers the decay "
           "for edits that change a lot). The held-out image is inverted by the reconstruction-rectified MODEL (a "
           "model without the edit: an edit rectifier that inverted would let its own sampling undo the edit) and "
           "sampled back by the edit-rectified MODEL (the edit) and by the reconstruction-rectified one (the "
           "reconstruction, to compare); SDEdit (the photo noised half way, denoise 0.5, the paper's image-to-image "
           "use) is the other way in.\n\n"
           "Expected time on one GPU (an estimate, not yet measured at 512x512: no GPU has run this graph): an edit "
           "step runs a plain and a rectified UNet pass, the VAE decoder and CLIP on 8 images and the backward "
           "through them, roughly 1-2 s on an H100, so the 200 steps take about 5 min; rectifier_reconstruct's "
           "5,000 steps (no decoder, no CLIP) roughly 0.5 s each, about 40 min. Loading the saved rectifier here "
           "saves repeating those 5,000 steps for every edit.\n\n"
           "Needs an OpenCLIP checkpoint in models/open_clip (e.g. ViT-B-32) and open_clip_torch.")
    ckpt, empty = rectifier_inputs(g)
    clip = g.add("SIE_LoadOpenCLIP", clip_name="open_clip_vit_b32.safetensors", arch="ViT-B-32")
    recon = g.add("SIE_LoadRectifier", title="Load the reconstruction rectifier",
                  rectifier_name="rectifier/recon_00001.safetensors")
    photo = rectifier_photo(g)
    held = rectifier_held_out(g, photo)
    images = rectifier_training_set(g, photo)
    g.stage("1. Edit training (Alg. 1)", columns=2)
    edit = g.add("SIE_TrainRectifier", title="Train (edit)", model=ckpt.out(0), vae=ckpt.out(2), images=images.out(0),
                 mode="edit", steps=200, lr=0.001, seed=0, open_clip=clip.out(0), source_text="black coffee",
                 target_text="latte art", rectifier=recon.out(0), conditioning=empty.out(0), batch=8,
                 estimate="base")
    g.add("SIE_SaveRectifier", title="Save (edit)", rectifier=edit.out(0), filename_prefix="rectifier/edit")
    g.add("SaveImage", title="Edit losses", images=edit.out(1), filename_prefix="rectifier/edit_loss")
    g.stage("2. Edit: invert without the edit, sample back with it; SDEdit", columns=3)
    encoded = g.add("VAEEncode", title="Held-out latent", pixels=held.out(0), vae=ckpt.out(2))
    apply_recon = g.add("SIE_ApplyRectifier", title="Apply Rectifier (reconstruction)", model=ckpt.out(0),
                        rectifier=recon.out(0), image=held.out(0), strength=1.0, vae=ckpt.out(2), estimate="base")
    apply_edit = g.add("SIE_ApplyRectifier", title="Apply Rectifier (edit)", model=ckpt.out(0), rectifier=edit.out(0),
                       image=held.out(0), strength=1.0, vae=ckpt.out(2), estimate="base")
    euler = g.add("KSamplerSelect", title="euler (= DDIM, eta 0)", sampler_name="euler")
    inv = rectifier_inversion(g, apply_recon.out(0), ckpt, empty, encoded, "reconstruction rectifier")
    rectifier_sample_back(g, apply_edit.out(0), ckpt, empty, inv, euler, "Edited", "rectifier/edit")
    rectifier_sample_back(g, apply_recon.out(0), ckpt, empty, inv, euler, "Reconstruction (no edit)",
                          "rectifier/edit_reconstruction")
    ks = g.add("KSampler", title="SDEdit 0.5 (edit rectifier)", model=apply_edit.out(0), positive=empty.out(0),
               negative=empty.out(0), latent_image=encoded.out(0), seed=0, steps=50, cfg=1.0, sampler_name="ddpm",
               scheduler="normal", denoise=0.5)
    dec = g.add("VAEDecode", samples=ks.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Edited (SDEdit 0.5)", images=dec.out(0), filename_prefix="rectifier/edit_sdedit")
    return g

GRAPHS = [sinddm_random_samples, sinddm_roi_outpaint, sinddm_harmonization, sinddm_style_transfer, sinddm_text_guided,
          sinddm_text_roi, sinddm_text_style, imagic, sine_edit, sine_any_resolution, sine_multi_model, layerdiffusion,
          layerdiffusion_reference_background, rectifier_reconstruct, rectifier_edit]


def main() -> None:
    schemas = load_schemas()
    (ROOT / "workflows" / "api").mkdir(exist_ok=True)
    for make in GRAPHS:
        g = make()
        (ROOT / "workflows" / f"{g.name}.json").write_text(json.dumps(g.ui(schemas), indent=1) + "\n")
        (ROOT / "workflows" / "api" / f"{g.name}.json").write_text(json.dumps(g.api(schemas), indent=1) + "\n")
        print(f"wrote workflows/{g.name}.json and workflows/api/{g.name}.json")


if __name__ == "__main__":
    main()
