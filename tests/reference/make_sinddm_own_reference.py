"""Writes tests/data/sinddm_own_reference.json: numbers of the pack's OWN SinDDM variants.

    python tests/reference/make_sinddm_own_reference.py [--check]

These numbers do not come from the official code (which has no such variants); they are a
record of the pack's own choices, computed with the pack's code:

* ``float_rmse_m1_1_errors``: ``core.sinddm.build_pyramid(image, error_kind="float")``,
  the RMSE between x^s and the bilinear upsampling of x^(s-1), both on [-1, 1] (instead
  of the official uint8-wrapped error), for the bundled coffee images;
* ``float_rmse_m1_1_start_steps``: T[s] from ``MultiScaleSchedule.build`` on those errors
  (the official rule, first t with sigma_t > L_s, applied to the float errors).

``--check`` recomputes and compares with the stored file instead of writing it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "sinddm_own_reference.json"
COFFEE = ("coffee_128x100.png", "coffee_250x200.png")
ABOUT = ("The pack's own numbers, NOT the official SinDDM code's: the float-error pyramid variant "
         "(error_kind='float', RMSE on [-1, 1] images) of core.sinddm, recorded by "
         "tests/reference/make_sinddm_own_reference.py. Numbers computed by the official code are in "
         "sinddm_official_reference.json.")


def compute() -> dict:
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from core.sinddm import build_pyramid
    from core.sinddm.schedule import MultiScaleSchedule

    out = {}
    for name in COFFEE:
        pyr = build_pyramid(Image.open(ROOT / "core" / "sinddm" / "data" / name), error_kind="float")
        out[name] = {"float_rmse_m1_1_errors": [float(e) for e in pyr.spec.errors],
                     "float_rmse_m1_1_start_steps": list(MultiScaleSchedule.build(pyr.spec.errors).start_steps)}
    return {"about": ABOUT, "coffee": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the stored file instead of writing it")
    args = ap.parse_args()
    ref = compute()
    if args.check:
        same = json.loads(OUT.read_text())["coffee"] == ref["coffee"]
        print(f"{OUT.name}: " + ("reproduced" if same else "DIFFERS"))
        return 0 if same else 1
    OUT.write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
