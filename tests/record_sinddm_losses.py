"""Records SinDDM's fixed-seed training losses and EMA weights (run once, before the trainer moved onto core.fit).

    python tests/record_sinddm_losses.py   # writes tests/data/sinddm_recorded_losses.json

The numbers were produced by this script at commit f99f35a with ``core.sinddm.train`` still on
its own loop; ``tests/test_sinddm.py::test_trainer_reproduces_recorded_losses`` checks that the
trainer on the engine's fit loop gives the same numbers.  They are *our* numbers, not the
official code's (those live in sinddm_official_reference.json).

Re-recorded (issue 12) after two changes to the trainer: the initial weights are now drawn
inside ``core.sinddm.model.private_rng`` instead of after a global ``torch.manual_seed`` (the
initialisation RNG no longer touches the process's state), and the EMA decay per update is
scaled so that the EMA's time constant is the paper's in proportion to the run
(``TrainConfig.ema_update_decay``; 24 steps: decay 0.995 ** 500 instead of 0.995).  The
losses are bit-identical to the f99f35a recording (the new initialisation gives the same
weights); only the two ``ema_sum`` values changed, and with the old decay forced they are
bit-identical to the old ones too (checked when re-recording).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def record(precisions: tuple[str, ...] = ("fp32", "bf16"), **changes) -> dict:
    """The recorded run; ``changes`` override TrainConfig fields (tests use them to show that a changed loop
    is caught)."""
    from PIL import Image

    from core.sinddm.model import NetConfig
    from core.sinddm.pyramid import build_pyramid
    from core.sinddm.train import TrainConfig, train

    torch.set_num_threads(1)
    img = Image.open(ROOT / "core/sinddm/data/coffee_128x100.png").convert("RGB")
    pyr = build_pyramid(img)
    out = {}
    for precision in precisions:
        cfg = {"steps": 24, "batch_size": 2, "seed": 3, "precision": precision, **changes}
        res = train(pyr, NetConfig(8), TrainConfig(**cfg))
        out[precision] = {"losses": res.losses,
                          "ema_sum": float(sum(p.detach().double().sum() for p in res.net.parameters()))}
    return out


if __name__ == "__main__":
    data = {"about": "SinDDM losses and EMA parameter sums, tiny net, recorded by tests/record_sinddm_losses.py "
                     "at commit f99f35a (SinDDM's own loop), 1 thread; re-recorded after the initialisation RNG "
                     "moved into a private generator and the EMA decay was scaled to the run (losses unchanged, "
                     "ema_sum changed).", **record()}
    (ROOT / "tests/data/sinddm_recorded_losses.json").write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data)[:400])
