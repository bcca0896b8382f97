"""Fine-tuning without full-size extras (issue 23): the optimiser step taken inside backward, and LoRA
results kept as factors.

* ``FitConfig.step_in_backward``: each parameter's Adam step as soon as its gradient is complete, the
  gradient freed at once.  Checked against ``torch.optim.AdamW`` stepping every parameter after a plain
  backward (written out here, not through the fit loop), with two parameter groups at different learning
  rates, weight decay and a step-decay schedule; that no two gradients are ever held at once; and that a
  tensor receiving two gradients in one backward is refused instead of being stepped twice.
* LoRA fine-tunes: ``result.deltas`` and ``result.weight_functions()`` hold the factors only (no
  full-size delta), and applying them equals applying the dense delta computed here from the saved
  file's factors (up @ down * alpha / r), at strength 1 and 0.4.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

pytest.importorskip("diffusers")

from core.fit import FitConfig, Term, fit  # noqa: E402
from core.imagic import FineTuneConfig, finetune  # noqa: E402
from core.lora import LoRAConfig, LowRankDelta  # noqa: E402
from core.seam import DeltaFunction  # noqa: E402
from tiny_sd import tiny_sd_model  # noqa: E402


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 5, generator=g)


def _groups(net: nn.Module) -> list[dict]:
    convs = [p for m in list(net)[:3] for p in m.parameters()]
    return [{"params": convs, "lr": 3e-2}, {"params": list(net[5].parameters()), "lr": 1e-2}]


def test_step_in_backward_equals_adamw_after_a_whole_backward():
    steps, gamma = 6, 0.5
    ours = _net()
    res = fit(_groups(ours), _data, [Term("mse", lambda b: ((ours(b[0]) - b[1]) ** 2).mean())],
              FitConfig(steps, 1.0, optimizer="adamw", weight_decay=0.1, decay_every=2, decay_gamma=gamma,
                        step_in_backward=True))
    ref = _net()
    opt = torch.optim.AdamW(_groups(ref), weight_decay=0.1)
    losses = []
    for step in range(1, steps + 1):
        x, y = _data(step)
        loss = ((ref(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 2 == 0:
            for g in opt.param_groups:
                g["lr"] *= gamma
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(losses), rtol=1e-6, atol=0)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in ours.parameters())


def test_step_in_backward_never_holds_two_gradients():
    for in_backward, most in ((True, 0), (False, 5)):
        net = _net()
        params = list(net.parameters())
        held = []
        for p in params:  # runs when p's gradient arrives, before it is accumulated
            p.register_hook(lambda g: held.append(sum(q.grad is not None for q in params)) or g)
        fit(params, _data, [Term("mse", lambda b: ((net(b[0]) - b[1]) ** 2).mean())],
            FitConfig(2, 1e-2, step_in_backward=in_backward))
        assert max(held) == most, (in_backward, held)


def test_step_in_backward_refuses_a_tensor_with_two_gradients():
    lin = nn.Linear(4, 4)

    def twice(b):  # the same weight in two separately recomputed segments: two gradient arrivals
        h = checkpoint(lin, b, use_reentrant=True)
        return checkpoint(lin, h, use_reentrant=True).pow(2).mean()

    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="two gradients in one backward"):
        fit(list(lin.parameters()), lambda s: x, [Term("t", twice)], FitConfig(1, 1e-2, step_in_backward=True))
    with pytest.raises(ValueError, match="clip"):
        FitConfig(1, 1e-2, step_in_backward=True, grad_clip=1.0)


@pytest.fixture(scope="module")
def lora_result():
    model = tiny_sd_model(0)
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 4, 16, 16, generator=g)
    cond = model.encode_text(["a photo of a dog"])
    res = finetune(model, latent, cond, FineTuneConfig("lora", steps=6, lr=5e-2, lora=LoRAConfig(4, 6.0)))
    return model, latent, cond, res


def test_lora_result_keeps_factors_not_full_size_deltas(lora_result):
    model, _, _, res = lora_result
    params = model.unet_parameters()
    full = sum(params[n].numel() for n in res.deltas)
    held = {id(t): t.numel() for v in res.deltas.items_.values() for t in (v.down, v.up)}
    fns = res.weight_functions(0.5)
    assert all(isinstance(f, LowRankDelta) for f in fns.values())
    held.update({id(t): t.numel() for f in fns.values() for t in f.buffers()})
    assert sum(held.values()) < full / 4, (sum(held.values()), full)  # measured: factors ~1/9 of the weights


def _file_dense(sd: dict, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """The dense delta of every LoRA in a saved state dict, from its factors: up @ down * alpha / r."""
    out = {}
    for key, down in sd.items():
        if key.endswith(".lora_down.weight"):
            module = key[len(prefix): -len(".lora_down.weight")]
            up = sd[key.replace("lora_down", "lora_up")]
            alpha = float(sd[key.replace("lora_down.weight", "alpha")])
            out[module + ".weight"] = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
    return out


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_lora_result_applies_like_its_dense_delta(lora_result, strength):
    model, latent, cond, res = lora_result
    dense = _file_dense(res.delta)
    assert set(dense) == set(res.deltas)
    assert max(float(d.abs().max()) for d in dense.values()) > 1e-3  # the training moved it
    t = torch.tensor([300, 700])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    c = cond.expand(2, -1, -1)
    with torch.no_grad():
        with model.adapted({k: DeltaFunction(v, strength) for k, v in dense.items()}) as m:
            want = m.eps(x, t, c)
        with model.adapted(res.weight_functions(strength)) as m:
            got = m.eps(x, t, c)
        base = model.eps(x, t, c)
    assert float((want - base).abs().max()) > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    name = next(iter(dense))
    torch.testing.assert_close(res.deltas[name].flatten(1), dense[name], rtol=1e-5, atol=1e-7)


# -- 8-bit Adam (bitsandbytes, optional) ------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 8))  # 8,192 weights: quantised moments


def _mlp_data(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)


def _fit_mlp(steps: int, **kw):
    net = _mlp()
    return net, fit(list(net.parameters()), _mlp_data, [Term("mse", lambda b: ((net(b[0]) - b[1]) ** 2).mean())],
                    FitConfig(steps, 1e-2, optimizer="adam8bit", **kw.pop("config", {})), **kw)


def test_adam8bit_without_bitsandbytes_names_the_fix(monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "bitsandbytes" else real(name, *a, **k))
    with pytest.raises(ImportError, match=r"pip install bitsandbytes\) or use optimizer 'adam'"):
        _fit_mlp(1)


def test_adam8bit_stores_one_byte_moments_and_steps_in_backward_alike():
    bnb = pytest.importorskip("bitsandbytes")
    ref = _mlp()
    opt = bnb.optim.Adam8bit(ref.parameters(), lr=1e-2)
    for step in range(1, 5):
        x, y = _mlp_data(step)
        opt.zero_grad()
        ((ref(x) - y) ** 2).mean().backward()
        opt.step()
    for in_backward in (False, True):
        net, _ = _fit_mlp(4, config={"step_in_backward": in_backward})
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    w = ref[0].weight
    assert opt.state[w]["state1"].dtype == torch.uint8 and opt.state[w]["state2"].dtype == torch.uint8


def test_adam8bit_resumes_exactly(tmp_path):
    pytest.importorskip("bitsandbytes")
    from core.checkpoint import Checkpointing

    whole, _ = _fit_mlp(6)
    ck = Checkpointing(tmp_path, "mlp", {"t": 1}, every=3)
    _fit_mlp(3, config={}, checkpointing=ck)
    saved = ck.existing()[-1]
    resumed, res = _fit_mlp(6, checkpointing=Checkpointing(tmp_path, "mlp", {"t": 1}, resume=saved))
    assert res.resumed_from == 3
    for p, q in zip(resumed.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_imagic_cli_refuses_adam8bit_without_bitsandbytes_before_loading(tmp_path):
    import os
    import subprocess
    import sys

    from helpers import ROOT

    hidden = tmp_path / "hide" / "bitsandbytes"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'hide'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "core.imagic", "--checkpoint", str(tmp_path / "none.safetensors"),
                           "--image", str(ROOT / "core/sinddm/data/coffee_128x100.png"), "--prompt", "a cup",
                           "--device", "cpu", "--optimizer", "adam8bit", "--out", str(tmp_path / "e.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--optimizer: optimizer 'adam8bit' needs bitsandbytes" in proc.stderr
    assert "pip install bitsandbytes" in proc.stderr and not (tmp_path / "e.png").exists()


# -- a full fine-tune in place (core.inplace) --------------------------------------------------------------------------
@pytest.fixture
def spill_dir(tmp_path, monkeypatch):
    """The temporary folder the in-place run spills the original weights to."""
    import tempfile

    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _full(model, latent, cond, in_place: bool, **kw):
    return finetune(model, latent, cond, FineTuneConfig("full", steps=4, lr=1e-3, in_place=in_place), **kw)


def test_full_finetune_in_place_trains_the_weights_themselves_and_restores_them(spill_dir):
    model = tiny_sd_model(0)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    cond = model.encode_text(["a photo of a dog"])
    before = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    w = model.unet.conv_in.weight
    seen = []

    def on_step(i, n, info):  # the model's own tensor is what trains (no copy), and a spill file exists
        seen.append((w.requires_grad, not torch.equal(w, before["conv_in.weight"]), len(list(spill_dir.iterdir()))))

    res = _full(model, latent, cond, True, on_step=on_step)
    assert seen == [(True, True, 1)] * 4
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())  # bit for bit
    assert not any(p.requires_grad for p in model.unet.parameters()) and list(spill_dir.iterdir()) == []
    copy = _full(model, latent, cond, False)  # a float32 copy trained beside the base: the same arithmetic
    assert res.losses == copy.losses and set(res.deltas) == set(copy.deltas)
    assert all(torch.equal(res.deltas[k], copy.deltas[k]) for k in copy.deltas)
    assert res.trainable_parameters == copy.trainable_parameters == sum(p.numel() for p in model.unet.parameters())


def test_full_finetune_in_place_restores_the_weights_when_cancelled(spill_dir):
    from core.fit import Interrupted

    model = tiny_sd_model(0)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    cond = model.encode_text(["a photo of a dog"])
    before = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    calls = []
    with pytest.raises(Interrupted):
        _full(model, latent, cond, True, should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert not any(p.requires_grad for p in model.unet.parameters()) and list(spill_dir.iterdir()) == []


def test_in_place_only_for_float32_parameters_of_an_owned_module():
    from core.inplace import can_train_in_place

    model = tiny_sd_model(0)
    params = model.unet_parameters()
    assert can_train_in_place(model, params)
    assert not can_train_in_place(model, {"w": nn.Parameter(torch.zeros(2, dtype=torch.float16))})
    assert not can_train_in_place(object(), params)  # a back end that does not say so (ComfyUI's MODEL)


def test_without_room_for_the_spill_file_a_full_fine_tune_trains_a_copy(spill_dir, monkeypatch, caplog):
    import safetensors.torch

    model = tiny_sd_model(0)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    cond = model.encode_text(["a photo of a dog"])
    want = _full(model, latent, cond, False)
    before = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with caplog.at_level("WARNING", logger="comfyui-single-image-edit"):
        got = _full(model, latent, cond, True)
    assert "training a float32 copy instead" in caplog.text and "No space left" in caplog.text
    assert got.losses == want.losses and all(torch.equal(got.deltas[k], want.deltas[k]) for k in want.deltas)
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert list(spill_dir.iterdir()) == []
