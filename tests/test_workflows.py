"""Every bundled workflow: UI format sound, API twin identical in meaning, inputs valid for their schemas.

Schemas: this pack's nodes from the pack itself; ComfyUI's core nodes from
tests/data/comfyui_object_info.json (``/object_info`` of a real ComfyUI, commit recorded
in the file).  The UI -> API conversion here is written independently of
workflows/build.py, so the two must agree for the test to pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import ROOT, load_pack

WF = ROOT / "workflows"
CONTRACT = json.loads((ROOT / "tests" / "data" / "comfyui_object_info.json").read_text())
CORE = CONTRACT["nodes"]
PACK = load_pack()
UI_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

UI_FILES = sorted(WF.glob("*.json"))
API_FILES = sorted((WF / "api").glob("*.json"))


def schema(node_type: str) -> dict:
    """{"order", "inputs": {name: (type, opts, required)}, "outputs": [types], "output_node"}"""
    if node_type in PACK.NODE_CLASS_MAPPINGS:
        cls = PACK.NODE_CLASS_MAPPINGS[node_type]
        decl = cls.INPUT_TYPES()
        outputs, output_node = list(cls.RETURN_TYPES), bool(getattr(cls, "OUTPUT_NODE", False))
        sections = {s: list(decl.get(s, {}).items()) for s in ("required", "optional")}
    elif node_type in CORE:
        info = CORE[node_type]
        outputs, output_node = info["output"], info["output_node"]
        sections = {s: [(n, info["input"][s][n]) for n in info["input_order"].get(s, [])]
                    for s in ("required", "optional")}
    else:
        raise KeyError(node_type)
    inputs, order = {}, []
    for s, items in sections.items():
        for name, d in items:
            inputs[name] = (d[0], d[1] if len(d) > 1 else {}, s == "required")
            order.append(name)
    return {"order": order, "inputs": inputs, "outputs": outputs, "output_node": output_node}


def is_widget(typ, opts) -> bool:
    return (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")


def n_extra(name, typ, opts) -> int:
    seed_like = typ == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))
    return 1 if seed_like or opts.get("image_upload") else 0


def ui_to_api(ui: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        if node["type"] in UI_ONLY:
            continue
        sch = schema(node["type"])
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name in sch["order"]:
            typ, opts, _ = sch["inputs"][name]
            if is_widget(typ, opts):
                assert values, f"node {node['id']} ({node['type']}): widgets_values too short at {name!r}"
                v = values.pop(0)
                for _ in range(n_extra(name, typ, opts)):
                    values.pop(0)
                if name not in linked:
                    inputs[name] = v
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        assert not values, f"node {node['id']} ({node['type']}): {len(values)} widget values left over"
        out[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return out


def test_every_ui_workflow_has_an_api_twin_and_back():
    assert UI_FILES, "no workflows bundled"
    assert [p.name for p in UI_FILES] == [p.name for p in API_FILES]


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_workflow_is_consistent(path: Path):
    ui = json.loads(path.read_text())
    assert ui.get("version") == 0.4 and isinstance(ui["nodes"], list) and isinstance(ui["links"], list)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
    assert ui["last_node_id"] >= max(nodes) and ui["last_link_id"] >= max((lk[0] for lk in ui["links"]), default=0)
    link_ids = [lk[0] for lk in ui["links"]]
    assert len(set(link_ids)) == len(link_ids), "duplicate link ids"
    for node in ui["nodes"]:
        t = node["type"]
        assert t in UI_ONLY or t in PACK.NODE_CLASS_MAPPINGS or t in CORE, f"unknown node type {t}"
    for lid, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert lid in out["links"], f"link {lid} missing from node {src} output {src_slot}"
        assert inp["link"] == lid, f"link {lid} not recorded on node {dst} input {dst_slot}"
        assert out["type"] == typ
        assert inp["type"] in (typ, "*") or typ == "*", f"link {lid}: {typ} into {inp['type']}"
        assert schema(nodes[src]["type"])["outputs"][src_slot] == typ
    for node in ui["nodes"]:
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                assert inp["link"] in link_ids
        for out in node.get("outputs", []):
            for lid in out.get("links") or []:
                assert lid in link_ids


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_api_twin_matches_ui(path: Path):
    ui = json.loads(path.read_text())
    api = json.loads((WF / "api" / path.name).read_text())
    stripped = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui_to_api(ui) == stripped


@pytest.mark.parametrize("path", API_FILES, ids=[p.stem for p in API_FILES])
def test_api_inputs_are_valid_for_their_schemas(path: Path):
    api = json.loads(path.read_text())
    has_output = False
    for node_id, node in api.items():
        sch = schema(node["class_type"])
        has_output |= sch["output_node"]
        unknown = set(node["inputs"]) - set(sch["inputs"])
        assert not unknown, f"{node_id} ({node['class_type']}): unknown inputs {unknown}"
        for name, (typ, opts, required) in sch["inputs"].items():
            where = f"{path.name} node {node_id} ({node['class_type']}).{name}"
            if name not in node["inputs"]:
                assert not required, f"{where}: required input missing"
                continue
            v = node["inputs"][name]
            if isinstance(v, list):  # a link
                src = api[v[0]]
                src_type = schema(src["class_type"])["outputs"][v[1]]
                want = "COMBO" if isinstance(typ, list) else typ
                assert src_type == want or "*" in (src_type, want), f"{where}: {src_type} linked into {want}"
                continue
            assert is_widget(typ, opts), f"{where}: a value given to a link-only input"
            choices = typ if isinstance(typ, list) else opts.get("options") if typ == "COMBO" else None
            if choices is not None:
                if choices:  # empty lists are file names that depend on the server's folders
                    assert v in choices, f"{where}: {v!r} not in {choices[:5]}..."
            elif typ == "INT":
                assert isinstance(v, int) and not isinstance(v, bool)
                assert opts.get("min", -2**63) <= v <= opts.get("max", 2**63), f"{where}: {v} out of range"
            elif typ == "FLOAT":
                assert isinstance(v, (int, float)) and not isinstance(v, bool)
                assert opts.get("min", -1e300) <= v <= opts.get("max", 1e300), f"{where}: {v} out of range"
            elif typ == "BOOLEAN":
                assert isinstance(v, bool)
            elif typ == "STRING":
                assert isinstance(v, str)
    assert has_output, f"{path.name} has no output node"


def test_contract_records_its_comfyui_commit():
    assert len(CONTRACT["comfyui_commit"]) == 40 and CONTRACT["comfyui_version"]
    assert "KSampler" in CORE and "SaveImage" in CORE


def test_converter_rejects_a_shifted_widget_list():
    """Guard against a vacuous comparison: dropping one widget value must be caught."""
    path = WF / "sinddm_random_samples.json"
    ui = json.loads(path.read_text())
    node = next(n for n in ui["nodes"] if n["type"] == "SIE_SinDDMTrain")
    node["widgets_values"] = node["widgets_values"][1:]
    with pytest.raises(AssertionError):
        api = json.loads((WF / "api" / path.name).read_text())
        assert ui_to_api(ui) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
