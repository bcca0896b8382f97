"""Schema rules for every registered node, and the append-only snapshot of their inputs.

The snapshot (tests/data/node_inputs.json) records each node's inputs in widget order
(required, then optional).  A node may append inputs; renaming, removing or reordering
one breaks saved workflows (their widgets_values are positional) and fails here.

A second record (tests/data/node_contract.json) holds what else a saved or API workflow
depends on: each input's type, default and bounds, a combo's fixed choices, the outputs'
types and names, the category and whether it is an output node (tooltips and descriptions
are documentation and may change freely).  It was written from the classic declarations
the typed schema replaced, so it also proves the move kept every one of them.

After appending inputs, adding a node or changing the contract on purpose, refresh both with

    SIE_UPDATE_SNAPSHOT=1 python -m pytest tests/test_node_schema.py
"""

from __future__ import annotations

import copy
import inspect
import json
import os

import pytest

from helpers import ROOT, load_pack

SNAPSHOT = ROOT / "tests" / "data" / "node_inputs.json"
CONTRACT = ROOT / "tests" / "data" / "node_contract.json"
CONTRACT_KEYS = ("default", "min", "max", "step", "round", "multiline", "options", "control_after_generate",
                 "forceInput")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

PACK = load_pack()
NODES = sorted(PACK.NODE_CLASS_MAPPINGS.items())


def input_order(cls) -> list[str]:
    spec = cls.INPUT_TYPES()
    return list(spec.get("required", {})) + list(spec.get("optional", {}))


@pytest.mark.parametrize("node_id,cls", NODES, ids=[n for n, _ in NODES])
def test_node_schema(node_id, cls):
    assert node_id.startswith("SIE_")
    assert PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id].strip()
    assert cls.CATEGORY.startswith("single_image_edit/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    # the typed node API: a schema, and execute as a classmethod (ComfyUI calls it through FUNCTION)
    schema = cls.define_schema()
    assert schema.node_id == node_id and schema.display_name == PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert callable(getattr(cls, cls.FUNCTION, None)), f"FUNCTION {cls.FUNCTION!r} missing"
    assert inspect.ismethod(cls.execute) and cls.execute.__self__ is cls, "execute must be a classmethod"
    assert not hasattr(cls, "run"), "the classic entry point is gone: execute computes"
    names = cls.RETURN_NAMES
    assert len(names) == len(cls.RETURN_TYPES) and len(set(names)) == len(names)
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    if not cls.RETURN_TYPES:
        assert getattr(cls, "OUTPUT_NODE", False), "a node without outputs must be an output node"

    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    params = inspect.signature(cls.execute).parameters
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            assert isinstance(decl, tuple) and 1 <= len(decl) <= 2, (name, decl)
            typ, opts = decl[0], (decl[1] if len(decl) > 1 else {})
            assert opts.get("tooltip", "").strip(), f"{node_id}.{name} has no tooltip"
            assert name in params, f"{node_id}.execute does not accept {name!r}"
            if section == "optional":
                assert params[name].default is not inspect.Parameter.empty, f"optional {name!r} needs a default"
            if typ == "COMBO":  # the typed API's combo: its choices in "options"
                assert isinstance(opts["options"], list)
                if opts["options"] and "default" in opts:
                    assert opts["default"] in opts["options"]
            elif typ in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], (name, opts)
            elif typ in ("STRING", "BOOLEAN"):
                assert "default" in opts
            else:
                assert isinstance(typ, str) and typ.isupper(), (name, typ)
    for name, p in params.items():
        if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty:
            assert name in spec.get("required", {}), f"{node_id}.execute needs {name!r} but it is no input"


def current_snapshot() -> dict[str, list[str]]:
    return {node_id: input_order(cls) for node_id, cls in NODES}


def snapshot_problems(saved: dict[str, list[str]], now: dict[str, list[str]]) -> list[str]:
    """What breaks saved workflows: a removed node, or inputs renamed/removed/reordered."""
    problems = []
    for node_id, inputs in saved.items():
        if node_id not in now:
            problems.append(f"{node_id} was removed (saved workflows use it)")
        elif now[node_id][: len(inputs)] != inputs:
            problems.append(f"{node_id}: inputs were {inputs}, now {now[node_id]}; only appending is allowed")
    return problems


def test_inputs_are_append_only():
    now = current_snapshot()
    if os.environ.get("SIE_UPDATE_SNAPSHOT"):
        old = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.exists() else {}
        problems = snapshot_problems({k: v for k, v in old.items() if k in now}, now)
        assert not problems, problems  # refuse to record a breaking change
        SNAPSHOT.write_text(json.dumps({**old, **now}, indent=1, sort_keys=True) + "\n")
    saved = json.loads(SNAPSHOT.read_text())
    problems = snapshot_problems(saved, now)
    assert not problems, problems
    missing = sorted(set(now) - set(saved))
    assert not missing, f"new nodes {missing}: run with SIE_UPDATE_SNAPSHOT=1 to record them"


def test_snapshot_check_detects_breaking_changes():
    """The check above, run on real node classes changed the ways a developer might change them."""
    node_id, cls = next((n, c) for n, c in NODES if len(c.INPUT_TYPES().get("required", {})) >= 3)
    saved = {node_id: input_order(cls)}

    def changed(edit) -> dict[str, list[str]]:  # the node with its real INPUT_TYPES after ``edit``
        spec = copy.deepcopy(cls.INPUT_TYPES())
        edit(spec)
        return {node_id: input_order(type("Changed", (cls,), {"INPUT_TYPES": classmethod(lambda c: spec)}))}

    def append(spec):
        spec.setdefault("optional", {})["new_input"] = ("INT", {"default": 0, "min": 0, "max": 1, "tooltip": "x"})

    def reorder(spec):
        first, second, *rest = spec["required"].items()
        spec["required"] = dict([second, first, *rest])

    def remove(spec):
        spec["required"].pop(next(iter(spec["required"])))

    def rename(spec):
        spec["required"] = {("renamed" if i == 1 else k): v for i, (k, v) in enumerate(spec["required"].items())}

    def make_optional(spec):  # moving an input to the optional section moves its widget to the end
        name = next(iter(spec["required"]))
        spec.setdefault("optional", {})[name] = spec["required"].pop(name)

    assert snapshot_problems(saved, changed(lambda spec: None)) == []
    assert snapshot_problems(saved, changed(append)) == []  # appending is allowed
    for edit in (reorder, remove, rename, make_optional):
        problems = snapshot_problems(saved, changed(edit))
        assert len(problems) == 1 and problems[0].startswith(f"{node_id}: inputs were"), edit.__name__
    assert snapshot_problems(saved, {}) == [f"{node_id} was removed (saved workflows use it)"]


def contract(cls) -> dict:
    """What workflows depend on beyond the input order (see the module docstring).  Combos whose choices come
    from the running ComfyUI (its model folders, samplers, schedulers) keep their default, not their list."""
    spec = cls.INPUT_TYPES()
    inputs = {}
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            typ, opts = decl[0], (decl[1] if len(decl) > 1 else {})
            kept = {k: opts[k] for k in CONTRACT_KEYS if k in opts}
            if typ == "COMBO" and name in SERVER_COMBOS.get(cls.define_schema().node_id, ()):
                kept.pop("options", None)
            inputs[name] = [section, typ, kept]
    return json.loads(json.dumps({"inputs": inputs, "outputs": [list(cls.RETURN_TYPES), list(cls.RETURN_NAMES)],
                                  "category": cls.CATEGORY, "output_node": bool(cls.OUTPUT_NODE)}))


# combos listing the server's files or samplers (their choices differ per installation)
SERVER_COMBOS = {"SIE_LoadOpenCLIP": {"clip_name"}, "SIE_LoadSinDDM": {"model_name"}, "SIE_LoadTrained": {"trained_name"},
                 "SIE_EtaSweep": {"sampler_name", "scheduler"}, "SIE_LoadSine": {"sine_name"}, "SIE_LoadSAM": {"sam_name"},
                 "SIE_GuidanceSweep": {"sampler_name", "scheduler"}, "SIE_LoadRectifier": {"rectifier_name"},
                 "SIE_TrainRectifier": {"encoder_weights"}}


def contract_problems(saved: dict, now: dict) -> list[str]:
    problems = []
    for node_id, c in saved.items():
        if node_id not in now:
            continue  # a removed node is test_inputs_are_append_only's to report
        n = now[node_id]
        for key in ("outputs", "category", "output_node"):
            if n[key] != c[key]:
                problems.append(f"{node_id}: {key} was {c[key]}, now {n[key]}")
        for name, decl in c["inputs"].items():
            if name in n["inputs"] and n["inputs"][name] != decl:
                problems.append(f"{node_id}.{name}: was {decl}, now {n['inputs'][name]}")
    return problems


def test_node_contract_is_kept():
    now = {node_id: contract(cls) for node_id, cls in NODES}
    if os.environ.get("SIE_UPDATE_SNAPSHOT"):
        CONTRACT.write_text(json.dumps(now, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    saved = json.loads(CONTRACT.read_text())
    problems = contract_problems(saved, now)
    assert not problems, "\n".join(problems)
    missing = sorted(set(now) - set(saved))
    assert not missing, f"new nodes {missing}: run with SIE_UPDATE_SNAPSHOT=1 to record them"


def test_contract_check_detects_a_changed_default_type_or_output():
    node_id, cls = "SIE_EtaSweep", PACK.NODE_CLASS_MAPPINGS["SIE_EtaSweep"]
    saved = {node_id: contract(cls)}
    assert contract_problems(saved, {node_id: contract(cls)}) == []
    for edit in (lambda c: c["inputs"]["steps"][2].update(default=51),
                 lambda c: c["inputs"]["cfg"].__setitem__(1, "INT"),
                 lambda c: c["inputs"]["etas"].__setitem__(0, "optional"),
                 lambda c: c["outputs"][0].__setitem__(0, "IMAGE"),
                 lambda c: c.update(category="single_image_edit/other")):
        now = copy.deepcopy(saved)
        edit(now[node_id])
        assert len(contract_problems(saved, now)) == 1
