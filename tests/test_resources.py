"""Memory estimates and the refusals made with them (core/resources.py and the nodes' guards)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from core import resources as R
from core.sinddm.model import NetConfig, SinDDMNet, parameter_count
from helpers import load_pack

PACK = load_pack()
N = PACK.NODE_CLASS_MAPPINGS
NodeInputError = sys.modules[PACK.__name__ + ".nodes.common"].NodeInputError
training_nodes = sys.modules[PACK.__name__ + ".nodes.training"]  # the shared training nodes and their checks
PACK_R = sys.modules[PACK.__name__ + ".core.resources"]  # the nodes' copy of core.resources
GIB = R.GIB


def set_free(monkeypatch, n):
    monkeypatch.setattr(PACK_R, "free_memory_bytes", lambda device: n)


def test_sinddm_estimates_grow_with_size_count_and_width():
    base = R.sinddm_sample_bytes(100, 128, 1, 160)
    assert R.sinddm_sample_bytes(200, 128, 1, 160) == 2 * base
    assert R.sinddm_sample_bytes(100, 128, 4, 160) == 4 * base
    assert R.sinddm_sample_bytes(100, 128, 1, 320) > base
    t = R.sinddm_train_bytes(200, 250, 32, 160)
    assert R.sinddm_train_bytes(200, 250, 64, 160) > t > R.sinddm_train_bytes(200, 250, 32, 64)
    # paper settings: a few GiB to ~20 GiB, i.e. fit on the paper's 48 GB A6000
    assert 5 * GIB < t < 40 * GIB


@pytest.mark.parametrize("width", [8, 48, 160])
def test_sinddm_parameter_formula_matches_the_network(width):
    assert R.sinddm_net_params(width) == parameter_count(SinDDMNet(NetConfig(width)))


def test_imagic_estimates():
    full = R.imagic_parts((64, 64), "full")
    assert abs(full["fp32 copy"] / 1e9 - 3.4) < 0.1 and abs(full["Adam state"] / 1e9 - 6.9) < 0.1
    assert "gradients" not in full  # stepped inside backward, one tensor at a time (core.fit.StepInBackward)
    assert abs(R.imagic_parts((64, 64), "full", optimizer="adam8bit")["Adam state"] / 1e9 - 1.7) < 0.1
    assert R.imagic_bytes((64, 64), "full") > R.imagic_bytes((64, 64), "lora") > R.imagic_bytes((64, 64), "embedding")
    assert R.imagic_bytes((128, 128), "lora") > R.imagic_bytes((64, 64), "lora")
    assert R.imagic_bytes((64, 64), "lora", gradient_checkpointing=True) < R.imagic_bytes((64, 64), "lora")
    with pytest.raises(ValueError, match="mode"):
        R.imagic_parts((64, 64), "half")


def test_check_fits(monkeypatch):
    monkeypatch.setattr(R, "free_memory_bytes", lambda device: 8 * GIB)
    assert R.check_fits(GIB, "cpu", "x", "fix it") == 8 * GIB
    with pytest.raises(R.ResourceError, match=r"x needs about 16\.0 GiB but only 8\.0 GiB is free on the cpu") as e:
        R.check_fits(16 * GIB, "cpu", "x", "fix it")
    assert isinstance(e.value, ValueError) and e.value.fix == "fix it" and "Fix: fix it" in str(e.value)
    monkeypatch.setattr(R, "free_memory_bytes", lambda device: None)  # unknown: not checked
    assert R.check_fits(10**15, "cpu", "x", "") is None


def test_free_memory_of_this_machine():
    free = R.free_memory_bytes("cpu")
    assert free is None or free > 0
    assert R.free_memory_bytes(torch.device("meta")) is None


# --------------------------------------------------------------------------------------
# The nodes' guards (free memory fixed at 4 GiB)
# --------------------------------------------------------------------------------------
@pytest.fixture
def four_gib(monkeypatch):
    set_free(monkeypatch, 4 * GIB)


@pytest.fixture(scope="module")
def tiny_model():
    from core.sinddm import SinDDM, build_pyramid

    pyramid = build_pyramid(torch.rand(3, 40, 48))
    return SinDDM.create(SinDDMNet(NetConfig(16)), pyramid)


def test_sample_node_refuses_what_cannot_fit(tiny_model, four_gib):
    node = N["SIE_SinDDMSample"]
    with pytest.raises(NodeInputError, match=r"input 'count'.*GiB.*Fix: lower count to \d+"):
        node.execute(tiny_model, count=10**6, seed=0, width_scale=1.0, height_scale=1.0, width=0, height=0, start_steps="")
    with pytest.raises(NodeInputError, match=r"input 'width'.*100000x100000 px.*GiB.*smaller size"):
        node.execute(tiny_model, count=1, seed=0, width_scale=1.0, height_scale=1.0, width=100000, height=100000,
                 start_steps="")
    (out,) = node.execute(tiny_model, count=1, seed=0, width_scale=1.0, height_scale=1.0, width=0, height=0,
                      start_steps="")
    assert out.shape[0] == 1


def test_inject_and_edit_nodes_refuse_huge_counts(tiny_model, four_gib):
    image = torch.rand(1, 40, 48, 3)
    with pytest.raises(NodeInputError, match=r"input 'count'.*GiB"):
        N["SIE_SinDDMInject"].execute(tiny_model, image, "style_transfer", 0, 10**6, 0, True)
    with pytest.raises(NodeInputError, match=r"input 'count'.*GiB"):
        N["SIE_SinDDMEditTrainingImage"].execute(tiny_model, (), "training_image", 0, 10**6, 0)


def test_train_node_refuses_what_cannot_fit(monkeypatch):
    set_free(monkeypatch, GIB // 4)
    image = torch.rand(1, 100, 128, 3)
    with pytest.raises(NodeInputError, match=r"input 'batch_size'.*GiB"):
        N["SIE_SinDDMTrain"].execute(image, 1, 256, 160, 1e-3, 0, 0, "fp32")
    set_free(monkeypatch, GIB // 1000)
    with pytest.raises(NodeInputError, match=r"input 'width'.*GiB"):
        N["SIE_SinDDMTrain"].execute(image, 1, 1, 512, 1e-3, 0, 0, "fp32")


def fake_sd15(params: int = R.SD15_UNET_PARAMS, adm=None):
    """A MODEL whose fp16 UNet reports a parameter count without allocating it (SD 1.5's by default)."""
    weights = [SimpleNamespace(numel=lambda: params, dtype=torch.float16)]
    config = SimpleNamespace(unet_config={"adm_in_channels": adm, "context_dim": 2048 if adm else 768})
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=SimpleNamespace(parameters=lambda: iter(weights)),
                                                 model_config=config, manual_cast_dtype=None))


def test_imagic_guard_names_mode_or_image():
    model, image = fake_sd15(), torch.rand(1, 512, 512, 3)
    check = training_nodes.check_memory
    free = 8 * GIB
    check(model, image, "embedding", torch.device("cpu"), False, free=free)
    check(model, image, "lora", torch.device("cpu"), False, free=free)
    with pytest.raises(NodeInputError, match=r"input 'mode'.*full fine-tune.*weight copies 1.6.*Adam state.*15.2 GiB.*"
                                             r"Fix: use mode lora"):
        check(model, image, "full", torch.device("cpu"), False, free=free)
    with pytest.raises(NodeInputError, match=r"input 'image'.*GiB.*smaller image"):
        check(model, torch.rand(1, 4096, 4096, 3), "lora", torch.device("cpu"), False, free=free)
    assert training_nodes.unet_param_count(object()) == R.SD15_UNET_PARAMS


def test_sdxl_estimates_scale_activations_and_count_comfyui_weight_copies():
    """SDXL: 2x SD 1.5's activations per latent pixel and 87 % of the UNet copied for backward on ComfyUI's back
    end (3 % with gradient checkpointing), figures of benchmarks/unet_saved_tensors.py."""
    xl = R.imagic_parts((128, 128), "lora", 2_567_463_684, 8, True, "adam", "sdxl", 2)
    sd = R.imagic_parts((128, 128), "lora", R.SD15_UNET_PARAMS, 8, True, "adam", "sd1", 2)
    assert xl["activations"] == 2 * sd["activations"]
    assert xl["weight copies"] == int(0.03 * 2_567_463_684 * 2)
    assert R.imagic_parts((128, 128), "lora", 2_567_463_684, 8, False, "adam", "sdxl", 2)["weight copies"] == \
        int(0.87 * 2_567_463_684 * 2)
    assert "weight copies" not in R.imagic_parts((64, 64), "lora")  # the diffusers back end copies nothing
    model, image = fake_sd15(2_567_463_684, adm=2816), torch.rand(1, 1024, 1024, 3)
    check = training_nodes.check_memory
    check(model, image, "lora", torch.device("cpu"), True, free=16 * GIB)
    with pytest.raises(NodeInputError, match=r"input 'image'.*40.9 GiB.*SDXL is trained at 1024x1024.*"
                                             r"gradient_checkpointing on"):
        check(model, image, "lora", torch.device("cpu"), False, free=16 * GIB)
