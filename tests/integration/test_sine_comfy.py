"""SINE's nodes on a real ComfyUI MODEL (random-weight SD 1.5): model-based guidance (eq. 3) equals the same
mix of separate runs, F(v) reaches only the fine-tuned branch, the fine-tuned pass runs only for t > K, one load.

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

SCRIPT = textwrap.dedent("""
    import comfy.sd, comfy.samplers, comfy.sample, comfy.model_management as mm
    from sie_pack.nodes.comfy_bridge import apply_delta
    from sie_pack.core.lora import LoRAConfig, make_loras, lora_state_dict
    N = pack.NODE_CLASS_MAPPINGS
    out = {}
    loads = []
    _real = mm.load_models_gpu
    mm.load_models_gpu = lambda models, *a, **k: (loads.append(len(models)), _real(models, *a, **k))[1]

    def run(guider, steps, seed=1, scheduler="normal"):
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"),
                                                 scheduler, steps)
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=seed)

    def plain(m, pos, neg, w, steps=1):
        g = comfy.samplers.CFGGuider(m); g.set_conds(pos, neg); g.set_cfg(w)
        return run(g, steps)

    def lora_of(model, seed):
        shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.named_parameters()}
        with torch.inference_mode(False):
            loras = make_loras(shapes, LoRAConfig(rank=4, alpha=4, targets="attention"), seed=seed)
            g = torch.Generator().manual_seed(seed + 1)
            for l in loras.values():
                l.up.data.normal_(std=0.2, generator=g)
            return apply_delta(model, lora_state_dict(loras))

    rel = lambda p, q: float((p - q).abs().max() / q.abs().max())
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a dog in the snow"))
        ft_c = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a sks dog"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        ft = N["SIE_PositionalMap"]().run(lora_of(model, 0), "bilinear")[0]
        ft2 = lora_of(model, 5)
        _real([clip.patcher])

        # one euler step at cfg 1: the output is the mixed x0 itself
        loads.clear()
        guider = N["SIE_ModelGuidance"]().run(model, ft, pos, ft_c, neg, 1.0, 0.7, 0)[0]
        got = run(guider, 1)
        out["loads"] = len(loads)
        out["clip_loaded"] = any(l.model is clip.patcher for l in mm.current_loaded_models)
        base, tuned = plain(model, pos, neg, 1.0), plain(ft, ft_c, neg, 1.0)
        tuned_no_map = plain(lora_of(model, 0), ft_c, neg, 1.0)
        out["single"] = rel(got, 0.7 * base + 0.3 * tuned)
        out["map_effect"] = rel(tuned, tuned_no_map)
        out["ft_effect"] = rel(tuned, base)

        # multi-model: b_2 = 0.2 out of 1 - v
        g2 = N["SIE_ModelGuidance"]().run(model, ft, pos, ft_c, neg, 1.0, 0.5, 0, ft2, ft_c, 0.2)[0]
        out["multi"] = rel(run(g2, 1), 0.5 * base + 0.3 * tuned + 0.2 * plain(ft2, ft_c, neg, 1.0))

        # K = 999 is plain CFG on the pretrained model, and the fine-tuned model never runs
        g3 = N["SIE_ModelGuidance"]().run(model, ft, pos, ft_c, neg, 5.0, 0.7, 999)[0]
        out["plain_cfg"] = rel(run(g3, 3), plain(model, pos, neg, 5.0, 3))
        out["calls_K999"] = g3.calls["finetuned"]

        # K = 400 over 6 ddim_uniform steps: the fine-tuned pass only where t > 400
        g4 = N["SIE_ModelGuidance"]().run(model, ft, pos, ft_c, neg, 5.0, 0.7, 400)[0]
        seen = []
        orig = g4.combine
        g4.combine = lambda s: (seen.append(s.t), orig(s))[1]
        run(g4, 6, scheduler="ddim_uniform")
        out["ts"] = seen
        out["calls_K400"] = g4.calls["finetuned"]
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    r = run_in_comfyui(SCRIPT, str(random_sd15()), timeout=1200, tmp_dir=tmp_path_factory.mktemp("sine"))
    print("SINE guidance results:", json.dumps(r))
    return r


def test_model_guidance_equals_the_mix_of_separate_runs(result):
    assert result["ft_effect"] > 1e-3 and result["map_effect"] > 1e-3, result  # both can be seen
    assert result["single"] < 1e-5, result  # also shows F(v) reached only the fine-tuned branch
    assert result["multi"] < 1e-5, result
    assert result["loads"] == 1 and result["clip_loaded"], result


def test_finetuned_pass_runs_only_for_t_above_K(result):
    assert result["plain_cfg"] < 1e-5 and result["calls_K999"] == 0, result
    assert result["calls_K400"] == sum(1 for t in result["ts"] if t > 400) > 0, result
    assert any(t <= 400 for t in result["ts"]), result
