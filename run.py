"""Set up and run, from nothing but Python 3.10+ (standard library only).

    python3 run.py demo [DEMO OPTIONS]     # SinDDM on the bundled image (python -m core.sinddm demo ...)
    python3 run.py test [PYTEST OPTIONS]   # the test suite (python -m pytest ...)
    python3 run.py setup                   # only the set-up
    python3 run.py --dry-run demo          # print the commands, run nothing

The first run creates a virtual environment in ``.venv`` (``--venv`` for another folder),
installs torch and torchvision, the pack's requirements, pytest and scikit-image into it, and remembers
what it installed (``.venv/.sie-setup``); later runs skip the set-up until that changes.

torch/torchvision: any matching pair works.  The default is the pair CI uses,
``torch==2.14.1 torchvision==0.29.1``; set ``SIE_TORCH`` to other pip requirements (e.g.
``SIE_TORCH="torch torchvision"`` for the newest pair, or the pair your CUDA driver needs) and
``SIE_TORCH_INDEX`` to a package index for them (e.g.
``https://download.pytorch.org/whl/cpu`` for the CPU-only build, a much smaller download);
``SIE_TORCH=""`` installs none (a ``--venv`` that already has torch).  Options of run.py
itself (``--dry-run``, ``--venv``) go before the command; everything after it is passed on.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_TORCH = "torch==2.14.1 torchvision==0.29.1"
STAMP = ".sie-setup"
COMMANDS = {
    "demo": ["-m", "core.sinddm", "demo"],
    "test": ["-m", "pytest"],
    "setup": None,
}


def venv_python(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def torch_spec(env=os.environ) -> list[str]:
    return shlex.split(env.get("SIE_TORCH", DEFAULT_TORCH))


def setup_key(env=os.environ) -> str:
    """What the set-up installed: the torch spec, its index and the requirements file."""
    h = hashlib.sha256()
    h.update(" ".join(torch_spec(env)).encode())
    h.update(env.get("SIE_TORCH_INDEX", "").encode())
    h.update((ROOT / "requirements.txt").read_bytes())
    return h.hexdigest()


def plan(command: str, args: list[str], venv: Path, env=os.environ) -> list[list[str]]:
    """The commands to run, in order (set-up steps only where they are needed)."""
    py = venv_python(venv)
    steps: list[list[str]] = []
    if not py.exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
    stamp = venv / STAMP
    fresh = stamp.is_file() and stamp.read_text().strip() == setup_key(env)
    if not fresh:
        pip = [str(py), "-m", "pip", "install"]
        steps.append([*pip, "--upgrade", "pip"])
        index = env.get("SIE_TORCH_INDEX")
        torch = torch_spec(env)
        if torch:
            steps.append([*pip, *torch, *(["--index-url", index] if index else [])])
        steps.append([*pip, "-r", str(ROOT / "requirements.txt"), "pytest>=7.4", "scikit-image>=0.22"])
        steps.append(["stamp", str(stamp)])
    if COMMANDS[command] is not None:
        steps.append([str(py), *COMMANDS[command], *args])
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the commands it would run, and run none")
    ap.add_argument("--venv", default=str(ROOT / ".venv"), help="the virtual environment (default: .venv here)")
    ap.add_argument("command", choices=sorted(COMMANDS))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the demo or to pytest")
    a = ap.parse_args(argv)
    if sys.version_info < (3, 10):
        print(f"Python 3.10 or newer is needed (this is {sys.version.split()[0]})", file=sys.stderr)
        return 2
    venv = Path(a.venv).resolve()
    for step in plan(a.command, a.args, venv):
        if step[0] == "stamp":
            print(f"+ (record the set-up in {step[1]})", flush=True)
            if not a.dry_run:
                Path(step[1]).write_text(setup_key() + "\n")
            continue
        print("+ " + shlex.join(step), flush=True)
        if a.dry_run:
            continue
        rc = subprocess.call(step, cwd=ROOT)
        if rc != 0:
            if "install" in step[:4]:
                print(f"set-up failed (exit {rc}): see pip's message above. To pick another torch pair set "
                      f"SIE_TORCH (now {' '.join(torch_spec()) or 'empty'}), e.g. SIE_TORCH='torch torchvision'",
                      file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
