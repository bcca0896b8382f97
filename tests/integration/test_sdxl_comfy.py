"""SDXL in a real ComfyUI: a random-weight SDXL base checkpoint built with ComfyUI's own classes.

Heavy (a 6.9 GB file; each script holds the model in fp32 on the CPU, about 14 GB), so the tests are
marked ``sdxl`` and run only when asked: ``SIE_SDXL=1 COMFYUI_DIR=... python -m pytest -m sdxl``
(on both supported ComfyUI versions).  The checkpoint is built once (about a minute, 8 GB of memory)
and cached beside the random SD 1.5.

* the seam over ComfyUI's MODEL / CLIP / VAE (``ComfySD``) agrees with the diffusers back end
  (``core.sd.load_sdxl``) on the same file: text conditioning (context and pooled vector), eps with
  the added conditioning, VAE; each side runs in its own process (two fp32 SDXLs do not fit in 24 GB);
* the nodes run on the SDXL MODEL at a small size with the input MODEL untouched, and their
  equations hold there (named in each test).  These scripts load the UNet in bf16 (ComfyUI's
  ``--bf16-unet``): training through ComfyUI computes with per-call copies of the weights that autograd
  keeps for backward, and fp32 SDXL with them does not fit in 24 GB.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import pytest

from comfy_server import run_in_comfyui, skip_reason
from test_bridge import random_checkpoint

SDXL_REASON = None if os.environ.get("SIE_SDXL") == "1" else (
    "heavy SDXL checks (a 6.9 GB random SDXL, ~16 GB of memory): run by hand with SIE_SDXL=1")
pytestmark = [pytest.mark.integration, pytest.mark.sdxl,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
              pytest.mark.skipif(SDXL_REASON is not None, reason=SDXL_REASON or "")]


def random_sdxl() -> Path:
    """The random-weight SDXL checkpoint, built once with ComfyUI's classes and cached."""
    return random_checkpoint("random_sdxl.safetensors", "make_random_sdxl.py", timeout=1800)


INPUTS = """
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 4, 8, 12, generator=g)            # non-square: the size conditioning has h != w
t = torch.tensor([10, 500, 990])
img = torch.rand(1, 3, 64, 96, generator=g)
prompts = ["a photo of a cat", "an oil painting of a harbour", ""]
"""

COMFY_SIDE = textwrap.dedent("""
    import comfy.sd
    from sie_pack.nodes.comfy_bridge import ComfySD
    from sie_pack.core.seam import LatentDiffusion
""") + INPUTS + textwrap.dedent("""
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
    sd = ComfySD(model, clip, vae)
    ours = torch.load(sys.argv[3], weights_only=True)
    with torch.no_grad():
        cond = sd.encode_text(prompts)
        eps = sd.eps(x, t, ours["cond"])
        latent = sd.encode(img)
        image = sd.decode(ours["latent"])
    out = {"config": type(model.model.model_config).__name__, "protocol": isinstance(sd, LatentDiffusion),
           "dims": [sd.context_dim, sd.pooled_dim], "cond_shape": list(cond.shape),
           "context": rel(cond[:, :-1], ours["cond"][:, :-1]), "pooled": rel(cond[:, -1], ours["cond"][:, -1]),
           "eps": rel(eps, ours["eps"]), "latent": rel(latent, ours["latent"]),
           "image": float((image - ours["image"]).abs().max()), "eps_scale": float(ours["eps"].abs().mean()),
           "schedule": float((sd.alphas_cumprod - ours["schedule"]).abs().max())}
    print("RESULT " + json.dumps(out))
""")

DIFFUSERS_SIDE = textwrap.dedent("""
    from sie_pack.core.sd.loader import load_sd
""") + INPUTS + textwrap.dedent("""
    m = load_sd(sys.argv[2], device="cpu", dtype=torch.float32)
    with torch.no_grad():
        cond = m.encode_text(prompts)
        eps = m.eps(x, t, cond)
        latent = m.encode(img)
        image = m.decode(latent)
    torch.save({"cond": cond, "eps": eps, "latent": latent, "image": image, "schedule": m.alphas_cumprod}, sys.argv[3])
    print("RESULT " + json.dumps({"type": type(m).__name__, "vae": str(next(m.vae.parameters()).dtype)}))
""")


def test_sdxl_bridge_matches_diffusers_backend(tmp_path):
    ckpt = random_sdxl()
    saved = tmp_path / "diffusers_side.pt"
    d = run_in_comfyui(DIFFUSERS_SIDE, str(ckpt), str(saved), timeout=1800, tmp_dir=tmp_path)
    assert d["type"] == "DiffusersSDXL"
    r = run_in_comfyui(COMFY_SIDE, str(ckpt), str(saved), timeout=1800, tmp_dir=tmp_path)
    assert r["config"] == "SDXL" and r["protocol"]  # ComfyUI's checkpoint loader detects the file as SDXL
    assert r["dims"] == [2048, 1280] and r["cond_shape"] == [3, 78, 2048]
    assert r["schedule"] < 1e-6
    assert r["eps_scale"] > 0.01
    print("SDXL bridge vs diffusers:", {k: r[k] for k in ("context", "pooled", "eps", "latent", "image")})
    for key in ("context", "pooled", "eps", "latent", "image"):
        assert r[key] < 1e-4, r


BF16_UNET = """
from comfy.cli_args import args as _args
_args.bf16_unet = True  # the training scripts: fp32 SDXL plus the per-call weight copies of training exceed 24 GB
"""

IMAGIC = BF16_UNET + textwrap.dedent("""
    import os, tempfile
    import comfy.sd, comfy.model_management, comfy.sampler_helpers, comfy.samplers, folder_paths
    import nodes as comfy_nodes
    from sie_pack.nodes.comfy_bridge import ComfySD
    from sie_pack.nodes.imagic import save_trained
    from sie_pack.nodes.training import cond_tensor
    N = pack.NODE_CLASS_MAPPINGS
    out = {}

    def unet_digest(model):
        comfy.model_management.load_models_gpu([model])
        return digest(model.model.diffusion_model)

    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400, 850])

    def eps_of(model, cond):
        with torch.inference_mode(False), torch.no_grad():
            return ComfySD(model).eps(x, t, cond)

    def sampler_y(model, conditioning, latent):  # the y ComfyUI's samplers compute for a CONDITIONING
        conds = comfy.sampler_helpers.convert_cond(conditioning)
        conds = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, latent, torch.device("cpu"),
                                                  "positive")
        return conds[0]["model_conds"]["y"].cond

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        target = enc(clip, "a photo of a cat")
        negative = enc(clip, "")
        image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
        before = unet_digest(model)
        # checkpointing on: without it a training step holds a copy of most UNet weights (8 GiB here), which the
        # nodes' memory check refuses when the machine is busy
        e_opt, _, _ = N["SIE_OptimizeEmbedding"].execute(model, vae, image, target, 3, 1e-2, 0,
                                                         gradient_checkpointing="on")
        model_ft, _, trained, _ = N["SIE_FineTune"].execute(model, vae, image, e_opt, "lora", 2, 1e-3, 4, 0,
                                                            gradient_checkpointing="on")
        out["weights_unchanged"] = unet_digest(model) == before
        out["context_moved"] = float((e_opt[0][0] - target[0][0]).abs().max())
        out["pooled_moved"] = float((e_opt[0][1]["pooled_output"] - target[0][1]["pooled_output"]).abs().max())
        out["e_opt_shape"] = [list(e_opt[0][0].shape), list(e_opt[0][1]["pooled_output"].shape)]
        mixed = N["SIE_InterpolateConditioning"].execute(target, e_opt, 1.2)[0]
        out["interp_context"] = rel(mixed[0][0], 1.2 * target[0][0] - 0.2 * e_opt[0][0])
        out["interp_pooled"] = rel(mixed[0][1]["pooled_output"],
                                   1.2 * target[0][1]["pooled_output"] - 0.2 * e_opt[0][1]["pooled_output"])
        with torch.inference_mode(False):
            packed = cond_tensor(mixed, model)[0]
            ours_y = ComfySD(model)._added_conditioning(packed, x)[1]
        out["y_vs_sampler"] = float((ours_y[:1] - sampler_y(model, mixed, x)).abs().max())
        latents = N["SIE_EtaSweep"].execute(model_ft, target, e_opt, negative, {"samples": torch.zeros(1, 4, 8, 12)},
                                          "0.5, 1.0", 7, 2, 5.0, "ddim", "ddim_uniform")[0]["samples"]
        out["sweep_shape"] = list(latents.shape)
        base_eps, ft_eps = eps_of(model, packed), eps_of(model_ft, packed)
        out["ft_changes_eps"] = float((ft_eps - base_eps).abs().max())
        loras = tempfile.mkdtemp()
        folder_paths.add_model_folder_path("loras", loras)
        save_trained(trained, os.path.join(loras, "imagic_sdxl.safetensors"))
        native = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "imagic_sdxl.safetensors", 1.0)[0]
        out["native_vs_ours"] = float((eps_of(native, packed) - ft_eps).abs().max())
        out["label_emb_trained"] = any(k.startswith("diffusion_model.label_emb.") for k in trained.delta)
        out["weights_unchanged_after_all"] = unet_digest(model) == before
        out["errors"] = {
            "no_pooled": error(lambda: N["SIE_OptimizeEmbedding"].execute(
                model, vae, image, [[target[0][0], {}]], 1, 1e-3, 0)),
            "sd15_width": error(lambda: N["SIE_OptimizeEmbedding"].execute(
                model, vae, image, [[torch.zeros(1, 77, 768), {}]], 1, 1e-3, 0)),
        }
    print("RESULT " + json.dumps(out))
""")


def test_imagic_nodes_on_sdxl(tmp_path):
    r = run_in_comfyui(IMAGIC, str(random_sdxl()), timeout=3600, tmp_dir=tmp_path)
    print("Imagic on SDXL:", r)
    assert r["weights_unchanged"] and r["weights_unchanged_after_all"], r
    assert r["e_opt_shape"] == [[1, 77, 2048], [1, 1280]]
    assert r["context_moved"] > 0 and r["pooled_moved"] > 0, r  # stage 1 optimises both parts
    assert r["interp_context"] < 1e-6 and r["interp_pooled"] < 1e-6, r  # eq. 3 on both parts
    assert r["y_vs_sampler"] == 0.0, r  # the added conditioning we train with is the sampler's
    assert r["sweep_shape"] == [2, 4, 8, 12]
    assert r["ft_changes_eps"] > 0 and r["label_emb_trained"], r
    assert r["native_vs_ours"] == 0.0, r  # ComfyUI's LoraLoaderModelOnly gives exactly our patched MODEL
    assert "input 'conditioning'" in r["errors"]["no_pooled"] and "pooled" in r["errors"]["no_pooled"], r
    assert "input 'conditioning'" in r["errors"]["sd15_width"] and "2048" in r["errors"]["sd15_width"], r


# --------------------------------------------------------------------------------------
# SINE, LayerDiffusion and the rectifier on the SDXL MODEL: one script per method (bf16 UNet, a 64x96 image,
# an 8x12 latent: non-square, so a size conditioning with h and w swapped would show).
METHOD_HELPERS = BF16_UNET + textwrap.dedent("""
    import ctypes, gc, os, tempfile, time
    from pathlib import Path
    import comfy.sd, comfy.model_management as mm, comfy.sample, comfy.samplers, folder_paths
    import nodes as comfy_nodes
    import sie_pack.nodes.comfy_bridge as bridge
    from sie_pack.nodes.comfy_bridge import ComfySD
    from sie_pack.nodes.training import cond_tensor
    N = pack.NODE_CLASS_MAPPINGS
    out = {}
    tmp = tempfile.mkdtemp()
    bridge.save_dir = lambda name: Path(tmp)  # keep the ComfyUI checkout clean
    bridge.model_path = lambda name, file_name: os.path.join(tmp, file_name)
    LATENT = (1, 4, 8, 12)  # a 64x96 image

    def unet_digest(model):  # as loaded (ComfyUI patches a loaded clone's weights in place)
        mm.load_models_gpu([model])
        return digest(model.model.diffusion_model)

    def run(guider, steps, seed=3, sampler="euler", scheduler="normal", latent=None):
        latent = torch.zeros(*LATENT) if latent is None else latent
        noise = comfy.sample.prepare_noise(latent, seed)
        sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"),
                                                 scheduler, steps)
        return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=seed)

    def plain(m, pos, neg, w, steps=1):  # ComfyUI's own CFGGuider
        g = comfy.samplers.CFGGuider(m); g.set_conds(pos, neg); g.set_cfg(w)
        return run(g, steps)

    xs = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    ts = torch.tensor([400, 850])

    def eps_of(m, cond):  # ComfySD's eps (what the training nodes optimise) at a packed conditioning
        with torch.inference_mode(False), torch.no_grad():
            return ComfySD(m).eps(xs, ts, cond)

    def eps_vs_sampler(m, conditioning, t=600):
        # ComfySD's eps on cond_tensor(conditioning) (what training sees) against ComfyUI's sampling of the
        # CONDITIONING itself (its y from pooled_output and the latent's size) at the same x and sigma
        with torch.inference_mode(False), torch.no_grad():
            sd = ComfySD(m)
            x_t = torch.randn(*LATENT, generator=torch.Generator().manual_seed(t))
            tt = torch.tensor([t])
            a = sd.alphas_cumprod[tt]
            sigma = ((1 - a) / a).sqrt().to(torch.float32)
            x = x_t / a.sqrt().to(x_t.dtype).view(-1, 1, 1, 1)
            ours = sd.eps(x_t, tt, cond_tensor(conditioning, m)[0])
        got = []

        def fn(model_k, noise, sigmas, extra_args=None, callback=None, disable=None):
            got.append(model_k(x, sigma, **(extra_args or {})))
            return noise
        g = comfy.samplers.CFGGuider(m); g.set_conds(conditioning, conditioning); g.set_cfg(1.0)
        g.sample(torch.zeros_like(x), torch.zeros_like(x), comfy.samplers.KSAMPLER(fn),
                 torch.stack([sigma[0], torch.zeros(())]), seed=0)
        theirs = (x - got[0]) / sigma.view(-1, 1, 1, 1)
        return float((ours - theirs).abs().max())

    timing = {}

    def timed(key, fn):
        t0 = time.perf_counter(); r = fn(); timing[key] = round(time.perf_counter() - t0, 1); return r

    def free():  # what a section trained goes before the next, handed back to the OS (the training nodes' memory
        # check reads the free memory: glibc keeps freed heap pages otherwise)
        gc.collect(); mm.unload_all_models(); mm.soft_empty_cache(); gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)

    def any_error(call):  # the error a call raises, with its type ("no error" if none)
        try:
            call()
            return "no error"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
""")

SINE_SETUP = METHOD_HELPERS + textwrap.dedent("""
    from sie_pack.nodes.sine import positional_patches

    def sine_file(tag):
        return [f for f in sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*.safetensors")) if tag in f][0]

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        pos, neg, ft_c = enc(clip, "a photo of a dog in the snow"), enc(clip, ""), enc(clip, "a photo of a sks dog")
        image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
        packed = cond_tensor(ft_c, model)[0]
        before = unet_digest(model)
""")

# two tests, each its own process: the whole-image fine-tune with its reloads and guidance, then the patch
# fine-tune (one process holding both is refused by the fine-tune's memory check on a 24 GB machine)
SINE_WHOLE = SINE_SETUP + textwrap.dedent("""
    # whole image, LoRA, 2 steps (the CLIP connected, its text encoder not trained)
    recipe = N["SIE_SineRecipe"].execute("a photo of a sks dog", False, False, 0.0, 0.0, 0.0)[0]
    ft, _, trained, ft_clip = timed("finetune_2_steps", lambda: N["SIE_FineTune"].execute(
        model, vae, image, ft_c, "lora", 2, 1e-3, 4, 0, recipe, clip))
    res = trained.result
    out["weights_unchanged"] = unet_digest(model) == before
    out["clip_is_input"] = ft_clip is clip
    out["steps"] = len(res.losses)
    out["label_emb_trained"] = any(k.startswith("diffusion_model.label_emb.") for k in res.delta)
    out["c_hat_shape"] = list(res.c_hat.shape)
    out["eps_vs_sampler"] = eps_vs_sampler(ft, ft_c)  # what training optimised is what sampling computes
    ft_eps = eps_of(ft, packed)
    out["ft_changes_eps"] = float((ft_eps - eps_of(model, packed)).abs().max())

    # Save SINE -> Load SINE (c^ unpacked back into a CONDITIONING) and ComfyUI's LoraLoaderModelOnly
    N["SIE_SaveSine"].execute(trained, "sine/whole")
    m2, c2, cond2, prompt2 = N["SIE_LoadSine"].execute(model, clip, sine_file("whole"), 1.0)
    out["reload"] = {"prompt": prompt2, "clip_is_input": c2 is clip,
                     "context": float((cond2[0][0] - ft_c[0][0]).abs().max()),
                     "pooled": float((cond2[0][1]["pooled_output"] - ft_c[0][1]["pooled_output"]).abs().max()),
                     "shapes": [list(cond2[0][0].shape), list(cond2[0][1]["pooled_output"].shape)],
                     "eps": float((eps_of(m2, packed) - ft_eps).abs().max()), "map": len(positional_patches(m2))}
    folder_paths.add_model_folder_path("loras", tmp)
    native = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, sine_file("whole"), 1.0)[0]
    out["native_vs_ours"] = float((eps_of(native, packed) - ft_eps).abs().max())
    del m2, native
    free()

    # the positional map on SDXL (channels from the MODEL), and sampling with the fine-tuned MODEL through it:
    # K = 400 over 2 normal steps (t = 999, then 0), the fine-tuned pass at the first only
    pm = N["SIE_PositionalMap"].execute(ft, "bilinear")[0]
    maps = positional_patches(pm)
    out["map"] = {"count": len(maps), "channels": maps[0].channels, "map_channels": maps[0].map.channels}
    gs = N["SIE_ModelGuidance"].execute(model, pm, pos, ft_c, neg, 5.0, 0.7, 400)[0]
    s = timed("guided_2_steps_K400", lambda: run(gs, 2))
    out["sample"] = {"shape": list(s.shape), "finite": bool(torch.isfinite(s).all()),
                     "calls": [gs.calls["evaluations"], gs.calls["finetuned"]]}
    del pm, gs, ft
    free()

    # eq. 3 from separate runs of ComfyUI's CFGGuider, F(v) on the tuned branch only.  The tuned MODEL carries
    # diff patches whose sums are not bf16 numbers: the patched MODEL stores round_bf16(W + delta), and the
    # guider's views must round the same way (unrounded, eq. 3 here was off by 5.6e-4 at cfg 1, 2.0e-3 at cfg 5)
    diffs, exact = {}, True
    gen = torch.Generator().manual_seed(9)
    for k, v in model.model.diffusion_model.named_parameters():
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight", "attn1.to_q.weight")):
            w = v.detach().float()
            d = torch.randn(v.shape, generator=gen) * 0.05
            exact = exact and torch.equal((w + d).to(v.dtype).float(), w + d)
            diffs["diffusion_model." + k[:-len(".weight")] + ".diff"] = d
    out["diff_sums_exact"] = exact
    tuned_model = bridge.apply_delta(model, diffs)
    pmx = N["SIE_PositionalMap"].execute(tuned_model, "bilinear")[0]
    base, tuned = plain(model, pos, neg, 1.0), plain(pmx, ft_c, neg, 1.0)
    out["map_effect"] = rel(tuned, plain(tuned_model, ft_c, neg, 1.0))
    out["ft_effect"] = rel(tuned, plain(model, ft_c, neg, 1.0))
    g1 = N["SIE_ModelGuidance"].execute(model, pmx, pos, ft_c, neg, 1.0, 0.7, 0)[0]
    out["eq3_cfg1"] = rel(timed("guided_1_step_cfg1", lambda: run(g1, 1)), 0.7 * base + 0.3 * tuned)
    uncond = plain(model, neg, neg, 1.0)
    g5 = N["SIE_ModelGuidance"].execute(model, pmx, pos, ft_c, neg, 5.0, 0.7, 0)[0]
    out["eq3_cfg5"] = rel(timed("guided_1_step_cfg5", lambda: run(g5, 1)),
                          uncond + 5.0 * (0.7 * base + 0.3 * tuned - uncond))
    out["weights_unchanged_after_all"] = unet_digest(model) == before
    out["timing_s"] = timing
print("RESULT " + json.dumps(out))
""")

SINE_PATCH = SINE_SETUP + textwrap.dedent("""
    # SDXL's text encoders are not trained: the recipe's train_text_encoder is named, before any training (first,
    # while the fine-tune's memory check passes)
    trecipe = N["SIE_SineRecipe"].execute("a photo of a sks dog", False, True, 0.0, 0.0, 0.0)[0]
    out["text_error"] = any_error(lambda: N["SIE_FineTune"].execute(model, vae, image, ft_c, "lora", 1, 1e-3, 4, 0,
                                                                    trecipe, clip))
    out["unchanged_after_text_error"] = unet_digest(model) == before

    # patches with F(v) and the pooled x0 term, 1 step on 64-pixel crops of a 128x128 resize (the recipe's
    # 512 crops of 1024 are the same code at 64 times the cost)
    from sie_pack.core.sine import recipe as sine_recipe
    from sie_pack.core.sine.patches import PatchConfig
    real_config = sine_recipe.SineFineTuneConfig

    class SmallPatches(real_config):
        def __init__(self, **kw):
            super().__init__(patch=PatchConfig(high_resolution=128, size=64), **kw)
    sine_recipe.SineFineTuneConfig = SmallPatches
    sine_recipe.PATCH_SIZE = 64
    precipe = N["SIE_SineRecipe"].execute("a photo of a sks dog", True, False, 1.0, 0.0, 0.0)[0]
    pft, _, ptrained, _ = timed("patch_finetune_1_step", lambda: N["SIE_FineTune"].execute(
        model, vae, image, ft_c, "lora", 1, 1e-3, 4, 0, precipe, clip))
    sine_recipe.SineFineTuneConfig, sine_recipe.PATCH_SIZE = real_config, 512
    N["SIE_SaveSine"].execute(ptrained, "sine/patch")
    pm2 = N["SIE_LoadSine"].execute(model, clip, sine_file("patch"), 1.0)[0]
    p_eps = eps_of(pft, packed)
    out["patch"] = {"terms": sorted(ptrained.result.terms), "channels": ptrained.result.channels,
                    "positional": ptrained.result.positional, "map": len(positional_patches(pft)),
                    "reload_map": len(positional_patches(pm2)),
                    "reload_eps": float((eps_of(pm2, packed) - p_eps).abs().max())}
    del pm2
    free()
    gp = N["SIE_ModelGuidance"].execute(model, pft, pos, ft_c, neg, 5.0, 0.7, 400)[0]
    sp = timed("guided_2_steps_K400", lambda: run(gp, 2))
    out["patch"]["sample"] = [list(sp.shape), bool(torch.isfinite(sp).all())]
    out["weights_unchanged"] = unet_digest(model) == before

    # an SD 1.x SINE file (its c^ 768 wide) onto the SDXL MODEL: named, not a traceback
    from safetensors.torch import save_file
    save_file({"sie_sine.c_hat": torch.zeros(1, 77, 768)}, os.path.join(tmp, "sd15_sine.safetensors"),
              {"format": "sie.sine", "version": "1", "prompt": "a photo of a sks dog"})
    out["sd15_file_error"] = any_error(lambda: N["SIE_LoadSine"].execute(model, clip, "sd15_sine.safetensors", 1.0))

    out["timing_s"] = timing
print("RESULT " + json.dumps(out))
""")


def test_sine_nodes_on_sdxl(tmp_path):
    r = run_in_comfyui(SINE_WHOLE, str(random_sdxl()), timeout=3600, tmp_dir=tmp_path)
    print("SINE on SDXL (whole image):", r)
    assert r["weights_unchanged"] and r["weights_unchanged_after_all"], r
    assert r["clip_is_input"] and r["steps"] == 2 and r["label_emb_trained"], r
    assert r["c_hat_shape"] == [1, 78, 2048], r  # c^ packed: 77 context rows and the pooled vector
    assert r["eps_vs_sampler"] == 0.0, r  # training's eps at c^ is ComfyUI's for the CONDITIONING c^ (y included)
    assert r["ft_changes_eps"] > 0, r
    rl = r["reload"]
    assert rl["prompt"] == "a photo of a sks dog" and rl["clip_is_input"] and rl["map"] == 0, rl
    assert rl["shapes"] == [[1, 77, 2048], [1, 1280]] and rl["context"] == 0.0 and rl["pooled"] == 0.0, rl
    assert rl["eps"] == 0.0 and r["native_vs_ours"] == 0.0, r  # Load SINE and LoraLoaderModelOnly: our MODEL
    assert r["map"] == {"count": 1, "channels": 320, "map_channels": 320}, r  # SDXL's first block: 320 channels
    assert r["sample"] == {"shape": [1, 4, 8, 12], "finite": True, "calls": [2, 1]}, r
    assert not r["diff_sums_exact"] and r["map_effect"] > 1e-3 and r["ft_effect"] > 1e-3, r
    assert r["eq3_cfg1"] < 1e-5 and r["eq3_cfg5"] < 1e-5, r  # eq. 3 from separate runs; F(v) on the tuned branch


def test_sine_patches_and_text_encoder_on_sdxl(tmp_path):
    p = run_in_comfyui(SINE_PATCH, str(random_sdxl()), timeout=3600, tmp_dir=tmp_path)
    print("SINE on SDXL (patches):", p)
    assert p["weights_unchanged"], p
    q = p["patch"]
    assert q["terms"] == ["eps_mse", "pooled_x0"] and q["channels"] == 320 and q["positional"], q
    assert q["map"] == 1 and q["reload_map"] == 1 and q["reload_eps"] == 0.0, q
    assert q["sample"] == [[1, 4, 8, 12], True], q
    assert p["text_error"].startswith("NodeInputError: input 'train_text_encoder'") and "SDXL" in p["text_error"], p
    assert p["unchanged_after_text_error"], p
    assert p["sd15_file_error"].startswith("NodeInputError: input 'sine_name'"), p
    assert "SD 1.x" in p["sd15_file_error"] and "SDXL" in p["sd15_file_error"], p


LAYERDIFFUSION = METHOD_HELPERS + textwrap.dedent("""
    from sie_pack.core.layerdiffusion import interpolate_layers, schedule

    def moved(new, old):  # (context, pooled vector): the largest change of each part of a CONDITIONING
        return [float((new[0][0] - old[0][0]).abs().max()),
                float((new[0][1]["pooled_output"] - old[0][1]["pooled_output"]).abs().max())]

    def parts(c):
        return [list(c[0][0].shape), list(c[0][1]["pooled_output"].shape)]

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        t_a, t_b, neg = enc(clip, "a dog jumping"), enc(clip, "in a forest"), enc(clip, "")
        g = torch.Generator().manual_seed(0)
        image, reference = torch.rand(1, 64, 96, 3, generator=g), torch.rand(1, 64, 96, 3, generator=g)
        mask = torch.zeros(1, 64, 96); mask[:, 16:48, 24:72] = 1.0
        ref_mask = torch.zeros(1, 64, 96)
        before = unet_digest(model)

        # stage 1, eq. 2 as written (concat): one prediction with both contexts and e_a's pooled vector (the
        # training here with gradient checkpointing, as auto chooses on a GPU: without it this script peaks at 21 GB)
        recipe = N["SIE_LayerRecipe"].execute(2.0, 1.0, "image", "reference", "concat", "image", "area")[0]
        e_a, curve1, e_b = timed("stage1_concat_2_steps", lambda: N["SIE_OptimizeEmbedding"].execute(
            model, vae, image, t_a, 2, 1e-2, 0, t_b, mask, recipe, gradient_checkpointing="on"))
        out["stage1"] = {"shapes": [parts(e_a), parts(e_b)], "e_a": moved(e_a, t_a), "e_b": moved(e_b, t_b),
                         "curve": list(curve1.shape)}
        free()
        # the separate_reference reading: e_b alone on the reference, so its pooled vector is trained too
        sep_ref = N["SIE_LayerRecipe"].execute(2.0, 1.0, "image", "reference", "separate_reference", "image",
                                               "area")[0]
        e_a2, _, e_b2 = timed("stage1_separate_reference_2_steps", lambda: N["SIE_OptimizeEmbedding"].execute(
            model, vae, image, t_a, 2, 1e-2, 0, t_b, mask, sep_ref, reference, ref_mask, gradient_checkpointing="on"))
        out["stage1_separate"] = {"e_a": moved(e_a2, t_a), "e_b": moved(e_b2, t_b)}
        free()

        # eq. 3: ComfyUI's ConditioningAverage on both parts, equal to the pack's interpolation of the packed tensors
        e_opt = comfy_nodes.ConditioningAverage().addWeighted(e_a, e_b, 0.7)[0]
        out["eq3"] = {
            "context": float((e_opt[0][0] - (0.7 * e_a[0][0] + 0.3 * e_b[0][0])).abs().max()),
            "pooled": float((e_opt[0][1]["pooled_output"] - (0.7 * e_a[0][1]["pooled_output"]
                                                            + 0.3 * e_b[0][1]["pooled_output"])).abs().max()),
            "packed": float((cond_tensor(e_opt, model)[0] - interpolate_layers(
                cond_tensor(e_a, model)[0], cond_tensor(e_b, model)[0], 0.7)).abs().max()),
            "pooled_differs": float((e_opt[0][1]["pooled_output"] - e_a[0][1]["pooled_output"]).abs().max())}

        # stage 2 at e_opt: the object under the mask, the background from the reference
        ft, curve2, trained, _ = timed("stage2_lora_2_steps", lambda: N["SIE_FineTune"].execute(
            model, vae, image, e_opt, "lora", 2, 1e-3, 4, 0, recipe, None, mask, reference, ref_mask,
            gradient_checkpointing="on"))
        out["unchanged"] = unet_digest(model) == before
        out["stage2"] = {"method": trained.info.get("method"), "curve": list(curve2.shape),
                         "eps_vs_sampler": eps_vs_sampler(ft, e_opt)}
        packed = cond_tensor(e_opt, model)[0]
        out["stage2"]["ft_changes_eps"] = float((eps_of(ft, packed) - eps_of(model, packed)).abs().max())

        # eq. 8: a one-step run is CFG at e^_a (even) or at e_opt (odd), exactly ComfyUI's CFGGuider at that
        # CONDITIONING (its pooled output included); three steps follow the schedule
        at = {"even": e_a, "odd": e_opt}
        plains = {k: plain(ft, c, neg, 5.0) for k, c in at.items()}
        out["one_step"] = {}
        for parity in ("even", "odd"):
            gd = N["SIE_IterativeGuidance"].execute(ft, e_a, e_opt, neg, 5.0, parity)[0]
            got = run(gd, 1)
            out["one_step"][parity] = {"trace": gd.trace, "rel": rel(got, plains[parity])}
        swapped = [[e_opt[0][0], {**e_opt[0][1], "pooled_output": e_a[0][1]["pooled_output"]}]]
        out["pooled_effect"] = rel(plain(ft, swapped, neg, 5.0), plains["odd"])  # the sampler reads pooled_output
        gd = N["SIE_IterativeGuidance"].execute(ft, e_a, e_opt, neg, 5.0, "auto")[0]
        s = timed("iterative_3_steps", lambda: run(gd, 3))
        out["three_steps"] = {"trace": gd.trace, "schedule": schedule(3), "shape": list(s.shape),
                              "finite": bool(torch.isfinite(s).all())}
        out["unchanged_at_end"] = unet_digest(model) == before
        out["timing_s"] = timing
    print("RESULT " + json.dumps(out))
""")


def test_layerdiffusion_nodes_on_sdxl(tmp_path):
    r = run_in_comfyui(LAYERDIFFUSION, str(random_sdxl()), timeout=3600, tmp_dir=tmp_path)
    print("LayerDiffusion on SDXL:", r)
    assert r["unchanged"] and r["unchanged_at_end"], r
    s1 = r["stage1"]
    assert s1["shapes"] == [[[1, 77, 2048], [1, 1280]]] * 2 and s1["curve"][0] == 1, s1
    assert min(s1["e_a"]) > 0 and s1["e_b"][0] > 0, s1  # e_a: context and pooled vector; e_b: its context
    assert s1["e_b"][1] == 0.0, s1  # concat keeps e_a's pooled vector (as ConditioningConcat): e_b's is not read
    assert min(r["stage1_separate"]["e_a"] + r["stage1_separate"]["e_b"]) > 0, r  # alone, e_b's pooled is trained
    e = r["eq3"]
    assert e["context"] == 0.0 and e["pooled"] == 0.0 and e["packed"] == 0.0 and e["pooled_differs"] > 0, e
    s2 = r["stage2"]
    assert s2["method"] == "layerdiffusion" and s2["curve"][0] == 1 and s2["ft_changes_eps"] > 0, s2
    assert s2["eps_vs_sampler"] == 0.0, s2  # stage 2 trains at e_opt as ComfyUI samples it (y included)
    one = r["one_step"]
    assert one["even"]["trace"] == [0] and one["odd"]["trace"] == [1], one  # 0: e^_a, 1: e_opt
    assert one["even"]["rel"] < 1e-6 and one["odd"]["rel"] < 1e-6, one
    assert r["pooled_effect"] > 1e-3, r
    t = r["three_steps"]
    assert t["trace"] == t["schedule"] == [1, 0, 1] and t["shape"] == [1, 4, 8, 12] and t["finite"], t


RECTIFIER_SDXL = METHOD_HELPERS + textwrap.dedent("""
    import copy
    from sie_pack.nodes.rectifier import TrainedRectifier, unet_parameters
    from sie_pack.core.rectifier import RectifierInfo, modulation_functions, new_rectifier, rectified
    from sie_pack.core.seam import Features, ViewSpec

    def sample(m, seed=1, steps=2, cfg=1.0, latent=None, noise=None):
        latent = torch.zeros(*LATENT) if latent is None else latent
        noise = comfy.sample.prepare_noise(latent, seed) if noise is None else noise
        return comfy.sample.sample(m, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed,
                                   disable_pbar=True)

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        pos, neg = enc(clip, ""), enc(clip, "a blurry photo")
        g = torch.Generator().manual_seed(0)
        images = torch.rand(2, 64, 96, 3, generator=g)
        before = unet_digest(model)
        plain_sample = timed("plain_2_steps", lambda: sample(model))

        # Delta = 0: Apply Rectifier samples bit for bit like the plain MODEL; strength 0 too
        with torch.inference_mode(False):
            fresh = TrainedRectifier(new_rectifier(unet_parameters(model), channels=4, estimate_clip=4.0),
                                     RectifierInfo("ldm"))
        out["layers"] = len(fresh.net.layer_names)
        out["rectifier_params"] = sum(p.numel() for p in fresh.net.parameters())
        m0 = N["SIE_ApplyRectifier"].execute(model, fresh, images[:1], 1.0, vae)[0]
        out["fresh_equal"] = torch.equal(timed("rectified_2_steps", lambda: sample(m0)), plain_sample)
        ms = N["SIE_ApplyRectifier"].execute(model, fresh, images[:1], 0.0, vae)[0]
        out["strength0_equal"] = torch.equal(sample(ms), plain_sample)
        out["eps_vs_sampler"] = eps_vs_sampler(model, pos)  # the unmodulated pass training sees is the sampler's

        with torch.inference_mode(False), torch.no_grad():
            sd = ComfySD(model, None, vae)
            x0 = sd.encode(images.movedim(-1, 1))  # [2, 4, 8, 12]
            x_t = torch.randn(2, 4, 8, 12, generator=g)
            t = torch.tensor([700, 200])
            c = cond_tensor(pos, model)[0].expand(2, -1, -1)  # [2, 78, 2048]: context and pooled vector
            e_plain = sd.eps(x_t, t, c)
            with sd.views(ViewSpec(modulates=fresh.net.layer_names)) as (base, mod):
                fns = modulation_functions(fresh.net(x0, torch.randn(2, 4, 8, 12, generator=g), t))
                out["views_delta0_equal"] = [torch.equal(mod.eps(x_t, t, c, Features(modulation=fns)), e_plain),
                                             torch.equal(base.eps(x_t, t, c), e_plain)]

            # per-sample modulation in a batch == a per-sample loop (a perturbed A head: Delta != 0)
            bumped = copy.deepcopy(fresh.net)
            gen = torch.Generator().manual_seed(5)
            for br in bumped.branches:
                br.head_a.weight.copy_(torch.randn(br.head_a.weight.shape, generator=gen) * 0.05)
                br.head_a.bias.copy_(torch.randn(br.head_a.bias.shape, generator=gen) * 0.05)
            with rectified(sd, bumped, x0) as r:
                batch_eps = r.eps(x_t, t, c)
            loop = []
            for j in range(2):
                with rectified(sd, bumped, x0[j:j + 1]) as r:
                    loop.append(r.eps(x_t[j:j + 1], t[j:j + 1], c[j:j + 1]))
            loop = torch.cat(loop)
            out["per_sample"] = {"rel": rel(batch_eps, loop), "effect": rel(batch_eps, e_plain),
                                 "samples_differ": rel(batch_eps[0] - e_plain[0], batch_eps[1] - e_plain[1])}
        free()

        # through Apply Rectifier and a sampler with CFG: one reference per latent of a batch of 2
        bumped_r = TrainedRectifier(bumped, RectifierInfo("ldm"))
        mb = N["SIE_ApplyRectifier"].execute(model, bumped_r, images, 1.0, vae)[0]
        noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 8, 12), 3)
        both = timed("rectified_batch2_cfg3_2_steps", lambda: sample(mb, cfg=3.0, latent=torch.zeros(2, 4, 8, 12),
                                                                     noise=noise))
        each = [sample(N["SIE_ApplyRectifier"].execute(model, bumped_r, images[j:j + 1], 1.0, vae)[0], cfg=3.0,
                       noise=noise[j:j + 1]) for j in range(2)]
        out["apply_batch"] = {"rel": rel(both, torch.cat(each)),
                              "effect": rel(both[:1], sample(model, cfg=3.0, noise=noise[:1]))}
        del mb, m0, ms
        free()

        # Train Rectifier (recon), 2 steps of batch 1 at the empty prompt, then Apply; and 1 step with no
        # conditioning (a zero context and a zero pooled vector, packed)
        rect, loss = timed("train_recon_2_steps", lambda: N["SIE_TrainRectifier"].execute(
            model, vae, images, "recon", 2, 1e-3, 0, None, "face", "", None, pos, 1))
        h = rect.info.history[-1]
        out["train"] = {"loss_shape": list(loss.shape), "steps": rect.info.steps, "text_context": h["text_context"],
                        "final_loss": h["final_loss"], "size": h["size"],
                        "moved": float(sum(float(b.head_a.weight.abs().sum()) for b in rect.net.branches))}
        out["unchanged_after_train"] = unet_digest(model) == before
        m1 = N["SIE_ApplyRectifier"].execute(model, rect, images[:1], 1.0, vae)[0]
        s1 = sample(m1)
        out["trained"] = {"finite": bool(torch.isfinite(s1).all()), "effect": rel(s1, plain_sample),
                          "calls": m1.model_options["model_function_wrapper"].rule.calls}
        del m1
        free()
        rect0, _ = timed("train_recon_1_step_no_conditioning", lambda: N["SIE_TrainRectifier"].execute(
            model, vae, images, "recon", 1, 1e-3, 0, batch=1))
        out["zero_context"] = [rect0.info.history[-1]["text_context"], rect0.info.history[-1]["final_loss"]]
        out["unchanged_at_end"] = unet_digest(model) == before
        out["plain_again"] = torch.equal(sample(model), plain_sample)
        out["timing_s"] = timing
    print("RESULT " + json.dumps(out))
""")


def test_rectifier_nodes_on_sdxl(tmp_path):
    r = run_in_comfyui(RECTIFIER_SDXL, str(random_sdxl()), timeout=3600, tmp_dir=tmp_path)
    print("rectifier on SDXL:", r)
    assert r["layers"] == 33, r  # SDXL: middle 4; output blocks 18 ResNet convs, 9 skips, 2 up-sampler convs
    assert r["fresh_equal"] and r["strength0_equal"], r  # Delta = 0 through Apply Rectifier: bit for bit
    assert r["views_delta0_equal"] == [True, True], r  # and through the views, packed conditioning
    assert r["eps_vs_sampler"] == 0.0, r
    p = r["per_sample"]
    assert p["effect"] > 1e-3 and p["samples_differ"] > 1e-3 and p["rel"] < 1e-5, p
    a = r["apply_batch"]
    assert a["effect"] > 1e-3 and a["rel"] < 1e-5, a  # cond and uncond chunks each get their own reference
    t = r["train"]
    assert t["steps"] == 2 and t["text_context"] == "conditioning input" and t["size"] == [96, 64], t
    assert t["moved"] > 0 and math.isfinite(t["final_loss"]), t
    assert r["trained"]["finite"] and r["trained"]["effect"] > 0, r
    assert r["trained"]["calls"] == {"base": 2, "modulated": 2}, r  # cfg 1, 2 euler steps: one chunk per call
    assert r["zero_context"][0] == "zero text context" and math.isfinite(r["zero_context"][1]), r
    assert r["unchanged_after_train"] and r["unchanged_at_end"] and r["plain_again"], r
