"""Load test for the OpenAI-compatible server (loopback only, bounded): continuous batching against
one-at-a-time serving, and prefix reuse.

    python scripts/bench_serve.py                       # starts a server on a random-init model
    python scripts/bench_serve.py --preset=gpt2-small   # ... random-init, GPT-2 small's shape
    python scripts/bench_serve.py --workdir=out/sc_cpu  # ... on a trained workdir
    python scripts/bench_serve.py --url=http://127.0.0.1:8000 --model_name=sc_cpu   # a running server

1. Throughput: --clients concurrent streaming clients, prompt lengths and max_tokens mixed
   (deterministic per seed), greedy. Every completion must be complete (finish_reason "length",
   completion_tokens == max_tokens) and equal the answer to the same request served alone. Reports
   total generated tokens/s for both, their ratio (issue 16's target: >= 3x), and p50/p99 of
   time-to-first-token (TTFT), time per output token after the first (TPOT) and the gap between
   streamed chunks (ITL: a chunk carries the tokens of one engine decode call).
   Order: two warm-up passes (other text, the same mix: compiles what the load meets), the
   concurrent pass, then the one-at-a-time pass. The one-at-a-time pass sees the prompts a second
   time, so a prefix cache helps it, not the concurrent pass: the ratio is, if anything,
   understated. The run reports how many executables were compiled after the warm-up (a compile
   inside a timed pass stalls every stream for seconds).
2. Prefix reuse: --prefix_len tokens of shared text + a short distinct suffix. TTFT of the first
   request whose prefix the server has never seen (cold) against three more sharing it (warm),
   over --prefix_trials different prefixes: median cold / median warm (issue 16's target: >= 2x).

The default model has the shape of nanoGPT's Shakespeare-char GPU config (6 layers, 6 heads, 384
wide, 256 context, 65 characters; 10.7M params) with random weights: throughput does not depend on
what the weights say, and greedy equality is checked either way. --preset=NAME takes the shape of
an nj.ModelConfig preset instead (e.g. gpt2-small, llama-134m) with the 65-character vocabulary and
--max_seq_len context: a model whose decode step is bound by reading its weights, where batching
pays, unlike the 10.7M default whose step on XLA:CPU is bound by per-op overhead.
"""

import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanojax import cli  # noqa: E402
from nanojax.metrics import cpu_description  # noqa: E402

flags.DEFINE_string("url", None, "Target a running server instead of starting one (loopback only).")
flags.DEFINE_string("model_name", "bench", "The model id to request.")
flags.DEFINE_string("workdir", None, "Serve this workdir instead of a random-init model.")
flags.DEFINE_string("preset", None, "Random-init model of this nj.ModelConfig preset's shape (e.g. "
                    "gpt2-small, llama-134m), with the 65-character vocabulary; default: Shakespeare-char.")
flags.DEFINE_integer("max_seq_len", 256, "Context of the --preset model (tokens).")
flags.DEFINE_integer("slots", 8, "Engine decode slots (when this script starts the server).")
flags.DEFINE_integer("chunk_size", 8, "Engine decode steps per compiled call.")
flags.DEFINE_integer("clients", 32, "Concurrent streaming clients.")
flags.DEFINE_integer("min_prompt", 8, "Shortest prompt (tokens).")
flags.DEFINE_integer("max_prompt", 120, "Longest prompt (tokens).")
flags.DEFINE_integer("min_new", 16, "Fewest new tokens per request.")
flags.DEFINE_integer("max_new", 96, "Most new tokens per request.")
flags.DEFINE_integer("prefix_len", 200, "Shared prefix length for the prefix-reuse test (0: skip).")
flags.DEFINE_integer("prefix_trials", 7, "Different prefixes (each: 1 cold, 3 warm requests).")
flags.DEFINE_integer("seed", 0, "Seed for prompt texts and lengths.")
flags.DEFINE_string("text", "/work/shared/data/tinyshakespeare.txt", "Text to cut prompts from "
                    "(missing: random characters).")
FLAGS = flags.FLAGS


def _start_server():
    """A server on a free loopback port in a thread of this process: (url, engine, context, stop)."""
    import uvicorn

    import nanojax as nj
    from nanojax.infer.scheduler import Engine
    from nanojax.serve import create_app
    from nanojax.tokenizer import CharTokenizer

    if FLAGS.workdir:
        from nanojax.serve.load import load_model

        m = load_model(workdir=FLAGS.workdir)
        cfg, params, tok = m.cfg, m.params, m.tokenizer
    else:
        import jax

        tok = CharTokenizer("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
        if FLAGS.preset:
            cfg = nj.ModelConfig.preset(FLAGS.preset, vocab_size=tok.vocab_size, dropout=0.0,
                                        max_seq_len=FLAGS.max_seq_len)
        else:
            cfg = nj.ModelConfig(vocab_size=tok.vocab_size, n_layer=6, n_head=6, d_model=384, max_seq_len=256)
        print(f"model: {FLAGS.preset or 'shakespeare-char shape'}, {cfg.n_layer} layers, d_model "
              f"{cfg.d_model}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}", flush=True)
        params = nj.init_params(cfg, jax.random.key(0))
    engine = Engine(params, cfg, tok, slots=FLAGS.slots, max_queue=max(64, 2 * FLAGS.clients),
                    chunk_size=FLAGS.chunk_size).warm_up()  # every bucket: no compile in a timed pass
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tok, FLAGS.model_name), host="127.0.0.1",
                                           port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop():
        server.should_exit = True
        thread.join(timeout=60)

    return f"http://127.0.0.1:{port}", engine, cfg.max_seq_len, stop


async def _stream(client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: its text, usage, finish reason and timings (seconds)."""
    body = {"model": FLAGS.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, text, usage, finish = [], [], None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c["text"]:
                    arrivals.append(time.perf_counter() - t0)
                    text.append(c["text"])
                finish = c["finish_reason"] or finish
    return {"text": "".join(text), "usage": usage, "finish": finish, "arrivals": arrivals,
            "latency": time.perf_counter() - t0}


def _workload(rng, n: int, corpus: str) -> list[tuple[str, int]]:
    out = []
    for _ in range(n):
        length = int(rng.integers(FLAGS.min_prompt, FLAGS.max_prompt + 1))
        start = int(rng.integers(0, len(corpus) - length))
        out.append((corpus[start:start + length], int(rng.integers(FLAGS.min_new, FLAGS.max_new + 1))))
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def _timings(results: list[dict]) -> dict[str, float]:
    ttft = [r["arrivals"][0] for r in results if r["arrivals"]]
    tpot = [(r["latency"] - r["arrivals"][0]) / (r["usage"]["completion_tokens"] - 1)
            for r in results if r["arrivals"] and r["usage"]["completion_tokens"] > 1]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    return {"ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "tpot_p50": _pct(tpot, 50),
            "tpot_p99": _pct(tpot, 99), "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99)}


async def _run(url: str, work: list[tuple[str, int]], concurrent: bool) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(work) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(_stream(client, url, p, m) for p, m in work))
        else:
            results = [await _stream(client, url, p, m) for p, m in work]
        return list(results), time.perf_counter() - t0


async def _prefix_test(url: str, corpus: str, rng) -> list[tuple[float, list[float]]]:
    """Per prefix: (cold TTFT, [warm TTFTs]): one request with a prefix never seen before, then
    three more with other suffixes after the same prefix (several warm ones per prefix: on a shared
    machine one reading can be off by a scheduling hiccup)."""
    import httpx

    out = []
    n = FLAGS.prefix_len
    async with httpx.AsyncClient(timeout=600) as client:
        for trial in range(FLAGS.prefix_trials + 1):  # trial 0 only compiles these shapes
            start = int(rng.integers(0, len(corpus) - n - 60))
            prefix = corpus[start:start + n]
            suffixes = [corpus[start + n + 12 * k:start + n + 12 * k + 12] for k in range(4)]
            cold = await _stream(client, url, prefix + suffixes[0], 4)
            warm = [await _stream(client, url, prefix + sfx, 4) for sfx in suffixes[1:]]
            if trial:
                out.append((cold["arrivals"][0], [w["arrivals"][0] for w in warm]))
    return out


def main(argv):
    del argv
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # absl turns on INFO: one line per request
    if FLAGS.preset and (FLAGS.workdir or FLAGS.url):
        raise ValueError("--preset picks the random-init model this script serves; it cannot be "
                         "combined with --workdir or --url (drop one)")
    if FLAGS.url and not FLAGS.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise ValueError(f"--url must be a loopback address (this is a load test), got {FLAGS.url}")
    rng = np.random.default_rng(FLAGS.seed)
    stop = engine = None
    if FLAGS.url:
        import httpx

        url = FLAGS.url.rstrip("/")
        context = httpx.get(url + "/v1/models").json()["data"][0].get("max_model_len", 256)
    else:
        url, engine, context, stop = _start_server()
        if FLAGS.max_prompt + FLAGS.max_new > context or FLAGS.prefix_len + 12 + 4 > context:
            raise ValueError(f"prompts + outputs must fit the model's {context}-token context")
    path = Path(FLAGS.text)
    corpus = path.read_text(encoding="utf-8") if path.is_file() else "".join(
        rng.choice(list("abcdefghijklmnopqrstuvwxyz ,.\n"), 200_000))
    try:
        warm = [_workload(rng, FLAGS.clients, corpus) for _ in range(2)]
        work = _workload(rng, FLAGS.clients, corpus)
        print(f"warm-up: 2 x {FLAGS.clients} requests, then 1, 2, 4, ... requests decoding together "
              "through every attention window (compiles what the load meets) ...", flush=True)
        for w in warm:
            asyncio.run(_run(url, w, concurrent=True))
        asyncio.run(_run(url, warm[0][:4], concurrent=False))
        b = 1
        while b <= FLAGS.slots:  # decode runs a power-of-two bucket of the active slots
            long = [(corpus[i * 8:i * 8 + 8], context - 8) for i in range(b)]
            asyncio.run(_run(url, long, concurrent=True))
            b *= 2
        compiled = engine.stats()["executables"] if engine is not None else 0
        print(f"load average before the timed passes: {os.getloadavg()[0]:.1f}", flush=True)
        conc, t_conc = asyncio.run(_run(url, work, concurrent=True))
        seq, t_seq = asyncio.run(_run(url, work, concurrent=False))
        bad = [i for i, (c, s, (_, m)) in enumerate(zip(conc, seq, work, strict=True))
               if c["text"] != s["text"] or c["finish"] != "length" or c["usage"]["completion_tokens"] != m]
        tokens = sum(m for _, m in work)
        print(f"\n{FLAGS.clients} streaming clients, prompts {FLAGS.min_prompt}-{FLAGS.max_prompt} tokens, "
              f"max_tokens {FLAGS.min_new}-{FLAGS.max_new}, {tokens} tokens in all, greedy")
        print(f"correct and complete: {FLAGS.clients - len(bad)}/{FLAGS.clients}"
              + (f"  MISMATCH at {bad}" if bad else ""))
        print("| serving | wall s | tokens/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms |")
        print("|---|---|---|---|---|---|")
        for name, res, t in (("concurrent", conc, t_conc), ("one at a time", seq, t_seq)):
            m = {k: 1e3 * v for k, v in _timings(res).items()}
            print(f"| {name} | {t:.2f} | {tokens / t:.0f} | {m['ttft_p50']:.0f} / {m['ttft_p99']:.0f} | "
                  f"{m['tpot_p50']:.1f} / {m['tpot_p99']:.1f} | {m['itl_p50']:.1f} / {m['itl_p99']:.1f} |")
        print(f"throughput ratio (concurrent / one at a time): {t_seq / t_conc:.2f}x; load average "
              f"after: {os.getloadavg()[0]:.1f}; {cpu_description()}")
        timed_compiles = (engine.stats()["executables"] - compiled) if engine is not None else 0
        if engine is not None:
            print(f"executables compiled during the timed passes: {timed_compiles}")
        if FLAGS.prefix_len:
            trials = asyncio.run(_prefix_test(url, corpus, rng))
            print(f"\nprefix reuse, {FLAGS.prefix_len}-token shared prefix + 12-token suffix, TTFT ms:")
            for c, ws in trials:
                print(f"  cold {1e3 * c:.1f}  warm {' '.join(f'{1e3 * w:.1f}' for w in ws)}")
            cold = statistics.median(c for c, _ in trials)
            warm = statistics.median(w for _, ws in trials for w in ws)
            print(f"  median cold {1e3 * cold:.1f}, median warm {1e3 * warm:.1f}: cut {cold / warm:.2f}x")
        if engine is not None:
            st = engine.stats()
            print(f"\nengine: {st['executables']} executables compiled ({st['executables_by_fn']}; at most "
                  f"{st['executable_variants']}); prefix hits {st['prefix_hits']}, "
                  f"prompt tokens reused {st['prefix_tokens_reused']}")
        if bad:
            raise ValueError(f"{len(bad)} completions were incomplete or differ from the sequential answer")
    finally:
        if stop is not None:
            stop()


if __name__ == "__main__":
    cli.run(main)
