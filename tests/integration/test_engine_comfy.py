"""The engine on a real ComfyUI MODEL (random-weight SD 1.5): views inside one sampling step, one load
per run, no eviction, the input-block feature against the diffusers back end, the guider's step index.

Runs in ComfyUI's Python; skipped without COMFYUI_DIR.  The script also prints the switch cost
per call (CPU), which the engine issue's note reports.
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
    import time, warnings
    import comfy.sd, comfy.samplers, comfy.sample, comfy.model_management as mm
    from sie_pack.nodes.comfy_views import ComfySD, view_spec_from_patched
    from sie_pack.nodes.comfy_guider import view_guider_class
    from sie_pack.nodes.comfy_bridge import apply_delta
    from sie_pack.core.lora import LoRAConfig, make_loras, lora_state_dict
    from sie_pack.core.seam import Features, ViewSpec
    from sie_pack.core.sd.loader import load_sd15
    out = {}
    loads = []
    _real_load = mm.load_models_gpu
    def counting_load(models, *a, **k):
        loads.append([type(m).__name__ for m in models])
        return _real_load(models, *a, **k)
    mm.load_models_gpu = counting_load

    def grid_map(h, box):
        b, ch, hh, ww = h.shape
        yy = torch.linspace(0, 1, hh).view(1, 1, hh, 1)
        xx = torch.linspace(0, 1, ww).view(1, 1, 1, ww)
        k = torch.arange(ch).view(1, ch, 1, 1).float()
        return torch.sin(3 * xx + k) * torch.cos(2 * yy) * 0.5

    ViewGuider = view_guider_class()

    class MixGuider(ViewGuider):
        a = 0.3
        def combine(self, s):
            self.seen.append((s.index, s.t))
            base, = s.predict(0, ["positive"])
            tuned, = s.predict(1, ["positive"])
            return self.a * base + (1 - self.a) * tuned

    class IndexGuider(ViewGuider):
        def combine(self, s):
            self.seen.append((s.index, s.t))
            return super().combine(s)

    def run_guider(guider, sampler, scheduler, steps, seed=1):
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"),
                                                 scheduler, steps)
        return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=seed)

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        # a random LoRA on the attention projections, applied the native way (what Load LoRA does)
        shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.named_parameters()}
        with torch.inference_mode(False):
            loras = make_loras(shapes, LoRAConfig(rank=4, alpha=4, targets="attention"), seed=0)
            g = torch.Generator().manual_seed(1)
            for l in loras.values():
                l.up.data.normal_(std=0.2, generator=g)
            lora_sd = lora_state_dict(loras)
        lora_model = apply_delta(model, lora_sd)
        spec = view_spec_from_patched(model, lora_model)
        out["view_layers"] = len(spec.weight_functions)

        # another model loaded before sampling must stay loaded
        _real_load([clip.patcher])
        def clip_loaded():
            return any(l.model is clip.patcher for l in mm.current_loaded_models)

        # 1) mix inside each step == the same mix of two separate runs (one step: the output is x0)
        results = []
        for seed in (1, 2):
            mix = MixGuider(model, [spec]); mix.seen = []
            mix.set_conds(pos, neg); mix.set_cfg(1.0)
            loads.clear()
            got = run_guider(mix, "euler", "normal", 1, seed)
            n_loads = len(loads)
            sep = []
            for m in (model, lora_model):
                gd = comfy.samplers.CFGGuider(m); gd.set_conds(pos, neg); gd.set_cfg(1.0)
                sep.append(run_guider(gd, "euler", "normal", 1, seed))
            ref = MixGuider.a * sep[0] + (1 - MixGuider.a) * sep[1]
            results.append({"rel": float((got - ref).abs().max() / ref.abs().max()),
                            "lora_effect": float((sep[1] - sep[0]).abs().max() / sep[0].abs().max()),
                            "loads": n_loads, "clip_loaded_after": clip_loaded()})
        out["mix"] = results

        # 2) step index per sampler, restarting per run; heun warns
        idx = {}
        for sampler, scheduler in (("euler", "normal"), ("ddim", "ddim_uniform"), ("dpmpp_2m", "karras"),
                                   ("heun", "karras")):
            runs = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(1 if sampler == "heun" else 2):
                    mix = IndexGuider(model, []); mix.seen = []
                    mix.set_conds(pos, neg); mix.set_cfg(1.0)
                    loads.clear()
                    run_guider(mix, sampler, scheduler, 3)
                    runs.append({"seen": mix.seen, "loads": len(loads)})
            idx[sampler] = {"runs": runs, "warned": any("more than once per step" in str(w.message) for w in caught)}
        out["index"] = idx

    with torch.inference_mode(False), torch.no_grad():
        # 3) ComfySD views: base and LoRA view in one block, one load, matching the separate models
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        t = torch.tensor([500])
        c = pos[0][0]
        e_base = ComfySD(model).eps(x, t, c)
        e_lora = ComfySD(lora_model).eps(x, t, c)
        loads.clear()
        with ComfySD(model).views(spec) as (base, tuned):
            inside = [tuned.eps(x, t, c), base.eps(x, t, c), tuned.eps(x, t, c)]
            n = 5
            timing = {}
            for name, fn in (("base", lambda: base.eps(x, t, c)), ("view", lambda: tuned.eps(x, t, c))):
                fn(); t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                timing[name] = (time.perf_counter() - t0) / n
            t0 = time.perf_counter()
            for _ in range(n):
                base.eps(x, t, c); tuned.eps(x, t, c)
            timing["alternating_pair"] = (time.perf_counter() - t0) / n
            out["views"] = {"lora": rel(inside[0], e_lora), "base": rel(inside[1], e_base), "lora2": rel(inside[2], e_lora),
                        "loads": len(loads), "clip_loaded_after": clip_loaded(), "effect": rel(e_lora, e_base)}
        sdm = ComfySD(model)
        sdm.eps(x, t, c)
        t0 = time.perf_counter()
        for _ in range(n):
            sdm.eps(x, t, c)
        timing["plain_model"] = (time.perf_counter() - t0) / n
        out["timing_s_per_call"] = timing

        # 4) the input-block feature: same eps as the diffusers back end
        d = load_sd15(sys.argv[2], device="cpu", dtype=torch.float32)
        f = Features(input_map=grid_map)
        ca = d.encode_text(["a photo of a cat"])
        e_c, e_d = ComfySD(model).eps(x, t, ca, f), d.eps(x, t, ca, f)
        plain = d.eps(x, t, ca)
        out["feature"] = {"rel": rel(e_c, e_d), "effect": rel(e_d, plain)}
        # a per-call weight modulation (theta (1 + Delta) on one conv of the decoder) in a view: same on both
        from sie_pack.core.seam import DeltaFunction
        name = "output_blocks.3.0.in_layers.2.weight"
        w = d.unet_parameters()[name].detach()
        mod = Features(modulation={name: DeltaFunction(w * 0.5)})
        with ComfySD(model).views(ViewSpec(modulates=(name,))) as (_, vc), d.views(ViewSpec(modulates=(name,))) as (_, vd):
            m_c, m_d = vc.eps(x, t, ca, mod), vd.eps(x, t, ca, mod)
        out["modulation"] = {"rel": rel(m_c, m_d), "effect": rel(m_d, plain)}

        # 5) a bf16-stored UNet (--bf16-unet): the patched MODEL rounds W + delta to bf16, and so must the view
        #    (the unrounded sum, what the view computed before, is the comparison that must differ)
        from sie_pack.nodes.comfy_views import PatchFunction
        m16 = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=False, output_clip=False,
                                                    model_options={"dtype": torch.bfloat16})[0]
        l16 = apply_delta(m16, lora_sd)
        spec16 = view_spec_from_patched(m16, l16)
        raw16 = ViewSpec({k: PatchFunction(f.patches, f.key) for k, f in spec16.weight_functions.items()})
        e16 = ComfySD(l16).eps(x, t, c)
        with ComfySD(m16).views(spec16, raw16) as (_, v16, r16):
            out["bf16"] = {"stored": str(m16.model.diffusion_model.input_blocks[1][1].proj_in.weight.dtype),
                           "view": rel(v16.eps(x, t, c), e16), "unrounded": rel(r16.eps(x, t, c), e16),
                           "effect": rel(e16, ComfySD(m16).eps(x, t, c))}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    r = run_in_comfyui(SCRIPT, str(random_sd15()), timeout=1200, tmp_dir=tmp_path_factory.mktemp("engine"))
    print("engine results:", json.dumps({k: v for k, v in r.items() if k != "index"}))
    return r


def test_a_view_guider_mixes_base_and_lora_within_each_step_like_two_separate_runs(result):
    assert result["view_layers"] > 50
    for r in result["mix"]:
        assert r["lora_effect"] > 1e-3, r  # the LoRA changes the prediction: the comparison can fail
        assert r["rel"] < 1e-5, r
        assert r["loads"] == 1, r  # one model load for the whole guided run
        assert r["clip_loaded_after"], r  # nothing else evicted


def test_guider_step_index_per_sampler_restarts_every_run(result):
    for sampler in ("euler", "ddim", "dpmpp_2m"):
        info = result["index"][sampler]
        for run in info["runs"]:
            assert [i for i, _ in run["seen"]] == [0, 1, 2], (sampler, run)
            ts = [t for _, t in run["seen"]]
            assert ts == sorted(ts, reverse=True) and all(0 <= t <= 999 for t in ts), (sampler, ts)
            assert run["loads"] == 1
        assert not info["warned"], sampler
    assert result["index"]["heun"]["warned"]  # two evaluations per step: the guider says so


def test_comfy_views_coexist_on_one_load_and_match_the_patched_models(result):
    v = result["views"]
    assert v["effect"] > 1e-3, v
    assert v["lora"] < 1e-5 and v["lora2"] < 1e-5 and v["base"] < 1e-5, v
    assert v["loads"] == 1 and v["clip_loaded_after"], v
    print("switch cost per call (s):", result["timing_s_per_call"])


def test_a_view_of_a_bf16_stored_model_rounds_like_the_patched_model(result):
    """ComfyUI stores a patched weight as round_bf16(W + delta); a view computing W + delta unrounded predicts
    something else than sampling the patched MODEL (what Model-Based Guidance's eq. 3 is checked against)."""
    b = result["bf16"]
    assert b["stored"] == "torch.bfloat16" and b["effect"] > 1e-3, b
    assert b["view"] < 1e-6, b
    assert b["unrounded"] > 100 * max(b["view"], 1e-7), b  # the rounding matters here: the check can fail


def test_typed_features_give_the_same_eps_on_both_backends(result):
    for key in ("feature", "modulation"):  # input-block map; per-call weight modulation in a view
        f = result[key]
        assert f["effect"] > 1e-3, (key, f)
        assert f["rel"] < 1e-5, (key, f)
