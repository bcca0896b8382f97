"""Imagic node helpers that need no ComfyUI: conditioning maths, eta lists, the trained-file format, checks.

The nodes themselves run on a real ComfyUI MODEL in tests/integration/test_imagic_comfy.py.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import ROOT, load_pack

PACK = load_pack()
imagic = sys.modules[PACK.__name__ + ".nodes.imagic"]
bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]
NodeInputError = sys.modules[PACK.__name__ + ".nodes.common"].NodeInputError
CORE = json.loads((ROOT / "tests/data/comfyui_object_info.json").read_text())["nodes"]


def cond(value: float, width: int = 768, pooled: bool = True):
    opts = {"pooled_output": torch.full((1, width), value)} if pooled else {}
    return [[torch.full((1, 77, width), value), opts]]


def test_interpolation_node_is_eq3_including_eta_above_one():
    node = PACK.NODE_CLASS_MAPPINGS["SIE_InterpolateConditioning"]
    for eta in (0.0, 0.7, 1.0, 1.3):
        (out,) = node.execute(cond(2.0), cond(1.0), eta)
        assert out[0][0].unique().item() == pytest.approx(eta * 2.0 + (1 - eta) * 1.0)
        assert out[0][1]["pooled_output"].unique().item() == pytest.approx(eta * 2.0 + (1 - eta) * 1.0)
    target = cond(2.0)
    node.execute(target, cond(1.0), 0.5)
    assert target[0][0].unique().item() == 2.0  # inputs are not modified
    with pytest.raises(NodeInputError, match="optimized"):
        node.execute(cond(1.0), cond(1.0, width=1024), 0.5)


def test_core_conditioning_average_cannot_extrapolate():
    """Why the pack has its own node: core ConditioningAverage caps the strength at 1 (eta <= 1)."""
    spec = CORE["ConditioningAverage"]["input"]["required"]["conditioning_to_strength"][1]
    assert spec["max"] == 1.0 and spec["min"] == 0.0
    ours = PACK.NODE_CLASS_MAPPINGS["SIE_InterpolateConditioning"].INPUT_TYPES()["required"]["eta"][1]
    assert ours["max"] > 1.0


def test_eta_list_parsing():
    assert imagic.parse_etas("0.7, 0.8,0.9 ;1.1") == [0.7, 0.8, 0.9, 1.1]
    for bad in ("", "a, b"):
        with pytest.raises(NodeInputError, match="etas"):
            imagic.parse_etas(bad)


def test_trained_file_round_trip_and_lora_layout(tmp_path):
    delta = {"diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.randn(4, 320, 1, 1),
             "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.randn(320, 4, 1, 1),
             "diffusion_model.input_blocks.1.1.proj_in.alpha": torch.tensor(4.0)}
    trained = imagic.Trained(delta, "lora", torch.randn(1, 77, 768), {"steps": 3})
    path = tmp_path / "edit.safetensors"
    imagic.save_trained(trained, path)
    back = imagic.load_trained(path)
    assert back.mode == "lora" and back.info == {"steps": 3}
    assert torch.equal(back.embedding, trained.embedding)
    assert set(back.delta) == set(delta) and all(torch.equal(back.delta[k], delta[k]) for k in delta)
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]


def fake_model(cls_name: str, context: int, channels: int = 4, model_type: str = "EPS", adm=None):
    config = type(cls_name, (), {})()
    config.unet_config = {"context_dim": context, "in_channels": channels, "adm_in_channels": adm}
    base = SimpleNamespace(model_config=config, model_type=SimpleNamespace(name=model_type))
    return SimpleNamespace(model=base)


@pytest.mark.parametrize("model,ok", [
    (fake_model("SD15", 768), True),
    (fake_model("SD20", 1024, model_type="V_PREDICTION"), False),
    (fake_model("SDXL", 2048, adm=2816), True),
    (fake_model("SDXL", 2048, adm=2816, model_type="V_PREDICTION"), False),
    (fake_model("SDXLRefiner", 1280, adm=2560), False),
    (fake_model("SDXL", 2048, adm=2816, channels=9), False),
    (fake_model("SD15_instructpix2pix", 768, channels=8), False),
    ("not a model", False),
])
def test_model_check_names_what_it_got(model, ok):
    problem = bridge.sd_problem(model)
    assert (problem is None) == ok
    if not ok:
        with pytest.raises(NodeInputError, match="input 'model'"):
            imagic.check_model(model)


def test_prefix_and_counter_helpers(tmp_path):
    common = sys.modules[PACK.__name__ + ".nodes.common"]
    assert common.safe_prefix(" edits/cat ") == "edits/cat"
    for bad in ("", "/x", "a/../../b", "dir/"):
        with pytest.raises(NodeInputError):
            common.safe_prefix(bad)
    first = common.next_free_path(tmp_path, "edits/cat", ".safetensors")
    assert first == tmp_path / "edits" / "cat_00001.safetensors"
    first.write_bytes(b"x")
    assert common.next_free_path(tmp_path, "edits/cat", ".safetensors").name == "cat_00002.safetensors"
