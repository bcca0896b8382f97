"""The High-Fidelity rectifier nodes on a real ComfyUI MODEL (random-weight SD 1.5), run as ComfyUI's executor
runs them (inside ``torch.inference_mode()``, the weights inference tensors):

* a fresh rectifier (Delta = 0) through Apply Rectifier samples bit for bit like the plain MODEL, and so does
  strength 0; through the ComfySD views a Delta = 0 modulation gives eps bit for bit equal to the plain one;
* per-sample modulation in a batch (two reference latents, a perturbed A head) equals a per-sample loop, in
  ComfySD and through Apply Rectifier + a ComfyUI sampler with CFG (cond and uncond chunks of one call);
* the differentiable VAE decode equals ComfyUI's decode and passes gradients;
* Train (recon) and Apply + sampling leave the input MODEL as it was (UNet hash, patches, model options, its
  samples);
* Save -> Load gives the same rectifier and bit-identical samples; a truncated file, a LoRA, the SD checkpoint
  and a SINE file are refused naming the input;
* edit training (random OpenCLIP ViT-B-32) runs from the recon rectifier with a finite loss;
* a rectifier for another layer list, a pixel-space rectifier and a second Apply on the same MODEL are refused
  naming the input.

Runs in ComfyUI's Python; skipped without COMFYUI_DIR.  The script also prints timings (CPU).
"""

from __future__ import annotations

import json
import textwrap

import pytest
from test_workflows_execute import random_open_clip

from comfy_server import run_in_comfyui, skip_reason
from test_bridge import random_sd15

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

SCRIPT = textwrap.dedent("""
    import copy, math, os, tempfile, time
    from pathlib import Path
    import comfy.sd, comfy.sample, comfy.model_management as mm
    from safetensors.torch import save_file
    import sie_pack.nodes.comfy_bridge as bridge
    from sie_pack.nodes.comfy_views import ComfySD
    from sie_pack.nodes.common import NodeInputError
    from sie_pack.nodes.rectifier import TrainedRectifier, unet_parameters
    from sie_pack.core.rectifier import (LayerSpec, Rectifier, RectifierConfig, RectifierInfo, modulation_functions,
                                         new_rectifier, rectified)
    from sie_pack.core.seam import Features, ViewSpec
    from sie_pack.core.clip_model import load_open_clip
    N = pack.NODE_CLASS_MAPPINGS
    out, timing = {}, {}
    tmp = tempfile.mkdtemp()
    bridge.save_dir = lambda name: Path(tmp)  # keep the ComfyUI checkout clean
    bridge.model_path = lambda name, file_name: os.path.join(tmp, file_name)

    def unet_digest(model):  # as loaded (ComfyUI patches a loaded clone's weights in place)
        mm.load_models_gpu([model])
        return digest(model.model.diffusion_model)

    def state(model):
        return {"unet": unet_digest(model), "patches": len(model.patches), "object_patches": len(model.object_patches),
                "wrappers": len(getattr(model, "weight_wrapper_patches", {})), "options": repr(model.model_options)}

    def sample(m, seed=1, steps=2, sampler="ddpm", cfg=1.0, latent=None, noise=None, denoise=1.0):
        latent = torch.zeros(1, 4, 8, 8) if latent is None else latent
        noise = comfy.sample.prepare_noise(latent, seed) if noise is None else noise
        return comfy.sample.sample(m, noise, steps, cfg, sampler, "normal", pos, neg, latent, denoise=denoise,
                                   seed=seed, disable_pbar=True)

    def timed(key, fn):
        t0 = time.perf_counter(); r = fn(); timing[key] = round(time.perf_counter() - t0, 2); return r

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        pos, neg = enc(clip, ""), enc(clip, "a blurry photo")
        g = torch.Generator().manual_seed(0)
        images = torch.rand(2, 64, 64, 3, generator=g)
        before = state(model)
        plain = timed("sample_plain_2_steps", lambda: sample(model))

        # (a) Delta = 0: Apply Rectifier samples exactly like the plain MODEL; strength 0 too
        with torch.inference_mode(False):
            fresh = TrainedRectifier(new_rectifier(unet_parameters(model), channels=4, estimate_clip=4.0),
                                     RectifierInfo("ldm"))
        out["layers"] = len(fresh.net.layer_names)
        out["rectifier_params"] = sum(p.numel() for p in fresh.net.parameters())
        m0 = N["SIE_ApplyRectifier"].execute(model, fresh, images[:1], 1.0, vae)[0]
        out["fresh_equal"] = torch.equal(timed("sample_rectified_2_steps", lambda: sample(m0)), plain)
        ms = N["SIE_ApplyRectifier"].execute(model, fresh, images[:1], 0.0, vae)[0]
        out["strength0_equal"] = torch.equal(sample(ms), plain)

        with torch.inference_mode(False), torch.no_grad():
            sd = ComfySD(model, None, vae)
            x0 = sd.encode(images.movedim(-1, 1))                                    # [2, 4, 8, 8]
            x_t = torch.randn(2, 4, 8, 8, generator=g)
            t = torch.tensor([700, 200])
            c = pos[0][0].expand(2, -1, -1)
            e_plain = sd.eps(x_t, t, c)
            names = fresh.net.layer_names
            with sd.views(ViewSpec(modulates=names)) as (base, mod):
                p = torch.randn(2, 4, 8, 8, generator=g)
                fns = modulation_functions(fresh.net(x0, p, t))
                out["views_delta0_equal"] = [torch.equal(mod.eps(x_t, t, c, Features(modulation=fns)), e_plain),
                                             torch.equal(base.eps(x_t, t, c), e_plain)]

            # (b) per-sample modulation in a batch == a per-sample loop
            bumped = copy.deepcopy(fresh.net)
            gen = torch.Generator().manual_seed(5)
            for br in bumped.branches:
                br.head_a.weight.copy_(torch.randn(br.head_a.weight.shape, generator=gen) * 0.05)
                br.head_a.bias.copy_(torch.randn(br.head_a.bias.shape, generator=gen) * 0.05)
            with rectified(sd, bumped, x0) as r:
                batch_eps = timed("rectified_eps_batch2", lambda: r.eps(x_t, t, c))
            loop = []
            for j in range(2):
                with rectified(sd, bumped, x0[j:j + 1]) as r:
                    loop.append(r.eps(x_t[j:j + 1], t[j:j + 1], c[j:j + 1]))
            loop = torch.cat(loop)
            out["per_sample"] = {"rel": rel(batch_eps, loop), "effect": rel(batch_eps, e_plain),
                                 "samples_differ": rel(batch_eps[0] - e_plain[0], batch_eps[1] - e_plain[1])}

            # the differentiable decode: ComfyUI's decode, with gradients
            img = sd.decode(x0)
        with torch.inference_mode(False):
            lat = x0.clone().requires_grad_(True)
            dimg = sd.decode_differentiable(lat)
            dimg.mean().backward()
            out["decode"] = {"max_diff": float((dimg.detach() - img).abs().max()), "shape": list(dimg.shape),
                             "grad": float(lat.grad.abs().sum())}

        # (b') through Apply Rectifier and a sampler with CFG: one reference per latent of a batch of 2
        bumped_r = TrainedRectifier(bumped, RectifierInfo("ldm"))
        mb = N["SIE_ApplyRectifier"].execute(model, bumped_r, images, 1.0, vae)[0]
        noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 8, 8), 3)
        both = sample(mb, steps=2, sampler="euler", cfg=3.0, latent=torch.zeros(2, 4, 8, 8), noise=noise)
        each = [sample(N["SIE_ApplyRectifier"].execute(model, bumped_r, images[j:j + 1], 1.0, vae)[0], steps=2,
                       sampler="euler", cfg=3.0, noise=noise[j:j + 1]) for j in range(2)]
        out["apply_batch"] = {"rel": rel(both, torch.cat(each)),
                              "calls": mb.model_options["model_function_wrapper"].rule.calls,
                              "effect": rel(both[:1], sample(model, steps=2, sampler="euler", cfg=3.0,
                                                             noise=noise[:1]))}
        one_ref = N["SIE_ApplyRectifier"].execute(model, bumped_r, images[:1], 1.0, vae)[0]
        out["broadcast"] = rel(sample(one_ref, steps=2, sampler="euler", latent=torch.zeros(2, 4, 8, 8),
                                      noise=noise)[1:], sample(one_ref, steps=2, sampler="euler", noise=noise[1:]))
        three = N["SIE_ApplyRectifier"].execute(model, bumped_r, torch.cat([images, images[:1]]), 1.0, vae)[0]
        try:
            sample(three, latent=torch.zeros(2, 4, 8, 8))
            out["ref_count_error"] = "no error"
        except NodeInputError as e:
            out["ref_count_error"] = str(e)
        # estimate = modulated: fewer base passes, still runs
        mm_ = N["SIE_ApplyRectifier"].execute(model, bumped_r, images[:1], 1.0, vae, "modulated")[0]
        s_mod = sample(mm_, steps=3, sampler="euler")
        out["modulated_estimate"] = {"calls": mm_.model_options["model_function_wrapper"].rule.calls,
                                     "finite": bool(torch.isfinite(s_mod).all())}
        # SDEdit: denoise < 1 from an encoded image
        start = vae.encode(images[:1])
        msde = N["SIE_ApplyRectifier"].execute(model, bumped_r, images[:1], 1.0, vae)[0]
        s_sde = sample(msde, steps=4, sampler="euler", latent=start, denoise=0.5)
        out["sdedit"] = {"finite": bool(torch.isfinite(s_sde).all()),
                         "calls": msde.model_options["model_function_wrapper"].rule.calls}

        # (c) training and applying leave the input MODEL as it was
        rect, loss = timed("train_recon_2_steps_batch1", lambda: N["SIE_TrainRectifier"].execute(
            model, vae, images, "recon", 2, 1e-3, 0, conditioning=pos, batch=1))
        out["train"] = {"loss_shape": list(loss.shape), "mode": rect.info.mode, "steps": rect.info.steps,
                        "history": len(rect.info.history), "final": rect.info.history[-1]["final_loss"],
                        "moved": float(sum(float(b.head_a.weight.abs().sum()) for b in rect.net.branches))}
        out["unchanged_after_train"] = state(model) == before
        m1 = N["SIE_ApplyRectifier"].execute(model, rect, images[:1], 1.0, vae)[0]
        trained_sample = sample(m1)
        out["trained_effect"] = rel(trained_sample, plain)
        out["unchanged_after_apply"] = state(model) == before
        out["plain_again"] = torch.equal(sample(model), plain)

        # (d) save -> load: the same rectifier, the same samples
        N["SIE_SaveRectifier"].execute(rect, "rect/test")
        files = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*.safetensors"))
        out["files"] = files
        loaded, info = N["SIE_LoadRectifier"].execute(files[0])
        out["info"] = info
        out["reload_state_equal"] = all(torch.equal(a, b) for a, b in zip(rect.net.state_dict().values(),
                                                                          loaded.net.state_dict().values()))
        out["reload_history"] = loaded.info.history == rect.info.history
        out["reload_sample_equal"] = torch.equal(sample(N["SIE_ApplyRectifier"].execute(model, loaded, images[:1], 1.0,
                                                                                      vae)[0]), trained_sample)

        # (e) files that are not rectifiers
        data = (Path(tmp) / files[0]).read_bytes()
        (Path(tmp) / "truncated.safetensors").write_bytes(data[: len(data) // 2])
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 4)},
                  os.path.join(tmp, "lora.safetensors"))
        save_file({"x": torch.zeros(2)}, os.path.join(tmp, "sine.safetensors"), {"format": "sie.sine", "version": "1"})
        os.symlink(sys.argv[2], os.path.join(tmp, "sd15.safetensors"))
        out["load_errors"] = {f: error(lambda f=f: N["SIE_LoadRectifier"].execute(f))
                              for f in ("truncated.safetensors", "lora.safetensors", "sine.safetensors",
                                        "sd15.safetensors", "missing.safetensors")}

        # (f) edit training from the recon rectifier, with a random OpenCLIP
        with torch.inference_mode(False):
            oc = load_open_clip(sys.argv[3], "ViT-B-32")
        edit, eloss = timed("train_edit_2_steps_batch1", lambda: N["SIE_TrainRectifier"].execute(
            model, vae, images, "edit", 2, 1e-3, 0, oc, "coffee", "latte art", rect, pos, 1))
        h = edit.info.history
        out["edit"] = {"loss_shape": list(eloss.shape), "mode": edit.info.mode, "steps": edit.info.steps,
                       "history": [e["mode"] for e in h], "finite": all(math.isfinite(e["final_loss"]) for e in h),
                       "texts": [edit.info.source_text, edit.info.target_text],
                       "recon_untouched": all(torch.equal(a, b) for a, b in zip(rect.net.state_dict().values(),
                                                                                loaded.net.state_dict().values()))}
        out["unchanged_after_edit"] = state(model) == before

        # (g) bad inputs, named
        with torch.inference_mode(False):
            other = TrainedRectifier(Rectifier(RectifierConfig((LayerSpec("output_blocks.3.0.in_layers.2.weight",
                                                                          (640, 1280, 3, 3)),), 4)), RectifierInfo("ldm"))
            pixel = TrainedRectifier(Rectifier(RectifierConfig((LayerSpec("output_blocks.3.0.in_layers.2.weight",
                                                                          (1280, 2560, 3, 3)),), 3)),
                                     RectifierInfo("pixel"))
        errors = {
            "rectifier": error(lambda: N["SIE_ApplyRectifier"].execute(model, other, images[:1], 1.0, vae)),
            "rectifier_pixel": error(lambda: N["SIE_ApplyRectifier"].execute(model, pixel, images[:1], 1.0, vae)),
            "rectifier_train": error(lambda: N["SIE_TrainRectifier"].execute(model, vae, images, "recon", 1, 1e-3, 0,
                                                                           rectifier=other)),
            "model": error(lambda: N["SIE_ApplyRectifier"].execute(m1, rect, images[:1], 1.0, vae)),
            "strength": error(lambda: N["SIE_ApplyRectifier"].execute(model, rect, images[:1], 3.0, vae)),
            "open_clip": error(lambda: N["SIE_TrainRectifier"].execute(model, vae, images, "edit", 1, 1e-3, 0)),
            "target_text": error(lambda: N["SIE_TrainRectifier"].execute(model, vae, images, "edit", 1, 1e-3, 0, oc,
                                                                       "face", "")),
            "images": error(lambda: N["SIE_TrainRectifier"].execute(model, vae, torch.rand(1, 64, 68, 3), "recon", 1,
                                                                  1e-3, 0)),
            "images_small": error(lambda: N["SIE_TrainRectifier"].execute(model, vae, torch.rand(1, 32, 32, 3),
                                                                        "recon", 1, 1e-3, 0)),
        }
        out["errors"] = errors
        out["unchanged_at_end"] = state(model) == before
    out["timing_s"] = timing
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    r = run_in_comfyui(SCRIPT, str(random_sd15()), str(random_open_clip()), timeout=3000,
                       tmp_dir=tmp_path_factory.mktemp("rectifier"))
    print("rectifier results:", json.dumps(r))
    return r


def test_a_fresh_rectifier_and_strength_zero_reproduce_the_plain_model_bit_for_bit(result):
    assert result["layers"] == 43, result  # SD 1.5: middle 4 + output blocks 39 (core.rectifier.layers)
    assert result["fresh_equal"] and result["strength0_equal"], result
    assert result["views_delta0_equal"] == [True, True], result


def test_per_sample_modulation_in_a_batch_equals_a_per_sample_loop(result):
    p = result["per_sample"]
    assert p["effect"] > 1e-3 and p["samples_differ"] > 1e-3, p  # the modulation acts, differently per sample
    assert p["rel"] < 1e-5, p
    a = result["apply_batch"]
    assert a["effect"] > 1e-3, a
    assert a["rel"] < 1e-5, a  # cond and uncond chunks each get their own reference
    assert result["broadcast"] < 1e-5, result  # one reference for a batch of two
    assert "input 'image'" in result["ref_count_error"], result


def test_modulated_estimate_skips_base_passes_and_sdedit_runs(result):
    calls = result["modulated_estimate"]["calls"]
    assert result["modulated_estimate"]["finite"] and calls["base"] == 1 and calls["modulated"] >= 3, calls
    # denoise 0.5 with 4 steps: ComfyUI runs the last 4 of an 8-step schedule, one call each (euler)
    assert result["sdedit"]["finite"] and result["sdedit"]["calls"]["modulated"] == 4, result["sdedit"]


def test_differentiable_decode_matches_comfyui_and_has_gradients(result):
    d = result["decode"]
    assert d["shape"] == [2, 3, 64, 64] and d["max_diff"] < 1e-5 and d["grad"] > 0, d


def test_training_and_applying_leave_the_input_model_untouched(result):
    for key in ("unchanged_after_train", "unchanged_after_apply", "unchanged_after_edit", "unchanged_at_end"):
        assert result[key], key
    assert result["plain_again"], result
    t = result["train"]
    assert t["loss_shape"] == [1, 320, 640, 3] and t["mode"] == "recon" and t["steps"] == 2 and t["history"] == 1, t
    assert t["moved"] > 0 and result["trained_effect"] > 0, result


def test_save_and_load_give_the_same_samples_and_foreign_files_are_refused(result):
    assert len(result["files"]) == 1 and result["files"][0].startswith("rect/test_"), result
    assert result["reload_state_equal"] and result["reload_history"] and result["reload_sample_equal"], result
    assert result["info"].startswith("recon rectifier, 2 steps, 43 modulated layers"), result["info"]
    errors = result["load_errors"]
    for f, text in errors.items():
        assert text.startswith("input 'rectifier_name'") and f in text, (f, text)
    assert "SINE" in errors["sine.safetensors"] and "LoRA" in errors["lora.safetensors"], errors
    assert "Stable Diffusion" in errors["sd15.safetensors"] or "SD" in errors["sd15.safetensors"], errors


def test_edit_training_continues_from_the_reconstruction_rectifier(result):
    e = result["edit"]
    assert e["finite"] and e["mode"] == "edit" and e["steps"] == 4 and e["history"] == ["recon", "edit"], e
    assert e["texts"] == ["coffee", "latte art"] and e["recon_untouched"], e
    assert e["loss_shape"] == [1, 960, 640, 3], e  # total, CLIP and L1 curves


def test_bad_rectifier_inputs_are_named(result):
    inputs = {"rectifier_pixel": "rectifier", "rectifier_train": "rectifier", "images_small": "images"}
    for key, text in result["errors"].items():
        assert text.startswith(f"input '{inputs.get(key, key)}'"), (key, text)
    assert "pixel-space" in result["errors"]["rectifier_pixel"], result["errors"]
    assert "multiples of 8" in result["errors"]["images"] and "at least 64" in result["errors"]["images_small"]


# --------------------------------------------------------------------------------------
# The paper's path through the nodes: DDIM Inversion, then SamplerCustom (add_noise off, euler, the inversion's
# sigmas) with the rectified MODEL, as the workflows wire it; a small rectifier (ResNet blocks 1-1-1-1, width 8)
# with a perturbed A head (Delta != 0).  That this path lowers the reconstruction error of a held-out image with a
# trained rectifier is shown on the CLI (tests/test_rectifier_quality.py): a trained rectifier on a random-weight
# SD 1.5 would mean little and costs an hour of CPU here.
PATH_SCRIPT = textwrap.dedent("""
    import copy, time
    from pathlib import Path
    import numpy as np
    from PIL import Image
    import comfy.sd, comfy.sample, comfy.samplers
    from sie_pack.nodes.comfy_views import ComfySD
    from sie_pack.nodes.rectifier import TrainedRectifier, unet_parameters
    from sie_pack.core.rectifier import (RectifierInfo, new_rectifier, rectified, invert_and_sample, ddim_invert,
                                         ddim_sample)
    N = pack.NODE_CLASS_MAPPINGS
    STEPS = int(sys.argv[3])
    out, timing = {}, {}
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    def sample_back(m, inv):
        lat, sigmas = inv
        return comfy.sample.sample_custom(m, torch.zeros_like(lat["samples"]), 1.0,
                                          comfy.samplers.sampler_object("euler"), sigmas, pos, pos, lat["samples"],
                                          disable_pbar=True, seed=0)

    photo = torch.from_numpy(np.asarray(Image.open(Path(sys.argv[1]) / "core/sinddm/data/coffee_250x200.png")
                                        .convert("RGB")).copy()).float() / 255  # [200, 250, 3]
    held = torch.nn.functional.interpolate(photo[40:160, 130:250].permute(2, 0, 1)[None], size=(64, 64),
                                           mode="area").permute(0, 2, 3, 1)  # [1, 64, 64, 3]
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        with torch.inference_mode(False), torch.no_grad():
            small = new_rectifier(unet_parameters(model), channels=4, estimate_clip=4.0, encoder_layers=(1, 1, 1, 1),
                                  width=8)
            bumped = copy.deepcopy(small)
            g = torch.Generator().manual_seed(5)
            for br in bumped.branches:
                br.head_a.weight.copy_(torch.randn(br.head_a.weight.shape, generator=g) * 0.05)
                br.head_a.bias.copy_(torch.randn(br.head_a.bias.shape, generator=g) * 0.05)
        bumped_r = TrainedRectifier(bumped, RectifierInfo("ldm"))
        encoded = {"samples": vae.encode(held)}
        log("loaded")

        # (1) the node path computes core's invert_and_sample (the CLI's maths) on the same MODEL
        m_rect = N["SIE_ApplyRectifier"].execute(model, bumped_r, held, 1.0, vae)[0]
        t0 = time.perf_counter()
        inv_rect = N["SIE_DDIMInversion"].execute(m_rect, pos, encoded, STEPS)
        timing["inversion_node_rectified"] = round(time.perf_counter() - t0, 1)
        node_rect = model.model.process_latent_in(sample_back(m_rect, inv_rect))
        calls = dict(m_rect.model_options["model_function_wrapper"].rule.calls)
        inv_plain = N["SIE_DDIMInversion"].execute(model, pos, encoded, STEPS)
        node_plain = model.model.process_latent_in(sample_back(model, inv_plain))
        log("node path done")
        with torch.inference_mode(False), torch.no_grad():
            sd = ComfySD(model, None, vae)
            x0 = sd.encode(held.movedim(-1, 1))
            c = pos[0][0]
            ab = sd.alphas_cumprod
            plain_eps = lambda x, t: sd.eps(x, t, c)
            with rectified(sd, bumped, x0, cond=c) as r:
                x_T, core_rect = invert_and_sample(r, r, x0, ab, STEPS)
            core_plain = ddim_sample(plain_eps, ddim_invert(plain_eps, x0, ab, STEPS), ab, STEPS)
        log("core path done")
        out["node_path"] = {
            "x_T_rel": rel(model.model.process_latent_in(inv_rect[0]["samples"]) * float(ab[999]) ** 0.5, x_T),
            "sigmas": [len(inv_rect[1]), float(inv_rect[1][-1]), bool((inv_rect[1][:-1] > inv_rect[1][1:]).all())],
            "rect_rel": rel(node_rect, core_rect), "plain_rel": rel(node_plain, core_plain),
            "rect_vs_plain": rel(core_rect, core_plain), "calls": calls}
        log(json.dumps(out["node_path"]))

    out["timing_s"] = timing
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def paper_path(tmp_path_factory):
    r = run_in_comfyui(PATH_SCRIPT, str(random_sd15()), "2", timeout=3000,
                       tmp_dir=tmp_path_factory.mktemp("rectifier_path"))
    print("rectifier path results:", json.dumps(r))
    return r


def test_node_inversion_and_sampling_back_compute_the_clis_path(paper_path):
    """DDIM Inversion (through ComfyUI's sampling: the rectified MODEL's rule runs during the inversion too) and
    SamplerCustom with euler over its sigmas compute core.rectifier.invert_and_sample (the CLI's default path) on
    the same MODEL: rectified both ways, and plain both ways."""
    p = paper_path["node_path"]
    assert p["sigmas"] == [3, 0.0, True], p  # 2 steps high to low, then 0
    assert p["x_T_rel"] < 1e-3 and p["rect_rel"] < 1e-3 and p["plain_rel"] < 1e-3, p
    assert p["rect_vs_plain"] > 1e-2, p  # the rectifier acts
    assert p["calls"] == {"base": 4, "modulated": 4}, p  # 2 inversion + 2 sampling calls, cfg 1: one chunk each
