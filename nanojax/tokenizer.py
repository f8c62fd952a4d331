"""Tokenizers: characters, byte-level BPE trained with HF `tokenizers`, or any HF tokenizer.json.

All share one small interface: `encode(str) -> list[int]`, `decode(list[int]) -> str`,
`vocab_size`, `save(dir)`; `load_tokenizer(dir)` reads back whichever a directory holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanojax.outdir import write_atomic

CHAR_FILE = "tokenizer_char.json"
HF_FILE = "tokenizer.json"


class CharTokenizer:
    """One id per distinct character of the training text, in sorted order (nanoGPT's char)."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self._stoi})
        if unknown:
            raise ValueError(
                f"characters {unknown!r} are not in this char tokenizer's vocabulary "
                f"({self.vocab_size} characters from the training text); use only those characters."
            )
        return [self._stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CHAR_FILE
        write_atomic(path, json.dumps({"type": "char", "chars": self.chars}))  # resume rewrites it
        return path


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (byte-level BPE, or whatever a tokenizer.json holds)."""

    kind = "hf"

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception naming no file
            raise ValueError(f"{path} is not a valid tokenizer.json ({e}); re-save it with "
                             "transformers or `tokenizers`, or point at another file.") from None

    @classmethod
    def train_bpe(cls, text: str, vocab_size: int) -> HFTokenizer:
        """Byte-level BPE (GPT-2's scheme) learned from `text`; one special `<|endoftext|>`."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<|endoftext|>"],
            show_progress=False,
        )
        lines = text.splitlines(keepends=True)
        chunks = ["".join(lines[i:i + 1000]) for i in range(0, len(lines), 1000)]
        tok.train_from_iterator(chunks, trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / HF_FILE
        write_atomic(path, self.tok.to_str())  # whole or not at all: a resume rewrites it
        return path


Tokenizer = CharTokenizer | HFTokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a tokenizer from a directory (tokenizer_char.json or tokenizer.json) or a file."""
    path = Path(path)
    if path.is_file():
        if path.name == CHAR_FILE:
            try:
                chars = json.loads(path.read_text(encoding="utf-8"))["chars"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path} is not a nanojax char tokenizer file ({type(e).__name__}: "
                                 f"{e}); expected {{\"type\": \"char\", \"chars\": \"...\"}}. "
                                 "Re-run scripts/prepare_data.py.") from None
            if not isinstance(chars, str):
                raise ValueError(f"{path}: \"chars\" must be a string, got {type(chars).__name__}.")
            return CharTokenizer(chars)
        return HFTokenizer.from_file(path)
    if (path / CHAR_FILE).exists():
        return load_tokenizer(path / CHAR_FILE)
    if (path / HF_FILE).exists():
        return HFTokenizer.from_file(path / HF_FILE)
    raise FileNotFoundError(
        f"no tokenizer in {path}: expected {CHAR_FILE} or {HF_FILE}. "
        "Prepare data with scripts/prepare_data.py, or point at an HF model directory."
    )
