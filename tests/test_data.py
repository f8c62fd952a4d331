"""Tokenizers, token files and deterministic batches."""

import json

import numpy as np
import pytest

from nanojax import data
from nanojax.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20


def test_char_tokenizer_round_trip_and_save(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    assert tok.vocab_size == len(set(TEXT))
    assert tok.decode(tok.encode(TEXT)) == TEXT
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.encode("hear me") == tok.encode("hear me")
    with pytest.raises(ValueError, match="not in this char tokenizer's vocabulary"):
        tok.encode("Zebra")


def test_bpe_tokenizer_trains_round_trips_and_loads(tmp_path):
    tok = HFTokenizer.train_bpe(TEXT, vocab_size=300)
    assert tok.vocab_size <= 300
    ids = tok.encode(TEXT[:200])
    assert len(ids) < 200  # merges learned: fewer tokens than bytes
    assert tok.decode(ids) == TEXT[:200]
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    assert load_tokenizer(tmp_path).encode("hear me speak") == tok.encode("hear me speak")


def test_prepare_writes_split_files_with_the_right_dtype(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    meta = data.prepare(TEXT, tok, tmp_path, val_fraction=0.1)
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert len(train) + len(val) == len(TEXT) and len(val) == len(TEXT) - int(len(TEXT) * 0.9)
    assert tok.decode(list(train)) + tok.decode(list(val)) == TEXT
    assert data.token_dtype(65536) == np.uint16 and data.token_dtype(65537) == np.uint32


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = data.get_batch(tokens, 8, 4, seed=1, step=5)
    x2, y2 = data.get_batch(tokens, 8, 4, seed=1, step=5)
    np.testing.assert_array_equal(x1, x2)
    assert x1.shape == (1, 4, 8) and x1.dtype == np.int32
    np.testing.assert_array_equal(y1, x1 + 1)  # targets are the next tokens
    x3, _ = data.get_batch(tokens, 8, 4, seed=1, step=6)
    assert not np.array_equal(x1, x3)
    # Two processes each get their half of the same global batch.
    full, _ = data.get_batch(tokens, 8, 4, seed=1, step=5, accum=2)
    halves = [data.get_batch(tokens, 8, 4, seed=1, step=5, accum=2, process_index=i, process_count=2)[0]
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), full)


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared data directory"):
        data.load_meta(tmp_path / "nope")
    tok = CharTokenizer.from_text(TEXT)
    data.prepare(TEXT, tok, tmp_path)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.load_split(tmp_path, "val", seq_len=10_000)
    with pytest.raises(ValueError, match="out of range for vocab_size=5"):
        data.load_split(tmp_path, "train", seq_len=8, vocab_size=5)
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="missing or empty"):
        data.load_split(tmp_path, "train", seq_len=8)
    with pytest.raises(ValueError, match="empty"):
        data.prepare("", tok, tmp_path / "x")
