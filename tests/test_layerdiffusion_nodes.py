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
    assert named(lambda: N["SIE_LayerRecipe"]().run(0.0, 0.0, "image", "reference", "separate", "image",
                                                    "area")) == "lambda_obj"
    recipe = N["SIE_LayerRecipe"]().run(3.0, 1.0, "image", "image", "concat", "mask", "nearest")[0]
    assert recipe.lambda_obj == 3.0 and recipe.background_source == "image" and recipe.reading == "concat"
    model = fake_model(SD15)
    guide = N["SIE_IterativeGuidance"]().run
    assert named(lambda: guide(model, cond, cond, cond, 7.5, "sometimes")) == "start_parity"
    assert named(lambda: guide(model, cond, cond, cond, -1.0, "auto")) == "cfg"
    assert named(lambda: guide(model, [], cond, cond, 7.5, "auto")) == "object_positive"
    assert named(lambda: guide("no model", cond, cond, cond, 7.5, "auto")) == "model"


def test_shared_optimiser_needs_both_layered_inputs():
    model, image = fake_model(SD15), torch.rand(1, 64, 64, 3)
    opt = N["SIE_OptimizeEmbedding"]().run
    assert named(lambda: opt(model, None, image, cond, 1, 1e-3, 0, None, torch.ones(1, 64, 64))) == "conditioning_b"
    assert named(lambda: opt(model, None, image, cond, 1, 1e-3, 0, cond, None)) == "mask"
    assert named(lambda: opt(model, None, image, cond, 1, 1e-3, 0, cond, torch.ones(1, 64, 64), "x")) == "recipe"
    sine_recipe = N["SIE_SineRecipe"]().run("a photo of a sks dog", False, False, 0.0, 0.0, 0.0)[0]
    assert named(lambda: opt(model, None, image, cond, 1, 1e-3, 0, None, None, sine_recipe)) == "recipe"
