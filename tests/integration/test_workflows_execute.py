"""Execution tier: every bundled API workflow runs in a real ComfyUI server (needs COMFYUI_DIR).

Each workflow is posted as shipped, with the overrides of ``OVERRIDES`` (CPU-sized
steps and resolutions; applied per node class, never by editing copies of the files),
its input images uploaded through ``/upload/image``, the random-weight SD 1.5
checkpoint and a random-weight OpenCLIP ViT-B-32 in the model folders.  The test
follows the prompt on the server's WebSocket (bounded wait, with the pack's own
client, ``core.client``) and asserts: no ``node_errors``, ``execution_success``, and
every SaveImage node wrote the expected number of files of the expected size.

Override table (why each value): SinDDM training 20 steps, width 8, batch 2 (seconds
instead of hours); SinDDM samples 1 per node; the text-guided samples start the finer
scales at t = 3-4 (CLIP on 16 views is slow on a CPU), the text-in-region edit takes 2
CLIP steps instead of 100, and the text-styled training image starts the finest scale at
t = 4 (one guided step); Imagic at 64x64 with 2 steps per
stage and 2 etas, on the random SD 1.5 file; the rectifier at 64x64 with 2 training steps of batch 2 per mode
and 2 sampling steps (a rectified sampling step costs 4-7 plain ones on a CPU: a base pass, then a pass in
which each of the 43 modulated convolutions builds per-sample kernels), 2 DDIM inversion steps, and rectifier_edit's
Load Rectifier reading a small random rectifier made for the random SD 1.5.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from comfy_server import REPO, ComfyServer, skip_reason
from core.client import ComfyClient
from test_bridge import random_sd15
from tiny_clip import random_open_clip_file

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

WF = REPO / "workflows" / "api"
IMAGES = REPO / "core" / "sinddm" / "data"
CLIP_FILE = "open_clip_vit_b32.safetensors"
SAM_FILE = "random_sam_vit_b.safetensors"

SINDDM_TRAIN = {"SIE_SinDDMTrain": {"steps": 20, "width": 8, "batch_size": 2, "preview_every": 10}}
SINE_SMALL = {"CheckpointLoaderSimple": {"ckpt_name": "random_sd15.safetensors"}, "ImageScale": {"width": 64, "height": 64},
              "EmptyLatentImage": {"width": 64, "height": 64}, "SIE_FineTune": {"steps": 2},
              "BasicScheduler": {"steps": 2}}
LAYER_SMALL = {**SINE_SMALL, "SIE_OptimizeEmbedding": {"steps": 2}, "SIE_LoadSAM": {"sam_name": SAM_FILE},
               # a random SAM's masks are noise: the box prompt alone, dilated, keeps object and background non-empty
               "SIE_SAMSegment": {"prompt": '{"points": [], "box": [16, 16, 48, 48]}', "dilate": 2}}
RECTIFIER_FILE = "random_rectifier_sd15.safetensors"
RECTIFIER_SMALL = {"CheckpointLoaderSimple": {"ckpt_name": "random_sd15.safetensors"},
                   "ImageScale": {"width": 64, "height": 64}, "EmptyLatentImage": {"width": 64, "height": 64},
                   "SIE_TrainRectifier": {"steps": 2, "batch": 2}, "KSampler": {"steps": 2},
                   "SIE_DDIMInversion": {"steps": 2}, "SIE_LoadRectifier": {"rectifier_name": RECTIFIER_FILE}}
SDXL_CKPT = {"CheckpointLoaderSimple": {"ckpt_name": "random_sdxl.safetensors"}}
# workflow -> {node class: {input: value}}; then the expected SaveImage outputs {filename_prefix: (count, W, H)}
OVERRIDES = {
    "sinddm_random_samples": {**SINDDM_TRAIN, "SIE_SinDDMSample": {"count": 1}},
    "sinddm_roi_outpaint": {**SINDDM_TRAIN, "SIE_SinDDMSample": {"count": 1}},
    "sinddm_harmonization": {**SINDDM_TRAIN, "SIE_SinDDMInject": {"count": 1}},
    "sinddm_style_transfer": {**SINDDM_TRAIN, "SIE_SinDDMInject": {"count": 1}},
    "sinddm_text_guided": {**SINDDM_TRAIN, "SIE_SinDDMSample": {"count": 1, "start_steps": "3, 3, 3, 4"}},
    "sinddm_text_roi": {**SINDDM_TRAIN, "SIE_SinDDMGuideTextRegion": {"iterations": 2},
                        "SIE_SinDDMEditTrainingImage": {"count": 1},
                        "SIE_SinDDMSample": {"count": 1, "start_steps": "3, 3, 3, 4"}},
    "sinddm_text_style": {**SINDDM_TRAIN, "SIE_SinDDMEditTrainingImage": {"count": 1, "t_start": 4}},
    "imagic": {
        "CheckpointLoaderSimple": {"ckpt_name": "random_sd15.safetensors"},
        "ImageScale": {"width": 64, "height": 64},
        "EmptyLatentImage": {"width": 64, "height": 64},
        "SIE_OptimizeEmbedding": {"steps": 2},
        "SIE_FineTune": {"steps": 2},
        "KSampler": {"steps": 2},
        "SIE_EtaSweep": {"steps": 2, "etas": "0.5, 1.0"},
    },
    "sine_edit": {**SINE_SMALL, "SIE_GuidanceSweep": {"steps": 2, "K_values": "400", "v_values": "0.5, 0.9"}},
    "sine_any_resolution": {**SINE_SMALL, "SIE_FineTune": {"steps": 1},  # one step on a 512 crop (patches)
                            "EmptyLatentImage": {"width": 96, "height": 64}},
    "sine_multi_model": SINE_SMALL,
    "layerdiffusion": {**LAYER_SMALL, "KSampler": {"steps": 2}},
    "layerdiffusion_reference_background": {**LAYER_SMALL, "SolidMask": {"width": 64, "height": 64}},
    "rectifier_reconstruct": RECTIFIER_SMALL,
    "rectifier_edit": RECTIFIER_SMALL,
}
# the SDXL twins: the same CPU sizes on the random SDXL (executed by test_sdxl_workflows.py, marked sdxl)
SDXL_WORKFLOWS = ("imagic", "sine_edit", "layerdiffusion", "rectifier_reconstruct")


def sdxl_overrides(name: str) -> dict:
    """The SD 1.5 twin's overrides on the random SDXL, training with gradient checkpointing: on the CPU a step
    without it holds an fp32 copy of most UNet weights (8.3 GiB), which the nodes' memory check refuses."""
    out = {node: dict(values) for node, values in OVERRIDES[name].items()}
    out.update(SDXL_CKPT)
    for node in ("SIE_OptimizeEmbedding", "SIE_FineTune"):
        out.setdefault(node, {})["gradient_checkpointing"] = "on"
    return out


OVERRIDES.update({f"{name}_sdxl": sdxl_overrides(name) for name in SDXL_WORKFLOWS})
EXPECTED = {
    "sinddm_random_samples": {"sinddm/samples": (1, 250, 200), "sinddm/wide": (1, 500, 200),
                              "sinddm/tall": (1, 200, 320), "sinddm/loss": (1, 640, 320)},
    "sinddm_roi_outpaint": {"sinddm/outpaint": (1, 500, 200), "sinddm/roi": (1, 250, 200)},
    "sinddm_harmonization": {"sinddm/composite": (1, 250, 200), "sinddm/harmonized": (1, 250, 200)},
    "sinddm_style_transfer": {"sinddm/style_transfer": (1, 128, 100), "sinddm/style_transfer_coarser": (1, 128, 100)},
    "sinddm_text_guided": {"sinddm/text_content": (1, 250, 200), "sinddm/text_style": (1, 250, 200)},
    "sinddm_text_roi": {"sinddm/text_roi": (1, 250, 200), "sinddm/text_roi_samples": (1, 250, 200)},
    "sinddm_text_style": {"sinddm/text_style_trans": (1, 250, 200)},
    "imagic": {"imagic/edit": (1, 64, 64), "imagic/eta_sweep": (2, 64, 64), "imagic/embedding_loss": (1, 640, 320),
               "imagic/finetune_loss": (1, 640, 320)},
    "sine_edit": {"sine/edit": (1, 64, 64), "sine/sweep": (2, 64, 64), "sine/edit_loss": (1, 640, 320)},
    "sine_any_resolution": {"sine/wide_1024x768": (1, 96, 64), "sine/wide_1024x512": (1, 96, 64),
                            "sine/patches_loss": (1, 640, 320)},
    "sine_multi_model": {"sine/multi_model": (1, 64, 64), "sine/content_loss": (1, 640, 320),
                         "sine/style_loss": (1, 640, 320)},
    "layerdiffusion": {"layerdiffusion/edit": (1, 64, 64), "layerdiffusion/target": (1, 64, 64),
                       "layerdiffusion/edit_embedding_loss": (1, 640, 320),
                       "layerdiffusion/edit_finetune_loss": (1, 640, 320)},
    "layerdiffusion_reference_background": {"layerdiffusion/reference_background": (1, 64, 64),
                                            "layerdiffusion/reference_background_finetune_loss": (1, 640, 320)},
    "rectifier_reconstruct": {"rectifier/recon_rectified": (1, 64, 64), "rectifier/recon_plain": (1, 64, 64),
                              "rectifier/recon_loss": (1, 640, 320), "rectifier/held_out": (1, 64, 64)},
    "rectifier_edit": {"rectifier/edit": (1, 64, 64), "rectifier/edit_reconstruction": (1, 64, 64),
                       "rectifier/edit_sdedit": (1, 64, 64), "rectifier/edit_loss": (1, 640, 960),
                       "rectifier/held_out": (1, 64, 64)},
}
EXPECTED.update({f"{name}_sdxl": EXPECTED[name] for name in SDXL_WORKFLOWS})


def random_open_clip() -> Path:
    """A random-weight OpenCLIP ViT-B-32 in safetensors, made once and cached."""
    return random_open_clip_file("ViT-B-32", CLIP_FILE)


def random_sam() -> Path:
    """A random-weight Segment Anything ViT-B (segment-anything's own classes) in safetensors, made once and cached."""
    segment_anything = pytest.importorskip("segment_anything")
    import torch
    from safetensors.torch import save_file

    cache = Path(os.environ.get("SIE_TEST_CACHE", Path.home() / ".cache" / "comfyui-single-image-edit"))
    path = cache / SAM_FILE
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = segment_anything.sam_model_registry["vit_b"](checkpoint=None)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.rename(path)
    return path


def random_rectifier() -> Path:
    """A small random rectifier (Delta != 0) for the random SD 1.5, as rectifier_edit's Load Rectifier reads it; made
    once from the checkpoint's UNet shapes (its header) and cached."""
    import torch
    from safetensors import safe_open

    from core.rectifier import RectifierInfo, new_rectifier, save_rectifier

    ckpt = random_sd15()
    path = ckpt.parent / RECTIFIER_FILE
    if not path.exists():
        prefix = "model.diffusion_model."
        with safe_open(str(ckpt), "pt") as f:
            params = {k[len(prefix):]: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()
                      if k.startswith(prefix)}
        r = new_rectifier(params, 4, encoder_layers=(1, 1, 1, 1), width=8, estimate_clip=4.0)
        with torch.no_grad():
            for b in r.branches:
                b.head_a.bias.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
        save_rectifier(r, RectifierInfo("ldm", "recon", steps=0), path)
    return path


def apply_overrides(prompt: dict, overrides: dict) -> dict:
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        for key, value in overrides.get(node["class_type"], {}).items():
            assert key in node["inputs"], f"override {node['class_type']}.{key} matches no input"
            node["inputs"][key] = value
    return out


@pytest.fixture(scope="module")
def server():
    models = {"checkpoints": [random_sd15()], "open_clip": [random_open_clip()], "sams": [random_sam()],
              "single_image_edit/rectifier": [random_rectifier()]}
    with ComfyServer(models=models) as srv:
        client = ComfyClient(srv.url)
        for image in ("coffee_250x200.png", "coffee_128x100.png"):
            client.upload_image(IMAGES / image)
        client.upload_image(REPO / "core" / "layerdiffusion" / "data" / "table_by_the_sea_512.png")
        yield srv


def test_every_workflow_has_overrides():
    assert sorted(OVERRIDES) == sorted(p.stem for p in WF.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(n for n in OVERRIDES if not n.endswith("_sdxl")))
def test_workflow_executes(server, name):
    execute(server, name)


def execute(server, name: str) -> None:
    """Run one bundled workflow with its CPU-sized overrides and check the images it writes."""
    from PIL import Image

    prompt = apply_overrides(json.loads((WF / f"{name}.json").read_text()), OVERRIDES[name])
    result = ComfyClient(server.url).run(prompt, timeout=1500)  # raises on node_errors
    kinds = [k for k, _ in result.messages]
    assert result.status == "success", json.dumps(result.error, indent=1)[:4000] + server.log()[-3000:]
    assert "execution_success" in kinds and "execution_error" not in kinds, kinds
    written: dict[str, list[Path]] = {}
    for node_id, ui in result.outputs.items():
        prefix = prompt[node_id]["inputs"].get("filename_prefix")
        for img in ui.get("images", []):
            path = server.base / "output" / img["subfolder"] / img["filename"]
            written.setdefault(prefix, []).append(path)
    for prefix, (count, w, h) in EXPECTED[name].items():
        files = written.get(prefix, [])
        assert len(files) == count, (prefix, files)
        for f in files:
            assert f.is_file() and Image.open(f).size == (w, h), (f, Image.open(f).size)
    print(f"{name}: executed in {result.seconds:.1f} s")
