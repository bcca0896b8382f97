"""Seeds a node accepts (0 .. 2**64 - 1) never overflow where code derives ``seed + k``."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from core.losses import NoiseDraw
from core.seeds import SEED_MAX, derive_seed
from core.sinddm import NetConfig, SinDDM, SinDDMNet, build_pyramid, sample
from helpers import ROOT, load_pack

PACK = load_pack()


def test_derive_seed_is_seed_plus_k_wrapped_to_64_bits():
    node_max = PACK.NODE_CLASS_MAPPINGS["SIE_FineTune"].INPUT_TYPES()["required"]["seed"][1]["max"]
    assert node_max == SEED_MAX == 2**64 - 1
    assert derive_seed(0) == 0 and derive_seed(41, 1) == 42 and derive_seed(123, 1000) == 1123
    assert derive_seed(SEED_MAX, 1) == 0 and derive_seed(SEED_MAX, 1000) == 999 and derive_seed(-1) == SEED_MAX
    for k in range(3):
        torch.Generator().manual_seed(derive_seed(SEED_MAX, k))  # in range for torch
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(SEED_MAX + 1)  # what seed + 1 did before


def test_ordinary_seeds_draw_exactly_what_seed_plus_k_drew():
    for seed in (0, 7, 2**40):
        a, b = NoiseDraw(derive_seed(seed, 1)), NoiseDraw(seed + 1)
        latent = torch.zeros(1, 4, 4, 4)
        ta, ea = a(latent)
        tb, eb = b(latent)
        assert torch.equal(ta, tb) and torch.equal(ea, eb)


def test_sinddm_samples_with_the_maximum_seed(one_thread):
    small = Image.open(ROOT / "core/sinddm/data/coffee_128x100.png").convert("RGB").resize((40, 32))
    model = SinDDM.create(SinDDMNet(NetConfig(4)).eval(), build_pyramid(small))
    out = sample(model, count=2, seed=SEED_MAX, scales=1)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    # sample k draws from seed + k (mod 2**64): sample 1 of the maximum seed is sample 0 of seed 0
    torch.testing.assert_close(out[1], sample(model, count=1, seed=0, scales=1)[0])
    torch.testing.assert_close(out[0], sample(model, count=1, seed=SEED_MAX, scales=1)[0])


def test_imagic_finetune_accepts_the_maximum_seed(one_thread):
    pytest.importorskip("diffusers")
    import record_imagic_losses

    from core.imagic import FineTuneConfig, LoRAConfig, finetune

    model, latent, e_tgt, _ = record_imagic_losses.tiny_setup()
    res = finetune(model, latent, e_tgt, FineTuneConfig(mode="lora", steps=1, lr=1e-3, seed=SEED_MAX,
                                                        lora=LoRAConfig(rank=2, alpha=2.0)))
    assert len(res.losses) == 1 and all(torch.isfinite(v).all() for v in res.delta.values())
