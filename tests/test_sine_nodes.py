"""SINE node checks that need no ComfyUI (the nodes themselves run in tests/integration/test_sine_*_comfy.py):
bad inputs are refused before anything loads, with the input named."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from helpers import load_pack

PACK = load_pack()
N = PACK.NODE_CLASS_MAPPINGS
NodeInputError = sys.modules[PACK.__name__ + ".nodes.common"].NodeInputError


class SD15:
    unet_config = {"context_dim": 768, "in_channels": 4, "model_channels": 320}


class SDXL:
    unet_config = {"context_dim": 2048, "in_channels": 4, "adm_in_channels": 2816, "model_channels": 320}


class SDXLRefiner:  # a family the nodes refuse (SDXL itself is served)
    unet_config = {"context_dim": 1280, "in_channels": 4, "adm_in_channels": 2560, "model_channels": 384}


def fake_model(config, family: str = "a"):
    m = SimpleNamespace(model=SimpleNamespace(model_config=config(), model_type=SimpleNamespace(name="EPS")),
                        model_options={}, patches={}, family=family)
    m.clone = lambda: fake_model(config, family)
    m.is_clone = lambda other: getattr(other, "family", None) == family
    return m


def named(call) -> str:
    with pytest.raises(NodeInputError) as e:
        call()
    return e.value.input_name


def test_positional_map_is_refused_on_a_model_that_is_not_sd1():
    assert named(lambda: N["SIE_PositionalMap"].execute(fake_model(SDXLRefiner), "bilinear")) == "model"
    assert named(lambda: N["SIE_PositionalMap"].execute("not a model", "bilinear")) == "model"
    assert named(lambda: N["SIE_PositionalMap"].execute(fake_model(SD15), "bicubic")) == "mode"


def test_model_guidance_names_each_bad_input():
    base, same = fake_model(SD15), fake_model(SD15)
    run = N["SIE_ModelGuidance"].execute
    with pytest.raises(NodeInputError, match="SDXL model while the pretrained MODEL is SD15"):
        run(base, fake_model(SDXL, "b"), [], [], [], 7.5, 0.7, 400)
    assert named(lambda: run(base, fake_model(SD15, "b"), [], [], [], 7.5, 0.7, 400)) == "finetuned_model"
    assert named(lambda: run(base, same, [], [], [], 7.5, 1.5, 400)) == "v"
    assert named(lambda: run(base, same, [], [], [], 7.5, -0.1, 400)) == "v"
    assert named(lambda: run(base, same, [], [], [], 7.5, 0.7, 1000)) == "K"
    assert named(lambda: run(base, same, [], [], [], 7.5, 0.7, -1)) == "K"
    assert named(lambda: run(base, same, [], [], [], -1.0, 0.7, 400)) == "cfg"
    assert named(lambda: run(base, same, [], [], [], 7.5, 0.7, 400, same, None, 0.2)) == "finetune_positive_2"
    assert named(lambda: run(base, same, [], [], [], 7.5, 0.7, 400, fake_model(SD15, "c"), [], 0.2)) \
        == "finetuned_model_2"
    assert named(lambda: run(base, same, [], [], [], 7.5, 0.7, 400, same, [], 0.5)) == "weight_2"


def test_guidance_sweep_and_recipe_check_their_values():
    sweep = N["SIE_GuidanceSweep"].execute
    base = fake_model(SD15)
    latent = {"samples": None}
    assert named(lambda: sweep(base, base, [], [], [], latent, "400, 1200", "0.7", 0, 10, 7.5, "ddim",
                               "ddim_uniform")) == "K_values"
    assert named(lambda: sweep(base, base, [], [], [], latent, "400", "0.7, x", 0, 10, 7.5, "ddim",
                               "ddim_uniform")) == "v_values"
    assert named(lambda: sweep(base, base, [], [], [], latent, "400", "", 0, 10, 7.5, "ddim",
                               "ddim_uniform")) == "v_values"
    assert named(lambda: N["SIE_SineRecipe"].execute("  ", False, False, 0.0, 0.0, 0.0)) == "prompt"
    recipe = N["SIE_SineRecipe"].execute("a photo of a sks dog", True, True, 1.0, 0.1, 0.0)[0]
    assert recipe.patches and recipe.train_text_encoder and recipe.pooled_x0_weight == 1.0
    assert named(lambda: N["SIE_SaveSine"].execute("not trained", "sine")) == "trained"


def test_add_fine_tuned_model_chains_and_checks_its_inputs():
    base, same = fake_model(SD15), fake_model(SD15)
    add = N["SIE_SineAddModel"].execute
    one = add(same, [["c1"]], 0.2, 300)[0]
    two = add(same, [["c2"]], 0.1, 600, one)[0]
    assert [(m.weight, m.K) for m in two] == [(0.2, 300), (0.1, 600)] and len(one) == 1  # the chain is not mutated
    assert named(lambda: add("not a model", [], 0.2, 300)) == "finetuned_model"
    assert named(lambda: add(same, "text", 0.2, 300)) == "finetune_positive"
    assert named(lambda: add(same, [], 1.2, 300)) == "weight"
    assert named(lambda: add(same, [], 0.2, 1000)) == "K"
    assert named(lambda: add(same, [], 0.2, 300, "x")) == "models"
    run = N["SIE_ModelGuidance"].execute
    assert named(lambda: run(base, same, [], [], [], 7.5, 0.7, 400, None, None, 0.0, "x")) == "more_models"
    assert named(lambda: run(base, same, [], [], [], 7.5, 0.7, 400, None, None, 0.0,
                             add(fake_model(SD15, "other"), [], 0.1, 300)[0])) == "more_models"
    # v = 0.7 leaves 0.3 to share: 0.2 + 0.1 chained is all of it, more is refused
    assert named(lambda: run(base, same, [], [], [], 7.5, 0.7, 400, None, None, 0.0,
                             add(same, [], 0.2, 300, two)[0])) == "more_models"


def test_sine_recipe_refuses_training_sdxls_text_encoders_before_it_trains(monkeypatch):
    """train_text_encoder trains SD 1.x's one CLIP; on SDXL (pooled_dim > 0) the recipe names the input before
    anything trains, and on SD 1.x it goes on to the fine-tune."""
    import torch

    recipe_module = sys.modules[PACK.__name__ + ".core.sine.recipe"]
    recipes = sys.modules[PACK.__name__ + ".core.recipes"]
    trained = []

    def fake_finetune(*args, **kwargs):
        trained.append(kwargs.get("prompt"))
        raise RuntimeError("trained")

    monkeypatch.setattr(recipe_module, "finetune_sine", fake_finetune)
    recipe = N["SIE_SineRecipe"].execute("a photo of a sks dog", False, True, 0.0, 0.0, 0.0)[0]

    def request(pooled_dim: int):
        return recipes.StageRequest(SimpleNamespace(pooled_dim=pooled_dim), torch.rand(1, 3, 64, 64),
                                    torch.zeros(1, 77 + bool(pooled_dim), 2048 if pooled_dim else 768), 2, None, 0,
                                    torch.device("cpu"), text_encoder=True, extra={"clip": object()})

    with pytest.raises(recipes.RecipeInputError, match="SDXL") as e:
        recipe.finetune(request(1280))
    assert e.value.name == "train_text_encoder" and trained == []
    with pytest.raises(RuntimeError, match="trained"):
        recipe.finetune(request(0))
    assert trained == ["a photo of a sks dog"]


@pytest.mark.parametrize("trained_on, loaded_on, words", [
    (SD15, SDXL, ("SD 1.x model (its c^ is 768 wide)", "SDXL model (2048 wide)")),
    (SDXL, SD15, ("SDXL model (its c^ is 2048 wide)", "SD 1.x model (768 wide)")),
])
def test_load_sine_names_a_file_fine_tuned_on_the_other_family(tmp_path, trained_on, loaded_on, words):
    """Load SINE reads the recorded c^'s width against the MODEL's and names the file before it patches anything
    (not an unpack_cond failure inside sampling, nor LoRA keys silently dropped)."""
    import torch

    sine = sys.modules[PACK.__name__ + ".core.sine"]
    width = trained_on.unet_config["context_dim"]
    rows = 78 if "adm_in_channels" in trained_on.unet_config else 77  # SDXL's c^ is packed: context + pooled row
    result = sine.SineFineTuneResult(mode="lora", delta={}, deltas={}, losses=[0.1], terms={}, seconds=0.0,
                                     trainable_parameters=0, positional=False, c_hat=torch.randn(1, rows, width))
    path = sine.save_sine(result, "a photo of a sks dog", tmp_path / "sine.safetensors")
    with pytest.raises(NodeInputError) as e:
        N["SIE_LoadSine"].execute(fake_model(loaded_on), None, str(path), 1.0)
    assert e.value.input_name == "sine_name" and all(w in str(e.value) for w in words), str(e.value)
    check_family = sys.modules[PACK.__name__ + ".nodes.sine_train"].check_family
    assert check_family(sine.load_sine(path)[0], fake_model(trained_on)) is None  # the right family passes
