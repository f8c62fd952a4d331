"""Serve a model over the OpenAI API (completions, chat, streaming) with continuous batching.

    python scripts/serve.py --workdir=out/sc_cpu --port=8000
    python scripts/serve.py --hf_dir=path/to/llama --quant=int8 --slots=8 --max_queue=64
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "sc_cpu", "prompt": "ROMEO:", "max_tokens": 64, "temperature": 0}'

Binds 127.0.0.1 unless --host says otherwise. Ctrl-C (or SIGTERM) stops taking connections, lets
running requests finish for up to --drain_timeout seconds, cancels what is left (those streams end
with finish_reason "abort") and exits 0 (nanojax/serve/server.py).
docs/serving.md has the API, the errors and measurements.
"""

import sys
from pathlib import Path

from absl import flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax as nj  # noqa: E402
from nanojax import cli  # noqa: E402
from nanojax.serve.chat import ChatTemplate  # noqa: E402
from nanojax.serve.load import load_model  # noqa: E402

flags.DEFINE_string("workdir", None, "A training workdir or a scripts/quantize.py directory (or --hf_dir).")
flags.DEFINE_string("hf_dir", None, "A Hugging Face model dir (config.json, safetensors, tokenizer.json).")
flags.DEFINE_enum("quant", None, ["int8", "int4"], "Quantize the weights on load (int4: group 32).")
flags.DEFINE_enum("kv_cache_dtype", None, ["int8"], "Hold the KV cache in int8 (per token, kv head).")
flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 exposes the server to the network.")
flags.DEFINE_integer("port", 8000, "TCP port.")
flags.DEFINE_integer("slots", 8, "Decode slots: requests decoded together in one batch.")
flags.DEFINE_integer("max_queue", 64, "Requests waiting for a slot before new ones get 429.")
flags.DEFINE_integer("chunk_size", 8, "Decode steps per compiled call; requests join and leave between.")
flags.DEFINE_integer("prefix_cache_tokens", 8192, "Tokens of prompt-prefix KV kept for reuse (0: off).")
flags.DEFINE_string("model_name", None, "The model id clients send (default: the directory's name).")
flags.DEFINE_string("chat_template", None, "A jinja2 chat template file, overriding the model's own.")
flags.DEFINE_bool("warm_up", False, "Compile every prefill and decode bucket before serving (warm_up): "
                  "a slower start, no request waits for a compile.")
flags.DEFINE_float("drain_timeout", 30.0, "Seconds Ctrl-C waits for running requests before cancelling.")
FLAGS = flags.FLAGS


def _check_port(host: str, port: int) -> None:
    """A port in use (or a host that is not this machine's) is one error line, not a uvicorn log."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host, "
                         "or stop what uses it") from None


def main(argv):
    del argv
    from nanojax.infer.scheduler import Engine
    from nanojax.serve.app import create_app
    from nanojax.serve.server import serve

    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)  # orbax logs a restore at INFO
    for name in ("slots", "max_queue", "chunk_size"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name} must be >= 1, got {FLAGS[name].value}")
    if not 0 < FLAGS.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {FLAGS.port}")
    _check_port(FLAGS.host, FLAGS.port)  # before the model loads, not after
    m = load_model(workdir=FLAGS.workdir, hf_dir=FLAGS.hf_dir)
    params = nj.quantize(m.params, m.cfg, FLAGS.quant) if FLAGS.quant else m.params
    params = nj.pack_weights(params)  # on the CPU: 2 MiB pages for the decode's weight stream
    template = m.chat_template
    if FLAGS.chat_template:
        template = ChatTemplate(Path(FLAGS.chat_template).read_text(encoding="utf-8"),
                                template.special_tokens if template else None)
    name = FLAGS.model_name or Path(FLAGS.workdir or FLAGS.hf_dir).resolve().name
    engine = Engine(params, m.cfg, m.tokenizer, slots=FLAGS.slots, max_queue=FLAGS.max_queue,
                    chunk_size=FLAGS.chunk_size, prefix_cache_tokens=FLAGS.prefix_cache_tokens,
                    kv_cache_dtype=FLAGS.kv_cache_dtype)
    if FLAGS.warm_up:
        print("compiling every prefill and decode bucket (--warm_up) ...", flush=True)
        engine.warm_up()
    app = create_app(engine, m.tokenizer, name, chat_template=template, stop_token_ids=m.stop_token_ids,
                     prompt_prefix=m.prompt_prefix, max_context=m.cfg.max_seq_len, manage_engine=False)
    print(f"serving {name!r} on http://{FLAGS.host}:{FLAGS.port}/v1 ({FLAGS.slots} slots); Ctrl-C stops",
          flush=True)
    serve(app, engine, host=FLAGS.host, port=FLAGS.port, drain_timeout=FLAGS.drain_timeout)
    print("stopped", flush=True)


if __name__ == "__main__":
    cli.run(main)
