"""Through a real ComfyUI server: bad inputs, cancellation, templates and the headless client.

Needs COMFYUI_DIR (skipped otherwise).  Each prompt is followed on the server's
WebSocket with the pack's client (``core.client``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from comfy_server import PACK_DIR_NAME, REPO, ComfyServer, skip_reason
from core.client import ComfyClient, ComfyError

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

IMAGE = REPO / "core" / "sinddm" / "data" / "coffee_250x200.png"


@pytest.fixture(scope="module")
def server():
    with ComfyServer() as srv:
        ComfyClient(srv.url).upload_image(IMAGE)
        yield srv


def train_prompt(steps: int, extra: dict | None = None, prefix: str = "train") -> dict:
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": IMAGE.name}},
        "2": {"class_type": "SIE_SinDDMTrain", "inputs": {"image": ["1", 0], "steps": steps, "batch_size": 1,
                                                          "width": 8, "learning_rate": 1e-3, "seed": 0,
                                                          "preview_every": 0, "precision": "fp32"}},
        "3": {"class_type": "SIE_SaveSinDDM", "inputs": {"model": ["2", 0], "filename_prefix": prefix}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": f"{prefix}/loss"}},
    }
    prompt.update(extra or {})
    return prompt


def test_bad_mask_fails_with_an_error_naming_the_input(server):
    prompt = train_prompt(3, {
        "5": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 100, "height": 100}},
        "6": {"class_type": "SIE_SinDDMInject", "inputs": {"model": ["2", 0], "image": ["1", 0], "mode": "harmonization",
                                                           "t_start": 0, "count": 1, "seed": 0, "match_colors": True,
                                                           "mask": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bad"}},
    })
    result = ComfyClient(server.url).run(prompt, timeout=300)
    assert result.status == "error"
    msg = result.error["exception_message"]
    assert result.error["node_type"] == "SIE_SinDDMInject"
    assert "input 'mask'" in msg and "100x100" in msg and "250x200" in msg and "Fix:" in msg, msg
    assert "Traceback" not in msg


def test_bad_start_steps_fail_with_an_error_naming_the_input(server):
    prompt = train_prompt(3, {
        "5": {"class_type": "SIE_SinDDMSample", "inputs": {"model": ["2", 0], "count": 1, "seed": 0, "width_scale": 1.0,
                                                           "height_scale": 1.0, "width": 0, "height": 0,
                                                           "start_steps": "5"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "bad"}},
    })
    result = ComfyClient(server.url).run(prompt, timeout=300)
    assert result.status == "error" and "input 'start_steps'" in result.error["exception_message"]


def test_training_shows_loss_text_and_previews_on_the_node(server):
    prompt = train_prompt(40, prefix="progress_test")
    prompt["2"]["inputs"]["preview_every"] = 20
    result = ComfyClient(server.url).run(prompt, timeout=300)
    assert result.status == "success"
    texts = [t for node, t in result.texts if node == "2"]
    assert texts and "loss" in texts[-1] and "/40" in texts[-1], result.texts[-3:]
    assert result.previews >= 2  # coarse samples every 20 steps
    progress = [d for k, d in result.messages if k == "progress" and d.get("node") == "2"]
    assert progress[-1]["value"] == progress[-1]["max"] == 40


def test_out_of_range_steps_are_rejected_before_running(server):
    with pytest.raises(ComfyError, match="steps"):
        ComfyClient(server.url).run(train_prompt(0), timeout=60)


def test_interrupting_training_stops_it_and_keeps_only_its_checkpoint(server):
    client = ComfyClient(server.url)
    marks: dict[str, float] = {}
    models, output = server.base / "models", server.base / "output"

    def files() -> set:
        return {p for root in (models, output) if root.exists() for p in root.rglob("*") if p.is_file()}

    before = files()

    def on_message(kind, data):
        if kind == "progress" and data.get("node") == "2" and "asked" not in marks and data.get("value", 0) >= 2:
            marks["asked"] = time.time()
            client.interrupt()

    result = client.run(train_prompt(1_000_000, prefix="interrupt_test"), timeout=600, on_message=on_message)
    stopped = time.time()
    assert result.status == "interrupted", (result.error or {}).get("exception_message")
    latency = stopped - marks["asked"]
    print(f"training stopped {latency:.2f} s after POST /interrupt")
    assert latency < 5.0
    kept = sorted(p.relative_to(models).as_posix() for p in files() - before)
    # the steps done, kept for resume_from (issue 22); neither a model, an image nor a temporary file
    assert len(kept) == 1 and kept[0].startswith("single_image_edit/checkpoints/sinddm/sinddm_train_"), kept
    before = files()
    after = client.run(train_prompt(3, prefix="interrupt_test"), timeout=300)  # the server carries on normally
    assert after.status == "success"
    new = sorted(p.name for p in files() - before)
    assert new == ["interrupt_test_00001.safetensors", "loss_00001_.png"], new


def test_templates_list_the_ui_workflows_only(server):
    templates = server.get("/api/workflow_templates")
    ui = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert sorted(templates[PACK_DIR_NAME]) == ui  # the API twins in workflows/api/ are not offered
    served = server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{ui[0]}.json")
    assert served == json.loads((REPO / "workflows" / f"{ui[0]}.json").read_text())


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.client", "run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_headless_client_runs_a_shipped_workflow(server, tmp_path):
    out = tmp_path / "results"
    run = run_cli("workflows/api/sinddm_random_samples.json", "--server", server.url,
                  "--image", f"2={IMAGE}", "--set", "SIE_SinDDMTrain.steps=20", "--set", "SIE_SinDDMTrain.width=8",
                  "--set", "SIE_SinDDMTrain.batch_size=2", "--set", "SIE_SinDDMSample.count=1", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(files) == 4 and all(f.startswith("sinddm/") for f in files), files
    assert "[####" in run.stderr and "/254" in run.stderr  # a progress bar fed by the WebSocket
    assert str(out) in run.stdout


def test_headless_client_reports_failures(server, tmp_path):
    bad = run_cli("workflows/api/sinddm_random_samples.json", "--server", server.url,
                  "--set", "SIE_SinDDMTrain.steps=0", "--out", str(tmp_path))
    assert bad.returncode == 1 and "input 'steps'" in bad.stderr, bad.stderr
    typo = run_cli("workflows/api/sinddm_random_samples.json", "--server", server.url, "--set", "SIE_SinDDMTrain.stpes=2")
    assert typo.returncode == 1 and "has no input 'stpes'" in typo.stderr
    ui = run_cli("workflows/sinddm_random_samples.json", "--server", server.url)
    assert ui.returncode == 2 and "API format" in ui.stderr
    down = run_cli("workflows/api/sinddm_random_samples.json", "--server", "http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach ComfyUI" in down.stderr
