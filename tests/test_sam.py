"""Segment Anything loading and segmentation (core/sam.py, nodes/sam.py), on the CPU.

One random-weight ViT-B (segment_anything's own builder, seeded) is built for the whole module and
saved as .pth and .safetensors; it runs SAM's image encoder once (about 20 s on one busy CPU core:
the predictor always resizes to 1024 px).  Everything else about segmentation runs on a tiny SAM
built from segment_anything's classes (64 px input, milliseconds).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("segment_anything")

from helpers import ROOT, load_pack  # noqa: E402

PACK = load_pack()
SAM = importlib.import_module(PACK.__name__ + ".core.sam")
NODES = importlib.import_module(PACK.__name__ + ".nodes.sam")
NodeInputError = importlib.import_module(PACK.__name__ + ".nodes.common").NodeInputError
SAMError = SAM.SAMError


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    """(state dict, .pth path, .safetensors path) of one seeded random ViT-B."""
    from safetensors.torch import save_file
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in sam_model_registry["vit_b"](checkpoint=None).state_dict().items()}
    d = tmp_path_factory.mktemp("sams")
    pth, sft = d / "random_b.pth", d / "random_b.safetensors"
    torch.save(state, pth)
    save_file({k: v.contiguous() for k, v in state.items()}, str(sft))
    return state, pth, sft


def tiny_sam(seed: int = 0):
    """A SAM with a 64 px, 2-block, 32-wide image encoder: the predictor's full path in milliseconds."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    dim, size, patch = 32, 64, 16
    encoder = ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=dim, depth=2, num_heads=2, out_chans=dim,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True)
    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                           input_image_size=(size, size), mask_in_chans=4)
    decoder = MaskDecoder(transformer_dim=dim, transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64,
                                                                             num_heads=2),
                          num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=dim)
    return Sam(encoder, prompt, decoder, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_sam()


def image(h=40, w=56, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, w, 3, generator=g)


def fake_sam_state(width: int, depth: int) -> dict:
    """Shape-only (meta) tensors with the keys sam_variant looks at."""
    meta = dict(device="meta")
    sd = {"image_encoder.patch_embed.proj.weight": torch.empty(width, 3, 16, 16, **meta),
          "image_encoder.pos_embed": torch.empty(1, 64, 64, width, **meta),
          "prompt_encoder.point_embeddings.0.weight": torch.empty(1, 256, **meta),
          "mask_decoder.iou_token.weight": torch.empty(1, 256, **meta)}
    for i in range(depth):
        sd[f"image_encoder.blocks.{i}.norm1.weight"] = torch.empty(width, **meta)
    return sd


# --------------------------------------------------------------------------------------
# Recognising and loading checkpoints
# --------------------------------------------------------------------------------------
def test_variant_comes_from_the_weight_shapes(vit_b):
    state, _, _ = vit_b
    assert SAM.sam_variant(state) == "vit_b"
    assert SAM.sam_variant(fake_sam_state(768, 12)) == "vit_b"
    assert SAM.sam_variant(fake_sam_state(1024, 24)) == "vit_l"
    assert SAM.sam_variant(fake_sam_state(1280, 32)) == "vit_h"
    with pytest.raises(SAMError, match="unknown SAM image encoder .1024 wide, 12 blocks"):
        SAM.sam_variant(fake_sam_state(1024, 12))
    with pytest.raises(SAMError, match="unknown SAM image encoder .512 wide"):
        SAM.sam_variant(fake_sam_state(512, 12))


@pytest.mark.parametrize("keys,what", [
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"],
     "Stable Diffusion checkpoint"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
    (["image_encoder.trunk.patch_embed.proj.weight", "sam_mask_decoder.iou_token.weight"], "SAM 2"),
    (["image_encoder.layers.0.blocks.0.attn.qkv.weight", "image_encoder.patch_embed.seq.0.c.weight"], "MobileSAM"),
    (["mask_decoder.hf_token.weight", "image_encoder.pos_embed"], "SAM-HQ"),
    (["x"], "not a Segment Anything checkpoint: no SAM image encoder"),
])
def test_other_state_dicts_are_named(keys, what):
    with pytest.raises(SAMError, match=what):
        SAM.sam_variant({k: torch.zeros(1) for k in keys})


@pytest.mark.slow
def test_pth_and_safetensors_load_the_same_model_and_segment(vit_b):
    state, pth, sft = vit_b
    loaded = NODES.LoadSAM.execute(str(pth))[0]  # outside ComfyUI the node takes a full path
    assert loaded.variant == "vit_b" and not loaded.model.training
    from_sft = SAM.load_sam(sft)
    assert not from_sft.training
    a, b = loaded.model.state_dict(), from_sft.state_dict()
    assert a.keys() == b.keys() == state.keys()
    assert all(torch.equal(a[k], state[k]) and torch.equal(b[k], state[k]) for k in state)
    # Identical weights (and the same code) give identical masks; the encoder is run once, on the .pth model.
    img = image(64, 64)
    t = time.perf_counter()
    mask = SAM.segment(loaded.model, img, [(20.0, 30.0)], [1])
    seconds = time.perf_counter() - t
    print(f"one ViT-B segment call on a 64x64 image: {seconds:.1f} s")
    assert mask.shape == (64, 64) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(SAMError, match=r"evil\.pth: refused: the file holds Python objects"):
        SAM.load_sam(path)
    assert not marker.exists()
    with pytest.raises(NodeInputError) as e:
        NODES.LoadSAM.execute(str(path))
    assert e.value.input_name == "sam_name" and not marker.exists()
    # the control: an unrestricted unpickle does run the payload
    torch.load(path, weights_only=False)["payload"].close()
    assert marker.exists()


def test_files_that_are_not_sam_are_refused(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(SAMError, match=r"plain\.safetensors: not a Segment Anything checkpoint"):
        SAM.load_sam(plain)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2), "lora_unet_x.alpha": torch.zeros(())}, str(lora))
    with pytest.raises(SAMError, match="this is a LoRA"):
        SAM.load_sam(lora)
    ours = tmp_path / "ours.safetensors"
    save_file({"w": torch.zeros(2)}, str(ours), metadata={"format": "sie.sinddm", "version": "1"})
    with pytest.raises(SAMError, match="this is a SinDDM model"):
        SAM.load_sam(ours)
    text = tmp_path / "notes.pth"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(SAMError, match=r"notes\.pth: not a readable PyTorch checkpoint \(a text file\)"):
        SAM.load_sam(text)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(SAMError, match=r"fake\.safetensors: not a readable safetensors file \(a PNG image\)"):
        SAM.load_sam(fake)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(SAMError, match="expected a state dict of tensors, got Tensor"):
        SAM.load_sam(tensor)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(SAMError, match="unsupported file type '.ckpt'"):
        SAM.load_sam(ckpt)
    with pytest.raises(SAMError, match="missing.pth: file not found"):
        SAM.load_sam(tmp_path / "missing.pth")
    for bad in (str(plain), str(tmp_path / "missing.pth")):
        with pytest.raises(NodeInputError) as e:
            NODES.LoadSAM.execute(bad)
        assert e.value.input_name == "sam_name"


def test_missing_and_unexpected_weights_are_refused(vit_b, monkeypatch, tmp_path):
    state, _, _ = vit_b
    name = tmp_path / "edited.safetensors"
    missing = {k: v for k, v in state.items() if k != "mask_decoder.iou_token.weight"}
    monkeypatch.setattr(SAM, "read_state_dict", lambda path: missing)
    with pytest.raises(SAMError, match=r"edited\.safetensors: looks like SAM vit_b .*1 missing weights "
                                       r"\(mask_decoder\.iou_token\.weight\)"):
        SAM.load_sam(name)
    extra = {**state, "mask_decoder.extra.weight": torch.zeros(1)}
    monkeypatch.setattr(SAM, "read_state_dict", lambda path: extra)
    with pytest.raises(SAMError, match=r"1 unexpected weights \(mask_decoder\.extra\.weight\)"):
        SAM.load_sam(name)
    wrong = {**state, "mask_decoder.iou_token.weight": torch.zeros(2, 256)}
    monkeypatch.setattr(SAM, "read_state_dict", lambda path: wrong)
    with pytest.raises(SAMError, match="weights do not fit"):
        SAM.load_sam(name)


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------
def test_parse_prompt_reads_the_widget_json():
    assert SAM.parse_prompt("") == ([], [], None)
    assert SAM.parse_prompt("  \n") == ([], [], None)
    assert SAM.parse_prompt("{}") == ([], [], None)
    assert SAM.parse_prompt(NODES.DEFAULT_PROMPT) == ([], [], None)
    assert SAM.parse_prompt('{"points": [[10, 20, 1], [30.5, 4, 0], [7, 8]], "box": [1, 2, 30, 40]}') == (
        [(10.0, 20.0), (30.5, 4.0), (7.0, 8.0)], [1, 0, 1], (1.0, 2.0, 30.0, 40.0))
    assert SAM.parse_prompt('{"box": []}') == ([], [], None)


@pytest.mark.parametrize("text,message", [
    ("{points: []}", "not valid JSON"),
    ('{"points": [[1, 2, 1]]', "not valid JSON"),
    ("[[1, 2, 1]]", "expected a JSON object"),
    ('{"point": [[1, 2, 1]]}', "unknown key 'point'"),
    ('{"points": [1, 2, 1]}', "point 1 must be \\[x, y, label\\]"),
    ('{"points": "1,2"}', "'points' must be a list"),
    ('{"points": [[1, 2, 3, 4]]}', "point 1 must be"),
    ('{"points": [[1, 2, 1], ["a", 2, 1]]}', "point 2 x must be a finite number"),
    ('{"points": [[1, 2, 2]]}', "point 1 label must be 1 .positive. or 0"),
    ('{"points": [[1, 2, true]]}', "point 1 label must be"),
    ('{"box": [1, 2, 3]}', "'box' must be \\[x0, y0, x1, y1\\]"),
    ('{"box": [1, 2, 3, null]}', "box y1 must be a finite number"),
    ('{"box": {"x": 1}}', "'box' must be"),
])
def test_parse_prompt_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        SAM.parse_prompt(text)


@pytest.mark.parametrize("points,labels,box,message", [
    ([], [], None, "no prompt"),
    (None, None, None, "no prompt"),
    ([(57, 10)], [1], None, r"point 1 \(57, 10\) is outside the 56x40 image"),
    ([(5, -1)], [1], None, "outside"),
    ([(5, 5)], [1, 0], None, "1 points but 2 labels"),
    ([(5, 5)], [0], None, "only negative points"),
    ([], [], (10, 10, 5, 20), "empty or reversed"),
    ([], [], (10, 10, 10, 20), "empty or reversed"),
    ([], [], (0, 0, 60, 20), "reaches outside the 56x40 image"),
    ([], [], (0, 0, 5), "4 finite numbers"),
    ([], [], (0, 0, 5, float("nan")), "4 finite numbers"),
])
def test_segment_refuses_bad_prompts(tiny, points, labels, box, message):
    with pytest.raises(ValueError, match=message):
        SAM.segment(tiny, image(), points, labels, box)


def test_segment_refuses_a_bad_image(tiny):
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        SAM.segment(tiny, torch.rand(1, 40, 56, 3), [(5, 5)], [1])


# --------------------------------------------------------------------------------------
# Segmentation (tiny SAM)
# --------------------------------------------------------------------------------------
def test_segment_is_the_predictors_best_mask(tiny):
    import numpy as np
    from segment_anything import SamPredictor

    img = image()
    pixels = (img * 255).round().to(torch.uint8).numpy()
    predictor = SamPredictor(tiny)
    predictor.set_image(pixels)
    # a lone point: the best-scored of three
    masks, scores, _ = predictor.predict(np.array([[20.0, 12.0]]), np.array([1]), multimask_output=True)
    got = SAM.segment(tiny, img, [(20, 12)], [1])
    assert torch.equal(got, torch.from_numpy(masks[int(np.argmax(scores))]).float())
    # a box with points: SAM's single-mask output
    box = np.array([4.0, 3.0, 40.0, 30.0])
    masks, _, _ = predictor.predict(np.array([[20.0, 12.0], [30.0, 25.0]]), np.array([1, 0]), box=box,
                                    multimask_output=False)
    got = SAM.segment(tiny, img, [(20, 12), (30, 25)], [1, 0], (4, 3, 40, 30))
    assert torch.equal(got, torch.from_numpy(masks[0]).float())
    assert got.shape == (40, 56) and set(got.unique().tolist()) <= {0.0, 1.0}
    assert SAM.uses_multimask([(1, 2)], None) and not SAM.uses_multimask([(1, 2)], (0, 0, 1, 1))
    assert not SAM.uses_multimask([(1, 2), (3, 4)], None) and not SAM.uses_multimask([], (0, 0, 1, 1))


def test_points_and_box_go_to_sam_as_the_pixels_they_fall_in(tiny, monkeypatch):
    """A prompt position is continuous (pixel i is [i, i + 1)); SAM reads coordinates as pixel indices (its
    prompt encoder adds 0.5, the pixel's centre).  So (20.9, 12.9) goes to SAM as pixel (20, 12), a point on
    the far edge of a 56x40 image (x = 56, allowed by check_prompt) as the last pixel (55, 39), and the box
    corners likewise; the old code handed SAM the raw positions (56 is a column the image does not have)."""
    import numpy as np
    from segment_anything import SamPredictor

    seen = []
    predict = SamPredictor.predict

    def spy(self, point_coords=None, point_labels=None, box=None, **kw):
        seen.append((None if point_coords is None else np.asarray(point_coords).tolist(),
                     None if box is None else np.asarray(box).tolist()))
        return predict(self, point_coords, point_labels, box, **kw)

    monkeypatch.setattr(SamPredictor, "predict", spy)
    img = image()  # 40 x 56
    got = SAM.segment(tiny, img, [(20.9, 12.9), (56, 40)], [1, 0], (3.7, 2.2, 56, 40))
    assert seen == [([[20.0, 12.0], [55.0, 39.0]], [3.0, 2.0, 55.0, 39.0])]
    got_point = SAM.segment(tiny, img, [(20.9, 12.9)], [1])
    assert seen[1] == ([[20.0, 12.0]], None)
    # the same masks as SAM's own predictor given those pixels
    predictor = SamPredictor(tiny)
    predictor.set_image((img * 255).round().to(torch.uint8).numpy())
    masks, _, _ = predict(predictor, np.array([[20.0, 12.0], [55.0, 39.0]]), np.array([1, 0]),
                          box=np.array([3.0, 2.0, 55.0, 39.0]), multimask_output=False)
    assert torch.equal(got, torch.from_numpy(masks[0]).float())
    masks, scores, logits = predict(predictor, np.array([[20.0, 12.0]]), np.array([1]), multimask_output=True)
    assert torch.equal(got_point, torch.from_numpy(masks[int(np.argmax(scores))]).float())
    # and the 0.9 px matter to SAM (else this test could not tell the two apart)
    _, _, raw = predict(predictor, np.array([[20.9, 12.9]]), np.array([1]), multimask_output=True)
    assert np.abs(raw - logits).max() > 1e-3
    # integer prompts inside the image are handed over unchanged
    pts, bx = SAM.to_pixels([(0, 0), (55, 39)], (0, 0, 55, 39), 40, 56)
    assert pts.tolist() == [[0, 0], [55, 39]] and bx.tolist() == [0, 0, 55, 39]


def test_dilate_grows_and_invert_flips(tiny):
    m = torch.zeros(20, 30)
    m[8:12, 10:15] = 1
    grown = SAM.grow_mask(m, 2)
    assert grown[6:14, 8:17].eq(1).all() and grown.sum() == 8 * 9
    assert torch.equal(SAM.grow_mask(grown, -2), m)  # erosion undoes it here
    assert SAM.grow_mask(m, -3).sum() == 0
    edge = torch.zeros(10, 10)
    edge[0, 0] = 1
    assert SAM.grow_mask(edge, 1).sum() == 4  # clipped at the border

    img, prompt = image(), ([(20, 12)], [1], None)
    base = SAM.segment(tiny, img, *prompt)
    assert 0 < base.mean() < 1, "pick another seed: the tiny SAM's mask is empty or full"
    dilated = SAM.segment(tiny, img, *prompt, dilate=3)
    assert torch.equal(dilated, SAM.grow_mask(base, 3)) and dilated.sum() > base.sum()
    assert (dilated >= base).all()
    assert torch.equal(SAM.segment(tiny, img, *prompt, invert=True), 1 - base)
    assert torch.equal(SAM.segment(tiny, img, *prompt, dilate=3, invert=True), 1 - dilated)


# --------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------
def named(call) -> str:
    with pytest.raises(NodeInputError) as e:
        call()
    return e.value.input_name


def test_segment_node_masks_each_image_of_a_batch(tiny):
    sam = NODES.SAMModel(tiny, "tiny", "tiny")
    batch = torch.stack([image(seed=1), image(seed=2)])
    prompt = json.dumps({"points": [[20, 12, 1], [40, 30, 0]], "box": None})
    (mask,) = NODES.SAMSegment.execute(sam, batch, prompt, 1, False)
    assert mask.shape == (2, 40, 56) and mask.dtype == torch.float32 and mask.device.type == "cpu"
    for i in range(2):
        want = SAM.segment(tiny, batch[i], [(20, 12), (40, 30)], [1, 0], None, dilate=1)
        assert torch.equal(mask[i], want)
    assert next(tiny.parameters()).device.type == "cpu"


def test_segment_node_names_bad_inputs(tiny):
    sam = NODES.SAMModel(tiny, "tiny", "tiny")
    run = NODES.SAMSegment.execute
    img = image()[None]
    assert named(lambda: run("not a sam", img, '{"points": [[1, 1, 1]]}', 0, False)) == "sam"
    assert named(lambda: run(sam, torch.rand(1, 40, 56, 4), '{"points": [[1, 1, 1]]}', 0, False)) == "image"
    for prompt in (NODES.DEFAULT_PROMPT, "", "{oops", '{"points": [[100, 1, 1]]}', '{"box": [5, 5, 1, 1]}'):
        assert named(lambda p=prompt: run(sam, img, p, 0, False)) == "prompt"
    with pytest.raises(NodeInputError, match=r"input 'prompt': point 1 \(100, 1\) is outside the 56x40 image\. Fix:"):
        run(sam, img, '{"points": [[100, 1, 1]]}', 0, False)


def test_node_schema():
    for cls in NODES.NODES:
        assert cls.define_schema().node_id.startswith("SIE_") and cls.REQUIRES == ("segment_anything",)
        assert cls.CATEGORY == "single_image_edit/layerdiffusion"
        for name, decl in cls.INPUT_TYPES()["required"].items():
            assert decl[1]["tooltip"].strip(), name
    spec = NODES.SAMSegment.INPUT_TYPES()["required"]
    assert spec["prompt"][1]["multiline"] and SAM.parse_prompt(spec["prompt"][1]["default"]) == ([], [], None)
    assert "sams" in importlib.import_module(PACK.__name__ + ".nodes.comfy_bridge").MODEL_FOLDERS


def test_segment_anything_is_imported_only_when_used():
    code = ("import sys; sys.path.insert(0, 'tests'); sys.modules['segment_anything'] = None\n"
            "from helpers import load_pack\n"
            "import importlib; p = load_pack(); importlib.import_module(p.__name__ + '.nodes.sam')\n"
            "assert 'segment_anything' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
