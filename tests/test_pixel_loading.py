"""Offline loading of pixel-space DDPMs (core.pixel): round trips, schedules and refusals.

A tiny UNet2DModel with randomised weights stands in for google/ddpm-*-256; every
foreign file is written in its real format (safetensors, torch.save, diffusers configs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.pixel import (
    PixelModelError,
    alphas_cumprod_from_config,
    load_pixel_unet,
    save_pixel_folder,
    save_pixel_unet,
)

TINY = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
COSINE = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
LINEAR = {"_class_name": "DDPMScheduler", "num_train_timesteps": 500, "beta_start": 2e-4, "beta_end": 0.03,
          "beta_schedule": "linear"}


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**TINY).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():  # perturb every tensor, zero-initialised ones included
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))  # [B, C, H, W]


def outputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x, t).sample for t in (3, 777)]


def assert_same_model(loaded, reference, x: torch.Tensor) -> None:
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(outputs(loaded, x), outputs(reference, x)))


def linear_formula(T: int, b0: float, b1: float) -> torch.Tensor:
    betas = torch.tensor([b0 + (b1 - b0) * t / (T - 1) for t in range(T)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def cosine_formula(T: int, s: float = 0.008) -> torch.Tensor:
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def write_pipeline(unet, root: Path, scheduler: dict) -> Path:
    save_pixel_folder(unet, root / "unet")
    (root / "unet" / "scheduler_config.json").unlink()  # the pipeline's scheduler/ must be the one used
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1",
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"],
    }))
    return root


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------
def test_model_folder_round_trip(unet, x, tmp_path):
    folder = save_pixel_folder(unet, tmp_path / "ddpm", scheduler_config=LINEAR)
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    loaded, alphas = load_pixel_unet(folder)
    assert_same_model(loaded, unet, x)
    assert alphas.dtype == torch.float64 and alphas.device.type == "cpu" and alphas.shape == (500,)
    torch.testing.assert_close(alphas, linear_formula(500, 2e-4, 0.03), rtol=0, atol=1e-12)


def test_pipeline_folder_round_trip(unet, x, tmp_path):
    root = write_pipeline(unet, tmp_path / "pipe", COSINE)
    loaded, alphas = load_pixel_unet(root)
    assert_same_model(loaded, unet, x)
    torch.testing.assert_close(alphas, cosine_formula(1000), rtol=0, atol=1e-12)
    # The unet/ subfolder of a pipeline finds ../scheduler/ too.
    _, alphas_sub = load_pixel_unet(root / "unet")
    assert torch.equal(alphas_sub, alphas)


def test_single_file_round_trip(unet, x, tmp_path):
    ref = alphas_cumprod_from_config(COSINE)
    f = save_pixel_unet(unet, tmp_path / "m.safetensors", alphas_cumprod=ref, scheduler_config=COSINE)
    assert list(tmp_path.iterdir()) == [f]  # no temporary file left behind
    loaded, alphas = load_pixel_unet(f)
    assert_same_model(loaded, unet, x)
    assert torch.equal(alphas, ref)
    # Scheduler config only, and nothing at all (DDPMScheduler defaults).
    f2 = save_pixel_unet(unet, tmp_path / "s.safetensors", scheduler_config=LINEAR)
    assert torch.equal(load_pixel_unet(f2)[1], alphas_cumprod_from_config(LINEAR))
    f3 = save_pixel_unet(unet, tmp_path / "d.safetensors")
    torch.testing.assert_close(load_pixel_unet(f3)[1], linear_formula(1000, 1e-4, 0.02), rtol=0, atol=1e-12)


def test_single_file_with_config_beside(unet, x, tmp_path):
    folder = save_pixel_folder(unet, tmp_path / "m", scheduler_config=COSINE)
    loaded, alphas = load_pixel_unet(folder / "diffusion_pytorch_model.safetensors")
    assert_same_model(loaded, unet, x)
    assert torch.equal(alphas, alphas_cumprod_from_config(COSINE))


def test_bin_state_dict_loads(unet, x, tmp_path):
    folder = save_pixel_folder(unet, tmp_path / "m")
    weights = folder / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    loaded, _ = load_pixel_unet(folder, dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
    assert_same_model(loaded.float(), unet, x)


def test_legacy_attention_names_and_shards(unet, x, tmp_path):
    """google/ddpm-* files from diffusers 0.1 name attention query/key/value/proj_attn."""
    folder = save_pixel_folder(unet, tmp_path / "m")
    weights = folder / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in load_file(weights).items():
        for new, legacy in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.").replace(
                f".attentions.1.{new}.", f".attentions.1.{legacy}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    weights.unlink()
    keys = sorted(renamed)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: renamed[k] for k in ks}, folder / name)
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_model(load_pixel_unet(folder)[0], unet, x)


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [LINEAR, COSINE, {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                  "beta_end": 0.012}, None])
def test_schedules_match_formula_and_diffusers(cfg):
    from diffusers import DDPMScheduler

    alphas = alphas_cumprod_from_config(cfg)
    c = {**{"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"},
         **(cfg or {})}
    T = c["num_train_timesteps"]
    if c["beta_schedule"] == "linear":
        torch.testing.assert_close(alphas, linear_formula(T, c["beta_start"], c["beta_end"]), rtol=0, atol=1e-12)
    elif c["beta_schedule"] == "squaredcos_cap_v2":
        torch.testing.assert_close(alphas, cosine_formula(T), rtol=0, atol=1e-12)
    ref = DDPMScheduler(**{k: v for k, v in c.items() if not k.startswith("_")}).alphas_cumprod
    torch.testing.assert_close(alphas.float(), ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Refusals: each names the path
# --------------------------------------------------------------------------------------
def refused(path: Path, *words: str) -> None:
    with pytest.raises(PixelModelError) as info:
        load_pixel_unet(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg


def test_refuses_missing_path(tmp_path):
    refused(tmp_path / "nope", "no such")


def test_refuses_folder_without_config(unet, tmp_path):
    save_pixel_unet(unet, tmp_path / "only.safetensors")
    refused(tmp_path, "config.json", "only.safetensors")


def test_refuses_text_conditioned_unet_folder_and_pipeline(tmp_path):
    from diffusers import UNet2DConditionModel

    cond = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    cond.save_pretrained(tmp_path / "sd" / "unet", safe_serialization=True)
    refused(tmp_path / "sd" / "unet", "text-conditioned", "Stable Diffusion")
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"],
    }))
    refused(tmp_path / "sd", "Stable Diffusion")


def test_refuses_stable_diffusion_checkpoint(tmp_path):
    f = tmp_path / "v1-5.safetensors"
    save_file({
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77, dtype=torch.long),
    }, f)
    refused(f, "Stable Diffusion")


def test_refuses_lora(tmp_path):
    f = tmp_path / "style_lora.safetensors"
    base = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{base}.lora_down.weight": torch.zeros(4, 320), f"{base}.lora_up.weight": torch.zeros(320, 4),
               f"{base}.alpha": torch.tensor(4.0)}, f, metadata={"ss_network_dim": "4"})
    refused(f, "LoRA")


def test_refuses_non_safetensors(tmp_path):
    f = tmp_path / "readme.safetensors"
    f.write_text("This is not a model, just a text file with a misleading name.\n")
    refused(f, "safetensors")


def test_refuses_truncated_safetensors(unet, tmp_path):
    f = save_pixel_unet(unet, tmp_path / "cut.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    refused(f, "safetensors")


def test_refuses_single_file_without_config(unet, tmp_path):
    f = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, f)
    refused(f, "config")


def test_refuses_class_conditional_config(unet, tmp_path):
    folder = save_pixel_folder(unet, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_class_embeds"] = 10
    (folder / "config.json").write_text(json.dumps(cfg))
    refused(folder, "class-conditional")


def test_refuses_key_and_shape_mismatches(unet, tmp_path):
    folder = save_pixel_folder(unet, tmp_path / "m")
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["conv_in.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    refused(folder, "1 missing", "conv_in.weight", "1 unexpected", "extra.weight")

    state = load_file(weights)
    state["conv_in.weight"] = torch.zeros(16, 3, 5, 5)
    del state["extra.weight"]
    save_file(state, weights)
    refused(folder, "shape", "conv_in.weight")


def test_refuses_pickled_custom_object(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **TINY}))
    torch.save({"conv_in.weight": torch.zeros(1), "payload": Path("/etc")}, folder / "diffusion_pytorch_model.bin")
    refused(folder / "diffusion_pytorch_model.bin", "unpickl")
    refused(folder, "unpickl")


def test_refuses_bad_scheduler(unet, tmp_path):
    folder = save_pixel_folder(unet, tmp_path / "m", scheduler_config={"beta_schedule": "exotic"})
    refused(folder, "exotic")
    (folder / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 348.0}))
    refused(folder, "score-SDE")
