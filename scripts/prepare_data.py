"""Tokenize a text file into train.bin / val.bin for training.

    python scripts/prepare_data.py --input=input.txt --tokenizer=char --out_dir=data/shakespeare_char
    python scripts/prepare_data.py --url=https://... --tokenizer=bpe --vocab_size=4096 --out_dir=data/x
    python scripts/prepare_data.py --out_dir=data/shakespeare_char   # Tiny Shakespeare, downloaded

With neither --input nor --url the text is Tiny Shakespeare from TINY_SHAKESPEARE_URL (what `make
data` and scripts/bench_cpu.sh prepare).

--out_dir must be new or empty; --overwrite replaces it whole once the new files are written. The
input must be UTF-8 text (a binary file is refused, naming the byte offset).
"""

import sys
import urllib.request
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanojax import cli, data  # noqa: E402
from nanojax.outdir import check_target  # noqa: E402
from nanojax.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer  # noqa: E402

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
CACHE = "input.txt"  # a downloaded --url text, kept in out_dir

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "A local UTF-8 text file.")
flags.DEFINE_string("url", None, "Download the text from here (cached as out_dir/input.txt); with neither "
                    "--input nor --url, Tiny Shakespeare.")
flags.DEFINE_enum("tokenizer", "char", ["char", "bpe", "file"], "char, byte-level BPE, or --tokenizer_file.")
flags.DEFINE_string("tokenizer_file", None, "An existing tokenizer.json (with --tokenizer=file).")
flags.DEFINE_integer("vocab_size", 4096, "BPE vocabulary size (> 256: the byte alphabet comes first).")
flags.DEFINE_float("val_fraction", 0.1, "Share of the text (from the end) held out for validation.")
flags.DEFINE_string("out_dir", "data/shakespeare_char", "Where train.bin, val.bin, meta.json go.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out_dir (it is refused otherwise).")


def read_text() -> str:
    if FLAGS.input:
        return data.read_text(FLAGS.input)
    cache = Path(FLAGS.out_dir) / CACHE
    if cache.exists():
        return data.read_text(cache)
    try:
        with urllib.request.urlopen(FLAGS.url, timeout=30) as r:
            raw = r.read()
    except OSError as e:
        raise app.UsageError(
            f"could not download {FLAGS.url}: {e}\nWithout network, download the file elsewhere "
            "and pass it with --input=path/to/input.txt (make quickstart SHAKESPEARE=path)."
        ) from e
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(raw)
    return data.read_text(cache)  # the same checks as a local file, naming the cached copy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    if FLAGS.input and FLAGS.url:
        raise app.UsageError("give one of --input=FILE or --url=URL, not both")
    if not FLAGS.input and not FLAGS.url:
        FLAGS.url = TINY_SHAKESPEARE_URL
    if FLAGS.tokenizer == "bpe" and FLAGS.vocab_size <= 256:
        raise app.UsageError(f"--vocab_size={FLAGS.vocab_size}: byte-level BPE starts from the 256 "
                             "byte tokens; use more than 256 (e.g. 4096)")
    if FLAGS.tokenizer == "file" and not FLAGS.tokenizer_file:
        raise app.UsageError("--tokenizer=file needs --tokenizer_file=path/to/tokenizer.json")
    out = Path(FLAGS.out_dir)
    src = Path(FLAGS.input) if FLAGS.input else out / CACHE
    # An input file directly in out_dir (the --url cache) is kept; deeper inside, it is refused.
    keep = (src.name,) if src.resolve().parent == out.resolve() else ()
    check_target(out, overwrite=FLAGS.overwrite, keep=keep, inputs=(src,))  # before any download
    text = read_text()
    if not text.strip():
        raise ValueError(f"{src} holds no text (only whitespace, or nothing); give a file with text in it")
    if FLAGS.tokenizer == "char":
        tok = CharTokenizer.from_text(text)
    elif FLAGS.tokenizer == "bpe":
        tok = HFTokenizer.train_bpe(text, FLAGS.vocab_size)
    else:
        tok = load_tokenizer(FLAGS.tokenizer_file)
    try:
        meta = data.prepare(text, tok, out, FLAGS.val_fraction, overwrite=FLAGS.overwrite, keep=keep)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from e  # name the file the text came from
    print(f"{FLAGS.out_dir}: vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens, "
          f"val {meta['val_tokens']:,} tokens ({meta['dtype']})")


if __name__ == "__main__":
    cli.run(main)
