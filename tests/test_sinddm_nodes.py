"""SinDDM through its ComfyUI node classes (called directly, no server) and CLIP text guidance.

Outside ComfyUI the bridge's progress bar and folders degrade to no-ops; the save folder
is redirected to a temporary directory.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, load_pack

PACK = load_pack()
N = PACK.NODE_CLASS_MAPPINGS
bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]
common = sys.modules[PACK.__name__ + ".nodes.common"]
NodeInputError = common.NodeInputError


def comfy_image(path=ROOT / "core/sinddm/data/coffee_128x100.png") -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255
    return torch.from_numpy(arr)[None]  # IMAGE [1, H, W, 3]


@pytest.fixture(scope="module")
def node_model():
    model, curve = N["SIE_SinDDMTrain"]().run(comfy_image(), steps=60, batch_size=2, width=16,
                                               learning_rate=1e-3, seed=0, preview_every=30, precision="fp32")
    assert curve.ndim == 4 and curve.shape[-1] == 3
    return model


def test_train_node_runs_under_inference_mode():
    """ComfyUI runs every node inside torch.inference_mode(); training must still work."""
    with torch.inference_mode():
        image = comfy_image()
        model, _ = N["SIE_SinDDMTrain"]().run(image, steps=5, batch_size=1, width=8, learning_rate=1e-3, seed=0,
                                              preview_every=0, precision="fp32")
        (out,) = N["SIE_SinDDMSample"]().run(model, 1, 0, 1.0, 1.0, 0, 0, "")
    assert out.shape == (1, 100, 128, 3)


def test_sample_node_sizes(node_model):
    node = N["SIE_SinDDMSample"]()
    (a,) = node.run(node_model, count=2, seed=0, width_scale=1.5, height_scale=1.0, width=0, height=0, start_steps="")
    assert a.shape == (2, 100, 192, 3) and 0 <= a.min() and a.max() <= 1
    (b,) = node.run(node_model, count=1, seed=0, width_scale=1.0, height_scale=1.0, width=150, height=90,
                    start_steps="20, 10")
    assert b.shape == (1, 90, 150, 3)
    with pytest.raises(NodeInputError, match="start_steps"):
        node.run(node_model, 1, 0, 1.0, 1.0, 0, 0, "20")
    with pytest.raises(NodeInputError, match="start_steps"):
        node.run(node_model, 1, 0, 1.0, 1.0, 0, 0, "a, b")
    with pytest.raises(NodeInputError, match="width_scale"):
        node.run(node_model, 1, 0, 0.1, 0.1, 0, 0, "")


@pytest.mark.parametrize("bad,match", [
    (dict(image=torch.rand(1, 20, 200, 3)), "image"),       # under 32 px on a side
    (dict(image=torch.rand(1, 0, 0, 3)), "empty"),
    (dict(image=torch.rand(1, 64, 64, 4)), "alpha"),
    (dict(steps=0), "steps"),
    (dict(width=7), "width"),
])
def test_train_node_bad_input(bad, match):
    args = dict(image=comfy_image(), steps=10, batch_size=1, width=8, learning_rate=1e-3, seed=0, preview_every=0,
                precision="fp32")
    args.update(bad)
    with pytest.raises(NodeInputError, match=match) as e:
        N["SIE_SinDDMTrain"]().run(**args)
    assert "input '" in str(e.value)


def test_roi_node_checks_mask_size_and_chains(node_model):
    node = N["SIE_SinDDMGuideROI"]()
    img = comfy_image()
    with pytest.raises(NodeInputError, match="mask") as e:
        node.run(img, 0.8, 0, 0, mask=torch.ones(1, 50, 50))
    assert "resize the mask" in str(e.value)
    (one,) = node.run(img, 0.8, 0, 0)
    (two,) = node.run(img[:, 10:60, 20:90], 0.8, 100, 30, mask=torch.ones(1, 50, 70), guidance=one)
    assert len(one) == 1 and len(two) == 2  # the input chain is not mutated
    (out,) = N["SIE_SinDDMSample"]().run(node_model, 1, 0, 2.0, 1.0, 0, 0, "", guidance=two)
    assert out.shape == (1, 100, 256, 3)


def test_inject_node(node_model):
    node = N["SIE_SinDDMInject"]()
    img = comfy_image()
    mask = torch.zeros(1, 100, 128)
    mask[:, 30:50, 40:70] = 1
    (h,) = node.run(node_model, img, "harmonization", 0, 2, 0, True, mask=mask)
    assert h.shape == (2, 100, 128, 3)
    (s,) = node.run(node_model, img, "style_transfer", 3, 1, 0, False)
    assert s.shape == (1, 100, 128, 3)
    with pytest.raises(NodeInputError, match="mask"):
        node.run(node_model, img, "harmonization", 0, 1, 0, True)
    with pytest.raises(NodeInputError, match="mask"):
        node.run(node_model, img, "harmonization", 0, 1, 0, True, mask=torch.zeros(1, 100, 128))
    with pytest.raises(NodeInputError, match="mask"):
        node.run(node_model, img, "harmonization", 0, 1, 0, True, mask=torch.ones(1, 10, 10))


def test_save_and_load_nodes(node_model, tmp_path, monkeypatch):
    monkeypatch.setattr(bridge, "save_dir", lambda name: tmp_path)
    monkeypatch.setattr(bridge, "model_path", lambda name, f: str(tmp_path / f))
    saver = N["SIE_SaveSinDDM"]()
    first = saver.run(node_model, "sinddm/test")["ui"]["text"][0]
    second = saver.run(node_model, "sinddm/test")["ui"]["text"][0]
    assert (first, second) == ("sinddm/test_00001.safetensors", "sinddm/test_00002.safetensors")
    assert sorted(p.name for p in (tmp_path / "sinddm").iterdir()) == ["test_00001.safetensors",
                                                                       "test_00002.safetensors"]
    loaded, info = N["SIE_LoadSinDDM"]().run(first)
    assert "3 scales" in info
    sampler = N["SIE_SinDDMSample"]()
    a = sampler.run(loaded, 1, 5, 1.0, 1.0, 0, 0, "")[0]
    b = sampler.run(node_model, 1, 5, 1.0, 1.0, 0, 0, "")[0]
    assert torch.equal(a, b)
    for bad in ("", "/abs/path", "../escape"):
        with pytest.raises(NodeInputError, match="filename_prefix"):
            saver.run(node_model, bad)
    with pytest.raises(NodeInputError, match="model_name"):
        N["SIE_LoadSinDDM"]().run("missing.safetensors")


# ------------------------------------------------------------------------------ CLIP guidance
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("clipcfg")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "sie-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model("sie-tiny-clip", pretrained=None)
    path = d / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_open_clip_loader_node(tiny_clip, monkeypatch):
    monkeypatch.setattr(bridge, "model_path", lambda name, f: str(tiny_clip.parent / f))
    with torch.inference_mode():  # as inside ComfyUI
        (clip,) = N["SIE_LoadOpenCLIP"]().run(tiny_clip.name, "sie-tiny-clip")
    assert clip.image_size == 32 and not any(p.is_inference() for p in clip.model.parameters())
    with pytest.raises(NodeInputError, match="arch"):
        N["SIE_LoadOpenCLIP"]().run(tiny_clip.name, "ViT-B-32")


def test_clip_guidance_steers_samples(tiny_clip, node_model):
    from core.sinddm import SinDDM, sample
    from core.sinddm.clip_guidance import CLIPGuidance, load_open_clip

    clip = load_open_clip(tiny_clip, "sie-tiny-clip")

    model = SinDDM(node_model.net, node_model.pyramid, node_model.schedule)
    g = CLIPGuidance(clip, "a red apple", "content", strength=0.5, fill_factor=0.3, n_views=4)
    guided = sample(model, count=1, seed=0, guidance=[g])
    plain = sample(model, count=1, seed=0)
    assert guided.shape == plain.shape and (guided - plain).abs().mean() > 1e-3
    assert g.mask is not None and 0.2 < float(g.mask.mean()) < 0.4  # about the fill factor
    finest_steps = node_model.schedule.start_steps[-1]
    expected = sum(node_model.schedule.start_steps[1:]) - 3  # scales >= 1, last 3 steps unguided
    assert len(g.scores) == expected and finest_steps > 3
    style = CLIPGuidance(clip, "Van Gogh", "style", n_views=2)
    sample(model, count=1, seed=0, guidance=[style])
    assert style.text.endswith(" Style") and len(style.scores) == finest_steps - 3


def test_text_guide_node_validation(tiny_clip, node_model):
    from core.sinddm.clip_guidance import load_open_clip

    clip = load_open_clip(tiny_clip, "sie-tiny-clip")
    node = N["SIE_SinDDMGuideText"]()
    with pytest.raises(NodeInputError, match="text"):
        node.run(clip, "   ", "content", 0.3, 0.3, 0)
    (chain,) = node.run(clip, "apple", "content", 0.3, 0.3, 0)
    with pytest.raises(NodeInputError, match="guidance"):
        node.run(clip, "pear", "style", 0.3, 0.3, 0, guidance=chain)


def test_thresholded_grad_keeps_the_top_fraction():
    from core.sinddm.clip_guidance import thresholded_grad

    g = torch.randn(2, 3, 40, 50, generator=torch.Generator().manual_seed(0))
    sparse, mask = thresholded_grad(g, 0.7)
    assert mask.shape == (2, 1, 40, 50)
    assert abs(float(mask.mean()) - 0.3) < 0.01
    energy = g.norm(dim=1, keepdim=True)
    assert torch.all(sparse.norm(dim=1, keepdim=True) <= energy + 1e-6)
    assert torch.all(sparse[mask.expand_as(sparse) == 0] == 0)
