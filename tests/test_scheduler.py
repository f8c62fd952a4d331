"""The continuous-batching engine (nanojax/infer/scheduler.py over infer/slots.py): requests that
come and go at different times, in different slots, must give what `nj.generate` gives for each
prompt alone (the oracle); prefix reuse must not change greedy tokens; logprobs must equal
log_softmax of `nj.forward`'s logits; cancels free slots; a full queue refuses; seeded sampling
does not depend on the slot or the neighbours; nothing recompiles beyond the stated variants."""

import string
import threading

import jax
import numpy as np
import pytest
from conftest import np_params

import nanojax as nj
from nanojax.infer import slots as SL
from nanojax.infer.scheduler import Engine, EngineStopped, QueueFull, SamplingParams
from nanojax.sampling import row_knobs
from nanojax.tokenizer import CharTokenizer

# A Llama-family model (RoPE, grouped-query attention: 4 heads over 2 kv heads) with peaked logits,
# so greedy choices are not near-ties.
CFG = nj.ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64,
                     pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
                     init_std=0.2)
TOK = CharTokenizer(string.printable[:97])


class FlakyTokenizer:
    """The char tokenizer, with two hooks into the engine thread (which calls decode for every
    request it delivers tokens to): decode raises while `fail` is set (the error path), and
    blocks on `gate` when it sees `pause_at` tokens (to act while requests are mid-decode).
    `log` keeps every decoded id list, in the engine's order."""

    def __init__(self):
        self.fail = False
        self.pause_at = None
        self.paused, self.gate = threading.Event(), threading.Event()
        self.gate.set()
        self.log = []

    def decode(self, ids):
        self.log.append(tuple(ids))
        if self.fail and len(ids) >= 3:
            raise RuntimeError("decode failed on purpose")
        if len(ids) == self.pause_at:
            self.paused.set()
            self.gate.wait(timeout=60)
        return TOK.decode(ids)


@pytest.fixture(scope="module")
def params():
    return np_params(CFG, 0)


@pytest.fixture(scope="module")
def tokenizer():
    return FlakyTokenizer()


@pytest.fixture(scope="module")
def engine(params, tokenizer):
    eng = Engine(params, CFG, tokenizer, slots=2, max_queue=16, chunk_size=4,
                 prefix_cache_tokens=256).start()
    yield eng
    eng.shutdown(drain=False, timeout=30)


def _prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, CFG.vocab_size, n)] for n in lengths]


def _oracle(params, prompts, max_tokens):
    """nj.generate's greedy tokens for each prompt (one ragged batch: each row is independent of
    the others there, tests/test_generate.py; one call compiles less than one per prompt)."""
    out = nj.generate(params, CFG, prompts, max_new_tokens=max(max_tokens))
    return [o[:m] for o, m in zip(out, max_tokens, strict=True)]


def _collect(req):
    events = list(req)
    return [t for ev in events for t in ev.token_ids], events


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_staggered_requests_equal_generate_alone(engine, params):
    prompts = _prompts(1, [5, 19, 1, 33, 12, 8])
    max_tokens = [9, 4, 20, 11, 14, 3]
    first = [engine.submit(p, greedy(m)) for p, m in zip(prompts[:2], max_tokens[:2], strict=True)]
    next(iter(first[0]))  # the first request is decoding before the others arrive
    later = [engine.submit(p, greedy(m)) for p, m in zip(prompts[2:], max_tokens[2:], strict=True)]
    outs = [_collect(r) for r in first + later]
    for (toks, events), p, m, want in zip(outs, prompts, max_tokens, _oracle(params, prompts, max_tokens),
                                          strict=True):
        assert toks == want
        last = events[-1]
        assert last.finish_reason == "length"
        assert (last.prompt_tokens, last.completion_tokens) == (len(p), m)
        assert "".join(ev.text for ev in events) == TOK.decode(want)
    stats = engine.stats()
    assert stats["active_slots"] == 0 and stats["queue_len"] == 0


def test_requests_admitted_together_share_one_packed_prefill(params):
    # Queued before the engine starts, so its first turn admits all four: one packed call, whose
    # requests must not see each other (each equals generate alone).
    prompts = _prompts(11, [5, 19, 1, 33])
    max_tokens = [6, 3, 8, 5]
    eng = Engine(params, CFG, TOK, slots=4, max_queue=8, chunk_size=4, prefix_cache_tokens=0)
    reqs = [eng.submit(p, greedy(m)) for p, m in zip(prompts, max_tokens, strict=True)]
    eng.start()
    try:
        outs = [_collect(r)[0] for r in reqs]
        stats = eng.stats()
    finally:
        eng.shutdown(drain=False, timeout=30)
    assert outs == _oracle(params, prompts, max_tokens)
    assert stats["prefill_calls"] == 1 and stats["prefill_tokens"] == sum(map(len, prompts))


def test_prefill_packed_logits_equal_forward_per_request(params):
    # The slots-level call: three prompts back to back in slots 2, 0, 1; each request's logits
    # are those of nj.forward on that prompt alone, and its K/V land in its own slot.
    prompts = _prompts(12, [7, 12, 1])
    T = SL.prefill_bucket(20)
    cache = SL.new_cache(CFG, 3, None)
    tokens, slot = np.zeros((1, T), np.int32), np.full(T, 1, np.int32)
    pos = np.full(T, SL.cache_len(CFG), np.int32)  # padding: past the cache, dropped
    last = np.zeros(SL.pack_rows(T, 3), np.int32)
    at = 0
    for j, (s, p) in enumerate(zip([2, 0, 1], prompts, strict=True)):
        tokens[0, at:at + len(p)], slot[at:at + len(p)], pos[at:at + len(p)] = p, s, np.arange(len(p))
        last[j] = at + len(p) - 1
        at += len(p)
    knobs = row_knobs(0.0, None, None, None, CFG.vocab_size)
    knobs = {k: np.stack([v] * len(last)) for k, v in knobs.items()}
    keys = np.zeros((len(last), 2), np.uint32)
    cache, out = SL.prefill_packed(params, cache, tokens, slot, pos, last, knobs, keys, cfg=CFG)
    padded = np.zeros((len(prompts), 12), np.int32)  # right padding: causal, so it changes no real logit
    for j, p in enumerate(prompts):
        padded[j, :len(p)] = p
    full = np.asarray(nj.forward(params, padded, CFG))
    for j, p in enumerate(prompts):
        want = full[j, len(p) - 1]
        np.testing.assert_allclose(np.asarray(out["logits"][j]), want, rtol=2e-5, atol=2e-5)
        assert int(out["token"][j]) == int(np.argmax(want))
    # Slot 1 holds one token: position 0 written, the rest of its row still zero (padding dropped).
    k1 = np.asarray(cache[0][0])[1 * CFG.kv_heads:2 * CFG.kv_heads]
    assert np.abs(k1[:, 0]).sum() > 0 and not np.any(k1[:, 1:])


@pytest.mark.slow  # ~15 compiles (every prefill and decode bucket): ~30 s
def test_warm_up_compiles_everything_requests_then_meet(params):
    eng = Engine(params, CFG, TOK, slots=2, max_queue=8, chunk_size=4, prefix_cache_tokens=64).warm_up()
    before = eng.stats()["executables_by_fn"]
    eng.start()
    try:
        prompts = _prompts(13, [5, 40, 17, 2])
        reqs = [eng.submit(p, greedy(m)) for p, m in zip(prompts, [6, 3, 9, 4], strict=True)]
        sampled = SamplingParams(max_tokens=5, temperature=0.9, seed=3)
        reqs.append(eng.submit(prompts[1][:33] + [1, 2], sampled))
        outs = [_collect(r)[0] for r in reqs]
        after = eng.stats()
    finally:
        eng.shutdown(drain=False, timeout=30)
    assert outs[:4] == _oracle(params, prompts, [6, 3, 9, 4]) and len(outs[4]) == 5
    assert after["prefix_hits"] == 1  # the prefix-reusing prefill ran too
    assert after["executables_by_fn"] == before
    with pytest.raises(RuntimeError, match="before start"):
        eng.warm_up()


def test_plan_packs_keeps_order_and_fills_packs():
    lengths = [5, 19, 1, 33, 300, 2, 600, 1, 1, 1, 1, 120, 120, 120, 120, 60]
    packs = SL.plan_packs(lengths, slots=8)
    assert [i for p in packs for i in p] == list(range(len(lengths)))  # every request once, in order
    for p, nxt in zip(packs, packs[1:] + [None], strict=True):
        total = sum(lengths[i] for i in p)
        assert len(p) == 1 or (total <= SL.PACK_TOKENS
                               and len(p) <= SL.pack_rows(SL.prefill_bucket(total), 8))
        if nxt is not None:  # a pack closes only when the next request would not fit
            t, k = total + lengths[nxt[0]], len(p) + 1
            assert t > SL.PACK_TOKENS or k > SL.pack_rows(SL.prefill_bucket(t), 8)
    assert [len(p) for p in packs] == [6, 1, 1, 1, 1, 5, 1]  # worked out by hand


def test_cancel_frees_the_slot_and_leaves_the_others_alone(engine, params, tokenizer):
    prompts = _prompts(2, [6, 10, 7])
    tokenizer.paused.clear()
    tokenizer.gate.clear()
    tokenizer.pause_at = 5
    try:
        long = [engine.submit(p, greedy(50)) for p in prompts[:2]]  # both slots busy
        assert tokenizer.paused.wait(timeout=60)  # the engine is mid-decode, held in decode()
        waiting = engine.submit(prompts[2], greedy(6))  # queued behind them
        long[1].cancel()
    finally:
        tokenizer.pause_at = None
        tokenizer.gate.set()
    toks, _ = _collect(waiting)  # runs in the freed slot while the other one keeps going
    kept, _ = _collect(long[0])
    cancelled = list(long[1])
    assert cancelled[-1].finish_reason == "cancelled" and cancelled[-1].completion_tokens < 50
    assert [kept, toks] == _oracle(params, [prompts[0], prompts[2]], [50, 6])
    # The queued request finished long before the long one: the cancel freed a slot for it.
    assert tokenizer.log.index(tuple(toks)) < tokenizer.log.index(tuple(kept))


def test_queue_full_and_stopped_engine(params):
    eng = Engine(params, CFG, None, slots=1, max_queue=2)  # not started: the queue only fills
    reqs = [eng.submit([1, 2, 3], greedy(2)) for _ in range(2)]
    with pytest.raises(QueueFull, match="queue is full"):
        eng.submit([1, 2, 3], greedy(2))
    eng.shutdown(drain=False)
    assert [list(r)[-1].finish_reason for r in reqs] == ["cancelled", "cancelled"]
    with pytest.raises(EngineStopped):
        eng.submit([1, 2, 3], greedy(2))


def test_engine_refuses_params_of_another_model(params):
    with pytest.raises(ValueError, match="params do not match cfg"):
        Engine(params, CFG.replace(d_model=64, d_ff=128), TOK)


@pytest.mark.parametrize("prompt, sp, match", [
    ([], greedy(2), "empty"),
    ([1] * 64, greedy(1), "exceeds the context"),
    ([1, 2], greedy(0), "max_tokens must be an int >= 1"),
    ([1] * 60, greedy(5), "lower max_tokens to 4"),
    ([1, 97], greedy(2), "outside the vocabulary"),
    ("hello", greedy(2), "token ids, not text"),
    ([1], SamplingParams(temperature=-1.0), "temperature"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(top_k=0), "top_k"),
    ([1], SamplingParams(min_p=2.0), "min_p"),
    ([1], SamplingParams(logprobs=21), "logprobs"),
    ([1], SamplingParams(stop_token_ids=(200,)), "stop_token_ids"),
    ([1], SamplingParams(stop=("",)), "stop must be"),
])
def test_bad_requests_are_refused_with_a_clear_error(params, prompt, sp, match):
    eng = Engine(params, CFG, TOK, slots=1)
    with pytest.raises(ValueError, match=match):
        eng.submit(prompt, sp)


def test_prefix_reuse_gives_the_same_tokens_and_skips_the_prefill(engine, params):
    shared = _prompts(3, [40])[0]
    a, b = shared + [1, 2, 3], shared + [7]
    before = engine.stats()
    toks_a, ev_a = _collect(engine.submit(a, greedy(8)))
    mid = engine.stats()
    toks_b, ev_b = _collect(engine.submit(b, greedy(8)))
    after = engine.stats()
    assert ev_a[0].prefix_hit == 0
    assert ev_b[0].prefix_hit == 32  # two whole 16-token blocks of the shared 40
    assert [toks_a, toks_b] == _oracle(params, [a, b], [8, 8])
    assert mid["prefill_tokens"] - before["prefill_tokens"] == len(a)
    assert after["prefill_tokens"] - mid["prefill_tokens"] == len(b) - 32
    assert after["prefix_hits"] == mid["prefix_hits"] + 1
    # The reused K/V must be the prefix's own: one more request on it, prefill only, whose
    # logprobs (raw, greedy) must match a full forward of its prompt.
    c = shared + [9, 9, 9]
    _, ev_c = _collect(engine.submit(c, greedy(1, logprobs=5)))
    assert ev_c[0].prefix_hit == 32
    want = np.asarray(jax.nn.log_softmax(nj.forward(params, np.asarray([c], np.int32), CFG)[0, -1]))
    top = ev_c[0].logprobs[0].top
    assert [i for i, _ in top] == np.argsort(-want)[:5].tolist()
    np.testing.assert_allclose([v for _, v in top], np.sort(want)[::-1][:5], atol=2e-4)


def test_logprobs_equal_log_softmax_of_forward(engine, params):
    prompt = _prompts(4, [9])[0]
    temp = 0.7
    toks, events = _collect(engine.submit(prompt, SamplingParams(max_tokens=6, temperature=temp, seed=3,
                                                                  logprobs=3)))
    lps = [lp for ev in events for lp in ev.logprobs]
    logits = nj.forward(params, np.asarray([prompt + toks], np.int32), CFG)[0]  # (T, V)
    want = np.asarray(jax.nn.log_softmax(logits / temp, axis=-1))[len(prompt) - 1: -1]  # (6, V)
    assert [lp.token for lp in lps] == toks
    np.testing.assert_allclose([lp.logprob for lp in lps], want[np.arange(6), toks], atol=2e-4)
    for lp, row in zip(lps, want, strict=True):
        best = np.argsort(-row)[:3]
        assert [i for i, _ in lp.top] == best.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], row[best], atol=2e-4)


def test_stop_strings_and_stop_tokens(engine, params):
    prompt = _prompts(5, [7])[0]
    full = _oracle(params, [prompt], [20])[0]
    text = TOK.decode(full)
    stop = text[8:10]  # straddles the chunk edge after 9 tokens (1 from the prefill + 2 chunks of 4)
    k = text.find(stop)
    toks, events = _collect(engine.submit(prompt, greedy(20, stop=(stop, "never-there"))))
    assert "".join(ev.text for ev in events) == text[:k]
    assert events[-1].finish_reason == "stop"
    assert toks == full[: k + len(stop)]  # up to the token that completed the stop string
    stop_id = full[4]
    toks, events = _collect(engine.submit(prompt, greedy(20, stop_token_ids=(stop_id,))))
    cut = full.index(stop_id) + 1
    assert toks == full[:cut] and events[-1].finish_reason == "stop"
    assert "".join(ev.text for ev in events) == TOK.decode(full[: cut - 1])  # the stop id has no text


def test_seeded_sampling_ignores_slot_and_neighbours(engine):
    prompt = _prompts(6, [11])[0]
    sp = SamplingParams(max_tokens=24, temperature=1.0, top_k=40, top_p=0.95, min_p=0.01, seed=11)
    alone, _ = _collect(engine.submit(prompt, sp))
    others = [engine.submit(p, SamplingParams(max_tokens=m, temperature=0.9, seed=m))
              for p, m in zip(_prompts(7, [3, 20]), [10, 40], strict=True)]
    crowded, _ = _collect(engine.submit(prompt, sp))  # queued, then in whichever slot frees first
    other_seed, _ = _collect(engine.submit(prompt, SamplingParams(**{**sp.__dict__, "seed": 12})))
    for r in others:
        list(r)
    assert crowded == alone
    assert other_seed != alone


def test_an_error_ends_only_its_request(engine, tokenizer, params):
    prompt = _prompts(8, [5])[0]
    tokenizer.fail = True
    try:
        _, events = _collect(engine.submit(prompt, greedy(6)))
    finally:
        tokenizer.fail = False
    assert events[-1].finish_reason == "error" and "decode failed on purpose" in events[-1].error
    toks, _ = _collect(engine.submit(prompt, greedy(6)))
    assert toks == _oracle(params, [prompt], [6])[0]


def test_requests_coming_and_going_do_not_recompile(engine, params):
    prompts = _prompts(9, [2, 30, 13, 5, 21])
    max_tokens = [12, 6, 17, 9, 4]

    def run():
        reqs = [engine.submit(p, greedy(m)) for p, m in zip(prompts, max_tokens, strict=True)]
        return [_collect(r)[0] for r in reqs]

    # The executable counts are per jitted function for the whole process, and engines of other
    # tests in this worker (other slot counts) add their own variants: so the bound is on what
    # this engine's runs add (what they reuse from an earlier engine's identical shapes is free).
    start = engine.stats()["executables_by_fn"]
    run()  # compiles whatever these shapes need
    run()  # ... and, now that their prompts are cached, the prefix copy
    before = engine.stats()
    outs = run()
    after = engine.stats()
    assert outs == _oracle(params, prompts, max_tokens)
    assert after["executables"] == before["executables"]
    limits = SL.variant_counts(CFG, engine.slots)
    made = {k: after["executables_by_fn"][k] - start[k] for k in limits}
    assert all(made[k] <= limits[k] for k in limits), (made, limits)


def _np_filtered_probs(logits, temperature, top_k, top_p, min_p):
    """HF's order in numpy: temperature, top-k, top-p (keep while the mass above < top_p), min-p."""
    x = logits / temperature
    order = np.argsort(-x)
    keep = np.zeros(x.size, bool)
    keep[order[:top_k]] = True
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    above = np.cumsum(p[order]) - p[order]
    keep[order[above >= top_p]] = False
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    keep &= p >= min_p * p.max()
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def test_sample_rows_each_row_its_own_sampler():
    from nanojax.sampling import row_knobs, sample_rows

    V, draws = 12, 4000
    logits = np.random.default_rng(0).normal(0, 2.0, (4, V)).astype(np.float32)
    settings = [(0.0, None, None, None), (0.7, 4, None, None), (1.3, None, 0.6, None), (1.0, 8, 0.9, 0.15)]
    knobs = [row_knobs(*s, V) for s in settings]
    knobs = {k: np.stack([kn[k] for kn in knobs]) for k in knobs[0]}
    keys = jax.random.split(jax.random.key(0), (draws, 4))
    sample = jax.jit(jax.vmap(lambda k: sample_rows(logits, k, knobs, greedy_only=False)))
    got = np.asarray(sample(keys))  # (draws, 4)
    assert (got[:, 0] == logits[0].argmax()).all()  # the greedy row is the exact argmax
    for r, (temp, k, p, m) in enumerate(settings[1:], start=1):
        want = _np_filtered_probs(logits[r], temp, k or V, p or 1.0, m or 0.0)
        freq = np.bincount(got[:, r], minlength=V) / draws
        assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want)), f"row {r} drew a filtered token"
        np.testing.assert_allclose(freq, want, atol=0.03)


def test_releasable_text_holds_partial_utf8_and_stop_starts():
    from nanojax.infer.stops import releasable

    assert releasable("abc\ufffd", 0, (), final=False) == 3  # a character still being completed
    assert releasable("abc\ufffd", 0, (), final=True) == 4
    assert releasable("hello wo", 2, ("world",), final=False) == 6  # "wo" may begin "world"
    assert releasable("hello wx", 2, ("world",), final=False) == 8
    assert releasable("ab<", 0, ("<|end|>", "b<x"), final=False) == 1  # the longest possible start wins
    assert releasable("ab", 2, ("b<",), final=False) == 2  # nothing unsent to hold


@pytest.mark.slow
def test_int8_kv_cache_matches_generate_int8(params):
    """kv_cache_dtype="int8": the engine's quantized slot cache gives generate's int8 tokens."""
    prompts = _prompts(10, [5, 12])
    eng = Engine(params, CFG, None, slots=2, chunk_size=4, prefix_cache_tokens=0,
                 kv_cache_dtype="int8").start()
    try:
        outs = [_collect(r)[0] for r in [eng.submit(p, greedy(10)) for p in prompts]]
    finally:
        eng.shutdown()
    assert outs == nj.generate(params, CFG, prompts, max_new_tokens=10, kv_cache_dtype="int8")
