"""SINE fine-tuning, editing (eq. 3 through views), its file and CLI, on the tiny SD model (CPU).

The tiny UNet's first block has 32 channels and its VAE downsamples by 8: patches use
high_resolution 128 (a 16 x 16 positional grid) and 64-pixel crops (8 x 8 latents).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.artifact_io import ArtifactError
from core.losses import NoiseDraw, denoising_loss
from core.sampling import ddim_sample
from core.seam import Features
from core.sine import (
    PatchConfig,
    PositionalMap,
    SineFineTuneConfig,
    edit,
    finetune_sine,
    first_block_channels,
    load_sine,
    save_sine,
)
from core.sine.patches import PatchSampler
from helpers import ROOT
from tiny_sd import build_tiny, tiny_sd_model

PATCH = PatchConfig(high_resolution=128, size=64)
IMAGE = ROOT / "core/sinddm/data/coffee_128x100.png"


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_sd_model(0)


@pytest.fixture(scope="module")
def image():
    img = Image.open(IMAGE).convert("RGB")
    return torch.from_numpy(np.asarray(img).astype("float32") / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def cond(tiny_model):
    return tiny_model.encode_text(["a photo of a sks cup"])


@pytest.fixture(scope="module")
def tuned(tiny_model, image, cond):
    config = SineFineTuneConfig(steps=20, lr=5e-3, patches=True, patch=PATCH, seed=0)
    return finetune_sine(tiny_model, image, cond, config)


def fixed_patch_loss(model, image, cond, n: int = 8) -> float:
    """eps-MSE with the positional map at fixed boxes and fixed (t, eps), never used in training."""
    sampler = PatchSampler(image, PATCH)
    gen = torch.Generator().manual_seed(999)
    draw = NoiseDraw(12345)
    pmap = PositionalMap(32, PATCH.grid)
    out = []
    with torch.no_grad():
        for _ in range(n):
            crop, box = sampler(1, gen)
            z0 = model.encode(crop)
            out.append(denoising_loss(model, z0, cond, *draw(z0), features=Features(pmap, box)).item())
    return float(np.mean(out))


def test_first_block_channels_come_from_the_model(tiny_model):
    assert first_block_channels(tiny_model) == 32


def test_patch_finetuning_lowers_the_fixed_loss_and_keeps_the_base(tiny_model, image, cond, tuned):
    before = {k: v.clone() for k, v in tiny_model.unet.state_dict().items()}
    base_loss = fixed_patch_loss(tiny_model, image, cond)
    with tiny_model.adapted(tuned.weight_functions()) as m:
        tuned_loss = fixed_patch_loss(m, image, cond)
    assert tuned_loss < base_loss, (tuned_loss, base_loss)
    assert tuned.positional and tuned.channels == 32 and tuned.grid_size == 16
    assert len(tuned.losses) == 20 and tuned.mode == "lora"
    assert any(k.endswith("lora_up.weight") for k in tuned.delta)
    after = tiny_model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pooled_x0_term_is_its_own_curve_and_zero_weighted_by_default(tiny_model, image, cond, tuned):
    off = tuned.terms
    assert set(off) == {"eps_mse", "pooled_x0"}
    assert np.allclose(tuned.losses, off["eps_mse"])  # weight 0: the total is the eps term
    on = finetune_sine(tiny_model, image, cond, SineFineTuneConfig(steps=3, lr=5e-3, patches=True, patch=PATCH,
                                                                   pooled_x0_weight=1.0))
    total = np.array(on.terms["eps_mse"]) + np.array(on.terms["pooled_x0"])
    assert np.allclose(on.losses, total, rtol=1e-5)
    assert all(v > 0 for v in on.terms["pooled_x0"])


def test_whole_image_full_mode_runs_without_map(tiny_model, cond):
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    res = finetune_sine(tiny_model, img, cond, SineFineTuneConfig(mode="full", steps=2, lr=1e-4))
    assert not res.positional and res.deltas and any(k.endswith(".diff") for k in res.delta)
    assert SineFineTuneConfig().total_steps == 800 and SineFineTuneConfig(patches=True).total_steps == 10_000
    assert SineFineTuneConfig(mode="full").learning_rate == 1e-6


class Counter:
    def __init__(self, unet):
        self.n = 0
        self.handle = unet.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.n += 1


def test_edit_with_K_above_every_t_is_plain_cfg(tiny_model, cond, tuned):
    u = tiny_model.encode_text([""])
    c = tiny_model.encode_text(["a photo of a sks cup on a table"])
    count = Counter(tiny_model.unet)
    try:
        out = edit(tiny_model, tuned, c, cond, u, (1, 4, 8, 8), steps=5, w=7.5, K=999, seed=3)
        calls_no_ft = count.n
        count.n = 0
        ref = ddim_sample(tiny_model, c, u, (1, 4, 8, 8), steps=5, guidance=7.5, seed=3)
        assert torch.allclose(out, ref, atol=1e-5)
        assert calls_no_ft == 5  # one batched base call per step, never the fine-tuned view
        count.n = 0
        every = edit(tiny_model, tuned, c, cond, u, (1, 4, 8, 8), steps=5, K=-1, seed=3)
        assert count.n == 10  # plus the fine-tuned view at every step
        assert not torch.allclose(every, out)
    finally:
        count.handle.remove()


def test_edit_at_a_non_square_size(tiny_model, cond, tuned):
    u = tiny_model.encode_text([""])
    out = edit(tiny_model, tuned, cond, cond, u, (1, 4, 6, 10), steps=3, K=0)
    assert out.shape == (1, 4, 6, 10) and torch.isfinite(out).all()


def test_artifact_round_trip_and_refusal(tmp_path, tuned):
    p = save_sine(tuned, "a photo of a sks cup", tmp_path / "t.safetensors")
    back, prompt = load_sine(p)
    assert prompt == "a photo of a sks cup" and back.positional and back.grid_size == 16 and back.channels == 32
    assert set(back.deltas) == set(tuned.deltas)
    assert all(torch.allclose(back.deltas[k].flatten(), tuned.deltas[k].flatten(), atol=1e-6) for k in tuned.deltas)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ArtifactError, match="not a SINE fine-tune"):
        load_sine(tmp_path / "lora.safetensors")
    (tmp_path / "a.png").write_bytes(IMAGE.read_bytes())
    with pytest.raises(ArtifactError):
        load_sine(tmp_path / "a.png")


def test_cli_finetune_then_edit_end_to_end(tmp_path):
    import subprocess
    import sys

    from tiny_sd import write_config_dir, write_single_file

    unet, vae, text = build_tiny(0)
    cfg = write_config_dir(tmp_path / "cfg", unet, vae, text)
    ckpt = write_single_file(tmp_path / "tiny.safetensors", unet, vae, text)
    tuned, out = tmp_path / "tuned.safetensors", tmp_path / "out" / "edit.png"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    common = ["--checkpoint", str(ckpt), "--config-dir", str(cfg), "--device", "cpu"]
    run = subprocess.run([sys.executable, "-m", "core.sine", "finetune", *common, "--image", str(IMAGE),
                          "--prompt", "a photo of a sks cup", "--out", str(tuned), "--patches", "--steps", "3",
                          "--size", "64"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "core.sine", "edit", *common, "--tuned", str(tuned),
                          "--target", "a photo of a sks cup on a table", "--width", "96", "--height", "64",
                          "--steps", "3", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Image.open(out).size == (96, 64)
    assert "with positional map" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "core.sine", "edit", *common, "--tuned", str(ckpt),
                          "--target", "x", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    bad_v = subprocess.run([sys.executable, "-m", "core.sine", "edit", *common, "--tuned", str(tuned),
                            "--target", "x", "--v", "1.5", "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)
    assert bad_v.returncode == 2 and "--v" in bad_v.stderr, bad_v.stderr[-2000:]
    # the official variant: the text encoder trained too; edit encodes c^ through it
    te = tmp_path / "te.safetensors"
    run = subprocess.run([sys.executable, "-m", "core.sine", "finetune", *common, "--image", str(IMAGE),
                          "--prompt", "a photo of a sks cup", "--out", str(te), "--train-text-encoder", "--steps", "2",
                          "--size", "64"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and "text encoder" in run.stdout, run.stderr[-3000:]
    assert load_sine(te)[0].text_deltas
    run = subprocess.run([sys.executable, "-m", "core.sine", "edit", *common, "--tuned", str(te), "--target", "x",
                          "--steps", "2", "--width", "64", "--height", "64", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]


def test_config_checks_and_cancel(tiny_model, image, cond):
    from core.fit import Interrupted

    with pytest.raises(ValueError):
        SineFineTuneConfig(mode="dreambooth")
    with pytest.raises(ValueError):
        SineFineTuneConfig(pooled_x0_weight=-1.0)
    assert SineFineTuneConfig(patch=PATCH, whole_fraction=0.1).patch_config.whole_fraction == 0.1
    with pytest.raises(Interrupted):
        finetune_sine(tiny_model, image, cond, SineFineTuneConfig(steps=5, patches=True, patch=PATCH),
                      should_stop=lambda: True)


class PooledLatents:
    """The tiny SD model with a fixed 8x8 average-pool "encoder": the random tiny VAE maps every colour to
    nearly the same latent, so a position-dependent image would not give position-dependent latents."""

    def __init__(self, model):
        self.model = model

    def encode(self, image):
        x = torch.nn.functional.avg_pool2d(image.float() * 2 - 1, 8)  # [B, 3, H/8, W/8] in [-1, 1]
        return torch.cat([x, x.mean(1, keepdim=True)], 1)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_patch_finetuning_learns_where_each_patch_sits(tiny_model, cond):
    """Top half white, bottom half black: at high noise only F(v) tells a crop's colour, so after patch fine-tuning
    the loss at held-out crops is lower with their true box than with the point-mirrored box (opposite colour)."""
    model = PooledLatents(tiny_model)
    img = torch.zeros(1, 3, 128, 128)
    img[:, :, :64] = 1.0
    tuned = finetune_sine(model, img, cond, SineFineTuneConfig(steps=800, lr=2e-3, patches=True, patch=PATCH, seed=0))
    sampler, gen, draw = PatchSampler(img, PATCH), torch.Generator().manual_seed(999), NoiseDraw(12345)
    pmap, grid = PositionalMap(32, PATCH.grid), PATCH.grid
    true, mirrored, base = [], [], []
    with torch.no_grad(), tiny_model.adapted(tuned.weight_functions()) as m:
        for k in range(48):  # held-out boxes: another generator than training's
            crop, box = sampler(1, gen)
            z0 = model.encode(crop)
            _, eps = draw(z0)
            t = torch.tensor([950 if k % 2 else 990])
            other = box.clone()
            other[:, 0], other[:, 1] = grid - box[:, 0] - box[:, 2], grid - box[:, 1] - box[:, 3]
            true.append(denoising_loss(m, z0, cond, t, eps, features=Features(pmap, box)).item())
            mirrored.append(denoising_loss(m, z0, cond, t, eps, features=Features(pmap, other)).item())
    with torch.no_grad():
        gen.manual_seed(999)
        draw = NoiseDraw(12345)
        for k in range(48):
            crop, box = sampler(1, gen)
            z0 = model.encode(crop)
            _, eps = draw(z0)
            t = torch.tensor([950 if k % 2 else 990])
            base.append(denoising_loss(tiny_model, z0, cond, t, eps, features=Features(pmap, box)).item())
    print(f"held-out crops at t 950/990: base {np.mean(base):.4f}, true box {np.mean(true):.4f}, "
          f"mirrored box {np.mean(mirrored):.4f}")
    assert np.mean(true) < np.mean(base), (np.mean(true), np.mean(base))
    assert np.mean(true) < np.mean(mirrored), (np.mean(true), np.mean(mirrored))


def test_edit_step_is_eq3_from_separate_model_calls_and_counts_the_finetuned_pass(tiny_model, cond, tuned,
                                                                                   monkeypatch):
    """Each step of core.sine.edit equals eq. 3 computed from separate calls (pretrained model alone; the
    fine-tuned model alone, with F(v) of the whole grid), to 1e-5; the fine-tuned model runs exactly once per
    step with t > K and never otherwise."""
    from core.diffusion import timesteps
    from core.sine.guidance import model_guidance
    from core.sampling import ddim_loop

    u = tiny_model.encode_text([""])
    c = tiny_model.encode_text(["a photo of a sks cup on a table"])
    w, v, K, steps, seed = 7.5, 0.7, 400, 6, 5
    count = Counter(tiny_model.unet)
    try:
        got = edit(tiny_model, tuned, c, cond, u, (1, 4, 8, 8), steps=steps, w=w, v=v, K=K, seed=seed)
        calls = count.n
    finally:
        count.handle.remove()
    ts = [int(t) for t in timesteps(1000, steps, "leading", steps_offset=1)]
    assert calls == steps + sum(1 for t in ts if t > K) and any(t <= K for t in ts)

    pmap = Features(input_map=PositionalMap(tuned.channels, tuned.grid_size))

    def separate(x, tt, i):
        e_u, e_c = tiny_model.eps(x, tt, u), tiny_model.eps(x, tt, c)
        if int(tt[0]) <= K:
            return e_u + w * (e_c - e_u)
        with tiny_model.adapted(tuned.weight_functions()) as ft:
            e_hat = ft.eps(x, tt, cond, pmap)
        return e_u + w * (v * e_c + (1 - v) * e_hat - e_u)

    import sys

    edit_module = sys.modules["core.sine.edit"]  # the package re-exports the function under the same name
    seen = []  # (x, t, eps) of every step of a real edit run

    def recording(rule, x, *args, **kwargs):
        def rule_and_record(x, tt, i):
            e = rule(x, tt, i)
            seen.append((x.clone(), tt.clone(), e.clone()))
            return e

        return ddim_loop(rule_and_record, x, *args, **kwargs)

    monkeypatch.setattr(edit_module, "ddim_loop", recording)
    again = edit(tiny_model, tuned, c, cond, u, (1, 4, 8, 8), steps=steps, w=w, v=v, K=K, seed=seed)
    assert torch.equal(again, got) and [int(tt[0]) for _, tt, _ in seen] == ts
    for i, (x, tt, e) in enumerate(seen):  # eq. 3 for t > K, plain CFG for t <= K, from separate calls
        with torch.no_grad():
            ref = separate(x, tt, i)
        assert float((e - ref).abs().max() / ref.abs().max()) < 1e-5, int(tt[0])
    # and the rule itself: core.sine.guidance.model_guidance is the same formula
    gen = torch.Generator().manual_seed(0)
    a, b, e = (torch.randn(2, 3, generator=gen) for _ in range(3))
    torch.testing.assert_close(model_guidance(a, b, [e], [1 - v], w, 500, K), a + w * (v * b + (1 - v) * e - a))
    torch.testing.assert_close(model_guidance(a, b, [e], [1 - v], w, 300, K), a + w * (b - a))


def test_text_encoder_training_on_the_tiny_model(tiny_model, image, tmp_path):
    """The official code trains the text encoder too: a second delta (text_encoders.clip_l.transformer.*),
    the encoder itself untouched, the adapted encoding different, and the file keeps both deltas."""
    before = {k: v.clone() for k, v in tiny_model.text_parameters().items()}
    prompt = "a photo of a sks cup"
    for mode in ("lora", "full"):
        res = finetune_sine(tiny_model, image[..., :64, :64], None,
                            SineFineTuneConfig(mode=mode, steps=3, lr=1e-3, train_text_encoder=True, text_mode=mode,
                                               text_lr=1e-3), prompt=prompt)
        assert res.text_delta and all(k.startswith("text_encoders.clip_l.transformer.text_model.")
                                      for k in res.text_delta)
        if mode == "lora":  # adapters on the layers only
            assert all(k.startswith("text_encoders.clip_l.transformer.text_model.encoder.layers.")
                       for k in res.text_delta)
        assert all(torch.equal(before[k], v) for k, v in tiny_model.text_parameters().items())
        with torch.no_grad(), tiny_model.text_adapted(res.text_weight_functions()) as encode:
            adapted = encode(prompt)
        assert (adapted - tiny_model.encode_text([prompt])).abs().max() > 1e-6
        back, _ = load_sine(save_sine(res, prompt, tmp_path / f"{mode}.safetensors"))
        assert set(back.text_deltas) == set(res.text_deltas) and set(back.deltas) == set(res.deltas)
    with pytest.raises(ValueError, match="prompt"):
        finetune_sine(tiny_model, image, None, SineFineTuneConfig(steps=1, train_text_encoder=True))


def adaptive_pool_by_definition(x: torch.Tensor, size: int) -> torch.Tensor:
    """adaptive_avg_pool2d from its definition: output cell (i, j) is the mean of input rows
    floor(i H / size) .. ceil((i + 1) H / size) - 1 and the same for columns."""
    h, w = x.shape[-2:]
    out = torch.empty(*x.shape[:-2], size, size, dtype=torch.float64)
    for i in range(size):
        r0, r1 = (i * h) // size, -((-(i + 1) * h) // size)
        for j in range(size):
            c0, c1 = (j * w) // size, -((-(j + 1) * w) // size)
            out[..., i, j] = x[..., r0:r1, c0:c1].double().mean(dim=(-2, -1))
    return out


@pytest.mark.parametrize("side", [64, 96])
def test_pooled_x0_loss_is_the_official_adaptive_pool_to_64(side):
    """The official term is (t/T)^2 L1(adaptive_avg_pool2d(x0^, 64), adaptive_avg_pool2d(z0, 64)), mean over the
    batch: 64 is an output size, so on a 64x64 latent it is a per-pixel L1, not one mean per channel (avg_pool2d
    with a 64 kernel); on a 96x96 latent each cell averages its adaptive bins.  From the definition, batch 2."""
    from core.sine.finetune import pooled_x0_loss

    gen = torch.Generator().manual_seed(side)
    x0, z0 = torch.randn(2, 4, side, side, generator=gen), torch.randn(2, 4, side, side, generator=gen)
    t = torch.tensor([700, 250])
    per = (adaptive_pool_by_definition(x0, 64) - adaptive_pool_by_definition(z0, 64)).abs().mean(dim=(1, 2, 3))
    want = float(((t.double() / 1000) ** 2 * per).mean())
    got = float(pooled_x0_loss(x0, z0, t, 1000))
    assert abs(got - want) <= 1e-5 * want, (got, want)
    if side == 64:  # identity pool: the plain per-pixel L1
        plain = ((t.double() / 1000) ** 2 * (x0 - z0).abs().double().mean(dim=(1, 2, 3))).mean()
        assert abs(float(plain) - want) <= 1e-5 * want
    channel_means = (x0.mean(dim=(-2, -1)) - z0.mean(dim=(-2, -1))).abs().mean(dim=1)  # avg_pool2d(x, 64)
    assert abs(float(((t.double() / 1000) ** 2 * channel_means).mean()) - want) > 0.1 * want


def test_pooled_x0_term_in_the_fine_tune_loop_is_the_definition(tiny_model, cond):
    """The loop's recorded term at step 1 (untrained LoRA: the base model), recomputed from the definition with the
    step's (t, eps): on the tiny model's 8x8 latent the 64 output cells repeat each latent pixel 8 x 8 times, so the
    term is the per-pixel L1 (a kernel clamped to the latent would give one mean per channel)."""
    from core.diffusion import predict_x0, q_sample
    from core.seeds import derive_seed

    seed = 3
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    res = finetune_sine(tiny_model, img, cond, SineFineTuneConfig(steps=1, lr=1e-4, pooled_x0_weight=1.0, seed=seed))
    T = len(tiny_model.alphas_cumprod)
    with torch.no_grad():
        z0 = tiny_model.encode(img)
        t, eps = NoiseDraw(derive_seed(seed, 1), T)(z0)
        a = tiny_model.alphas_cumprod[t]
        x_t = q_sample(z0, a, eps)
        x0 = predict_x0(x_t, tiny_model.eps(x_t, t, cond), a)
    per = (adaptive_pool_by_definition(x0, 64) - adaptive_pool_by_definition(z0, 64)).abs().mean()
    want = float((t.double() / T) ** 2 * per)
    got = res.terms["pooled_x0"][0]
    assert abs(got - want) <= 1e-5 * want, (got, want)


def test_text_encoder_full_fine_tune_is_the_official_one_adamw_group(tiny_model, image):
    """The official configure_optimizers: AdamW(UNet params + every text-model param, lr, decay 0.01), one group.
    Two steps of SINE's full fine-tune with the text encoder in full equal two such steps taken by hand on copies
    of the tiny UNet and CLIP text model (same (t, eps) draws): every text parameter moves as the reference's,
    the token embedding's rows of the prompt's tokens (the rare token "sks" included) and the position table too."""
    import copy

    from core.diffusion import q_sample
    from core.sd.tokenizer import tokenize
    from core.seeds import derive_seed

    prompt, lr, seed, steps = "a photo of a sks cup", 1e-3, 4, 2
    img = image[..., :64, :64]
    config = SineFineTuneConfig(mode="full", steps=steps, lr=lr, seed=seed, train_text_encoder=True)
    assert config.text_mode == "full" and config.text_learning_rate == lr  # one group, one rate
    res = finetune_sine(tiny_model, img, None, config, prompt=prompt)

    unet, text = copy.deepcopy(tiny_model.unet).float(), copy.deepcopy(tiny_model.text_encoder).float()
    for p in [*unet.parameters(), *text.parameters()]:
        p.requires_grad_(True)
    unet0 = {k: v.detach().clone() for k, v in unet.named_parameters()}
    text0 = {k: v.detach().clone() for k, v in text.named_parameters()}
    opt = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=lr, weight_decay=0.01)
    T = len(tiny_model.alphas_cumprod)
    with torch.no_grad():
        z0 = tiny_model.encode(img)
    draw = NoiseDraw(derive_seed(seed, 1), T)
    ids = tokenize(tiny_model.tokenizer, [prompt])
    for _ in range(steps):
        t, eps = draw(z0)
        x_t = q_sample(z0, tiny_model.alphas_cumprod[t], eps)
        pred = unet(x_t, t, encoder_hidden_states=text(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()

    names = dict(tiny_model.text_names())  # canonical -> the module's own name
    ref_text = {c: (dict(text.named_parameters())[n].detach() - text0[n]) for c, n in names.items()}
    assert set(res.text_deltas) == set(ref_text)  # every parameter of the text model, embeddings included
    for name, ref in ref_text.items():
        got = res.text_deltas[name]
        assert (got - ref).abs().max() <= 0.02 * lr + 1e-3 * ref.abs().max(), name
    token = res.text_deltas["text_model.embeddings.token_embedding.weight"]  # [49408, 32]
    rows = token.abs().amax(dim=1)
    used = ids[0].unique()
    sks = tiny_model.tokenizer("sks", add_special_tokens=False)["input_ids"]
    assert all(rows[i] > 0.5 * lr for i in sks)  # the rare token's row is trained
    unused = torch.ones(len(rows), dtype=torch.bool)
    unused[used] = False
    table = tiny_model.text_parameters()["text_model.embeddings.token_embedding.weight"]
    assert rows[unused].max() <= steps * lr * 0.01 * table.abs().max() * 1.01  # other rows: weight decay only
    assert res.text_deltas["text_model.embeddings.position_embedding.weight"].abs().max() > 0.5 * lr
    unet_params = dict(unet.named_parameters())
    for c, n in tiny_model.canonical_names().items():  # and the UNet, in the same group
        ref = unet_params[n].detach() - unet0[n]
        got = res.deltas[c].reshape(ref.shape)
        assert (got - ref).abs().max() <= 0.02 * lr + 1e-3 * ref.abs().max(), c
    # c^ is the prompt through the trained encoder: the reference's encoder after the same steps
    with torch.no_grad():
        assert (res.c_hat - text(ids)[0]).abs().max() < 1e-5


def test_text_encoder_learning_rates_follow_the_text_mode():
    full_text = SineFineTuneConfig(train_text_encoder=True)  # UNet lora 1e-4, text encoder full: official 1e-6
    assert full_text.text_mode == "full" and full_text.text_learning_rate == 1e-6
    assert SineFineTuneConfig(mode="full", lr=2e-6, train_text_encoder=True).text_learning_rate == 2e-6
    assert SineFineTuneConfig(train_text_encoder=True, text_mode="lora").text_learning_rate == 1e-4
    assert SineFineTuneConfig(mode="full", train_text_encoder=True, text_mode="lora").text_learning_rate == 1e-4
    assert SineFineTuneConfig(train_text_encoder=True, text_lr=3e-5).text_learning_rate == 3e-5
    with pytest.raises(ValueError, match="text_mode"):
        SineFineTuneConfig(text_mode="half")


def test_multi_model_guidance_has_one_K_per_model():
    """Official DDIMMultiSampler: e = u + w((1 - sum_A b_i) c + sum_A b_i c^_i - u) over the models A active at t
    (here t > K_i), plain CFG when none is; any number of models."""
    from core.sine.guidance import model_guidance

    gen = torch.Generator().manual_seed(1)
    u, c, e1, e2, e3 = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(5))
    b, Ks, w = [0.3, 0.2, 0.1], [400, 600, 200], 5.0
    for t, active in [(700, [0, 1, 2]), (500, [0, 2]), (300, [2]), (100, [])]:
        preds = [e if i in active else None for i, e in enumerate((e1, e2, e3))]  # inactive: not evaluated
        got = model_guidance(u, c, preds, b, w, t, Ks)
        mix = (1 - sum(b[i] for i in active)) * c + sum(b[i] * (e1, e2, e3)[i] for i in active)
        torch.testing.assert_close(got, u + w * (mix - u), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no prediction"):
        model_guidance(u, c, [e1, None, e3], b, w, 700, Ks)
    with pytest.raises(ValueError, match="thresholds"):
        model_guidance(u, c, [e1, e2, e3], b, w, 700, [400, 600])


def test_saved_c_hat_is_the_conditioning_training_used(tiny_model, tmp_path):
    """Trained at the conditioning of one text while the recorded prompt says another: the file gives back the
    conditioning training used (to the bit), not the other text's encoding; with the text encoder trained, the
    prompt through the trained encoder (what training encoded at every step)."""
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    trained_on, label = "a photo of a sks cup", "a painting of a sks teapot"
    cond = tiny_model.encode_text([trained_on])
    res = finetune_sine(tiny_model, img, cond, SineFineTuneConfig(steps=1, lr=1e-3))
    back, prompt = load_sine(save_sine(res, label, tmp_path / "two_texts.safetensors"))
    assert prompt == label
    assert torch.equal(back.c_hat, cond.float()) and torch.equal(res.c_hat, cond.float())
    assert (back.c_hat - tiny_model.encode_text([label])).abs().max() > 1e-3  # the texts differ
    assert set(back.deltas) == set(res.deltas)  # c^ is no delta

    res = finetune_sine(tiny_model, img, cond, SineFineTuneConfig(steps=2, lr=1e-3, train_text_encoder=True),
                        prompt=label)
    back, _ = load_sine(save_sine(res, label, tmp_path / "text.safetensors"))
    with torch.no_grad(), tiny_model.text_adapted(back.text_weight_functions()) as encode:
        again = encode(label)
    assert (back.c_hat - again).abs().max() < 1e-5  # c^ = the trained prompt through the trained encoder
    assert (back.c_hat - cond).abs().max() > 1e-3  # not the (unused) conditioning of the other text
