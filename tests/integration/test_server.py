"""Integration tier: the pack inside a real ComfyUI server (needs COMFYUI_DIR).

The server runs from COMFYUI_DIR with its own Python, a throw-away base directory and
this repository linked into its custom_nodes.  Skipped, with the reason, without it.
"""

from __future__ import annotations

import json

import pytest

from comfy_server import PACK_DIR_NAME, REPO, ComfyServer, comfyui_commit, skip_reason
from helpers import load_pack

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


@pytest.fixture(scope="module")
def server():
    with ComfyServer() as srv:
        yield srv


def expected_info(node_id: str, cls, display: str) -> dict:
    """What ComfyUI's /object_info should say about one of our nodes, derived from its typed schema in this
    process (by ComfyUI's comfy_api where it is importable, else by tests/standin): comparing it with the
    server's answer checks the stand-in against the real API, node by node."""
    spec = cls.INPUT_TYPES()
    info = {
        "input": spec,
        "input_order": {k: list(v) for k, v in spec.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": [False] * len(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": node_id,
        "display_name": display,
        "description": cls.DESCRIPTION,
        "python_module": f"custom_nodes.{PACK_DIR_NAME}",
        "category": cls.CATEGORY,
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    return json.loads(json.dumps(info))  # tuples -> lists, as the server serialises them


def test_pack_imports_without_error(server):
    log = server.log()
    assert PACK_DIR_NAME in log, "the pack was not even seen by ComfyUI"
    # the pack as a custom node (the test cache's folder is also named after the pack: its ComfyUI lines are not ours)
    ours_path = f"custom_nodes/{PACK_DIR_NAME}"
    bad = [line for line in log.splitlines() if ours_path in line and ("IMPORT FAILED" in line or
                                                                       "Cannot import" in line)]
    assert not bad, "\n".join(bad) + "\n" + log[-3000:]
    # ComfyUI logs tracebacks of its own optional nodes (e.g. audio without torchaudio): only ours count
    blocks = [b.split("\n\n")[0] for b in log.split("Traceback (most recent call last):")[1:]]
    ours = [b for b in blocks if ours_path in b or str(REPO) in b]
    assert not ours, ours[0]
    import_line = [line for line in log.splitlines() if line.strip().endswith(PACK_DIR_NAME) and "seconds" in line]
    assert import_line and "IMPORT FAILED" not in import_line[0], import_line


# Combo inputs whose choices come from the running ComfyUI (its model folders, its samplers): the test
# process has no ComfyUI, so only their place and options are compared, and the default must be offered.
SERVER_LISTS = {"SIE_LoadOpenCLIP": {"clip_name"}, "SIE_LoadSinDDM": {"model_name"},
                "SIE_LoadTrained": {"trained_name"}, "SIE_EtaSweep": {"sampler_name", "scheduler"},
                "SIE_LoadSine": {"sine_name"}, "SIE_LoadSAM": {"sam_name"}, "SIE_GuidanceSweep": {"sampler_name", "scheduler"},
                "SIE_LoadRectifier": {"rectifier_name"}}


def test_object_info_lists_every_node_with_our_schema(server):
    pack = load_pack()
    info = server.get("/object_info")
    ours = {k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_DIR_NAME}"}
    assert ours == set(pack.NODE_CLASS_MAPPINGS), (sorted(ours ^ set(pack.NODE_CLASS_MAPPINGS)))
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert info[node_id].get("output_matchtypes") is None  # ComfyUI 0.8 names the key; our outputs have none
        got = {k: v for k, v in info[node_id].items()
               if k not in ("deprecated", "experimental", "api_node", "output_matchtypes")}
        want = expected_info(node_id, cls, pack.NODE_DISPLAY_NAME_MAPPINGS[node_id])
        for name in SERVER_LISTS.get(node_id, ()):
            section = "required" if name in want["input"].get("required", {}) else "optional"
            server_opts, opts = got["input"][section][name][1], want["input"][section][name][1]
            assert got["input"][section][name][0] == "COMBO" and isinstance(server_opts["options"], list)
            if "default" in opts:
                assert opts["default"] in server_opts["options"], (node_id, name, opts["default"])
            server_opts["options"] = opts["options"] = "<server list>"
        assert got == want, f"{node_id}: /object_info differs from the class"


def test_model_folders_are_registered(server):
    folders = server.get("/models")
    for name in ("sie_sinddm", "sie_trained", "sie_sine", "sie_rectifier", "sams", "open_clip"):
        assert name in folders, folders


def test_contract_commit_matches_server(server):
    """The core-node contract in tests/data should come from the ComfyUI under test (a warning, not a failure)."""
    from helpers import ROOT

    contract = json.loads((ROOT / "tests" / "data" / "comfyui_object_info.json").read_text())
    commit = comfyui_commit(server.root)
    if commit != contract["comfyui_commit"]:
        pytest.skip(f"contract from {contract['comfyui_commit'][:8]}, server at {commit[:8]}: regenerate with "
                    "python tests/integration/comfy_server.py contract tests/data/comfyui_object_info.json")
    info = server.get("/object_info")
    for name, node in contract["nodes"].items():
        assert name in info, f"core node {name} missing from the server"
        assert info[name]["input_order"] == node["input_order"], name
