"""A real CLIP tokenizer built offline from the BPE vocabulary shipped in `encoders/assets/`.

The vocabulary file is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT, redistributed by
open_clip; see `encoders/assets/CREDITS.md`). Rebuilding the 49408-token vocabulary from it gives
exactly the ids of `openai/clip-vit-large-patch14`'s tokenizer, so tiny test pipelines tokenize
prompts the way Stable Diffusion v1 does, with no Hub access.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the file
MODEL_MAX_LENGTH = 77


def _byte_alphabet() -> list[str]:
    """GPT-2's reversible byte -> printable unicode mapping, in byte-rank order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return [chr(c) for c in codepoints]


@lru_cache(maxsize=1)
def clip_vocab_and_merges(path: str | Path = BPE_VOCAB_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return CLIP's token -> id table and its ordered merge list."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    alphabet = _byte_alphabet()
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _write_vocab_files(out_dir: Path) -> None:
    vocab, merges = clip_vocab_and_merges()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )


def build_clip_tokenizer() -> CLIPTokenizer:
    """A `CLIPTokenizer` identical in ids to Stable Diffusion v1's, built from the shipped vocab.

    It goes through `vocab.json` + `merges.txt`, the files every transformers release reads.
    """
    with tempfile.TemporaryDirectory() as tmp:
        _write_vocab_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH)


def save_clip_tokenizer(out_dir: str | Path) -> None:
    """Save the tokenizer as a Hub `tokenizer/` folder (`save_pretrained` files + vocab/merges)."""
    out_dir = Path(out_dir)
    build_clip_tokenizer().save_pretrained(out_dir)
    _write_vocab_files(out_dir)
