"""The CLIP BPE tokenizer of Stable Diffusion 1.x, offline.

SD 1.x encodes prompts with OpenAI CLIP's byte-level BPE (the tokenizer of
``openai/clip-vit-large-patch14``): 49,408 tokens, <|startoftext|> = 49406,
<|endoftext|> = 49407, 77 positions, padded with <|endoftext|>.  The pack ships its
vocabulary as ``vocab.json`` / ``merges.txt`` in ``configs/sd15/tokenizer``.  Those two
files are derived from the BPE merge list that open_clip distributes
(``bpe_simple_vocab_16e6.txt.gz``) by :func:`clip_vocab_from_bpe`; run

    python -m core.sd.tokenizer --write core/sd/configs/sd15/tokenizer

to regenerate them (the tests check that the shipped files equal the derivation).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import torch

SHIPPED_DIR = Path(__file__).resolve().parent / "configs" / "sd15" / "tokenizer"
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI's list keeps the first 49152 - 256 - 2 merges of the file (after its header line).
N_MERGES = 49152 - 256 - 2


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2's mapping).

    Printable Latin-1 bytes stand for themselves; the 68 others get the code points
    256, 257, ... in byte order.  Listed in CLIP's vocabulary order: the printable
    bytes first, then the remapped ones.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]


def clip_vocab_from_bpe(bpe_gz: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """Derive CLIP's token -> id table and merge list from the BPE merge file.

    Ids: the 256 byte symbols, the same 256 with the end-of-word marker "</w>", one id
    per merge in file order, then <|startoftext|> and <|endoftext|>.
    """
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : N_MERGES + 1]
    symbols = byte_alphabet()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer_files(bpe_gz: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json (what a CLIPTokenizer reads) into out_dir."""
    vocab, merges = clip_vocab_from_bpe(bpe_gz)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_clip_tokenizer(path: str | os.PathLike | None = None, pad_token: str | None = None):
    """A transformers CLIPTokenizer from a local folder (default: the shipped SD 1.x files).

    ``pad_token="!"`` (id 0) gives SDXL's second tokenizer (OpenCLIP ViT-bigG's), which pads
    with 0 instead of <|endoftext|>; the vocabulary and merges are the same."""
    from transformers import CLIPTokenizer

    path = Path(path) if path is not None else SHIPPED_DIR
    if not (path / "vocab.json").is_file() or not (path / "merges.txt").is_file():
        raise FileNotFoundError(f"tokenizer folder {path} has no vocab.json/merges.txt")
    extra = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True, **extra)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids [B, 77]: BOS, the prompt's tokens (truncated), EOS, then EOS padding."""
    if isinstance(prompts, str):
        prompts = [prompts]
    enc = tokenizer(
        list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    return enc["input_ids"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Regenerate the shipped CLIP tokenizer files from open_clip's BPE list.")
    ap.add_argument("--write", default=str(SHIPPED_DIR), help="output folder")
    ap.add_argument("--bpe", default=None, help="bpe_simple_vocab_16e6.txt.gz (default: the one open_clip ships)")
    a = ap.parse_args(argv)
    bpe = a.bpe
    if bpe is None:
        from open_clip.tokenizer import default_bpe

        bpe = default_bpe()
    write_tokenizer_files(bpe, a.write)
    print(f"wrote {a.write}/vocab.json and merges.txt")


if __name__ == "__main__":
    main()
