"""Token files on disk and deterministic batches.

A prepared data directory holds `train.bin` and `val.bin` (flat token ids, uint16 when the vocab
fits in 16 bits, else uint32), `meta.json`, and the tokenizer file. The batch at step `s` is a
pure function of (seed, step): resuming a run replays nothing and skips nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nanojax.outdir import replace_dir
from nanojax.tokenizer import Tokenizer

META = "meta.json"
MIN_TOKENS = 100  # fewer cannot give both a train and a val split anything to hold


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file, refusing (with the byte offset) what is not UTF-8 text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file.")
    raw = path.read_bytes()
    fix = "Give a plain UTF-8 text file (convert with e.g. `iconv -t UTF-8`)."
    try:
        text, bad = raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        text, bad = "", e
    nul = raw.find(b"\0")  # valid UTF-8, but no text file holds one: binary, or UTF-16
    if nul >= 0 and (bad is None or nul < bad.start):
        raise ValueError(f"{path} holds a NUL byte at offset {nul}: it is binary (or UTF-16) data, "
                         f"not UTF-8 text. {fix}")
    if bad is not None:
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{raw[bad.start]:02x} at offset {bad.start} "
                         f"is {bad.reason}. {fix}")
    return text


def prepare(text: str, tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.1, *,
            overwrite: bool = False, keep: tuple[str, ...] = (), min_tokens: int = MIN_TOKENS) -> dict:
    """Tokenizes `text`, splits the first (1 - val_fraction) into train and the rest into val,
    and writes train.bin, val.bin, meta.json and the tokenizer to out_dir.

    out_dir must be absent or empty unless `overwrite`; then it is replaced whole once the new
    files are written (nanojax.outdir). keep: names of input files in out_dir (a downloaded
    input.txt) that are neither refused nor removed. Text of fewer than `min_tokens` tokens, or
    with a vocabulary of one token, is refused: nothing can be learnt from it.
    """
    if not text:
        raise ValueError("the input text is empty; give a file with some text in it.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if tokenizer.vocab_size < 2:
        raise ValueError(
            f"the text gives a vocabulary of {tokenizer.vocab_size} token ({tokenizer.kind} "
            f"tokenizer; the text repeats {text[:1]!r}): there is nothing to predict. Give real text.")
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    n = len(ids)
    split = int(n * (1.0 - val_fraction))
    if n < min_tokens:
        raise ValueError(
            f"the text is only {n} tokens long; at least {min_tokens} are needed for a train and a "
            "val split. Give a longer text.")
    if split < 2 or n - split < 2:
        raise ValueError(
            f"val_fraction={val_fraction} splits {n} tokens into {split} train and {n - split} val; "
            "each needs at least 2. Choose a val_fraction nearer 0.1, or give a longer text.")
    dtype = token_dtype(tokenizer.vocab_size)
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "tokenizer": tokenizer.kind,
        "train_tokens": split,
        "val_tokens": n - split,
    }
    with replace_dir(out_dir, overwrite=overwrite, keep=keep) as out:
        for name, part in (("train", ids[:split]), ("val", ids[split:])):
            part.astype(dtype).tofile(out / f"{name}.bin")
        tokenizer.save(out)
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


def full_split_batches(tokens: np.ndarray, seq_len: int, batch_size: int, process_index: int = 0,
                       process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every next-token prediction of a split exactly once, in batches of windows.

    Yields inputs x (int32), targets y (int32) and weights w (float32, 1 or 0), each
    (batch_size / process_count, seq_len): this process's contiguous share of the rows, as in
    get_batch. Window r takes inputs tokens[r*T : (r+1)*T] and the targets shifted by one, so each
    of the n - 1 targets tokens[1:] is predicted once, from 1 to T tokens of context. Where the
    split runs out, the last window is padded with token 0 at weight 0 and whole rows of weight 0
    fill the last batch (and any process's share past the end): every batch has one shape, so one
    compiled function serves them all. Over all batches and processes the weights sum to n - 1.
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    T, n = seq_len, len(tokens)
    n_windows = -(-(n - 1) // T)  # ceil: the last window may be partial
    per = batch_size // process_count
    for first in range(0, n_windows, batch_size):
        start = (first + process_index * per) * T  # this share's first input token
        flat = np.zeros(per * T + 1, np.int32)  # (per * T + 1,): inputs and targets overlap by all but one
        part = np.asarray(tokens[start:start + per * T + 1], dtype=np.int32)  # short (or empty) at the end
        flat[:len(part)] = part
        w = (start + np.arange(per * T) < n - 1).astype(np.float32)  # target index start + j + 1 <= n - 1
        yield flat[:-1].reshape(per, T), flat[1:].reshape(per, T), w.reshape(per, T)


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
