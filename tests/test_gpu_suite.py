"""benchmarks/gpu_suite.py: the dry run (tiny sizes, CPU) gives a row per method and stage, all finite.

The suite itself runs on a GPU (nobody runs it in CI); this keeps its code from rotting.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT

SUITE = ROOT / "benchmarks" / "gpu_suite.py"

EXPECTED = {
    "SinDDM": ["train step, scale 0", "train step, scale 1", "train step, mean over scales",
               "paper's training, projected", "one sample, full size"],
    "Imagic": ["embedding step", "LoRA fine-tune step", "full fine-tune step", "DDIM + CFG step",
               "whole edit, lora r8", "whole edit, full"],
    "Imagic SDXL": ["embedding step", "LoRA fine-tune step", "DDIM + CFG step", "whole edit, lora r8"],
    "engine": ["eps call, plain model", "eps call, base in views()", "eps call, LoRA view",
               "eps calls, base + view alternating", "view switch cost", "DDIM + CFG step (base only)",
               "DDIM step, SINE guidance with a LoRA view"],
    "SINE": ["fine-tune step, LoRA", "fine-tune step, LoRA, patches", "fine-tune step, full",
             "fine-tune step, full + text encoder"],
    "LayerDiffusion": ["stage 1: layered embeddings (e_a + e_b) step", "stage 2: layered fine-tune (full) step",
                       "stage 2: layered fine-tune (lora) step", "stage 3: iterative guidance (lora view) step",
                       "whole edit, lora (500+250+50 steps), projected"],
    "Rectifier": [f"{what}, {model}" for model, step in (("pixel DDPM", "DDPM step"), ("SD", "DDPM + CFG step"))
                  for what in (f"{step}, plain", f"{step}, rectified (base estimate)",
                               f"{step}, rectified (modulated estimate)", "rectified / plain step, base estimate",
                               "rectified / plain step, modulated estimate", "rectifier forward (one call)",
                               "modulated pass / plain pass")]
    + ["recon train step, pixel DDPM, batch 8", "recon train step, pixel DDPM, batch 1",
       "recon train step, SD, batch 1", "recon train step, SD, batch 4"]
    # the edit step needs open_clip (a random-weight CLIP; the bare GPU machine has none and skips it)
    + (["edit train step, pixel DDPM, batch 8", "CLI train --mode edit (end to end)"]
       if importlib.util.find_spec("open_clip") else []),
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_dry_run_has_a_finite_row_per_method_and_stage(dry_run):
    stdout, data = dry_run
    rows = data["table"]
    for method, stages in EXPECTED.items():
        names = [r["stage"] for r in rows if r["method"] == method]
        for stage in stages:
            assert any(n.startswith(stage) for n in names), (method, stage, names)
    for r in rows:
        assert math.isfinite(r["value"]), r
        assert r["peak_mib"] is None or (math.isfinite(r["peak_mib"]) and r["peak_mib"] > 0), r
        if r["stage"] != "view switch cost (pair - base - view)":  # a difference: may be negative
            assert r["value"] > 0, r
    # the printed table has the same rows
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 1
    for r in rows:
        assert any(r["stage"] in line and r["method"] in line for line in table), r


def test_dry_run_records_where_the_numbers_come_from(dry_run):
    _, data = dry_run
    assert data["tier"] == "dry-run"
    assert data["machine"] and data["date"] and data["torch"]
    assert data["command"].startswith("python benchmarks/gpu_suite.py --dry-run")
    assert set(data["suite_seconds"]) >= {"sinddm", "imagic", "engine", "rectifier", "total"}


def test_dry_run_sdxl_records_issue_21_targets_without_verdicts(dry_run):
    _, data = dry_run
    t = data["imagic_sdxl"]["targets"]
    assert t["applies"] is False and "tiny SDXL" in data["imagic_sdxl"]["model"]
    assert abs(t["lora_step_peak_gib"]["target"] * 2**30 - 16e9) < 1 and t["whole_lora_edit_min"]["target"] == 3.0
    assert all("met" not in t[k] and t[k]["measured"] > 0 for k in ("lora_step_peak_gib", "whole_lora_edit_min"))


def test_dry_run_rectifier_records_targets_without_verdicts(dry_run):
    """The CPU dry run lists the acceptance targets and the anchor but passes no verdict on them."""
    _, data = dry_run
    rect = data["rectifier"]
    assert rect["tier"] == "tiny" and rect["skipped"] == []
    t = rect["targets"]
    assert t["applies"] is False and "3090" in t["anchor"]
    assert t["pixel_recon_step_s"]["limit"] == 0.25
    for key in ("pixel_recon_step_s", "sampling_pixel_base_over_plain", "sampling_sd_modulated_over_plain"):
        assert "met" not in t[key] and math.isfinite(t[key]["value"]), key
    # base estimate: one unmodulated pass per step; modulated: only the trajectory's first step
    smp = rect["pixel"]["sampling"]
    assert smp["rectified_base"]["base_calls"] == smp["steps"]
    assert smp["rectified_modulated"]["base_calls"] == 1
    if importlib.util.find_spec("open_clip"):  # python -m core.rectifier train, recon then edit, end to end
        cli = rect["cli_edit"]
        assert cli["history"] == ["recon", "edit"] and all(math.isfinite(x) for x in cli["final_losses"]), cli


@pytest.fixture
def gpu_suite(monkeypatch):
    """The suite's module, imported with sys.path and sys.modules restored afterwards."""
    import importlib

    monkeypatch.setattr(sys, "path", [str(SUITE.parent), *sys.path])
    before = set(sys.modules)
    yield importlib.import_module("gpu_suite")
    for name in set(sys.modules) - before:  # benchmarks/common.py, memory.py, ...: not importable elsewhere
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(SUITE.parent)):
            del sys.modules[name]


def test_full_tier_is_the_papers_scale(gpu_suite):
    """The default tier's settings are the papers' (a GPU run must measure what the README cites)."""
    full = gpu_suite.FULL
    assert (full["sinddm_image"], full["sinddm_width"], full["sinddm_batch"]) == ("coffee_250x200.png", 160, 32)
    assert full["sinddm_paper_steps"] == 120_000
    assert (full["sd"], full["sd_size"]) == ("random", 512)
    assert full["switch_latent"] == 64  # 512 px
    rect = full["rectifier"]
    assert rect["tier"] == "real" and rect["budget_s"] <= 120  # the suite must fit one device call
    real = importlib.import_module("rectifier_speed").REAL
    assert (real["pixel"]["unet"], real["pixel"]["size"], real["pixel"]["encoder_layers"]) == (
        "celebahq-256", 256, [3, 4, 6, 3])
    assert 8 in real["pixel"]["train_batches"] and real["sd"]["latent"] == 64  # 512 px


def test_missing_diffusers_without_wheels_says_what_to_do(gpu_suite, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(SystemExit, match="--download-wheels"):
        gpu_suite.ensure_diffusers(tmp_path / "no_wheels")
