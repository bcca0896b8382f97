"""High-Fidelity rectifier nodes without ComfyUI (they run on a real server in
tests/integration/test_rectifier_comfy.py): the schema, every input check that comes before anything is loaded
(with the input named), the per-call rule of Apply Rectifier on fake denoiser calls, the wrapper that hands
ComfyUI's calls to it, and save / load of the file."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_sine_nodes import SD15, SDXLRefiner, fake_model

from helpers import load_pack

PACK = load_pack()
N = PACK.NODE_CLASS_MAPPINGS
NodeInputError = sys.modules[PACK.__name__ + ".nodes.common"].NodeInputError
rect_nodes = sys.modules[PACK.__name__ + ".nodes.rectifier"]
views = sys.modules[PACK.__name__ + ".nodes.comfy_views"]
core_rect = sys.modules[PACK.__name__ + ".core.rectifier"]
seam = sys.modules[PACK.__name__ + ".core.seam"]
core_views = sys.modules[PACK.__name__ + ".core.views"]

LAYER = "output_blocks.0.0.in_layers.2.weight"
IDS = ["SIE_TrainRectifier", "SIE_ApplyRectifier", "SIE_SaveRectifier", "SIE_LoadRectifier", "SIE_DDIMInversion"]


def tiny_rectifier(layers=((LAYER, (8, 8, 3, 3)),), channels: int = 4, backbone: str = "ldm", seed: int = 0):
    cfg = core_rect.RectifierConfig(tuple(core_rect.LayerSpec(n, s) for n, s in layers), channels,
                                    encoder_layers=(1, 1, 1, 1), width=8, time_dim=8, seed=seed)
    return rect_nodes.TrainedRectifier(core_rect.Rectifier(cfg), core_rect.RectifierInfo(backbone))


def sd_model(config=SD15, layers=((LAYER, (8, 8, 3, 3)),)):
    """A fake MODEL whose UNet has the given (name, shape) parameters."""
    m = fake_model(config)
    params = {n: torch.zeros(s) for n, s in layers}
    m.model.diffusion_model = SimpleNamespace(named_parameters=lambda: iter(params.items()))
    return m


def named(call) -> str:
    with pytest.raises(NodeInputError) as e:
        call()
    return e.value.input_name


def test_node_ids_categories_and_input_order():
    for node_id in IDS:
        cls = N[node_id]
        assert cls.CATEGORY == "single_image_edit/rectifier" and len(cls.DESCRIPTION) > 50
    spec = N["SIE_TrainRectifier"].INPUT_TYPES()
    assert list(spec["required"]) == ["model", "vae", "images", "mode", "steps", "lr", "seed"]
    assert list(spec["optional"]) == ["open_clip", "source_text", "target_text", "rectifier", "conditioning", "batch",
                                      "estimate", "encoder_weights", "checkpoint_every",
                                      "resume_from"]
    assert spec["required"]["steps"][1]["default"] == 5000 and spec["required"]["lr"][1]["default"] == 1e-3
    assert spec["optional"]["batch"][1]["default"] == 8 and spec["optional"]["open_clip"][0] == "SIE_OPEN_CLIP"
    assert N["SIE_TrainRectifier"].RETURN_TYPES == ["SIE_RECTIFIER", "IMAGE"]
    assert N["SIE_TrainRectifier"].RETURN_NAMES == ["rectifier", "loss"]
    spec = N["SIE_ApplyRectifier"].INPUT_TYPES()
    assert list(spec["required"]) == ["model", "rectifier", "image", "strength", "vae"]
    assert list(spec["optional"]) == ["estimate"] and N["SIE_ApplyRectifier"].RETURN_TYPES == ["MODEL"]
    assert list(N["SIE_SaveRectifier"].INPUT_TYPES()["required"]) == ["rectifier", "filename_prefix"]
    assert N["SIE_SaveRectifier"].OUTPUT_NODE and N["SIE_SaveRectifier"].RETURN_TYPES == []
    assert list(N["SIE_LoadRectifier"].INPUT_TYPES()["required"]) == ["rectifier_name"]
    assert PACK.NODE_DISPLAY_NAME_MAPPINGS["SIE_ApplyRectifier"] == "Apply Rectifier"
    for node_id in IDS:  # every input and output explained
        cls = N[node_id]
        spec = cls.INPUT_TYPES()
        for section in (spec.get("required", {}), spec.get("optional", {})):  # not ComfyUI's hidden inputs
            for name, decl in section.items():
                assert decl[1]["tooltip"].strip(), (node_id, name)
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES)


def test_train_rectifier_names_each_bad_input():
    run = N["SIE_TrainRectifier"].execute
    model, image = sd_model(), torch.rand(2, 64, 64, 3)
    clip = SimpleNamespace(model=torch.nn.Linear(1, 1), encode_image=lambda x: x)
    assert named(lambda: run(fake_model(SDXLRefiner), None, image, "recon", 1, 1e-3, 0)) == "model"
    assert named(lambda: run(model, None, image, "invert", 1, 1e-3, 0)) == "mode"
    assert named(lambda: run(model, None, image, "recon", 0, 1e-3, 0)) == "steps"
    assert named(lambda: run(model, None, image, "recon", 1, 0.0, 0)) == "lr"
    assert named(lambda: run(model, None, image, "recon", 1, 1e-3, 0, batch=0)) == "batch"
    assert named(lambda: run(model, None, image, "recon", 1, 1e-3, 0, estimate="x")) == "estimate"
    assert named(lambda: run(model, None, torch.rand(1, 32, 32, 3), "recon", 1, 1e-3, 0)) == "images"
    with pytest.raises(NodeInputError, match="multiples of 8") as e:
        run(model, None, torch.rand(1, 64, 68, 3), "recon", 1, 1e-3, 0)
    assert e.value.input_name == "images"
    assert named(lambda: run(model, None, "no image", "recon", 1, 1e-3, 0)) == "images"
    assert named(lambda: run(model, None, image, "edit", 1, 1e-3, 0)) == "open_clip"
    assert named(lambda: run(model, None, image, "edit", 1, 1e-3, 0, "not a clip", "face", "smile")) == "open_clip"
    assert named(lambda: run(model, None, image, "edit", 1, 1e-3, 0, clip, "face", "  ")) == "target_text"
    assert named(lambda: run(model, None, image, "edit", 1, 1e-3, 0, clip, "face", "face")) == "target_text"
    other = tiny_rectifier((("output_blocks.9.0.in_layers.2.weight", (8, 8, 3, 3)),))
    wrong_shape = tiny_rectifier(((LAYER, (8, 16, 3, 3)),))
    pixel = tiny_rectifier(channels=3, backbone="pixel")
    for bad in ("a file name", other, wrong_shape, pixel):
        assert named(lambda bad=bad: run(model, None, image, "recon", 1, 1e-3, 0, rectifier=bad)) == "rectifier"
    with pytest.raises(NodeInputError, match="pixel-space DDPM"):
        run(model, None, image, "recon", 1, 1e-3, 0, rectifier=pixel)
    with pytest.raises(NodeInputError, match="another network"):
        run(model, None, image, "recon", 1, 1e-3, 0, rectifier=other)


def test_training_memory_check_blames_batch_or_images():
    check = rect_nodes.check_train_memory
    model, gib = sd_model(), 1 << 30
    check(model, (64, 64), 8, 10_000, "cpu", free=100 * gib)  # fits: no error
    with pytest.raises(NodeInputError) as e:  # 8 x 4 GiB of activations, 6 GiB free: one image would fit
        check(model, (64, 64), 8, 10_000, "cpu", free=6 * gib)
    assert e.value.input_name == "batch" and "lower batch to 1" in str(e.value)
    assert named(lambda: check(model, (64, 64), 8, 10_000, "cpu", free=1 * gib)) == "images"


def test_apply_rectifier_names_each_bad_input():
    run = N["SIE_ApplyRectifier"].execute
    model, rect, image = sd_model(), tiny_rectifier(), torch.rand(1, 64, 64, 3)
    assert named(lambda: run(fake_model(SDXLRefiner), rect, image, 1.0, None)) == "model"
    assert named(lambda: run(model, "rectifier", image, 1.0, None)) == "rectifier"
    assert named(lambda: run(model, tiny_rectifier(channels=3, backbone="pixel"), image, 1.0, None)) == "rectifier"
    assert named(lambda: run(sd_model(layers=(("output_blocks.1.0.in_layers.2.weight", (8, 8, 3, 3)),)), rect, image,
                             1.0, None)) == "rectifier"
    assert named(lambda: run(model, rect, image, 2.5, None)) == "strength"
    assert named(lambda: run(model, rect, image, -0.1, None)) == "strength"
    assert named(lambda: run(model, rect, image, 1.0, None, "previous")) == "estimate"
    assert named(lambda: run(model, rect, torch.rand(1, 64, 64, 4), 1.0, None)) == "image"
    assert named(lambda: run(model, rect, image, 1.0, None)) == "vae"


# --------------------------------------------------------------------------------------
class FakeCall:
    """A DenoiserCall as RectifierRule sees it; ``run`` records the view and features and returns a
    denoised output that depends on the modulation's A factors (zero for the base)."""

    def __init__(self, x, sigma, cond_or_uncond, log):
        self.x, self.sigma, self.cond_or_uncond, self.log = x, sigma, list(cond_or_uncond), log
        self.t = (sigma * 100).long()

    def run(self, view=0, features=None):
        self.log.append((view, features))
        if view == 0:
            return torch.zeros_like(self.x)
        a = next(iter(features.modulation.values())).a  # [B, C_out, k, k]
        return torch.zeros_like(self.x) + a.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)


def bumped_rectifier():
    r = tiny_rectifier()
    with torch.no_grad():
        for b in r.net.branches:
            b.head_a.weight.normal_(generator=torch.Generator().manual_seed(1))
    return r


def test_rule_strength_zero_is_the_base_pass_alone():
    log = []
    rule = rect_nodes.RectifierRule(bumped_rectifier().net, torch.rand(1, 4, 8, 8), 0.0)
    out = rule(FakeCall(torch.rand(2, 4, 8, 8), torch.tensor([5.0, 5.0]), [0], log))
    assert torch.equal(out, torch.zeros(2, 4, 8, 8)) and [v for v, _ in log] == [0]
    assert rule.net is None  # R never even copied


def test_rule_maps_one_reference_per_latent_onto_each_conditioning_chunk():
    net = bumped_rectifier().net
    refs = torch.rand(2, 4, 8, 8)
    rule = rect_nodes.RectifierRule(net, refs, 1.0)
    log = []
    x = torch.rand(4, 4, 8, 8)  # cond chunk (2 latents) + uncond chunk (2 latents)
    out = rule(FakeCall(x, torch.full((4,), 3.0), [0, 1], log))
    assert [v for v, _ in log] == [0, 1] and rule.calls == {"base": 1, "modulated": 1}
    a = next(iter(log[1][1].modulation.values())).a
    assert a.shape[0] == 4 and torch.equal(a[0], a[2]) and torch.equal(a[1], a[3]) and not torch.equal(a[0], a[1])
    # the same as the reference alone with its latent
    alone = rect_nodes.RectifierRule(net, refs[1:], 1.0)
    out1 = alone(FakeCall(x[1:2], torch.full((1,), 3.0), [0], []))
    assert torch.allclose(out[1], out1[0], atol=1e-6)
    assert rule.source is net and rule.net is not net  # R is copied, the SIE_RECTIFIER's network untouched
    # one reference broadcasts; a reference of another size is resized to the latent
    rule = rect_nodes.RectifierRule(net, torch.rand(1, 4, 16, 16), 1.0)
    assert rule(FakeCall(torch.rand(3, 4, 8, 8), torch.full((3,), 3.0), [0], [])).shape == (3, 4, 8, 8)
    # 3 references for 2 latents: named
    rule = rect_nodes.RectifierRule(net, torch.rand(3, 4, 8, 8), 1.0)
    assert named(lambda: rule(FakeCall(torch.rand(4, 4, 8, 8), torch.full((4,), 3.0), [0, 1], []))) == "image"


def test_rule_modulated_estimate_reuses_the_previous_call_of_a_trajectory():
    rule = rect_nodes.RectifierRule(bumped_rectifier().net, torch.rand(1, 4, 8, 8), 1.0, "modulated")
    log = []
    x = torch.rand(1, 4, 8, 8)
    for sigma in (10.0, 5.0, 1.0):  # one trajectory: one base pass
        rule(FakeCall(x, torch.tensor([sigma]), [0], log))
    assert [v for v, _ in log] == [0, 1, 1, 1]
    rule(FakeCall(x, torch.tensor([10.0]), [0], log))  # a new run starts at a higher sigma: base again
    rule(FakeCall(x, torch.tensor([0.5]), [0, 1], log))  # other conditioning chunks: their own trajectory
    assert [v for v, _ in log][4:] == [0, 1, 0, 1] and rule.calls == {"base": 3, "modulated": 5}


def test_rule_follows_the_model_between_devices_but_keeps_float32():
    rule = rect_nodes.RectifierRule(bumped_rectifier().net, torch.rand(1, 4, 8, 8), 1.0)
    assert rule.to(torch.float16) is rule and rule.to("cpu") is rule  # nothing copied yet: no-ops
    rule(FakeCall(torch.rand(1, 4, 8, 8), torch.tensor([2.0]), [0], []))
    rule.to(torch.float16)
    rule.to(torch.device("cpu"))
    assert next(rule.net.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------------------
def test_call_rule_wrapper_activates_views_chains_and_copies_cheaply():
    viewset = core_views.ViewSet([seam.ViewSpec(modulates=(LAYER,))])
    seen = []

    def apply_model(x, sigma, **c):
        seen.append((viewset.active, viewset.call.modulation, c))
        return x * 2

    inner_calls = []

    class Inner:
        def __call__(self, apply, args):
            inner_calls.append(args["cond_or_uncond"])
            return apply(args["input"], args["timestep"], **args["c"])

        def to(self, device):
            self.device = device
            return self

        def models(self):
            return ["extra"]

    fn = object()

    def rule(call):
        assert torch.equal(call.t, torch.tensor([7])) and call.cond_or_uncond == [1]
        base = call.run()
        return call.run(1, seam.Features(modulation={LAYER: fn})) + base

    ms = SimpleNamespace(timestep=lambda s: torch.full(s.shape, 7))
    wrapper = views.CallRuleWrapper(viewset, rule, ms, Inner())
    args = {"input": torch.ones(1, 4, 2, 2), "timestep": torch.tensor([3.0]), "c": {"c_crossattn": "text"},
            "cond_or_uncond": [1]}
    out = wrapper(lambda x, s, **c: apply_model(x, s, **c), args)
    assert torch.equal(out, torch.full((1, 4, 2, 2), 4.0))
    assert [(a, m) for a, m, _ in seen] == [(0, None), (1, {LAYER: fn})] and seen[0][2] == {"c_crossattn": "text"}
    assert inner_calls == [[1], [1]] and viewset.active == 0  # the inner wrapper runs inside both passes
    assert wrapper.to("cpu") is wrapper and wrapper.inner.device == "cpu" and wrapper.models() == ["extra"]
    twin = copy.deepcopy(wrapper)  # ComfyUI deep-copies model options when it clones a MODEL
    assert twin.viewset is viewset and twin.rule is rule and twin.inner is not wrapper.inner


# --------------------------------------------------------------------------------------
def test_save_and_load_round_trip_and_refusals(tmp_path, monkeypatch):
    bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]
    monkeypatch.setattr(bridge, "save_dir", lambda name: tmp_path)
    rect = bumped_rectifier()
    rect.info.history.append({"mode": "recon", "steps": 3})
    ui = N["SIE_SaveRectifier"].execute(rect, "faces/recon")
    assert ui.ui["text"] == ["faces/recon_00001.safetensors"]
    path = tmp_path / "faces" / "recon_00001.safetensors"
    loaded, info = N["SIE_LoadRectifier"].execute(str(path))
    assert info.startswith("recon rectifier, 0 steps, 1 modulated layers")
    assert all(torch.equal(a, b) for a, b in zip(rect.net.state_dict().values(), loaded.net.state_dict().values()))
    assert loaded.info.history == rect.info.history and loaded.net.layer_names == (LAYER,)
    assert not any(p.is_inference() for p in loaded.net.parameters())
    assert named(lambda: N["SIE_SaveRectifier"].execute("not a rectifier", "x")) == "rectifier"
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:300])
    from safetensors.torch import save_file

    sine = tmp_path / "sine.safetensors"
    save_file({"x": torch.zeros(1)}, str(sine), {"format": "sie.sine", "version": "1"})
    for bad in (truncated, sine, tmp_path / "missing.safetensors"):
        with pytest.raises(NodeInputError) as e:
            N["SIE_LoadRectifier"].execute(str(bad))
        assert e.value.input_name == "rectifier_name" and bad.name in str(e.value)


def test_loss_image_has_one_chart_per_term_in_edit_mode():
    fit = SimpleNamespace(losses=[1.0, 0.5], terms={"clip": [0.9, 0.8], "l1": [0.1, 0.05]})
    assert rect_nodes.loss_image(fit, "recon").shape == (1, 320, 640, 3)
    assert rect_nodes.loss_image(fit, "edit").shape == (1, 960, 640, 3)


# --------------------------------------------------------------------------------------
def test_ddim_inversion_node_schema_and_bad_inputs():
    cls = N["SIE_DDIMInversion"]
    assert cls.CATEGORY == "single_image_edit/rectifier" and list(cls.RETURN_TYPES) == ["LATENT", "SIGMAS"]
    assert list(cls.INPUT_TYPES()["required"]) == ["model", "positive", "latent", "steps"]
    assert "SamplerCustom" in cls.DESCRIPTION and "undo the edit" in cls.DESCRIPTION  # which model inverts, why
    run = cls.execute
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    assert named(lambda: run(fake_model(SDXLRefiner), [], latent, 10)) == "model"
    assert named(lambda: run(sd_model(), [], {"samples": torch.zeros(4, 8, 8)}, 10)) == "latent"
    assert named(lambda: run(sd_model(), [], "a latent", 10)) == "latent"
    assert named(lambda: run(sd_model(), [], latent, 0)) == "steps"
    assert named(lambda: run(sd_model(), [], latent, 10)) == "positive"


def test_train_rectifier_edit_without_a_rectifier_says_it_starts_from_delta_zero(caplog):
    spec = N["SIE_TrainRectifier"].INPUT_TYPES()["optional"]
    assert "Delta = 0" in spec["rectifier"][1]["tooltip"] and "edit mode" in spec["rectifier"][1]["tooltip"]
    run = N["SIE_TrainRectifier"].execute
    clip = SimpleNamespace(model=torch.nn.Linear(1, 1), encode_image=lambda x: x)
    caplog.set_level("WARNING", logger="comfyui-single-image-edit")
    with pytest.raises(Exception):  # no ComfyUI here: the run stops after the checks and the log line
        run(sd_model(), None, torch.rand(1, 64, 64, 3), "edit", 1, 1e-3, 0, clip, "face", "smiling face")
    assert any("starts from Delta = 0" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with pytest.raises(Exception):
        run(sd_model(), None, torch.rand(1, 64, 64, 3), "edit", 1, 1e-3, 0, clip, "face", "smiling face",
            tiny_rectifier())
    assert not any("Delta = 0" in r.getMessage() for r in caplog.records)  # continuing: nothing to say


def test_train_rectifier_loads_imagenet_encoder_weights(tmp_path):
    """The node's encoder_weights input: torchvision's ResNet-34 layout, as load_encoder_weights reads it (the CLI's
    --encoder-weights); a missing or foreign file is named."""
    from safetensors.torch import save_file
    from torchvision.models import resnet34

    spec = N["SIE_TrainRectifier"].INPUT_TYPES()["optional"]["encoder_weights"]
    assert spec[1]["options"][0] == "none" and spec[1]["default"] == "none"
    optional = list(N["SIE_TrainRectifier"].INPUT_TYPES()["optional"])
    assert optional[optional.index("estimate") + 1] == "encoder_weights"  # appended after estimate
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        tv = resnet34().state_dict()
    path = tmp_path / "resnet34.safetensors"
    save_file({k: v.contiguous() for k, v in tv.items()}, str(path))
    params = {LAYER: torch.zeros(8, 8, 3, 3)}
    net = rect_nodes.fresh_rectifier(params, 0, str(path))
    assert net.config.encoder_norm == "batch"
    own = net.encoder.net.state_dict()
    assert torch.equal(own["layer4.2.conv2.weight"], tv["layer4.2.conv2.weight"])
    assert torch.equal(own["bn1.running_var"], tv["bn1.running_var"])
    assert own["conv1.weight"].shape == (64, 8, 7, 7)  # the latent stem (2 x 4 channels) stays random
    plain = rect_nodes.fresh_rectifier(params, 0, None)
    assert plain.config.encoder_norm == "group"
    assert rect_nodes.encoder_path("none") is None
    assert named(lambda: rect_nodes.encoder_path(str(tmp_path / "missing.pth"))) == "encoder_weights"
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    assert named(lambda: rect_nodes.fresh_rectifier(params, 0, str(tmp_path / "other.safetensors"))) == \
        "encoder_weights"


# --------------------------------------------------------------------------------------
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows" / "api"
# the bundled images: coffee_128x100.png is coffee_250x200.png downscaled (core/sinddm/data/README.md), so both
# map into the 250x200 photo's pixels
PHOTO = {"coffee_250x200.png": 1.0, "coffee_128x100.png": 250 / 128}


def source_regions(api: dict, ref) -> list[tuple[float, float, float, float]]:
    """The rectangles (x0, y0, x1, y1) of the 250x200 photo that the IMAGE at ``ref`` ([node id, slot]) shows."""
    node = api[ref[0]]
    kind, inp = node["class_type"], node["inputs"]
    if kind == "LoadImage":
        assert inp["image"] in PHOTO, inp["image"]
        return [(0.0, 0.0, 250.0, 200.0)]  # either file shows the whole photo
    if kind == "ImageCrop":
        assert api[inp["image"][0]]["class_type"] == "LoadImage" and PHOTO[api[inp["image"][0]]["inputs"]["image"]] == 1
        return [(inp["x"], inp["y"], min(250, inp["x"] + inp["width"]), min(200, inp["y"] + inp["height"]))]
    if kind in ("ImageScale", "ImageFlip"):  # the same pixels (ImageScale's centre crop only removes some)
        return source_regions(api, inp["image"])
    if kind == "ImageBatch":
        return source_regions(api, inp["image1"]) + source_regions(api, inp["image2"])
    raise AssertionError(f"unexpected image node {kind}")


def overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def rectifier_source(api: dict, model_ref) -> str:
    """What a MODEL link carries: "plain", or the mode of the rectifier Apply Rectifier put on it ("recon" / "edit")."""
    node = api[model_ref[0]]
    if node["class_type"] == "CheckpointLoaderSimple":
        return "plain"
    assert node["class_type"] == "SIE_ApplyRectifier", node
    src = api[node["inputs"]["rectifier"][0]]
    return src["inputs"]["mode"] if src["class_type"] == "SIE_TrainRectifier" else "recon"  # Load: the recon file


@pytest.mark.parametrize("name", ["rectifier_reconstruct", "rectifier_edit"])
def test_workflows_invert_a_held_out_image_and_sample_it_back(name):
    api = json.loads((WORKFLOWS / f"{name}.json").read_text())
    by_type = lambda t: [k for k, v in api.items() if v["class_type"] == t]  # noqa: E731
    train = [api[k] for k in by_type("SIE_TrainRectifier")]
    held = [api[k]["inputs"]["image"] for k in by_type("SIE_ApplyRectifier")]
    assert train and held
    for t in train:
        for h in held:
            for a in source_regions(api, t["inputs"]["images"]):
                for b in source_regions(api, h):
                    assert overlap(a, b) == 0, (name, a, b)  # the held-out image is no part of the training set
    inversions = by_type("SIE_DDIMInversion")
    assert inversions
    for k in inversions:
        inv = api[k]["inputs"]
        encoded = api[inv["latent"][0]]
        assert encoded["class_type"] == "VAEEncode" and encoded["inputs"]["pixels"] in held
        assert rectifier_source(api, inv["model"]) != "edit"  # an edit rectifier never inverts
    pairs = []  # (the model that inverted, the model that samples back)
    for k in by_type("SamplerCustom"):
        sc = api[k]["inputs"]
        assert sc["latent_image"][0] in inversions and sc["sigmas"] == [sc["latent_image"][0], 1]
        assert sc["add_noise"] is False and sc["cfg"] == 1.0
        assert api[sc["sampler"][0]]["inputs"]["sampler_name"] == "euler"  # = DDIM with eta 0
        pairs.append((rectifier_source(api, api[sc["latent_image"][0]]["inputs"]["model"]),
                      rectifier_source(api, sc["model"])))
    if name == "rectifier_reconstruct":  # each model runs both halves of its round trip
        assert sorted(pairs) == [("plain", "plain"), ("recon", "recon")], pairs
    else:  # inverted without the edit, sampled back with it (and without, to compare)
        assert sorted(pairs) == [("recon", "edit"), ("recon", "recon")], pairs


def test_edit_workflow_continues_from_a_saved_reconstruction_rectifier():
    api = json.loads((WORKFLOWS / "rectifier_edit.json").read_text())
    train = [v for v in api.values() if v["class_type"] == "SIE_TrainRectifier"]
    assert [t["inputs"]["mode"] for t in train] == ["edit"]  # no 5,000-step reconstruction training in the graph
    loader = api[train[0]["inputs"]["rectifier"][0]]
    assert loader["class_type"] == "SIE_LoadRectifier"
    saved = [v["inputs"]["filename_prefix"] for v in json.loads((WORKFLOWS / "rectifier_reconstruct.json").read_text())
             .values() if v["class_type"] == "SIE_SaveRectifier"]
    assert loader["inputs"]["rectifier_name"] == f"{saved[0]}_00001.safetensors"  # what rectifier_reconstruct saves
    ui = json.loads((WORKFLOWS.parent / "rectifier_edit.json").read_text())
    note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "GPU" in note and "min" in note and "rectifier_reconstruct" in note
