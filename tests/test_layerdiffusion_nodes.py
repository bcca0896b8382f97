"""LayerDiffusion node checks that need no ComfyUI (the nodes run on a real server in
tests/integration/test_layerdiffusion_comfy.py): bad inputs are refused before anything loads, naming the input."""

from __future__ import annotations

import sys

import pytest
import torch
from test_sine_nodes import SD15, fake_model

from helpers import load_pack

PACK = load_pack()
N = PACK.NODE_CLASS_MAPPINGS
NodeInputError = sys.modules[PACK.__name__ + ".nodes.common"].NodeInputError
cond = [[torch.zeros(1, 77, 768), {}]]


def named(call) -> str:
    with pytest.raises(NodeInputError) as e:
        call()
    return e.value.input_name


def test_recipe_and_guider_inputs_are_checked():
    assert named(lambda: N["SIE_LayerRecipe"].execute(0.0, 0.0, "image", "reference", "separate", "image",
                                                    "area")) == "lambda_obj"
    recipe = N["SIE_LayerRecipe"].execute(3.0, 1.0, "image", "image", "concat", "mask", "nearest")[0]
    assert recipe.lambda_obj == 3.0 and recipe.background_source == "image" and recipe.reading == "concat"
    model = fake_model(SD15)
    guide = N["SIE_IterativeGuidance"].execute
    assert named(lambda: guide(model, cond, cond, cond, 7.5, "sometimes")) == "start_parity"
    assert named(lambda: guide(model, cond, cond, cond, -1.0, "auto")) == "cfg"
    assert named(lambda: guide(model, [], cond, cond, 7.5, "auto")) == "object_positive"
    assert named(lambda: guide("no model", cond, cond, cond, 7.5, "auto")) == "model"


def test_shared_optimiser_needs_both_layered_inputs():
    model, image = fake_model(SD15), torch.rand(1, 64, 64, 3)
    opt = N["SIE_OptimizeEmbedding"].execute
    assert named(lambda: opt(model, None, image, cond, 1, 1e-3, 0, None, torch.ones(1, 64, 64))) == "conditioning_b"
    assert named(lambda: opt(model, None, image, cond, 1, 1e-3, 0, cond, None)) == "mask"
    assert named(lambda: opt(model, None, image, cond, 1, 1e-3, 0, cond, torch.ones(1, 64, 64), "x")) == "recipe"
    sine_recipe = N["SIE_SineRecipe"].execute("a photo of a sks dog", False, False, 0.0, 0.0, 0.0)[0]
    assert named(lambda: opt(model, None, image, cond, 1, 1e-3, 0, None, None, sine_recipe)) == "recipe"


# ------------------------------------------------------------------------ issue 19: points 12, 13, 15, 17
def test_recipe_defaults_to_eq2_and_offers_the_papers_M_t():
    """Stage 1's default reading is eq. 2 as written (concat: one prediction with [e_a, e_b] under M);
    the other readings stay; object_mask 'target' (M_t from O_t, the paper) is offered next to 'image'."""
    spec = N["SIE_LayerRecipe"].INPUT_TYPES()
    reading = spec["required"]["reading"]
    assert reading[1]["default"] == "concat" and set(reading[1]["options"]) == {"concat", "separate", "separate_reference",
                                                                     "shared"}
    assert spec["optional"]["object_mask"][1]["options"] == ["image", "target"]
    assert spec["optional"]["object_mask"][1]["default"] == "image"
    LayerRecipe = sys.modules[PACK.__name__ + ".nodes.layerdiffusion"].LayerRecipe
    assert LayerRecipe().reading == "concat" and LayerRecipe().object_mask == "image"
    old = N["SIE_LayerRecipe"].execute(2.0, 1.0, "image", "reference", "separate", "image", "area")[0]  # saved graphs
    assert old.reading == "separate" and old.object_mask == "image"
    paper = N["SIE_LayerRecipe"].execute(2.0, 1.0, "image", "reference", "concat", "image", "area", "target")[0]
    assert paper.object_mask == "target"
    assert named(lambda: N["SIE_LayerRecipe"].execute(2.0, 1.0, "image", "reference", "concat", "image", "area",
                                                    "O_t")) == "object_mask"


def test_optimiser_outputs_are_named_for_what_they_carry():
    """Imagic's e_opt or LayerDiffusion's e^_a in the first output, e^_b in the third; types and order kept."""
    cls = N["SIE_OptimizeEmbedding"]
    assert list(cls.RETURN_TYPES) == ["CONDITIONING", "IMAGE", "CONDITIONING"]
    assert list(cls.RETURN_NAMES) == ["e_opt / ê_a", "loss_curve", "ê_b"]
    assert "Imagic" in cls.OUTPUT_TOOLTIPS[0] and "ê_a" in cls.OUTPUT_TOOLTIPS[0] and "ê_b" in cls.OUTPUT_TOOLTIPS[2]


class StepsSeen(Exception):
    pass


def test_fine_tune_steps_default_to_the_recipes(monkeypatch):
    """steps 0 (the new default) trains the recipe's count: Imagic 1,000, SINE 800 / 10,000 with patches,
    LayerDiffusion 250; a number set on the node (a saved workflow's) is used as it is; below 0 is refused."""
    bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]

    def progress(steps, *args, **kwargs):  # the first thing each path does with the step count
        raise StepsSeen(int(steps))

    monkeypatch.setattr(bridge, "Progress", progress)
    monkeypatch.setattr(bridge, "torch_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(sys.modules[PACK.__name__ + ".nodes.training"], "check_memory", lambda *a, **k: None)
    steps = N["SIE_FineTune"].INPUT_TYPES()["required"]["steps"]
    assert steps[0] == "INT" and steps[1]["default"] == 0 and steps[1]["min"] == 0
    model, image = fake_model(SD15), torch.rand(1, 64, 64, 3)
    sine = N["SIE_SineRecipe"].execute("a photo of a sks dog", False, False, 0.0, 0.0, 0.0)[0]
    sine_patches = N["SIE_SineRecipe"].execute("a photo of a sks dog", True, False, 0.0, 0.0, 0.0)[0]
    layer = N["SIE_LayerRecipe"].execute(2.0, 1.0, "image", "reference", "concat", "image", "area")[0]

    def seen(n, recipe, **kw) -> int:
        with pytest.raises(StepsSeen) as e:
            N["SIE_FineTune"].execute(model, None, image, cond, "lora", n, 0.0, 8, 0, recipe, None, **kw)
        return e.value.args[0]

    assert seen(0, None) == 1000 and seen(0, sine) == 800 and seen(0, sine_patches) == 10_000
    # LayerDiffusion's inputs (refused before any work when one it needs is missing), with or without its recipe
    ld = {"mask": torch.ones(1, 64, 64), "reference_image": image, "reference_mask": torch.zeros(1, 64, 64)}
    assert seen(0, layer, **ld) == 250 and seen(0, None, **ld) == 250
    assert named(lambda: seen(0, layer)) == "mask"
    assert seen(1000, layer, **ld) == 1000 and seen(37, None) == 37 and seen(800, sine_patches) == 800  # as saved
    assert named(lambda: N["SIE_FineTune"].execute(model, None, image, cond, "lora", -1, 0.0, 8, 0)) == "steps"


def test_the_optimiser_refuses_reference_inputs_outside_layerdiffusion():
    model, image = fake_model(SD15), torch.rand(1, 64, 64, 3)
    opt = N["SIE_OptimizeEmbedding"].execute
    assert named(lambda: opt(model, None, image, cond, 1, 1e-3, 0, None, None, None, image)) == "reference_image"
    assert named(lambda: opt(model, None, image, cond, 1, 1e-3, 0, None, None, None, None,
                             torch.zeros(1, 64, 64))) == "reference_mask"


def test_reference_background_placeholder_is_our_object_free_drawing():
    """Point 17: the bundled background is what the checked-in script draws (so the licence note holds), the
    reference_background workflow loads it, and both LayerDiffusion notes say which file goes where."""
    import importlib.util
    import json

    import numpy as np
    from PIL import Image

    from helpers import ROOT

    data = ROOT / "core" / "layerdiffusion" / "data"
    spec = importlib.util.spec_from_file_location("make_placeholder", data / "make_placeholder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    bundled = np.asarray(Image.open(data / "table_by_the_sea_512.png").convert("RGB"), np.int16)
    drawn = script.draw().astype(np.int16)
    assert bundled.shape == (512, 512, 3) and int(np.abs(bundled - drawn).max()) <= 1
    assert "MIT" in (data / "README.md").read_text() and "table_by_the_sea_512.png" in (data / "README.md").read_text()
    for name, files in (("layerdiffusion", ["coffee_250x200.png"]),
                        ("layerdiffusion_reference_background", ["coffee_250x200.png", "table_by_the_sea_512.png"])):
        api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
        loaded = sorted(n["inputs"]["image"] for n in api.values() if n["class_type"] == "LoadImage")
        assert loaded == sorted(files), (name, loaded)
        ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        note = next(n["widgets_values"][0] for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote"))
        for where in ("models/checkpoints", "models/sams", "ComfyUI/input", "v1-5-pruned-emaonly.safetensors",
                      "sam_vit_b_01ec64.pth", *files):
            assert where in note, (name, where)
