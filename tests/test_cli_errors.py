"""The command lines answer bad input the way the client does: one ``error: ...`` line, exit status 2.

Every case here fails in the checks made before any work starts (no model is loaded and
nothing is trained), so each run takes about as long as importing torch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from core import cli
from core.imagic.artifact import Trained, save_trained
from core.sinddm import NetConfig, SinDDM, SinDDMNet, build_pyramid, save
from helpers import ROOT

IMAGE = ROOT / "core/sinddm/data/coffee_128x100.png"


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.png").write_text("a text file with an image's name\n")
    (d / "notes.safetensors").write_text("a text file with a model's name\n")
    data = IMAGE.read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (16, 16), "gray").save(d / "tiny.png")
    save_trained(Trained({"w.lora_up.weight": torch.zeros(4, 2)}, "lora", torch.zeros(1, 77, 8)),
                 d / "edit.safetensors")
    small = Image.open(IMAGE).convert("RGB").resize((40, 32))
    save(SinDDM.create(SinDDMNet(NetConfig(4)), build_pyramid(small)), d / "sinddm.safetensors")
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(4, 2)}, str(d / "lora.safetensors"))
    return d


SINDDM = [  # (arguments, words the error line must contain)
    (["train", "--image", "{d}/missing.png"], ["--image", "missing.png", "not found", "Fix:"]),
    (["train", "--image", "{d}/notes.png"], ["--image", "notes.png", "not an image file", "Fix:"]),
    (["train", "--image", "{d}/cut.png"], ["--image", "cut.png", "damaged image"]),
    (["train", "--image", "{d}/tiny.png"], ["--image", "16x16 is too small"]),
    (["sample", "--model", "{d}/missing.safetensors"], ["--model", "missing.safetensors", "not found", "Fix:"]),
    (["sample", "--model", "{d}/notes.safetensors"], ["--model", "notes.safetensors", "a text file"]),
    (["sample", "--model", "{d}/edit.safetensors"], ["--model", "edit.safetensors", "an Imagic edit",
                                                     "not a SinDDM model"]),
    (["sample", "--model", "{d}/lora.safetensors"], ["--model", "a LoRA", "no 'format' tag"]),
    (["train", "--device", "toaster"], ["--device", "'toaster' is not a device name"]),
]
IMAGIC = [
    (["--checkpoint", "{d}/missing.safetensors"], ["--checkpoint", "missing.safetensors", "not found", "Fix:"]),
    (["--checkpoint", "{d}/notes.safetensors"], ["--checkpoint", "a text file, not a checkpoint"]),
    (["--checkpoint", "{d}/lora.safetensors"], ["--checkpoint", "a LoRA", "Stable Diffusion 1.x"]),
    (["--checkpoint", "{d}/sinddm.safetensors"], ["--checkpoint", "a SinDDM model, not a checkpoint"]),
    (["--checkpoint", "{d}/lora.safetensors", "--image", "{d}/notes.png"], ["--image", "not an image file"]),
    (["--checkpoint", "{d}/lora.safetensors", "--out", "{d}/out.txt"], ["--out", "out.txt", ".png"]),
    (["--checkpoint", "{d}/lora.safetensors", "--etas", "0.5,x"], ["--etas", "not a list of numbers"]),
]


def run(module: str, args: list[str], d) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *[a.format(d=d) for a in args]], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def check_one_line(proc: subprocess.CompletedProcess, words: list[str]) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("args,words", SINDDM, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(SINDDM)])
def test_sinddm_cli_bad_input(bad, tmp_path, args, words):
    out = tmp_path / "out"
    proc = run("core.sinddm", [*args, "--out", str(out)], bad)
    check_one_line(proc, words)
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("args,words", IMAGIC, ids=[f"imagic #{i}" for i in range(len(IMAGIC))])
def test_imagic_cli_bad_input(bad, tmp_path, args, words):
    base = ["--prompt", "a cup of tea", "--image", str(IMAGE), "--device", "cpu", "--out", str(tmp_path / "e.png")]
    proc = run("core.imagic", [*base, *args], bad)
    check_one_line(proc, words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module,args,word", [
    ("core.sinddm", ["train", "--steps", "0"], "argument --steps: must be at least 1"),
    ("core.sinddm", ["sample", "--model", "m.safetensors", "--seed", str(2**64)], "argument --seed"),
    ("core.imagic", ["--checkpoint", "c", "--image", "i", "--prompt", "p", "--size", "100"], "multiple of 8"),
    ("core.imagic", ["--checkpoint", "c", "--image", "i", "--prompt", "p", "--emb-lr", "x"], "argument --emb-lr"),
])
def test_bad_option_values_exit_2_through_argparse(module, args, word, tmp_path):
    proc = run(module, args, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert word in proc.stderr.splitlines()[-1]


# ------------------------------------------------------------------------ run_cli in-process
def test_run_cli_prints_known_errors_as_one_line(capsys):
    def main(argv):
        with cli.checking("--image", "give a PNG"):
            open("/nonexistent/x.png", "rb")

    with pytest.raises(SystemExit) as info:
        cli.run_cli(main, [])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: --image: /nonexistent/x.png: file not found. Fix: give a PNG\n"


@pytest.mark.parametrize("error", [RuntimeError("a bug in training"), ValueError("a bug after the checks"),
                                   OSError("a disk failure while writing")])
def test_run_cli_keeps_the_traceback_of_errors_once_the_work_started(error):
    """Only the checks made before the work (inside cli.checking) become one-liners."""
    def main(argv):
        with cli.checking("--image"):
            pass  # the checks pass
        raise error

    with pytest.raises(type(error), match=str(error)):
        cli.run_cli(main, [])


def test_seed_and_count_types():
    assert cli.seed("0") == 0 and cli.seed(str(2**64 - 1)) == 2**64 - 1
    for bad_value in ("-1", str(2**64)):
        with pytest.raises(Exception, match="between 0 and"):
            cli.seed(bad_value)
    with pytest.raises(Exception, match="at least 1"):
        cli.positive_int("0")
