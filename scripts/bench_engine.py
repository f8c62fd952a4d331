"""Benchmarks of the continuous-batching engine (nanojax/infer/scheduler.py), in one process:

    python scripts/bench_engine.py                       # all three, Shakespeare-char shape
    python scripts/bench_engine.py --parts=step --preset=llama-tiny
    python scripts/bench_engine.py --parts=step --preset=gpt2-small --vocab_size=65 --max_seq_len=256

- step: ms per decode step of `slots.decode_chunk` (S slots, each at its own position, per-row
  scatter writes into a [S*K, C, H] cache) against engine.py's decode loop (one batch, one shared
  position, `dynamic_update_slice`) at the same batch, window and number of steps. A per-row
  write that copied the cache would show here as a ratio well above 1.
- throughput: --requests mixed requests (prompt and output lengths drawn from a seeded rng)
  through the engine all at once, against the same requests one at a time (each submitted after
  the previous one finished, through the same engine) and through nj.generate one at a time,
  taking turns for --rounds rounds (medians).
- ttft: time to first token of a request whose prompt shares a --prefix-token prefix with an
  earlier one, against a cold prompt of the same length (medians of --repeats).
Every variant is compiled before anything is timed. `run_throughput` and `run_ttft` take an
Engine and can be called from other benchmarks.
"""

import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import nanojax as nj  # noqa: E402
from nanojax.infer import engine as E  # noqa: E402
from nanojax.infer import slots as SL  # noqa: E402
from nanojax.infer.scheduler import Engine, SamplingParams  # noqa: E402
from nanojax.metrics import cpu_description  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("parts", ["step", "throughput", "ttft"], "which benchmarks")
flags.DEFINE_string("preset", "shakespeare-char", "ModelConfig preset (dropout is set to 0)")
flags.DEFINE_integer("vocab_size", None, "Override the preset's vocabulary (e.g. 65: Tiny Shakespeare's "
                     "characters, as scripts/bench_serve.py serves)")
flags.DEFINE_integer("max_seq_len", None, "Override the preset's context length (tokens)")
flags.DEFINE_integer("slots", 8, "decode slots")
flags.DEFINE_integer("chunk_size", 8, "decode steps per compiled call")
flags.DEFINE_integer("requests", 32, "requests in the throughput run")
flags.DEFINE_integer("prefix_tokens", 200, "shared prefix length for the ttft run")
flags.DEFINE_integer("repeats", 5, "timed repeats (medians)")
flags.DEFINE_integer("rounds", 2, "timed rounds of the throughput run (the modes take turns)")


def _params(cfg: nj.ModelConfig, seed: int = 0) -> dict:
    from nanojax.model import ParamSpec, param_specs

    rng = np.random.default_rng(seed)

    def make(s):
        x = rng.normal(0.0, s.std, s.shape) if s.init == "normal" else np.full(s.shape, s.init == "ones")
        return jax.numpy.asarray(x.astype(np.float32))

    return jax.tree.map(make, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def run_step(params: dict, cfg: nj.ModelConfig, batch: int, steps: int = 32, repeats: int = 5) -> dict:
    """ms per decode step, slots.decode_chunk vs engine.py's decode, batch rows, window 64."""
    P, window = 16, 64
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, P)).tolist()
    spec, knobs = nj.sampling.make_spec(0.0, None, None, None, None)
    stops = jax.numpy.asarray(np.full(8, -1, np.int32))

    def engine_once():
        rnd = E._start(params, cfg, prompts, steps + 1, spec, knobs, stops, 0, 0, debug=False)
        jax.block_until_ready(rnd.state)
        t0 = time.perf_counter()
        rnd.advance(steps + 1)
        jax.block_until_ready(rnd.state)
        return (time.perf_counter() - t0) / steps

    cache = SL.new_cache(cfg, batch, None)
    rows = {"slot": np.arange(batch, dtype=np.int32), "token": np.ones(batch, np.int32),
            "pos": np.full(batch, P, np.int32), "t": np.zeros(batch, np.int32),
            "active": np.ones(batch, bool), "remaining": np.full(batch, 10**6, np.int32),
            "stops": np.full((batch, SL.N_STOP), -1, np.int32), "key": np.zeros((batch, 2), np.uint32),
            **{k: np.stack([v] * batch) for k, v in nj.sampling.row_knobs(0.0, None, None, None,
                                                                           cfg.vocab_size).items()}}

    def slots_once():
        nonlocal cache
        cache, out = SL.decode_chunk(params, cache, rows, cfg=cfg, steps=steps, window=window,
                                     greedy_only=True, logprobs=False)
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        cache, out = SL.decode_chunk(params, cache, rows, cfg=cfg, steps=steps, window=window,
                                     greedy_only=True, logprobs=False)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / steps

    engine_once(), slots_once()  # compile
    eng, slo = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        eng.append(engine_once())
        slo.append(slots_once())
    e, s = statistics.median(eng) * 1e3, statistics.median(slo) * 1e3
    return {"batch": batch, "engine_ms": e, "slots_ms": s, "ratio": s / e}


def mixed_requests(cfg: nj.ModelConfig, n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """n (prompt, max_tokens) pairs: prompts 8..96 tokens, outputs 16..128 (within the context)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(rng.integers(8, min(97, cfg.max_seq_len // 2)))
        m = int(rng.integers(16, min(129, cfg.max_seq_len - p + 1)))
        out.append((rng.integers(0, cfg.vocab_size, p).tolist(), m))
    return out


def run_throughput(engine: Engine, requests: list[tuple[list[int], int]], rounds: int = 2,
                   params: dict | None = None, cfg: nj.ModelConfig | None = None) -> dict:
    """Tokens/s of the requests all at once vs one at a time through the same engine (greedy),
    and (with params, cfg) vs nj.generate once per request: the modes take turns, `rounds`
    times, so all see the same machine load; medians of the rounds' times."""

    def all_at_once():
        reqs = [engine.submit(p, SamplingParams(max_tokens=m, temperature=0.0)) for p, m in requests]
        return [[t for ev in r for t in ev.token_ids] for r in reqs]

    def one_at_a_time():
        out = []
        for p, m in requests:  # each submitted once the previous one is done
            out.append([t for ev in engine.submit(p, SamplingParams(max_tokens=m, temperature=0.0))
                        for t in ev.token_ids])
        return out

    def generate_each():
        return [nj.generate(params, cfg, [p], max_new_tokens=m)[0] for p, m in requests]

    modes = {"batched": all_at_once, "sequential": one_at_a_time}
    if params is not None:
        modes["generate"] = generate_each
    want = {name: fn() for name, fn in modes.items()}  # compiles every variant these requests need
    assert want["batched"] == want["sequential"], "batched and one-at-a-time greedy tokens differ"
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    total = sum(m for _, m in requests)
    out = {"requests": len(requests), "tokens": total}
    for name in modes:
        out[f"{name}_tok_s"] = total / statistics.median(times[name])
    return out


def run_ttft(engine: Engine, cfg: nj.ModelConfig, prefix_tokens: int, repeats: int) -> dict:
    """Median time to first token: prompts sharing a prefix_tokens prefix with an earlier request
    vs prompts with no cached prefix (both prefix + 8 tokens)."""
    rng = np.random.default_rng(1)

    def first_token(prompt):
        t0 = time.perf_counter()
        req = engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0))
        events = list(req)
        return time.perf_counter() - t0, events[0].prefix_hit

    def fresh(n):
        return rng.integers(0, cfg.vocab_size, n).tolist()

    shared = fresh(prefix_tokens)
    first_token(shared + fresh(8))  # compiles and caches the shared prefix
    first_token(fresh(prefix_tokens + 8))  # compiles the cold path's bucket
    cold, warm, hits = [], [], []
    for _ in range(repeats):
        cold.append(first_token(fresh(prefix_tokens + 8))[0])
        t, hit = first_token(shared + fresh(8))
        warm.append(t)
        hits.append(hit)
    c, w = statistics.median(cold) * 1e3, statistics.median(warm) * 1e3
    return {"cold_ms": c, "warm_ms": w, "cut": c / w, "prefix_hit": min(hits)}


def main(_):
    overrides = {k: v for k in ("vocab_size", "max_seq_len") if (v := getattr(FLAGS, k)) is not None}
    cfg = nj.ModelConfig.preset(FLAGS.preset, dropout=0.0, **overrides)
    params = _params(cfg)
    print(f"# {FLAGS.preset}: {cfg.n_layer} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
          f"context {cfg.max_seq_len}; jax {jax.__version__}; {cpu_description()}")
    if "step" in FLAGS.parts:
        for b in (1, FLAGS.slots):
            r = run_step(params, cfg, b, repeats=FLAGS.repeats)
            print(f"step  batch {b}: engine.py decode {r['engine_ms']:.2f} ms/step, slots decode_chunk "
                  f"{r['slots_ms']:.2f} ms/step, ratio {r['ratio']:.2f}")
    engine = Engine(params, cfg, None, slots=FLAGS.slots, chunk_size=FLAGS.chunk_size,
                    max_queue=max(64, FLAGS.requests)).start()
    try:
        if "throughput" in FLAGS.parts:
            r = run_throughput(engine, mixed_requests(cfg, FLAGS.requests), FLAGS.rounds, params, cfg)
            print(f"throughput {r['requests']} requests, {r['tokens']} tokens: all at once "
                  f"{r['batched_tok_s']:.0f} tok/s; one at a time through the engine "
                  f"{r['sequential_tok_s']:.0f} tok/s (x{r['batched_tok_s'] / r['sequential_tok_s']:.2f}); "
                  f"nj.generate once per request {r['generate_tok_s']:.0f} tok/s "
                  f"(x{r['batched_tok_s'] / r['generate_tok_s']:.2f})")
        if "ttft" in FLAGS.parts:
            r = run_ttft(engine, cfg, FLAGS.prefix_tokens, FLAGS.repeats)
            print(f"ttft  {FLAGS.prefix_tokens}-token shared prefix: cold {r['cold_ms']:.1f} ms, "
                  f"warm {r['warm_ms']:.1f} ms (cut x{r['cut']:.2f}, prefix_hit {r['prefix_hit']})")
        print("stats", {k: v for k, v in engine.stats().items() if not isinstance(v, dict)})
    finally:
        engine.shutdown(drain=False, timeout=30)


if __name__ == "__main__":
    app.run(main)
