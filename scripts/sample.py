"""Sample from a trained workdir (or a Hugging Face model directory), printing text as it comes.

    python scripts/sample.py --workdir=out/shakespeare_char_cpu --prompt="ROMEO:" --max_new_tokens=500
    python scripts/sample.py --hf_dir=path/to/gpt2 --prompt="Hello" --temperature=0.7 --top_p=0.9
    python scripts/sample.py --workdir=out/sc_cpu --quant=int4 --kv_cache_dtype=int8   # quantized
    python scripts/sample.py --workdir=out/sc_cpu_int8    # a directory written by scripts/quantize.py
    python scripts/sample.py --lora=out/lora_run --prompt="ROMEO:"      # a LoRA fine-tuning workdir
    python scripts/sample.py --hf_dir=path/to/llama --lora=path/to/peft_adapter --prompt="Hi"

--max_new_tokens may exceed the model's context: when the context is full, generation slides on
(nanoGPT crops to the last block_size tokens; here the context is re-prefilled with its last
max_seq_len // 2 tokens and decoding continues), so a 64-token model can write 300 characters.
"""

import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax as nj  # noqa: E402
from nanojax import cli  # noqa: E402
from nanojax.infer import generate_stream  # noqa: E402
from nanojax.serve.load import load_model  # noqa: E402

flags.DEFINE_string("workdir", None, "A training workdir (or use --hf_dir).")
flags.DEFINE_string("hf_dir", None, "A Hugging Face model dir (config.json, safetensors, tokenizer.json).")
flags.DEFINE_string("lora", None, "A LoRA fine-tuning workdir (its base comes with it), or a PEFT adapter "
                    "directory applied to --workdir / --hf_dir.")
flags.DEFINE_string("prompt", "\n", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 500, "Tokens to generate (may exceed the context: it slides).")
flags.DEFINE_float("temperature", 0.8, "0 is greedy.")
flags.DEFINE_integer("top_k", 200, "Sample from the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", None, "Nucleus sampling: the smallest set of tokens with this much mass.")
flags.DEFINE_float("min_p", None, "Drop tokens less likely than min_p x the most likely one.")
flags.DEFINE_float("repetition_penalty", None, "HF-style penalty on tokens already present (> 1).")
flags.DEFINE_multi_string("stop", [], "Stop at this string (repeatable); it is not printed.")
flags.DEFINE_boolean("stream", True, "Print text as it is generated (--nostream: all at the end).")
flags.DEFINE_integer("chunk_size", 8, "Tokens per streamed chunk (one compiled decode call each).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("quant", None, ["int8", "int4"], "Quantize the weights on load (int4: group 32).")
flags.DEFINE_enum("kernel_activations", "fp32", ["fp32", "int8"],
                  "x inside the quantized CPU kernels: fp32 (exact), or int8 per 32-block on a VNNI CPU "
                  "(llama.cpp's Q8_0 scheme: faster, docs/quantization.md).")
flags.DEFINE_enum("kv_cache_dtype", None, ["int8"], "Hold the KV cache in int8 (per token, kv head).")
FLAGS = flags.FLAGS


def _load():
    """(cfg, params, tokenizer, stop token ids, ids to prepend to the prompt, adapter or None)."""
    if FLAGS.lora and (Path(FLAGS.lora) / "config.json").is_file():  # a LoRA training workdir
        if FLAGS.workdir or FLAGS.hf_dir:
            raise app.UsageError("--lora names a LoRA training workdir, which brings its own base: drop "
                                 "--workdir / --hf_dir")
        from nanojax.train.lora_run import load_lora_workdir

        cfg, params, adapter, tok = load_lora_workdir(FLAGS.lora)
        return cfg, params, tok, [], [], adapter
    loaded = _load_base()
    adapter = nj.load_lora(FLAGS.lora, loaded[0]) if FLAGS.lora else None
    return (*loaded, adapter)


def _load_base():
    if bool(FLAGS.workdir) == bool(FLAGS.hf_dir):
        raise app.UsageError("pass exactly one of --workdir or --hf_dir")
    m = load_model(workdir=FLAGS.workdir, hf_dir=FLAGS.hf_dir)  # shared with scripts/serve.py
    return m.cfg, m.params, m.tokenizer, list(m.stop_token_ids), list(m.prompt_prefix)


def main(argv):
    del argv
    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)  # orbax logs a restore at INFO; --v=1 brings it back
    cfg, params, tok, stop_ids, prefix, adapter = _load()
    if FLAGS.quant:
        params = nj.quantize(params, cfg, FLAGS.quant, kernel_activations=FLAGS.kernel_activations)
    params = nj.pack_weights(params)  # on the CPU: 2 MiB pages for the decode's weight stream
    ids = prefix + tok.encode(FLAGS.prompt)
    if not ids:
        raise app.UsageError("the prompt encodes to no tokens; pass a non-empty --prompt")
    ids = ids[-cfg.max_seq_len:]  # a prompt longer than the context keeps its end
    stream = generate_stream(
        params, cfg, [ids], max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
        top_k=FLAGS.top_k or None, top_p=FLAGS.top_p, min_p=FLAGS.min_p,
        repetition_penalty=FLAGS.repetition_penalty, stop_tokens=stop_ids, seed=FLAGS.seed,
        chunk_size=FLAGS.chunk_size if FLAGS.stream else max(1, FLAGS.max_new_tokens),
        stop_strings=FLAGS.stop or None, detokenize=tok.decode, overflow="slide",
        kv_cache_dtype=FLAGS.kv_cache_dtype, lora=adapter)
    print(FLAGS.prompt, end="", flush=True)
    new: list[int] = []
    shown = 0
    for chunk in stream:
        new += [t for t in chunk[0] if t not in stop_ids]  # a stop token ends the row; don't print it
        if FLAGS.stream:
            text = tok.decode(new)
            end = len(text.rstrip("\ufffd"))  # hold back a partial UTF-8 character
            print(text[shown:end], end="", flush=True)
            shown = end
    print(tok.decode(new)[shown:])

if __name__ == "__main__":
    cli.run(main)  # flag and user errors as `error: ...` lines (--debug: the traceback)
