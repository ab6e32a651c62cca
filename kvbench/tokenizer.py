"""Text in and out: bytes for byte-level models, a checkpoint's own tokenizer, or plain ids.

Each tokenizer streams: `decoder()` returns a function fed one token id at a time that returns the text
that token completes (a UTF-8 character may span several byte tokens, a BPE token may end mid-word).
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Callable

from kvbench.config import LoadedConfig
from kvbench.errors import KVBenchError


class ByteTokenizer:
    """One token per UTF-8 byte: any model whose vocabulary is exactly the 256 byte values."""

    name = "bytes (UTF-8)"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def decoder(self) -> Callable[[int], str]:
        incremental = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: incremental.decode(bytes([token]))

    def label(self, token: int) -> str:
        """A short printable form of one token, for plot axes."""
        char = chr(token) if token < 128 else f"\\x{token:02x}"
        return {"\n": "\\n", "\t": "\\t", " ": "␣"}.get(char, char if char.isprintable() else f"\\x{token:02x}")


class FileTokenizer:
    """A checkpoint directory's tokenizer.json (as transformers saves it), read by the `tokenizers` package."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the package raises a bare Exception on a malformed file
            raise KVBenchError(f"{path}: not a readable tokenizer.json ({exc})") from None
        self.name = f"{path.name} ({self.tokenizer.get_vocab_size()} tokens)"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def decoder(self) -> Callable[[int], str]:
        ids: list[int] = []
        shown = [""]

        def feed(token: int) -> str:
            # decode the whole sequence and emit what is new: merges and byte fallback stay correct
            ids.append(token)
            text = self.decode(ids)
            new, shown[0] = text[len(shown[0]):], text
            return new

        return feed

    def label(self, token: int) -> str:
        return self.decode([token]).replace("\n", "\\n") or f"<{token}>"


Tokenizer = ByteTokenizer | FileTokenizer


def tokenizer_for(loaded: LoadedConfig) -> Tokenizer | None:
    """The checkpoint's tokenizer.json if it has one, bytes for a 256-token vocabulary, else None (ids only)."""
    tokenizer_file = loaded.source / "tokenizer.json" if loaded.source.is_dir() else None
    if tokenizer_file is not None and tokenizer_file.is_file():
        return FileTokenizer(tokenizer_file)
    if loaded.model.vocab_size == 256:
        return ByteTokenizer()
    return None


def parse_ids(text: str, vocab: int) -> list[int]:
    parts = text.split(",")
    empty = [n for n, part in enumerate(parts, 1) if not part.strip()]
    if empty and text.strip():  # `1,,2` is a typo, not the prompt 1,2
        raise KVBenchError(f"--prompt-ids {text!r}: item {empty[0]} is empty; give comma-separated integers, "
                           "e.g. --prompt-ids 1,2,3")
    try:
        ids = [int(part) for part in parts if part.strip()]
    except ValueError:
        raise KVBenchError(f"--prompt-ids {text!r}: give comma-separated integers, e.g. --prompt-ids 1,2,3") from None
    if not ids:
        raise KVBenchError(f"--prompt-ids {text!r}: give at least one id, e.g. --prompt-ids 1,2,3")
    outside = next((i for i in ids if not 0 <= i < vocab), None)
    if outside is not None:
        raise KVBenchError(f"--prompt-ids: id {outside} is outside the vocabulary; each id must be in 0..{vocab - 1}")
    return ids
