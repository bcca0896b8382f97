"""How the pack's command lines answer bad input: one line ``error: ...`` on stderr, exit status 2.

``python -m core.sinddm`` and ``python -m core.imagic`` run their ``main`` through
:func:`run_cli`.  Before any work starts, a command checks its arguments and files
inside :func:`checking`, which turns the errors that bad input causes (a missing or
unreadable file, an image PIL cannot read, a bad value) into a :class:`CLIError` naming
the argument and the fix.  :func:`run_cli` prints those, and the pack's own file errors
(:class:`~core.artifact_io.ArtifactError`, :class:`~core.sd.checkpoint.CheckpointError`),
as one line.  Anything else raised once the work has started is a bug or a real failure
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .artifact_io import FORMAT_NAMES, ArtifactError, describe_format, image_format, sniff_file
from .checkpoint import Plan, ResumeError
from .sd.checkpoint import CheckpointError
from .seeds import SEED_MAX

USAGE_ERROR = 2  # argparse's exit status for bad arguments; the commands use it for every bad input


class CLIError(Exception):
    """Bad input to a command line; the message names the argument (or file) and the fix."""

    def __init__(self, arg: str, problem: str, fix: str = ""):
        self.arg = arg
        msg = f"{arg}: {problem}" if arg else problem
        if fix:
            msg = f"{msg.rstrip().rstrip('.')}. Fix: {fix}"
        super().__init__(" ".join(msg.split()))  # one line


KNOWN_ERRORS = (CLIError, ArtifactError, CheckpointError, ResumeError)


def describe(error: BaseException) -> str:
    """A short account of an input error (an OSError without its errno noise)."""
    if isinstance(error, FileNotFoundError):
        return f"{error.filename or error}: file not found"
    if isinstance(error, IsADirectoryError):
        return f"{error.filename or error}: is a folder, not a file"
    if isinstance(error, PermissionError):
        return f"{error.filename or error}: permission denied"
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


@contextmanager
def checking(arg: str, fix: str = "", errors: tuple[type[BaseException], ...] = (OSError, ValueError)) -> Iterator[None]:
    """Inside, ``errors`` (default: OSError, including PIL's UnidentifiedImageError, and ValueError)
    mean bad input for ``arg`` and become a :class:`CLIError`.  Use it only for checks made
    before the work starts, so that a failure during the work keeps its traceback."""
    try:
        yield
    except CLIError:
        raise
    except errors as e:
        raise CLIError(arg, describe(e), fix) from None


def open_image(path: str | Path, arg: str = "--image"):
    """The image at ``path`` as an RGB PIL image, fully decoded (so a truncated file fails here)."""
    from PIL import Image, UnidentifiedImageError

    fix = "give a PNG or JPEG image"
    p = Path(path)
    if not p.exists():
        raise CLIError(arg, f"{path}: file not found", fix)
    if not p.is_file():
        raise CLIError(arg, f"{path}: is a folder, not an image file", fix)
    try:
        with Image.open(p) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise CLIError(arg, f"{path}: not an image file (PIL cannot identify it)", fix) from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated/damaged image data (PNG chunks raise SyntaxError)
        raise CLIError(arg, f"{path}: a damaged image file ({describe(e)})", fix) from None


def check_image_output(path: str | Path, arg: str = "--out") -> Path:
    """An output image path whose extension PIL can write; its folder is created."""
    p = Path(path)
    with checking(arg):  # the message says which extensions work
        image_format(p)
    make_folder(p.parent, arg)
    return p


def make_folder(path: str | Path, arg: str = "--out") -> Path:
    p = Path(path)
    with checking(arg, "give a folder that can be created and written"):
        p.mkdir(parents=True, exist_ok=True)
    return p


def device(name: str | None, arg: str = "--device"):
    """The torch device to run on (default: CUDA when available), checked before any work starts."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(arg, f"'{name}' is not a device name", "use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(arg, f"{name}: this machine has no CUDA GPU (or torch was built without CUDA)",
                       "use --device cpu")
    return dev


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The training checkpoint flags every training command line takes (see :func:`checkpoint_plan`)."""
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="write the training state every N steps and at the end (0: only when interrupted); "
                        "an interrupted run always leaves its last completed step")
    p.add_argument("--checkpoint-dir", default=None,
                   help="folder of the training checkpoints (default: <--out without extension>_checkpoints)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=3, help="checkpoints kept per training stage")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="FILE",
                   help="continue from a checkpoint: FILE, or (no FILE) each stage's newest one in "
                        "--checkpoint-dir; the same settings are required and a file of another run is refused")


def checkpoint_plan(a: argparse.Namespace, out: str | Path) -> Plan:
    """The :class:`core.checkpoint.Plan` of the flags of :func:`add_checkpoint_args` (``out``: the command's
    output file or folder, beside which the checkpoints go by default)."""
    out = Path(out)
    folder = Path(a.checkpoint_dir) if a.checkpoint_dir else out.with_name(out.stem + "_checkpoints")
    if folder.exists() and not folder.is_dir():
        raise CLIError("--checkpoint-dir", f"{folder} is a file", "give a folder (it is made when the first "
                                                                  "checkpoint is written)")
    resume = None
    if a.resume not in (None, "latest"):
        resume = Path(a.resume)
        if not resume.is_file():
            raise CLIError("--resume", f"{a.resume}: file not found", "give a checkpoint file, or --resume alone "
                                                                      "for the newest one in --checkpoint-dir")
    return Plan(folder, a.checkpoint_every, a.keep_checkpoints, resume, resume_latest=a.resume == "latest")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed in 0 .. 2**64 - 1 (ComfyUI's and torch's range)."""
    value = int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be between 0 and {SEED_MAX}, got {value}")
    return value


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; bad input ends in one ``error: ...`` line on stderr and exit status 2."""
    try:
        main(argv)
    except KNOWN_ERRORS as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


CHECKPOINT_FIX = ("give an SD 1.x or SDXL checkpoint (e.g. v1-5-pruned-emaonly.safetensors, sd_xl_base_1.0.safetensors) "
                  "or a diffusers SD 1.x / SDXL folder")


def check_checkpoint(path: str, config_dir: str | None) -> None:
    """Header-only check of --checkpoint (and the configs of --config-dir) before anything is loaded."""
    from .sd.checkpoint import inspect_checkpoint, require_supported
    from .sd.loader import CONFIG_DIR, XL_CONFIG_DIR, read_config

    p = Path(path)
    if not p.exists():
        raise CLIError("--checkpoint", f"{path}: file not found", CHECKPOINT_FIX)
    if p.is_dir():
        return  # a diffusers folder: its loader names what is missing
    try:
        info = inspect_checkpoint(p)
    except CheckpointError as e:
        what = sniff_file(p)  # a text file or an image says so, instead of "header length 8675467939940627818"
        raise CLIError("--checkpoint", f"{p.name}: {what}, not a checkpoint" if what else str(e),
                       CHECKPOINT_FIX) from None
    tag = info.metadata.get("format")
    if tag in FORMAT_NAMES:  # one of the pack's own trained files (a SinDDM model, an Imagic edit)
        raise CLIError("--checkpoint", f"{p.name}: this is {describe_format(tag)}, not a checkpoint",
                       CHECKPOINT_FIX)
    xl = info.family == "sdxl"
    with checking("--config-dir", "give a folder with unet/, vae/, text_encoder/ (SDXL: also text_encoder_2/) "
                                  "config.json files"):
        root = Path(config_dir) if config_dir else (XL_CONFIG_DIR if xl else CONFIG_DIR)
        configs = {c: read_config(c, root) for c in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if xl else ())}
    with checking("--checkpoint"):  # the message names what the file is and what the pack needs
        require_supported(info, context_dim=configs["unet"]["cross_attention_dim"])
