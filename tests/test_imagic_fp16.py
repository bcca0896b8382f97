"""Imagic edits saved in half precision (Save Trained's precision input, the CLI's --save-fp16).

A full fine-tune of SD 1.5 is 3.4 GB per edit in float32.  In float16 the file halves, and each delta entry
is rounded to nearest: within 2^-11 of itself (float16's half step) for normal numbers, within 2^-25 (half
the subnormal step) below 6.1e-5.  The tests check exactly that bound entry by entry (bfloat16, 2^-9, would
fail it), the file size, that e_opt stays float32 and bit-identical, and that the loaded model predicts like
the float32 one to within 2^-11 of what the delta changes.  ComfyUI's own LoRA loader reads both layouts in
float16 in tests/integration/test_imagic_comfy.py.
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("diffusers")

from core.imagic import FineTuneConfig, LoRAConfig, finetune  # noqa: E402
from core.imagic.artifact import Trained, load_trained, save_trained  # noqa: E402
from core.lora import delta_weights  # noqa: E402
from core.seam import DeltaFunction  # noqa: E402
from helpers import load_pack  # noqa: E402
from tiny_sd import tiny_sd_model  # noqa: E402

HALF_STEP = 2.0 ** -11  # float16: 10 stored mantissa bits, round to nearest
SUBNORMAL_HALF_STEP = 2.0 ** -25


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    """Tiny networks run far faster on one thread (and do not fight a busy machine for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_sd_model(0)


@pytest.fixture(scope="module")
def latent():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tuned(model, latent):
    """(full fine-tune, LoRA fine-tune) of the tiny SD model, a few steps, and the cond they were tuned at."""
    cond = model.encode_text(["a photo of a cup of tea"])
    full = finetune(model, latent, cond, FineTuneConfig(mode="full", steps=3, lr=1e-4, seed=1))
    lora = finetune(model, latent, cond, FineTuneConfig(mode="lora", steps=3, lr=1e-2, seed=2,
                                                        lora=LoRAConfig(rank=4, alpha=4)))
    return full, lora, cond


def dtypes(path) -> dict[str, torch.dtype]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def eps_with(model, delta: dict[str, torch.Tensor] | None, cond, x, t):
    fns = {k: DeltaFunction(v) for k, v in delta_weights(delta).items()} if delta else {}
    with torch.no_grad(), model.adapted(fns) as m:
        return m.eps(x, t, cond.expand(len(t), -1, -1))


def test_full_finetune_in_fp16_halves_the_file_and_rounds_each_entry_to_nearest(tuned, tmp_path):
    full, _, cond = tuned
    trained = Trained(full.delta, "full", cond, {"steps": 3})
    p32 = save_trained(trained, tmp_path / "full32.safetensors")
    p16 = save_trained(trained, tmp_path / "full16.safetensors", "fp16")
    s32, s16 = p32.stat().st_size, p16.stat().st_size
    e_bytes = cond.numel() * 4  # e_opt stays float32
    print(f"tiny full fine-tune: {s32:,} B in fp32, {s16:,} B in fp16 ({s16 / s32:.3f})")
    assert abs((s16 - e_bytes) / (s32 - e_bytes) - 0.5) < 0.01, (s32, s16)
    kinds = dtypes(p16)
    assert kinds.pop("sie.embedding") == "F32" and set(kinds.values()) == {"F16"}, kinds
    back32, back16 = load_trained(p32), load_trained(p16)
    assert torch.equal(back16.embedding, back32.embedding) and back16.mode == "full"
    with safe_open(str(p16), "pt") as f:
        assert f.metadata()["precision"] == "fp16"
    rounded = 0
    for k, d in back32.delta.items():
        d16 = back16.delta[k].float()
        bound = torch.maximum(HALF_STEP * d.abs(), torch.full_like(d, SUBNORMAL_HALF_STEP))
        err = (d16 - d).abs()
        assert bool((err <= bound).all()), k  # round to nearest float16, nothing coarser
        rounded += int((err > 0).sum())
    assert rounded > 0  # the entries really were rounded


def test_fp16_edit_predicts_within_fp16_rounding_of_the_fp32_edit(model, tuned, tmp_path):
    full, lora, cond = tuned
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([150, 700])
    base = eps_with(model, None, cond, x, t)
    for name, res in (("full", full), ("lora", lora)):
        trained = Trained(res.delta, name, cond)
        d32 = load_trained(save_trained(trained, tmp_path / f"{name}32.safetensors")).delta
        d16 = load_trained(save_trained(trained, tmp_path / f"{name}16.safetensors", "fp16")).delta
        e32, e16 = eps_with(model, d32, cond, x, t), eps_with(model, d16, cond, x, t)
        effect, err = (e32 - base).abs().max().item(), (e16 - e32).abs().max().item()
        print(f"{name}: the delta moves eps by {effect:.3g}; fp16 vs fp32 file: {err:.3g} ({err / effect:.2g} of it)")
        assert effect > 1e-4
        assert err <= HALF_STEP * effect, (name, err, effect)


def test_fp16_lora_layout_keeps_alpha_and_round_trips(tuned, tmp_path):
    _, lora, cond = tuned
    p = save_trained(Trained(lora.delta, "lora", cond), tmp_path / "lora16.safetensors", "fp16")
    back = load_trained(p)
    alphas = [k for k in back.delta if k.endswith(".alpha")]
    assert alphas and all(back.delta[k].item() == lora.delta[k].item() for k in alphas)
    assert set(back.delta) == set(lora.delta)


def test_bad_precision_and_out_of_range_deltas_write_nothing(tmp_path):
    trained = Trained({"diffusion_model.out.2.diff": torch.tensor([1.0, 7e4])}, "full", torch.zeros(1, 77, 8))
    with pytest.raises(ValueError, match="beyond fp16's range"):
        save_trained(trained, tmp_path / "big.safetensors", "fp16")
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16"):
        save_trained(trained, tmp_path / "bf.safetensors", "bf16")
    assert list(tmp_path.iterdir()) == []
    save_trained(trained, tmp_path / "big.safetensors")  # fp32 holds it
    assert load_trained(tmp_path / "big.safetensors").delta["diffusion_model.out.2.diff"][1].item() == 7e4


def test_save_trained_node_precision_input(tuned, tmp_path, monkeypatch):
    pack = load_pack()
    imagic = sys.modules[pack.__name__ + ".nodes.imagic"]
    bridge = sys.modules[pack.__name__ + ".nodes.comfy_bridge"]
    node_error = sys.modules[pack.__name__ + ".nodes.common"].NodeInputError
    monkeypatch.setattr(bridge, "save_dir", lambda name: tmp_path)
    full, _, cond = tuned
    trained = imagic.Trained(full.delta, "full", cond)
    node = pack.NODE_CLASS_MAPPINGS["SIE_SaveTrained"]
    spec = node.INPUT_TYPES()["optional"]["precision"]
    assert spec[0] == "COMBO" and spec[1]["options"] == ["fp32", "fp16"] and spec[1]["default"] == "fp32"  # saved workflows keep fp32
    old = node.execute(trained, "edit").ui["text"][0]  # a workflow saved before the input existed
    new = node.execute(trained, "edit", "fp16").ui["text"][0]
    assert set(dtypes(tmp_path / old).values()) == {"F32"}
    assert dtypes(tmp_path / new)["diffusion_model.out.2.diff"] == "F16"
    big = imagic.Trained({"diffusion_model.out.2.diff": torch.tensor([7e4])}, "full", cond)
    with pytest.raises(node_error, match="input 'precision'.*fp32"):
        node.execute(big, "big", "fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([old, new])  # nothing left by the failure


def test_cli_save_fp16_needs_save_delta(capsys):
    from core.imagic.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", "c.safetensors", "--image", "i.png", "--prompt", "p", "--save-fp16"])
    assert info.value.code == 2 and "--save-fp16 applies to --save-delta" in capsys.readouterr().err
