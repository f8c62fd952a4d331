"""Token files on disk and deterministic batches.

A prepared data directory holds `train.bin` and `val.bin` (flat token ids, uint16 when the vocab
fits in 16 bits, else uint32), `meta.json`, and the tokenizer file. The batch at step `s` is a
pure function of (seed, step): resuming a run replays nothing and skips nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nanojax.tokenizer import Tokenizer

META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def prepare(text: str, tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.1) -> dict:
    """Tokenizes `text`, splits the first (1 - val_fraction) into train and the rest into val,
    and writes train.bin, val.bin, meta.json and the tokenizer to out_dir."""
    if not text:
        raise ValueError("the input text is empty; give a file with some text in it.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    dtype = token_dtype(tokenizer.vocab_size)
    n = len(ids)
    split = int(n * (1.0 - val_fraction))
    for name, part in (("train", ids[:split]), ("val", ids[split:])):
        part.astype(dtype).tofile(out / f"{name}.bin")
    tokenizer.save(out)
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "tokenizer": tokenizer.kind,
        "train_tokens": split,
        "val_tokens": n - split,
    }
    (out / META).write_text(json.dumps(meta, indent=2))
    return meta


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a prepared data directory. Run "
            f"`python scripts/prepare_data.py --input=FILE --out_dir={data_dir}` first."
        )
    return json.loads(path.read_text())


def load_split(data_dir: str | Path, split: str, seq_len: int, vocab_size: int | None = None) -> np.ndarray:
    """Memory-maps one split's tokens and checks it can serve (seq_len + 1)-token windows.

    vocab_size: when given, every id is checked to be < vocab_size (one pass over the file).
    """
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists() or path.stat().st_size == 0:
        raise ValueError(f"{path} is missing or empty; re-run scripts/prepare_data.py for {data_dir}.")
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{path} holds {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: the corpus "
            "is too short for this context. Use more text, or a smaller --config.model.max_seq_len."
        )
    if vocab_size is not None:
        top = int(tokens.max())
        if top >= vocab_size:
            raise ValueError(
                f"{path} holds token id {top}, out of range for vocab_size={vocab_size}. The data "
                "was prepared with another tokenizer; re-prepare it, or set model.vocab_size > "
                f"{top}."
            )
    return tokens


def batch_indices(n_tokens: int, seq_len: int, seed: int, step: int, count: int) -> np.ndarray:
    """`count` window starts in [0, n_tokens - seq_len - 1], a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=count)


def get_batch(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    step: int,
    accum: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets, int32 (accum, batch_size, seq_len) for step `step`.

    The global batch is the same for any number of processes; each process returns only its
    contiguous share of the batch_size rows (batch_size must divide evenly).
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    starts = batch_indices(len(tokens), seq_len, seed, step, accum * batch_size)
    starts = starts.reshape(accum, batch_size)
    per = batch_size // process_count
    starts = starts[:, process_index * per:(process_index + 1) * per]
    offsets = np.arange(seq_len + 1)
    windows = np.asarray(tokens[starts[..., None] + offsets], dtype=np.int32)  # (A, b, T+1)
    return windows[..., :-1], windows[..., 1:]
