"""The shared training nodes only call the recipe (issue 20): a sixth method's recipe, written here against
core.recipes alone, runs in Optimize Text Embedding and Fine-Tune Model with no change to any node module,
and the nodes hand it exactly their inputs and turn its outcome into ComfyUI types.

ComfyUI is not needed: the few bridge calls the nodes make (the seam over the MODEL, progress, the LoRA
loading) are replaced by recording stand-ins; the real ones run in tests/integration.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from test_sine_nodes import SD15, fake_model

from helpers import load_pack

PACK = load_pack()
N = PACK.NODE_CLASS_MAPPINGS
training = sys.modules[PACK.__name__ + ".nodes.training"]
recipes = sys.modules[PACK.__name__ + ".core.recipes"]
NodeInputError = sys.modules[PACK.__name__ + ".nodes.common"].NodeInputError


@dataclass(frozen=True)
class ToyRecipe:
    """A sixth method: reads a mask in its fine-tune stage, trains 77 steps by default, at 256 px."""

    seen: list = field(default_factory=list, compare=False)
    method: str = "toy"

    @property
    def title(self) -> str:
        return "Toy: Recipe"

    def inputs(self, stage):
        return frozenset({"mask"}) if stage == "finetune" else frozenset()

    def check(self, stage, connected):
        if stage == "finetune" and connected.get("mask") is None:
            raise recipes.RecipeInputError("mask", "the toy needs a mask", "connect one")

    def default_steps(self, stage):
        return 77

    def trains_at(self, image_hw):
        return (256, 256)

    def optimize_embedding(self, r):
        self.seen.append(("embedding", r))
        return recipes.EmbeddingOutcome(r.cond * 2, [1.0, 0.5], 0.1, "toy embedding loss")

    def finetune(self, r):
        self.seen.append(("finetune", r))
        delta = {"diffusion_model.out.2.weight.diff": torch.ones(3)}
        return recipes.FineTuneOutcome(delta, [1.0, 0.25], 0.1, "toy fine-tuning loss", trained="toy file",
                                       input_map=lambda h, box: h * 0)


@pytest.fixture
def bridged(monkeypatch):
    bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]
    calls = {"memory": [], "applied": []}
    monkeypatch.setattr(bridge, "ComfySD", lambda model, clip=None, vae=None: SimpleNamespace(
        context_dim=768, pooled_dim=0, model=model, clip=clip, vae=vae))
    monkeypatch.setattr(bridge, "Progress", lambda steps: SimpleNamespace(steps=steps, should_stop=lambda: False))
    monkeypatch.setattr(bridge, "torch_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(bridge, "free_memory", lambda: None)

    def apply(model, clip, delta, strength):
        calls["applied"].append((clip, sorted(delta), strength))
        patched = fake_model(SD15, "patched")
        patched.set_model_input_block_patch = lambda p: calls.setdefault("input_map", p)
        return patched, clip

    monkeypatch.setattr(bridge, "apply_delta_with_clip", apply)
    monkeypatch.setattr(training, "check_memory", lambda model, image, *a, **k: calls["memory"].append(
        tuple(image.shape)))
    return calls


def test_a_sixth_methods_recipe_runs_in_the_shared_nodes(bridged):
    model, image = fake_model(SD15), torch.rand(2, 64, 48, 3)
    cond = [[torch.randn(1, 77, 768), {"pooled_output": None}]]
    mask = torch.zeros(1, 64, 48)
    toy = ToyRecipe()
    out_model, curve, trained, clip = N["SIE_FineTune"].execute(model, "vae", image, cond, "full", 0, 0.0, 4, 7, toy,
                                                              None, mask)
    stage, r = toy.seen[-1]
    assert stage == "finetune" and r.steps == 77 and r.lr is None and r.mode == "full" and r.rank == 4
    assert r.seed == 7 and tuple(r.image.shape) == (1, 3, 64, 48) and torch.equal(r.image[0], image[0].permute(2, 0, 1))
    assert torch.equal(r.cond, cond[0][0]) and r.extra["mask"] is mask and r.model.vae == "vae"
    assert not r.text_encoder and r.model.clip is None  # the toy does not read "clip"
    assert bridged["memory"] == [(1, 256, 256, 3)]  # the recipe's training size
    assert bridged["applied"] == [(None, ["diffusion_model.out.2.weight.diff"], 1.0)]
    assert bridged["input_map"].map is not None and trained == "toy file" and clip is None
    assert out_model.family == "patched" and curve.shape[-1] == 3 and curve.ndim == 4

    e, _, e_b = N["SIE_OptimizeEmbedding"].execute(model, "vae", image, cond, 3, 1e-3, 0, None, None, toy)
    assert torch.equal(e[0][0], cond[0][0] * 2) and e[0][1] == cond[0][1] and e_b == []
    assert toy.seen[-1][0] == "embedding" and toy.seen[-1][1].lr == 1e-3 and toy.seen[-1][1].steps == 3


def test_the_shared_nodes_refuse_what_a_recipe_does_not_read_or_lacks(bridged):
    model, image, cond = fake_model(SD15), torch.rand(1, 64, 64, 3), [[torch.randn(1, 77, 768), {}]]

    def named(call) -> str:
        with pytest.raises(NodeInputError) as e:
            call()
        return e.value.input_name

    toy = ToyRecipe()
    fine_tune = N["SIE_FineTune"].execute
    assert named(lambda: fine_tune(model, None, image, cond, "lora", 1, 0.0, 4, 0, toy)) == "mask"  # check()
    assert named(lambda: fine_tune(model, None, image, cond, "lora", 1, 0.0, 4, 0, toy, None, torch.ones(1, 64, 64),
                                   image)) == "reference_image"  # not in inputs("finetune")
    assert named(lambda: N["SIE_OptimizeEmbedding"].execute(model, None, image, cond, 1, 1e-3, 0, None,
                                                           torch.ones(1, 64, 64), toy)) == "mask"
    assert named(lambda: fine_tune(model, None, image, cond, "lora", 1, 0.0, 4, 0, object())) == "recipe"
    assert toy.seen == [] and bridged["applied"] == []  # refused before any work


def test_training_progress_text_shows_the_pace_and_the_time_left(monkeypatch):
    bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]
    shown = []
    monkeypatch.setattr(bridge, "_progress_text", shown.append)
    progress = bridge.Progress(100)
    progress._bar = SimpleNamespace(update_absolute=lambda *a: None)  # as inside a server
    progress(40, 100, {"loss": 0.25, "sec_per_step": 0.5, "eta_s": 30.0})
    assert shown == ["step 40/100  loss 0.2500  (0.5 s/step, 30 s left)"]


def test_memory_inputs_reach_the_recipe(bridged):
    """gradient_checkpointing (auto: on for a GPU only) and optimizer_state, appended to the training nodes."""
    model, image, mask = fake_model(SD15), torch.rand(1, 64, 48, 3), torch.zeros(1, 64, 48)
    cond = [[torch.randn(1, 77, 768), {}]]
    toy = ToyRecipe()
    got = []
    import importlib.util

    cases = [("auto", "32-bit"), ("on", "32-bit"), ("off", "32-bit")]
    if importlib.util.find_spec("bitsandbytes") is not None:  # 8-bit: only where bitsandbytes is installed
        cases.append(("on", "8-bit"))
    for ckpt, state in cases:
        N["SIE_FineTune"].execute(model, "vae", image, cond, "full", 3, 0.0, 4, 0, toy, None, mask,
                                  gradient_checkpointing=ckpt, optimizer_state=state)
        r = toy.seen[-1][1]
        got.append((r.gradient_checkpointing, r.optimizer("adam"), r.optimizer("adamw")))
    assert got == [(False, "adam", "adamw"), (True, "adam", "adamw"), (False, "adam", "adamw"),
                   (True, "adam8bit", "adamw8bit")][:len(cases)]
    N["SIE_OptimizeEmbedding"].execute(model, "vae", image, cond, 3, 1e-3, 0, None, None, toy,
                                       gradient_checkpointing="on")
    assert toy.seen[-1][1].gradient_checkpointing and not toy.seen[-1][1].eight_bit


def test_8bit_moments_without_bitsandbytes_are_refused_naming_the_input(bridged, monkeypatch):
    fit = sys.modules[PACK.__name__ + ".core.fit"]

    def missing(name):
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(fit, "optimizer_library", missing)
    model, image, mask = fake_model(SD15), torch.rand(1, 64, 48, 3), torch.zeros(1, 64, 48)
    toy = ToyRecipe()
    with pytest.raises(NodeInputError, match=r"input 'optimizer_state'.*bitsandbytes.*Fix: install it"):
        N["SIE_FineTune"].execute(model, "vae", image, [[torch.randn(1, 77, 768), {}]], "full", 3, 0.0, 4, 0, toy,
                                  None, mask, optimizer_state="8-bit")
    with pytest.raises(NodeInputError, match=r"input 'gradient_checkpointing'"):
        N["SIE_FineTune"].execute(model, "vae", image, [[torch.randn(1, 77, 768), {}]], "full", 3, 0.0, 4, 0, toy,
                                  None, mask, gradient_checkpointing="sometimes")
    assert toy.seen == []  # refused before any work


@pytest.mark.parametrize("method,base", [("imagic", "adam"), ("sine", "adamw"), ("layerdiffusion", "adam")])
def test_each_methods_recipe_trains_with_the_requested_optimizer_and_checkpointing(method, base, monkeypatch):
    """The real recipes build their fine-tune config from the request: 8-bit moments of the method's own
    optimiser (SINE: AdamW, as the official code) and gradient checkpointing as asked."""
    rec = sys.modules[f"{PACK.__name__}.core.{method}.recipe"]
    seen = []

    class Stop(Exception):
        pass

    def capture(*a, **k):
        seen.append(next(x for x in (*a, *k.values()) if type(x).__name__.endswith("FineTuneConfig")))
        raise Stop

    name = {"imagic": "finetune", "sine": "finetune_sine", "layerdiffusion": "finetune_layered"}[method]
    monkeypatch.setattr(rec, name, capture)
    recipe = next(v for k, v in vars(rec).items() if k.endswith("Recipe") and isinstance(v, type)
                  and getattr(v, "__module__", "") == rec.__name__)()
    model = SimpleNamespace(encode=lambda x: torch.zeros(1, 4, 8, 8), device=torch.device("cpu"))
    extra = {"mask": torch.ones(1, 64, 64), "reference_mask": torch.zeros(1, 64, 64),
             "reference_image": torch.rand(1, 3, 64, 64)}
    r = recipes.StageRequest(model, torch.rand(1, 3, 64, 64), torch.zeros(1, 77, 768), 3, None, 0,
                             torch.device("cpu"), "full", 4, extra if method == "layerdiffusion" else {},
                             checkpointing=True, eight_bit=True)
    with pytest.raises(Stop):
        recipe.finetune(r)
    assert seen[0].optimizer == base + "8bit" and seen[0].gradient_checkpointing
