"""Speculative decoding (nanojax/infer/speculative.py): greedy output with a draft model or
prompt lookup equals plain greedy `nj.generate` (ragged batch, stop tokens, streaming, stop
strings); the rejection sampler's output follows the target distribution, unit-tested on a
small vocabulary against numpy probabilities and end to end against the target's exact
marginals from `nj.forward`; prompt lookup against a plain-Python reference; bad inputs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_params

import nanojax as nj
from nanojax.infer import speculative

ngram_propose = jax.jit(speculative.ngram_propose, static_argnums=(3, 4))
speculative_accept = jax.jit(speculative.speculative_accept)

V = 61
TARGET = nj.ModelConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=96,
                        pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
OTHER = nj.ModelConfig(vocab_size=V, n_layer=1, n_head=2, d_model=16, max_seq_len=96)  # GPT-2 style
PROMPTS = [[5, 17, 3, 9, 44, 2, 7], [8], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41], [6, 1, 2]]
NEW = 24


@pytest.fixture(scope="module")
def models():
    target = np_params(TARGET, 0)
    rng = np.random.default_rng(5)
    # A different model that agrees with the target often but not always: partial acceptance.
    near = jax.tree.map(lambda x: x + 0.2 * float(jnp.std(x) + 1e-3) * rng.standard_normal(x.shape), target)
    return {"target": target, "near": near, "other": np_params(OTHER, 1)}


@pytest.fixture(scope="module")
def plain(models):
    ref = nj.generate(models["target"], TARGET, PROMPTS, max_new_tokens=NEW)
    stop = ref[0][NEW // 2]  # a token that row 0 produces mid-way: the stop cuts it there
    return ref, stop, nj.generate(models["target"], TARGET, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop])


@pytest.mark.parametrize("which", ["near", "self", "other"])
def test_greedy_with_draft_model_equals_plain(models, plain, which):
    ref, stop, ref_stop = plain
    draft = {"near": (models["near"], TARGET), "self": (models["target"], TARGET),
             "other": (models["other"], OTHER)}[which]
    stats = {}
    out = nj.generate(models["target"], TARGET, PROMPTS, max_new_tokens=NEW, draft=draft,
                      num_speculative_tokens=3, stats=stats)
    assert out == ref
    if which == "self":
        assert stats["accepted"] == stats["proposed"] > 0  # the target as its own draft: all kept
        assert stats["calls"] <= -(-(NEW - 1) // 4)  # 4 tokens per verify forward
    elif which == "near":
        assert 0.2 < stats["acceptance_rate"] < 0.95, stats
    assert len(ref_stop[0]) < NEW and ref_stop[0][-1] == stop
    out_stop = nj.generate(models["target"], TARGET, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop],
                           draft=draft, num_speculative_tokens=3)
    assert out_stop == ref_stop


def test_prompt_lookup_greedy_equals_plain_and_stream(models, plain):
    ref, stop, ref_stop = plain
    stats = {}
    out = nj.generate(models["target"], TARGET, PROMPTS, max_new_tokens=NEW, draft="prompt_lookup",
                      num_speculative_tokens=4, prompt_lookup_ngram=2, stats=stats)
    assert out == ref
    assert stats["accepted"] > 0 and stats["calls"] < NEW - 1, stats
    # Streaming in chunks that end mid-iteration, with stop tokens and a stop string.
    kw = {"max_new_tokens": NEW, "stop_tokens": [stop],
          "stop_strings": [chr(48 + ref[2][9]) + chr(48 + ref[2][10])],
          "detokenize": lambda ids: "".join(chr(48 + i) for i in ids)}  # one char per id
    ref_s = nj.generate(models["target"], TARGET, PROMPTS, **kw)
    assert len(ref_s[2]) < NEW  # the stop string cuts row 2
    chunks = list(nj.generate_stream(models["target"], TARGET, PROMPTS, chunk_size=5, **kw,
                                     draft=(models["near"], TARGET), num_speculative_tokens=3))
    joined = [sum((c[b] for c in chunks), []) for b in range(len(PROMPTS))]
    assert joined == ref_s


def _np_ngram(hist, end, pad, k, ngram):
    """Plain-Python prompt lookup: longest n-gram first, most recent occurrence."""
    out = []
    for row, pd in zip(hist, pad, strict=True):
        start = end
        for m in range(ngram, 0, -1):
            tail = list(row[end - m + 1:end + 1])
            hits = [i for i in range(pd + m - 1, end) if list(row[i - m + 1:i + 1]) == tail]
            if hits:
                start = hits[-1] + 1
                break
        out.append([row[min(start + j, end)] for j in range(k)])
    return out


def test_ngram_propose_matches_reference():
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 4, (16, 40)).astype(np.int32)  # a 4-token alphabet: many matches
    hist[0, :] = 0
    hist[0, 30:36] = [1, 2, 3, 1, 2, 3]  # row 0: the trigram (1, 2, 3) recurs right before the end
    hist[1, 35:] = [9, 9, 9, 9, 8]  # row 1: its last token occurs nowhere before: no match
    pad = rng.integers(0, 10, (16,)).astype(np.int32)
    pad[:2] = 0
    for end, k, ngram in [(35, 4, 3), (39, 3, 2), (20, 5, 1)]:
        got = np.asarray(ngram_propose(jnp.asarray(hist), jnp.int32(end), jnp.asarray(pad), k, ngram))
        assert got.tolist() == _np_ngram(hist, end, pad, k, ngram), (end, k, ngram)
    got = np.asarray(ngram_propose(jnp.asarray(hist), jnp.int32(35), jnp.asarray(pad), 4, 3))
    assert got[0].tolist() == [1, 2, 3, 3]  # follows the earlier (1, 2, 3), clipped at the end
    assert np.asarray(ngram_propose(jnp.asarray(hist), jnp.int32(39), jnp.asarray(pad), 3, 2))[1].tolist() \
        == [8, 8, 8]


def _tv(samples: np.ndarray, probs: np.ndarray) -> float:
    freq = np.bincount(samples, minlength=probs.size) / samples.size
    return 0.5 * float(np.abs(freq - probs).sum())


def test_rejection_sampler_follows_target():
    """k = 2 on a 6-token vocabulary, q far from p (most of q's mass where p has none)."""
    p = np.array([[0.5, 0.3, 0.1, 0.1, 0.0, 0.0],
                  [0.05, 0.05, 0.2, 0.2, 0.3, 0.2],
                  [0.0, 0.6, 0.0, 0.0, 0.4, 0.0]], np.float32)  # (k+1, V)
    q = np.array([[0.05, 0.05, 0.1, 0.2, 0.3, 0.3],
                  [0.4, 0.1, 0.1, 0.1, 0.1, 0.2]], np.float32)  # (k, V)
    N = 200_000
    rng = np.random.default_rng(0)
    draft = np.stack([rng.choice(6, N, p=q[i]) for i in range(2)], 1).astype(np.int32)  # d_i ~ q_i
    acc, nxt = speculative_accept(jnp.broadcast_to(p, (N, 3, 6)), jnp.broadcast_to(q, (N, 2, 6)),
                                  jnp.asarray(draft), jax.random.key(0))
    acc, nxt = np.asarray(acc), np.asarray(nxt)
    x1 = np.where(acc >= 1, draft[:, 0], nxt)  # the first emitted token
    assert _tv(x1, p[0]) < 0.006
    x2 = np.where(acc >= 2, draft[:, 1], nxt)[acc >= 1]  # the second, where the first was a draft
    assert _tv(x2, p[1]) < 0.01
    assert _tv(nxt[acc == 2], p[2]) < 0.02  # the bonus token
    # The acceptance rate is sum_x min(p, q) (Leviathan et al. 2023, definition 3.1).
    assert abs(np.mean(acc >= 1) - np.minimum(p[0], q[0]).sum()) < 0.005


def test_sampled_tokens_follow_target_end_to_end(models):
    """4096 copies of one prompt, temperature 0.8 and top_k 5 on an 8-token model with a very
    different draft: the marginals of new tokens 1 and 2 (made by speculative iterations, rows
    advancing by the batch minimum) match the target's exact ones from nj.forward."""
    cfg = nj.ModelConfig(vocab_size=8, n_layer=1, n_head=2, d_model=16, max_seq_len=16)
    params, dparams = np_params(cfg, 3), np_params(cfg, 4)
    prompt, B, temp, top_k = [1, 2, 3], 4096, 0.8, 5
    stats = {}
    out = np.array(nj.generate(params, cfg, [prompt] * B, max_new_tokens=3, temperature=temp, top_k=top_k,
                               seed=1, draft=(dparams, cfg), num_speculative_tokens=2, stats=stats))

    def dist(logits):  # numpy: the sampler's distribution, temperature then top-k
        z = np.asarray(logits, np.float64) / temp
        z = np.where(z >= np.sort(z, -1)[..., -top_k:-top_k + 1], z, -np.inf)
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    seqs = np.array([prompt + list(x) for x in itertools.product(range(8), repeat=2)])  # (64, 5)
    pr = dist(nj.forward(params, jnp.asarray(seqs), cfg))  # (64, 5, 8)
    p0 = pr[0, 2]  # token 0 after the prompt
    p1 = np.einsum("a,ab->b", p0, pr[::8, 3])  # marginal of token 1
    p2 = np.einsum("a,ab,abc->c", p0, pr[::8, 3], pr[:, 4].reshape(8, 8, 8))  # of token 2
    assert 0.05 < stats["acceptance_rate"] < 0.95, stats
    assert _tv(out[:, 0], p0) < 0.03
    assert _tv(out[:, 1], p1) < 0.03
    assert _tv(out[:, 2], p2) < 0.03


@pytest.mark.parametrize("kw, match", [
    ({"draft": "other"}, "vocab_size .* differs"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an int >= 1"),
    ({"overflow": "slide"}, "overflow='error' only"),
    ({"kv_cache_dtype": "int8"}, "kv_cache_dtype"),
    ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"draft": "short"}, "draft model's context max_seq_len=16"),
    ({"draft": "ngram"}, "draft must be"),
    ({"draft": "prompt_lookup", "prompt_lookup_ngram": 0}, "prompt_lookup_ngram must be"),
    ({"draft": "params"}, "draft must be a \\(draft_params, draft_cfg\\) pair"),
])
def test_bad_inputs(models, kw, match):
    drafts = {"other": (np_params(OTHER.replace(vocab_size=50), 0), OTHER.replace(vocab_size=50)),
              "short": (models["other"], OTHER.replace(max_seq_len=16)), "params": models["other"]}
    kw = {"draft": (models["near"], TARGET), **kw}
    kw["draft"] = drafts.get(kw["draft"], kw["draft"]) if isinstance(kw["draft"], str) else kw["draft"]
    with pytest.raises(ValueError, match=match):
        nj.generate(models["target"], TARGET, PROMPTS, max_new_tokens=NEW, **kw)
    with pytest.raises(ValueError, match=match):
        next(nj.generate_stream(models["target"], TARGET, PROMPTS, max_new_tokens=NEW, **kw))
