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

from .artifact_io import ArtifactError, image_format
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


KNOWN_ERRORS = (CLIError, ArtifactError, CheckpointError)


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
