"""The SinDDM demo as ``python3 run.py demo`` runs it: its bundled image is what the data README says it is, and
the demo's default path (that image, training, sampling, writing) runs end to end.

How long the demo takes, and how good its samples are, is measured in ``benchmarks/sinddm_demo.py``
(``benchmarks/results/sinddm_demo_cpu.json``), not here.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from core.sinddm import build_pyramid
from core.sinddm.__main__ import DEMO
from helpers import ROOT

DATA = ROOT / "core" / "sinddm" / "data"


def test_the_demo_image_is_the_documented_crop_of_scikit_images_immunohistochemistry_picture():
    data = pytest.importorskip("skimage.data")
    # the recipe of core/sinddm/data/README.md, computed here from scikit-image's own file
    expected = Image.fromarray(data.immunohistochemistry()).crop((0, 0, 512, 400)).resize((96, 75), Image.LANCZOS)
    bundled = Image.open(DATA / "glands_96x75.png")
    assert DEMO["image"] == DATA / "glands_96x75.png"
    assert bundled.mode == "RGB" and bundled.size == (96, 75)
    diff = np.abs(np.asarray(bundled, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= 3, "Pillow versions may differ by a few values; a different crop or image differs by far more"
    assert build_pyramid(bundled).spec.sizes == ((49, 63), (75, 96))  # two scales: the demo's step costs


def test_the_demo_runs_end_to_end_on_its_bundled_image(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "core.sinddm", "demo", "--steps", "3", "--width", "8", "--batch",
                           "2", "--count", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "glands_96x75.png -> 2 scales (63x49, 96x75)" in proc.stdout
    for name in ("samples.png", "loss.png", "sinddm.safetensors"):
        assert (out / name).is_file(), name
    samples = Image.open(out / "samples.png")
    assert samples.width >= 2 * 96 and samples.height >= 3 * 75  # training image, 2 samples, 1 twice as wide
