"""SINE fine-tuning through the shared fine-tune node on a real ComfyUI MODEL and CLIP (random-weight SD 1.5):
inputs untouched, the text encoder trained when the recipe asks (in full: every text-model parameter, the token
and position embeddings included, and the trained CLIP gives the c^ training ended with), save -> load gives the
same guided sample and the c^ training used (also when the recipe's prompt names another text), the positional
map follows the file, eq. 3 with a full (diff) fine-tune, and bad inputs named.

Runs in ComfyUI's Python; skipped without COMFYUI_DIR.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from comfy_server import run_in_comfyui, skip_reason
from test_bridge import random_sd15

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

SETUP = """
    import gc, os, tempfile
    from pathlib import Path
    import comfy.sd, comfy.samplers, comfy.sample, comfy.model_management as mm
    import sie_pack.nodes.comfy_bridge as bridge
    from sie_pack.nodes.sine import positional_patches
    N = pack.NODE_CLASS_MAPPINGS
    out = {}
    tmp = tempfile.mkdtemp()
    bridge.save_dir = lambda name: Path(tmp)  # keep the ComfyUI checkout clean
    bridge.model_path = lambda name, file_name: os.path.join(tmp, file_name)

    def state(model, clip):  # as the inputs themselves compute (ComfyUI patches a loaded clone's weights in place)
        mm.load_models_gpu([model, clip.patcher])
        return (digest(model.model.diffusion_model), digest(clip.cond_stage_model), len(model.patches),
                len(clip.patcher.patches), sorted(model.model_options.get("transformer_options", {}).get("patches", {})))

    def run(guider, steps, seed=3, sampler="euler", scheduler="normal"):
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"),
                                                 scheduler, steps)
        return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=seed)

    def plain(m, pos, neg, w, steps=1):
        g = comfy.samplers.CFGGuider(m); g.set_conds(pos, neg); g.set_cfg(w)
        return run(g, steps)

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        pos, neg = enc(clip, "a photo of a dog in the snow"), enc(clip, "")
        ft_c = enc(clip, "a photo of a sks dog")
        image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        before = state(model, clip)

        def free():  # each section's trained objects go before the next (a full SD 1.5 fine-tune is several GB)
            gc.collect(); mm.unload_all_models(); mm.soft_empty_cache(); gc.collect()
"""

# two processes, so that one run never holds every section's fine-tune at once (one process: 24 GB RSS)
TRAIN = textwrap.dedent(SETUP + """        # LoRA + text encoder, whole image
        recipe = N["SIE_SineRecipe"].execute("a photo of a sks dog", False, True, 0.0, 0.0, 0.0)[0]
        ft, curve, trained, ft_clip = N["SIE_FineTune"].execute(model, vae, image, ft_c, "lora", 2, 1e-3, 4, 0,
                                                              recipe, clip)
        out["inputs_unchanged"] = state(model, clip) == before
        out["text_keys"] = len(trained.result.text_delta)
        out["clip_changed"] = rel(enc(ft_clip, "a photo of a sks dog")[0][0], ft_c[0][0])
        out["curve"] = list(curve.shape)
        ft_c2 = enc(ft_clip, "a photo of a sks dog")
        g = N["SIE_ModelGuidance"].execute(model, ft, pos, ft_c2, neg, 5.0, 0.7, 400)[0]
        trained_sample = run(g, 4)
        N["SIE_SaveSine"].execute(trained, "sine/test")
        files = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*.safetensors"))
        out["files"] = files
        m2, c2, cond2, prompt2 = N["SIE_LoadSine"].execute(model, clip, files[0], 1.0)
        out["prompt"] = prompt2
        out["reload_cond"] = rel(cond2[0][0], ft_c2[0][0])
        g2 = N["SIE_ModelGuidance"].execute(model, m2, pos, cond2, neg, 5.0, 0.7, 400)[0]
        out["reload_sample"] = rel(run(g2, 4), trained_sample)
        out["reload_no_map"] = not positional_patches(m2)
        out["inputs_unchanged_after_load"] = state(model, clip) == before

        del g, g2, m2, c2, trained_sample, ft, ft_clip, trained
        free()

        # the text encoder in full (the official code), at a visible rate: every text-model parameter moves, the
        # rare token's row and the position table included, and the output CLIP encodes the prompt as training
        # ended (ComfyUI reads the position table directly: the trained one must reach it both ways)
        # (ComfyUI keeps a CPU text encoder's weights in fp16: the output CLIP rounds w + delta to fp16, 3e-4
        # relative on this prompt; a float32 CLIP makes the check exact)
        clip32 = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=False, output_clip=True,
                                                       output_model=False,
                                                       te_model_options={"dtype": torch.float32})[1]
        clip_state = lambda c: (mm.load_models_gpu([c.patcher]), digest(c.cond_stage_model))[1]
        before32 = clip_state(clip32)
        frecipe = N["SIE_SineRecipe"].execute("a photo of a sks dog", False, True, 0.0, 0.0, 1e-3, "full")[0]
        _, _, ftrained, fclip = N["SIE_FineTune"].execute(model, vae, image, ft_c, "lora", 2, 1e-3, 4, 0, frecipe,
                                                        clip32)
        fdeltas = ftrained.result.text_deltas
        n_text = sum(1 for k, _ in clip32.cond_stage_model.named_parameters()
                     if k.startswith("clip_l.transformer.text_model."))
        out["full_text"] = {"keys": len(fdeltas), "text_params": n_text,
                            "token": float(fdeltas["text_model.embeddings.token_embedding.weight"].abs().max()),
                            "position": float(fdeltas["text_model.embeddings.position_embedding.weight"].abs().max()),
                            "c_hat_vs_clip": rel(enc(fclip, "a photo of a sks dog")[0][0], ftrained.result.c_hat),
                            "c_hat_moved": rel(ftrained.result.c_hat, ft_c[0][0])}
        N["SIE_SaveSine"].execute(ftrained, "sine/fulltext")
        ffile = [f for f in sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*.safetensors"))
                 if "fulltext" in f][0]
        _, fc2, fcond2, _ = N["SIE_LoadSine"].execute(model, clip32, ffile, 1.0)
        out["full_text"]["reload_cond"] = rel(fcond2[0][0], ftrained.result.c_hat)
        out["full_text"]["reload_clip"] = rel(enc(fc2, "a photo of a sks dog")[0][0], ftrained.result.c_hat)
        out["inputs_unchanged_after_full_text"] = (state(model, clip) == before
                                                   and clip_state(clip32) == before32)

        del ftrained, fclip, fdeltas, fc2, clip32
        free()

        # the recipe's prompt names one text, the conditioning another: Load SINE gives back the conditioning
        # training used, not the recipe's text re-encoded
        other = enc(clip, "a painting of a sks teapot")
        mrecipe = N["SIE_SineRecipe"].execute("a painting of a sks teapot", False, False, 0.0, 0.0, 0.0)[0]
        _, _, mtrained, _ = N["SIE_FineTune"].execute(model, vae, image, ft_c, "lora", 1, 1e-3, 4, 0, mrecipe, clip)
        N["SIE_SaveSine"].execute(mtrained, "sine/mismatch")
        mfile = [f for f in sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*.safetensors"))
                 if "mismatch" in f][0]
        _, _, mcond, mprompt = N["SIE_LoadSine"].execute(model, clip, mfile, 1.0)
        out["mismatch"] = {"prompt": mprompt, "vs_trained": rel(mcond[0][0], ft_c[0][0]),
                           "vs_recipe_text": rel(mcond[0][0], other[0][0])}

    print("RESULT " + json.dumps(out))
""")

GUIDE = textwrap.dedent(SETUP + """        # a LoRA fine-tune (one step) for the sweep and the bad-input checks
        recipe = N["SIE_SineRecipe"].execute("a photo of a sks dog", False, False, 0.0, 0.0, 0.0)[0]
        ft, _, trained, _ = N["SIE_FineTune"].execute(model, vae, image, ft_c, "lora", 1, 1e-3, 4, 0, recipe, clip)
        ft_c2 = ft_c

        # LoRA on patches (one step on a 512 crop): the output MODEL and the reloaded one carry F(v)
        precipe = N["SIE_SineRecipe"].execute("a photo of a sks dog", True, False, 1.0, 0.0, 0.0)[0]
        pft, _, ptrained, pclip = N["SIE_FineTune"].execute(model, vae, image, ft_c, "lora", 1, 1e-3, 4, 0,
                                                          precipe, clip)
        out["patch_terms"] = sorted(ptrained.result.terms)
        out["patch_map"] = len(positional_patches(pft))
        out["patch_clip_is_input"] = pclip is clip
        N["SIE_SaveSine"].execute(ptrained, "sine/patch")
        pfile = [f for f in sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*.safetensors"))
                 if "patch" in f][0]
        pm2 = N["SIE_LoadSine"].execute(model, clip, pfile, 1.0)[0]
        out["patch_reload_map"] = len(positional_patches(pm2))
        gp = N["SIE_ModelGuidance"].execute(model, pft, pos, ft_c, neg, 5.0, 0.7, 0)[0]
        gp2 = N["SIE_ModelGuidance"].execute(model, pm2, pos, ft_c, neg, 5.0, 0.7, 0)[0]
        out["patch_reload_sample"] = rel(run(gp2, 2), run(gp, 2))
        out["inputs_unchanged_after_patches"] = state(model, clip) == before

        del pft, ptrained, pm2, gp, gp2
        free()

        # eq. 3 with a full fine-tune (diff patches on every attention projection): the mix of separate runs
        diffs = {}
        gen = torch.Generator().manual_seed(9)
        for k, v in model.model.diffusion_model.named_parameters():
            if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight", "attn1.to_q.weight")):
                diffs["diffusion_model." + k[:-len(".weight")] + ".diff"] = torch.randn(v.shape, generator=gen) * 0.05
        full = bridge.apply_delta(model, diffs)
        gf = N["SIE_ModelGuidance"].execute(model, full, pos, ft_c, neg, 1.0, 0.7, 0)[0]
        out["full_mix"] = rel(run(gf, 1), 0.7 * plain(model, pos, neg, 1.0) + 0.3 * plain(full, ft_c, neg, 1.0))
        out["full_effect"] = rel(plain(full, ft_c, neg, 1.0), plain(model, ft_c, neg, 1.0))

        del full, gf, diffs
        free()

        # the sweep: one latent per (K, v), the same noise; K = 999 is plain CFG whatever v
        sweep, labels = N["SIE_GuidanceSweep"].execute(model, ft, pos, ft_c2, neg, {"samples": torch.zeros(1, 4, 8, 8)},
                                                     "999, 0", "0.3, 0.9", 3, 3, 5.0, "euler", "normal")
        s = sweep["samples"]
        out["sweep_shape"] = list(s.shape)
        out["sweep_labels"] = labels.splitlines()
        cfg_only = plain(model, pos, neg, 5.0, 3)
        out["sweep_K999"] = [rel(s[0:1], cfg_only), rel(s[1:2], cfg_only)]
        out["sweep_v_differs"] = rel(s[2:3], s[3:4])

        # bad input, named
        errors = {
            "v": error(lambda: N["SIE_ModelGuidance"].execute(model, ft, pos, ft_c, neg, 5.0, 1.5, 400)),
            "K": error(lambda: N["SIE_ModelGuidance"].execute(model, ft, pos, ft_c, neg, 5.0, 0.7, 1000)),
            "finetuned_model": error(lambda: N["SIE_ModelGuidance"].execute(
                model, comfy.sd.load_checkpoint_guess_config(sys.argv[2])[0], pos, ft_c, neg, 5.0, 0.7, 400)),
            "clip": error(lambda: N["SIE_FineTune"].execute(model, vae, image, ft_c, "lora", 1, 1e-3, 4, 0,
                N["SIE_SineRecipe"].execute("a photo of a sks dog", False, True, 0.0, 0.0, 0.0)[0], None)),
            "recipe": error(lambda: N["SIE_FineTune"].execute(model, vae, image, ft_c, "lora", 1, 1e-3, 4, 0, "x", clip)),
            "trained": error(lambda: N["SIE_SaveTrained"].execute(trained, "x")),
            "K_values": error(lambda: N["SIE_GuidanceSweep"].execute(model, ft, pos, ft_c, neg,
                {"samples": torch.zeros(1, 4, 8, 8)}, "400, 1200", "0.7", 0, 1, 5.0, "euler", "normal")),
        }
        out["errors"] = errors
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    r = run_in_comfyui(TRAIN, str(random_sd15()), timeout=1800, tmp_dir=tmp_path_factory.mktemp("sine_train"))
    r.update(run_in_comfyui(GUIDE, str(random_sd15()), timeout=1800, tmp_dir=tmp_path_factory.mktemp("sine_guide")))
    print("SINE training results:", json.dumps(r))
    return r


def test_finetune_node_trains_sine_without_touching_its_inputs(result):
    assert result["inputs_unchanged"] and result["inputs_unchanged_after_load"], result
    assert result["inputs_unchanged_after_patches"], result
    assert result["text_keys"] > 0 and result["clip_changed"] > 1e-6, result  # the text encoder was trained
    assert result["curve"][0] == 1
    assert result["patch_clip_is_input"] and result["patch_terms"] == ["eps_mse", "pooled_x0"], result


def test_saved_sine_model_reloads_to_the_same_guided_sample(result):
    assert result["prompt"] == "a photo of a sks dog" and len(result["files"]) == 1, result
    assert result["reload_cond"] < 1e-5 and result["reload_sample"] < 1e-5, result
    assert result["reload_no_map"], result


def test_text_encoder_in_full_trains_every_parameter_and_gives_the_trained_c_hat(result):
    r = result["full_text"]
    assert r["keys"] == r["text_params"], r  # every parameter of the text model
    assert r["token"] > 1e-4 and r["position"] > 1e-4, r  # the embeddings moved (lr 1e-3)
    assert r["c_hat_moved"] > 1e-4, r
    assert r["c_hat_vs_clip"] < 1e-5 and r["reload_cond"] < 1e-5 and r["reload_clip"] < 1e-5, r
    assert result["inputs_unchanged_after_full_text"], result


def test_load_sine_gives_back_the_conditioning_training_used(result):
    r = result["mismatch"]
    assert r["prompt"] == "a painting of a sks teapot", r
    assert r["vs_trained"] < 1e-6 and r["vs_recipe_text"] > 1e-2, r


def test_positional_map_follows_the_model_through_save_and_load(result):
    assert result["patch_map"] == 1 and result["patch_reload_map"] == 1, result
    assert result["patch_reload_sample"] < 1e-5, result


def test_model_guidance_with_a_full_fine_tune_is_the_mix_of_separate_runs(result):
    assert result["full_effect"] > 1e-3, result
    assert result["full_mix"] < 1e-5, result


def test_guidance_sweep_uses_one_noise_for_a_K_by_v_grid(result):
    assert result["sweep_shape"] == [4, 4, 8, 8], result
    assert result["sweep_labels"][0].endswith("K=999 v=0.3") and result["sweep_labels"][3].endswith("K=0 v=0.9")
    assert max(result["sweep_K999"]) < 1e-5, result  # never guided: plain CFG for any v
    assert result["sweep_v_differs"] > 1e-4, result


def test_bad_sine_inputs_are_named(result):
    for name, text in result["errors"].items():
        assert text.startswith(f"{name}:") or f"'{name}'" in text or name in text.split(":")[0], (name, text)
