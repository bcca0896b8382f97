"""The shared workflow builder: a graph described once (node types, widget values by input name, links) and
written in both formats (UI, API), with the node schemas and the canvas layout every paper's graphs use."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
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
    if importlib.util.find_spec("comfy_api") is None:  # outside ComfyUI: the tests' stand-in of its typed node API
        sys.path.append(str(ROOT / "tests" / "standin"))
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


def combo_options(typ, opts) -> list | None:
    """A combo's choices in either declaration form (a classic list, or the typed API's COMBO with "options")."""
    if isinstance(typ, list):
        return typ
    return opts.get("options") if typ == "COMBO" else None


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
class Base:
    """The base model a workflow loads: its checkpoint file name, native square size and how notes name it."""

    suffix: str  # appended to the graph's name
    ckpt: str
    size: int
    what: str

    def scaled(self, pixels: int) -> int:
        """A pixel coordinate or size given for 512x512, at this base's native size."""
        return pixels * self.size // 512


SD15 = Base("", "v1-5-pruned-emaonly.safetensors", 512, "an SD 1.x checkpoint")
SDXL = Base("_sdxl", "sd_xl_base_1.0.safetensors", 1024, "an SDXL checkpoint (base 1.0 or a fine-tune of it)")
SDXL_NOTE = ("\n\nSDXL: this graph runs at 1024x1024, SDXL's native size. SDXL also takes a size conditioning "
             "(original size, crop, target size): the pack trains with the image's own size, uncropped, and its "
             "nodes output CONDITIONINGs without sizes, so ComfyUI's samplers give them the latent's size, the same "
             "rule. Training goes through the UNet only (SDXL's two text encoders are not trained). Memory: keep "
             "gradient_checkpointing on auto (on for a GPU); a LoRA step at 1024x1024 is estimated at about 13 GiB "
             "beside the loaded model (5.1 GB in fp16), and the nodes refuse what their estimate says cannot fit. "
             "Expected GPU time: not measured yet (no GPU has run this graph).")


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
                        choices = combo_options(typ, opts) or [""]
                        v = opts.get("default", choices[0])
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
