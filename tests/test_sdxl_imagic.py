"""Imagic on SDXL (diffusers back end, tiny SDXL-shaped model): the optimised embedding is the whole
conditioning (context and pooled vector), the fine-tune's LoRA file is in ComfyUI's layout, and eq. 3's
eta interpolates both parts.

The expected prediction is computed without the back end's views or weight functions: the LoRA file
is decoded by hand (W + alpha / r * up @ down) into a copy of the UNet, which is called as SDXL's
pipeline calls it (:func:`test_sdxl_loading.hand_eps`).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("diffusers")

from core.imagic import EmbeddingConfig, FineTuneConfig, finetune, interpolate, optimize_embedding  # noqa: E402
from core.lora import LoRAConfig  # noqa: E402
from core.losses import NoiseDraw, denoising_loss  # noqa: E402
from core.sampling import ddim_sample  # noqa: E402
from helpers import ROOT  # noqa: E402
from test_sdxl_loading import hand_eps  # noqa: E402
from tiny_sd import TINY_XL_POOLED, tiny_sdxl_model  # noqa: E402

P = TINY_XL_POOLED


@pytest.fixture(scope="module")
def xl():
    return tiny_sdxl_model(1)


@pytest.fixture(scope="module")
def latent():
    """An image-like latent [1, 4, 8, 12] (non-square: the size conditioning has h != w)."""
    img = Image.open(ROOT / "core/sinddm/data/coffee_128x100.png").convert("RGB").resize((48, 32))
    x = torch.from_numpy(np.asarray(img).astype("float32") / 255).permute(2, 0, 1)[None] * 2 - 1
    small = F.avg_pool2d(x, 4)
    return torch.cat([small, small.mean(1, keepdim=True)], 1) * 1.5


def fixed_loss(model, latent, cond, n: int = 24) -> float:
    draw = NoiseDraw(999)
    with torch.no_grad():
        return float(np.mean([denoising_loss(model, latent, cond, *draw(latent)).item() for _ in range(n)]))


@pytest.fixture(scope="module")
def stages(xl, latent):
    e_tgt = xl.encode_text(["a photo of a dog"])
    emb = optimize_embedding(xl, latent, e_tgt, EmbeddingConfig(steps=50, lr=1e-2))
    ft = finetune(xl, latent, emb.e_opt, FineTuneConfig(mode="lora", steps=25, lr=5e-3,
                                                       lora=LoRAConfig(rank=4, alpha=4)))
    return e_tgt, emb, ft


def test_stage1_optimises_the_context_and_the_pooled_vector(xl, latent, stages):
    e_tgt, emb, _ = stages
    assert emb.e_opt.shape == e_tgt.shape == (1, 78, 64)
    d_ctx = (emb.e_opt[:, :-1] - e_tgt[:, :-1]).norm() / e_tgt[:, :-1].norm()
    d_pooled = (emb.e_opt[:, -1, :P] - e_tgt[:, -1, :P]).norm() / e_tgt[:, -1, :P].norm()
    assert d_ctx > 1e-3 and d_pooled > 1e-3, (d_ctx, d_pooled)
    assert (emb.e_opt[:, -1, P:] == 0).all(), "the packing's zeros get no gradient and stay zero"
    assert fixed_loss(xl, latent, emb.e_opt) < fixed_loss(xl, latent, e_tgt)
    # moving the pooled vector alone (context kept at e_tgt) already lowers the loss: it was optimised
    pooled_only = e_tgt.clone()
    pooled_only[:, -1] = emb.e_opt[:, -1]
    assert fixed_loss(xl, latent, pooled_only) < fixed_loss(xl, latent, e_tgt)


def lora_applied_copy(unet, delta_file, canonical):
    """A copy of the diffusers UNet with each LoRA of the file added to its weight by hand."""
    tuned = copy.deepcopy(unet)
    params = dict(tuned.named_parameters())
    stems = {k[: -len(".lora_up.weight")] for k in delta_file if k.endswith(".lora_up.weight")}
    with torch.no_grad():
        for stem in stems:
            up, down = delta_file[stem + ".lora_up.weight"].float(), delta_file[stem + ".lora_down.weight"].float()
            scale = float(delta_file[stem + ".alpha"]) / down.shape[0]
            w = params[canonical[stem[len("diffusion_model."):] + ".weight"]]
            w.add_((scale * up.flatten(1) @ down.flatten(1)).reshape(w.shape))
    return tuned, len(stems)


def test_eta_interpolates_context_and_pooled_vector_through_the_tuned_model(xl, latent, stages):
    e_tgt, emb, ft = stages
    assert any(k.startswith("diffusion_model.input_blocks.4.1.transformer_blocks.1.") for k in ft.delta)
    assert "diffusion_model.label_emb.0.0.lora_up.weight" in ft.delta  # SDXL's added-conditioning MLP is tuned too
    tuned_unet, n = lora_applied_copy(xl.unet, ft.delta, xl.canonical_names())
    assert n > 10
    x, t = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3)), torch.tensor([120, 710])
    for eta in (0.0, 0.7, 1.1):
        e = interpolate(e_tgt, emb.e_opt, eta)
        ctx = eta * e_tgt[:, :-1] + (1 - eta) * emb.e_opt[:, :-1]
        pooled = eta * e_tgt[:, -1, :P] + (1 - eta) * emb.e_opt[:, -1, :P]
        with torch.no_grad():
            want = hand_eps(tuned_unet, x, t, ctx.expand(2, -1, -1), pooled.expand(2, -1), (64, 96))
            with xl.adapted(ft.weight_functions()) as view:
                got = view.eps(x, t, e.expand(2, -1, -1))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sampling_with_cfg_runs_through_the_tuned_view(xl, stages):
    e_tgt, emb, ft = stages
    uncond = xl.encode_text([""])
    e = interpolate(e_tgt, emb.e_opt, 0.9)
    with xl.adapted(ft.weight_functions()) as tuned:
        out = ddim_sample(tuned, e, uncond, shape=(2, 4, 8, 12), steps=4, guidance=5.0, seed=0)
    assert out.shape == (2, 4, 8, 12) and torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().max() > 1e-3  # two samples from different noise


def test_command_lines_take_an_sdxl_single_file(tmp_path):
    """python -m core.imagic and python -m core.sine on a tiny SDXL single file (the real loader, offline)."""
    import subprocess
    import sys

    from safetensors import safe_open

    from tiny_sd import build_tiny_xl, write_config_dir_xl, write_single_file_xl

    modules = build_tiny_xl(0)
    cfg = write_config_dir_xl(tmp_path / "cfg", *modules)
    ckpt = write_single_file_xl(tmp_path / "tiny_xl.safetensors", *modules, dtype=torch.float16)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    common = ["--checkpoint", str(ckpt), "--config-dir", str(cfg), "--device", "cpu"]
    image = str(ROOT / "core/sinddm/data/coffee_128x100.png")

    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=env)

    out, delta = tmp_path / "edit.png", tmp_path / "edit.safetensors"
    r = run("core.imagic", *common, "--image", image, "--prompt", "a cup of tea", "--size", "64", "--emb-steps", "2",
            "--ft-steps", "2", "--steps", "2", "--etas", "1.0", "--out", str(out), "--save-delta", str(delta))
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(out).size == (64, 64)
    with safe_open(str(delta), "pt") as f:
        assert f.get_tensor("sie.embedding").shape == (1, 78, 64)  # the packed SDXL conditioning
        assert "diffusion_model.label_emb.0.0.lora_up.weight" in f.keys()

    tuned = tmp_path / "sine.safetensors"
    r = run("core.sine", "finetune", *common, "--image", image, "--prompt", "a photo of a sks cup", "--size", "64",
            "--steps", "2", "--out", str(tuned))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("core.sine", "edit", *common, "--tuned", str(tuned), "--target", "a cup of tea", "--width", "96",
            "--height", "64", "--steps", "2", "--K", "500", "--out", str(tmp_path / "sine.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(tmp_path / "sine.png").size == (96, 64)
    r = run("core.sine", "finetune", *common, "--image", image, "--prompt", "x", "--size", "64", "--steps", "2",
            "--train-text-encoder", "--out", str(tmp_path / "te.safetensors"))
    assert r.returncode == 2 and "--train-text-encoder" in r.stderr and "SDXL" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "te.safetensors").exists()
