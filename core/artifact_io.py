"""The pack's trained files: atomic writes, and one reader that checks the format tag.

Every file the pack trains (an Imagic edit, a SinDDM model) is a safetensors file whose
header metadata carries ``format`` (e.g. ``sie.sinddm``) and ``version``.
:func:`read_artifact` refuses anything else with an :class:`ArtifactError` that names the
file and says what it is instead (missing, not safetensors, truncated, a plain LoRA, a
model of the other method, a newer version).  Writes go to a temporary file in the
target folder, then are renamed over the target: a cancelled or crashed save never
leaves a partial file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

# Format tags written by the pack, and how a message names them.
FORMAT_NAMES = {
    "sie.trained": "an Imagic edit (Save Trained)",
    "sie.sinddm": "a SinDDM model",
    "sie.sine": "a SINE fine-tune",
    "sie.layerdiffusion": "a LayerDiffusion edit",
    "sie.rectifier": "a High-Fidelity rectifier",
}


class ArtifactError(ValueError):
    """A file that is not the trained file it was given as; the message names the file and what it is."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path.name}: {problem}")


def describe_format(tag: str) -> str:
    return FORMAT_NAMES.get(tag, f"a file of format {tag!r}")


def _temp_beside(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def _publish(tmp: str, path: Path) -> None:
    os.chmod(tmp, 0o644)  # mkstemp files are private; an output is not
    os.replace(tmp, path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """Write to a temporary file in the target folder, then rename it over ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: the pack saves .safetensors files only")
    tmp = _temp_beside(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def image_format(path: str | os.PathLike) -> str:
    """The PIL format name for ``path``'s extension (PNG for .png); ValueError for an unknown one."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{Path(path).name}: cannot write images of type '{suffix or '(no extension)'}'; "
                         "use a .png (or .jpg, .webp) file name")
    return fmt


def atomic_write_image(image, path: str | os.PathLike) -> Path:
    """Save a PIL image to ``path`` (format from the extension) through a temporary file and a rename."""
    path = Path(path)
    fmt = image_format(path)
    tmp = _temp_beside(path)
    try:
        image.save(tmp, format=fmt)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_artifact(path: str | os.PathLike, expected_format: str,
                  supported_version: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a trained file tagged ``expected_format``, of at most ``supported_version``.

    Raises :class:`ArtifactError` (a ValueError) naming the file for a missing file, a file
    that is not safetensors or is cut short or damaged, a missing or different ``format``
    tag, and a version newer than this code reads.  The header is checked before any
    tensor is read (and nothing is ever unpickled).
    """
    from safetensors import SafetensorError, safe_open

    from .sd.checkpoint import FAMILY_NAMES, CheckpointError, inspect_checkpoint

    p = Path(path)
    expected = describe_format(expected_format)
    if not p.exists():
        raise ArtifactError(p, f"file not found ({p})")
    if not p.is_file():
        raise ArtifactError(p, f"is a folder, not {expected} file")
    try:
        info = inspect_checkpoint(p)  # header only: pickles, non-safetensors and truncated files stop here
    except CheckpointError as e:
        what = sniff_file(p)
        raise ArtifactError(p, f"{what}, not {expected} file" if what else _without_name(str(e), p)) from None
    except OSError as e:  # unreadable: permissions, a disk error
        raise ArtifactError(p, f"cannot be read ({e.strerror or e})") from None
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # JSON that is not a safetensors header
        raise ArtifactError(p, f"not a valid safetensors file (damaged header: {e!r})") from None
    meta = dict(info.metadata)
    tag = meta.get("format")
    if tag not in FORMAT_NAMES:  # none, or another tool's (Hugging Face files carry format "pt")
        what = "a safetensors file" if info.family == "unknown" else FAMILY_NAMES[info.family]
        mark = "no 'format' tag" if tag is None else f"format tag {tag!r}"
        raise ArtifactError(p, f"this is {what} with {mark}, not {expected} saved by this pack")
    if tag != expected_format:
        raise ArtifactError(p, f"this is {describe_format(tag)}, not {expected}")
    version = meta.get("version", "1")
    try:
        number = int(version)
    except ValueError:
        raise ArtifactError(p, f"{expected} with a damaged 'version' tag ({version!r})") from None
    if number > supported_version:
        raise ArtifactError(p, f"{expected} of format version {number}, written by a newer version of the pack "
                               f"(this one reads up to version {supported_version}); update the pack")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(p, f"a damaged safetensors file ({e})") from None
    return tensors, meta


def _without_name(message: str, path: Path) -> str:
    """A CheckpointError message minus its leading '<name>: ' (ArtifactError adds the name itself)."""
    prefix = f"{path.name}: "
    return message[len(prefix):] if message.startswith(prefix) else message


_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"RIFF", "a RIFF (WebP/WAV) file"), (b"PK", "a zip or PyTorch .pt/.ckpt file"))


def sniff_file(path: str | os.PathLike) -> str | None:
    """What a file that is not safetensors looks like, when that is easy to tell (for the message)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if not head:
        return "an empty file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head[:1] in (b"{", b"["):
        return None  # maybe a damaged safetensors header: keep the header check's account
    text = head.decode("utf-8", errors="replace")
    if len(head) == 512:
        text = text[:-4]  # a multi-byte character may be cut at the end of the sample
    if all(c.isprintable() or c in "\r\n\t" for c in text) and "\ufffd" not in text:
        return "a text file"
    return None
