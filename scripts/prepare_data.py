"""Tokenize a text file into train.bin / val.bin for training.

    python scripts/prepare_data.py --input=input.txt --tokenizer=char --out_dir=data/shakespeare_char
    python scripts/prepare_data.py --url=https://... --tokenizer=bpe --vocab_size=4096 --out_dir=data/x
"""

import sys
import urllib.request
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanojax import data  # noqa: E402
from nanojax.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer  # noqa: E402

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "A local text file.")
flags.DEFINE_string("url", None, "Download the text from here (cached as out_dir/input.txt).")
flags.DEFINE_enum("tokenizer", "char", ["char", "bpe", "file"], "char, byte-level BPE, or --tokenizer_file.")
flags.DEFINE_string("tokenizer_file", None, "An existing tokenizer.json (with --tokenizer=file).")
flags.DEFINE_integer("vocab_size", 4096, "BPE vocabulary size.")
flags.DEFINE_float("val_fraction", 0.1, "Share of the text (from the end) held out for validation.")
flags.DEFINE_string("out_dir", "data/shakespeare_char", "Where train.bin, val.bin, meta.json go.")


def read_text() -> str:
    if FLAGS.input:
        path = Path(FLAGS.input)
        if not path.is_file():
            raise app.UsageError(f"--input={path} does not exist or is not a file.")
        return path.read_text(encoding="utf-8")
    if FLAGS.url:
        cache = Path(FLAGS.out_dir) / "input.txt"
        if cache.exists():
            return cache.read_text(encoding="utf-8")
        try:
            with urllib.request.urlopen(FLAGS.url, timeout=30) as r:
                text = r.read().decode("utf-8")
        except OSError as e:
            raise app.UsageError(
                f"could not download {FLAGS.url}: {e}\nWithout network, download the file elsewhere "
                "and pass it with --input=path/to/input.txt (make quickstart SHAKESPEARE=path)."
            ) from e
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(text, encoding="utf-8")
        return text
    raise app.UsageError("give --input=FILE or --url=URL")


def main(argv):
    del argv
    text = read_text()
    if not text.strip():
        raise app.UsageError("the input text is empty")
    if FLAGS.tokenizer == "char":
        tok = CharTokenizer.from_text(text)
    elif FLAGS.tokenizer == "bpe":
        tok = HFTokenizer.train_bpe(text, FLAGS.vocab_size)
    else:
        if not FLAGS.tokenizer_file:
            raise app.UsageError("--tokenizer=file needs --tokenizer_file=path/to/tokenizer.json")
        tok = load_tokenizer(FLAGS.tokenizer_file)
    meta = data.prepare(text, tok, FLAGS.out_dir, FLAGS.val_fraction)
    print(f"{FLAGS.out_dir}: vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens, "
          f"val {meta['val_tokens']:,} tokens ({meta['dtype']})")


if __name__ == "__main__":
    app.run(main)
