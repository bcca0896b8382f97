"""run.py: the two set-up-and-run commands (demo, test), checked without installing anything."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT

LAUNCHER = ROOT / "run.py"


@pytest.fixture
def launcher(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sie_launcher", LAUNCHER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dry(*args, env=None, cwd=None):
    """Run ``python run.py --dry-run ...``; the printed commands, split."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SIE_TORCH")}
    e.update(env or {})
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--dry-run", *args], capture_output=True, text=True,
                          env=e, cwd=cwd or ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_fresh_machine_demo_creates_venv_installs_then_runs(tmp_path):
    venv = tmp_path / "venv"
    steps = dry("--venv", str(venv), "demo", "--steps", "10", cwd=tmp_path)
    py = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    assert shlex.split(steps[0]) == [sys.executable, "-m", "venv", str(venv)]
    assert shlex.split(steps[1]) == [py, "-m", "pip", "install", "--upgrade", "pip"]
    assert shlex.split(steps[2]) == [py, "-m", "pip", "install", "torch==2.14.1", "torchvision==0.29.1"]
    assert shlex.split(steps[3]) == [py, "-m", "pip", "install", "-r", str(ROOT / "requirements.txt"), "pytest>=7.4", "scikit-image>=0.22"]
    assert steps[4].startswith("(record the set-up in")
    assert shlex.split(steps[5]) == [py, "-m", "core.sinddm", "demo", "--steps", "10"]
    assert not venv.exists(), "a dry run must create nothing"


def test_test_command_passes_its_arguments_to_pytest(tmp_path):
    steps = dry("--venv", str(tmp_path / "v"), "test", "-k", "launcher", "-x")
    assert shlex.split(steps[-1])[1:] == ["-m", "pytest", "-k", "launcher", "-x"]


def test_torch_pair_and_index_are_overridable(tmp_path):
    steps = dry("--venv", str(tmp_path / "v"), "setup",
                env={"SIE_TORCH": "torch==2.5.1 torchvision==0.20.1",
                     "SIE_TORCH_INDEX": "https://download.pytorch.org/whl/cpu"})
    torch_step = [shlex.split(s) for s in steps if "torch==2.5.1" in s]
    assert torch_step and torch_step[0][-4:] == ["torch==2.5.1", "torchvision==0.20.1", "--index-url",
                                                  "https://download.pytorch.org/whl/cpu"]
    assert not any("2.14.1" in s for s in steps)
    assert steps[-1].startswith("(record the set-up")  # setup runs nothing after it


def test_empty_torch_spec_installs_no_torch(tmp_path):
    steps = [shlex.split(s) for s in dry("--venv", str(tmp_path / "v"), "setup", env={"SIE_TORCH": ""})]
    installs = [s[4:] for s in steps if s[1:4] == ["-m", "pip", "install"]]
    assert installs == [["--upgrade", "pip"], ["-r", str(ROOT / "requirements.txt"), "pytest>=7.4", "scikit-image>=0.22"]]


def test_second_run_skips_the_set_up_until_it_changes(launcher, tmp_path):
    venv = tmp_path / "v"
    py = launcher.venv_python(venv)
    py.parent.mkdir(parents=True)
    py.write_text("")
    env = {}
    (venv / launcher.STAMP).write_text(launcher.setup_key(env) + "\n")
    assert launcher.plan("demo", [], venv, env) == [[str(py), "-m", "core.sinddm", "demo"]]
    # another torch pair: set up again (no new venv)
    steps = launcher.plan("test", [], venv, {"SIE_TORCH": "torch torchvision"})
    assert [s[:1] for s in steps][0] == [str(py)] and any(s[-2:] == ["torch", "torchvision"] for s in steps)
    assert steps[-1] == [str(py), "-m", "pytest"]


def test_default_torch_pair_matches_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    pair = re.search(r"pip install --quiet (torch==\S+ torchvision==\S+)", ci).group(1)
    src = LAUNCHER.read_text()
    assert f'DEFAULT_TORCH = "{pair}"' in src


def test_launcher_uses_only_the_standard_library():
    tree = ast.parse(LAUNCHER.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)
