"""Sampler distributions against an outside oracle.

Token frequencies from many seeded draws (one compiled call per sampler, the rows tiled) are
compared with softmax(logits / T) after HF's top-k, top-p and min-p warpers, written here in numpy
(and pinned to transformers' own warpers when torch is installed). The bound is on total variation
(TV): with N draws over V tokens its sampling noise is at most about 0.5 * sqrt(2 V / (pi N)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanojax as nj
from nanojax.model import ParamSpec, param_specs
from nanojax.sampling import sample_tokens

V = 12
N_DRAWS = 50_000  # per row: TV noise <= ~0.007 here (measured), TOL ~3x that; broken samplers >= 3 x TOL
TOL = 0.02
_P = np.log([0.3, 0.2, 0.14, 0.1, 0.07, 0.055, 0.045, 0.03, 0.02, 0.015, 0.01, 0.005])
_RNG = np.random.default_rng(0)
# Three rows, not sorted by id (so a sampler that forgets to map sorted candidates back to ids is
# caught): medium, flat (x 0.6) and peaky (x 1.5) versions of one profile.
ROWS = np.stack([_P[_RNG.permutation(V)], 0.6 * _P[_RNG.permutation(V)], 1.5 * _P[_RNG.permutation(V)]])

SAMPLERS = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=2.0),
    dict(temperature=0.8, top_k=4),
    dict(temperature=0.7, top_p=0.8),
    dict(temperature=1.3, min_p=0.3),
    dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.1),
]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference(logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None,
               min_p: float | None = None) -> np.ndarray:
    """HF's warpers in numpy, each on the previous one's output: TemperatureLogitsWarper, then
    TopK (the k largest), TopP (a token stays while the mass strictly above it is < top_p) and
    MinP (a token stays when its probability is >= min_p x the best one's). Returns probs (R, V)."""
    x = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        kth = -np.sort(-x, axis=-1)[:, top_k - 1: top_k]
        x = np.where(x < kth, -np.inf, x)
    if top_p is not None:
        p = _softmax(x)
        order = np.argsort(-x, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        drop = np.zeros(x.shape, bool)
        np.put_along_axis(drop, order, np.cumsum(sorted_p, -1) - sorted_p >= top_p, -1)
        x = np.where(drop, -np.inf, x)
    if min_p is not None:
        p = _softmax(x)
        x = np.where(p < min_p * p.max(-1, keepdims=True), -np.inf, x)
    return _softmax(x)


def _tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p - q).sum(-1)


def _frequencies(tokens: np.ndarray, rows: int, n: int) -> np.ndarray:
    """tokens (n * rows,) from rows tiled n times -> per-row token frequencies (rows, V)."""
    t = np.asarray(tokens).reshape(n, rows)
    return np.stack([np.bincount(t[:, r], minlength=V) for r in range(rows)]) / n


def test_the_numpy_reference_is_hfs_warpers():
    """_reference equals transformers' Temperature/TopK/TopP/MinP warpers applied in HF's order."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = np.random.default_rng(1).normal(size=(64, V)) * 2
    for kw in SAMPLERS + [dict(temperature=1.1, top_p=0.5), dict(temperature=0.9, min_p=0.05)]:
        warpers = [lp.TemperatureLogitsWarper(kw["temperature"])]
        if "top_k" in kw:
            warpers.append(lp.TopKLogitsWarper(kw["top_k"]))
        if "top_p" in kw:
            warpers.append(lp.TopPLogitsWarper(kw["top_p"]))
        if "min_p" in kw:
            warpers.append(lp.MinPLogitsWarper(kw["min_p"]))
        scores = torch.tensor(logits)
        for w in warpers:
            scores = w(None, scores)
        np.testing.assert_allclose(_reference(logits, **kw), torch.softmax(scores, -1).numpy(), atol=1e-9,
                                   err_msg=str(kw))


@pytest.mark.parametrize("kw", SAMPLERS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_the_reference_tells_broken_samplers_apart(kw):
    """The rows are chosen so each broken sampler is >= 3 x TOL away (TV) from the right one, or
    draws a token the right one never draws (or never draws one it draws ~1000 times)."""
    ref = _reference(ROWS, **kw)
    kept = ref > 0
    assert np.all(_tv(ref, kept / kept.sum(-1, keepdims=True)) >= 3 * TOL)  # uniform among the kept
    if len(kw) == 1 and kw["temperature"] != 1.0:
        assert np.all(_tv(ref, _reference(ROWS, 1.0)) >= 3 * TOL)  # temperature ignored
    if len(kw) > 1:  # the boundary tokens of the kept set are likely enough to show up
        tempered = _softmax(ROWS / kw["temperature"])
        assert np.all(np.where(kept, ref, 1).min(-1) >= 0.02)  # least likely kept token
        assert np.all(np.where(kept, 0, tempered).max(-1) >= 0.02)  # most likely dropped token


@pytest.mark.parametrize("kw", SAMPLERS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sample_tokens_frequencies_match_the_reference(kw):
    """N_DRAWS draws per row from sample_tokens: exactly the reference's kept tokens are drawn
    (every one with p >= 1e-3, ~50 expected draws, appears), and the frequencies are within TOL
    (TV) of the reference distribution."""
    key = jax.random.key(sum(map(ord, str(kw))))
    tiled = jnp.asarray(np.tile(ROWS, (N_DRAWS, 1)), jnp.float32)  # one call: row i draws for ROWS[i % 3]
    freq = _frequencies(sample_tokens(tiled, key, **kw), len(ROWS), N_DRAWS)
    ref = _reference(ROWS, **kw)
    for r in range(len(ROWS)):
        drawn = set(np.flatnonzero(freq[r]).tolist())
        assert drawn <= set(np.flatnonzero(ref[r]).tolist()), (r, freq[r], ref[r])
        assert drawn >= set(np.flatnonzero(ref[r] >= 1e-3).tolist()), (r, freq[r], ref[r])
    tv = _tv(freq, ref)
    assert np.all(tv < TOL), (tv, freq.round(3), ref.round(3))


def _params(cfg: nj.ModelConfig, seed: int) -> dict:
    """Random params with init_params' structure and scales, from numpy (init_params' jax.random
    compiles for each new shape, seconds per config)."""
    rng = np.random.default_rng(seed)

    def make(s: ParamSpec) -> jax.Array:
        x = rng.normal(0.0, s.std, s.shape) if s.init == "normal" else np.full(s.shape, s.init == "ones")
        return jnp.asarray(x.astype(cfg.weight_dtype))  # cast on the host: nothing to compile

    return jax.tree.map(make, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def test_generate_first_token_frequencies_match_the_reference():
    """nj.generate end to end: the first sampled token of 10,000 copies of each of two ragged
    prompts (one batch, one seed) follows the reference applied to nj.forward's fp32 logits."""
    cfg = nj.ModelConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_seq_len=16, init_std=0.3)
    params = _params(cfg, 0)
    prompts, n = [[3, 1, 4], [1, 5, 9, 2, 6]], 10_000
    kw = dict(temperature=0.6, top_p=0.9)
    out = nj.generate(params, cfg, prompts * n, max_new_tokens=1, seed=7, **kw)
    toks = np.array([o[0] for o in out])
    counts = np.stack([np.bincount(toks[r::2], minlength=16) for r in range(2)]) / n
    padded = jnp.asarray([p + [0] * (5 - len(p)) for p in prompts])  # causal: the padding is unseen
    logits = np.asarray(jax.jit(nj.forward, static_argnums=2)(params, padded, cfg))[[0, 1], [2, 4]]
    ref = _reference(logits, **kw)
    # The test can tell: ignoring the temperature moves the distribution far away, and ignoring
    # top_p draws tokens the reference drops (p > 0.01 each: ~100 draws).
    assert np.all(_tv(ref, _reference(logits, 1.0, top_p=0.9)) > 0.2)
    assert np.all(np.where(ref == 0, _reference(logits, 0.6), 0).max(-1) > 0.01)
    for r in range(2):
        assert set(np.flatnonzero(counts[r]).tolist()) <= set(np.flatnonzero(ref[r]).tolist())
    tv = _tv(counts, ref)  # noise ~0.01 at V=16, n=10,000
    assert np.all(tv < 0.04), (tv, counts.round(3), ref.round(3))


def test_argmax_is_numpys_first_index_of_the_max():
    """sampling.argmax (a max of order-preserving int keys, then the first index holding it) against
    np.argmax on ties, -inf, +inf, NaN of either sign (the first NaN wins, as in np/jnp.argmax),
    -0.0 against 0.0 (equal: the first), negatives, bf16 and a 32000-token vocabulary; subnormals
    against jnp.argmax."""
    from nanojax.sampling import argmax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 32000)).astype(np.float32)
    x[0, [7, 31999]] = 50.0  # a tie: the first wins
    x[1, [31999, 7]] = [9.0, 9.0]
    x[2] = -np.inf  # all -inf: index 0
    x[3, ::2] = -np.inf
    x[4, [100, 200]] = np.inf
    x[5, [300, 40]] = np.nan  # NaN beats everything: the first NaN
    x[6, 31999] = 1e30  # the last index
    x[7] = np.float32(3.0)  # all equal
    x[8, [0, 5]] = [-0.0, 0.0]
    x[8, 1:] = -1.0
    x[8, 5] = 0.0
    x[9] = -rng.uniform(1, 5, 32000)  # all negative: the least negative wins
    x[10, [50, 70]] = [-np.nan, np.nan]  # a NaN with its sign bit set counts as well
    x[11] = rng.normal(size=32000) * 1e-40  # subnormals: XLA:CPU flushes them to zero, jnp.argmax too
    got = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got[:11], np.argmax(x[:11], axis=-1))
    assert got[11] == int(jax.jit(lambda r: jnp.argmax(r))(x[11])) == 0
    assert got.dtype == np.int32
    half = jnp.asarray(x[:11, :4000], jnp.bfloat16)  # bf16 logits: the same rule
    np.testing.assert_array_equal(np.asarray(argmax(half)), np.argmax(np.asarray(half, np.float32), axis=-1))
    small = jnp.asarray([[1.0, 3.0, 3.0, 2.0]])
    assert int(argmax(small)[0]) == 1 and argmax(jnp.asarray([2.0, 5.0])).shape == ()


def test_categorical_draws_what_jax_random_categorical_draws():
    """sampling.categorical is jax.random.categorical with the fast argmax: the same token for the
    same key, over many keys (with -inf entries, as the filters leave them)."""
    from nanojax.sampling import categorical

    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 60)) * 2, jnp.float32)
    logits = logits.at[:, ::3].set(-jnp.inf)
    keys = jax.random.split(jax.random.key(5), 64)
    both = jax.jit(jax.vmap(lambda k: (categorical(k, logits), jax.random.categorical(k, logits, axis=-1))))
    ours, theirs = both(keys)  # one compiled call: jax.random compiles slowly on CPU
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert len(np.unique(np.asarray(ours))) > 20  # the keys draw different tokens


@pytest.mark.parametrize("scale", [0.3, 8.0], ids=["flat:bisection", "peaked:top-candidates"])
def test_top_k_top_p_keep_is_hfs_kept_set(scale):
    """The per-row top-k/top-p mask (no vocabulary sort) keeps exactly the tokens HF's warpers
    keep (_reference), row by row with its own values, on a vocabulary wider than its candidate
    list: flat logits (the boundary beyond the candidates: bisection) and peaked ones (inside)."""
    from nanojax.sampling import TOP_CANDIDATES, top_k_top_p_keep

    Vw = 4 * TOP_CANDIDATES + 37
    rng = np.random.default_rng(2)
    knobs = [(None, 0.9), (5, None), (None, None), (40, 0.5), (1, 0.3), (None, 0.2), (TOP_CANDIDATES, 0.999)]
    if scale < 1:  # top_k between the candidates and the vocabulary always needs the bisection
        knobs.append((3 * TOP_CANDIDATES, 0.97))
    x = (rng.normal(size=(len(knobs), Vw)) * scale).astype(np.float32)
    keep = np.asarray(top_k_top_p_keep(jnp.asarray(x), jnp.asarray([k or Vw for k, _ in knobs], jnp.int32),
                                       jnp.asarray([p or 1.0 for _, p in knobs], jnp.float32)))
    for r, (k, p) in enumerate(knobs):
        want = _reference(x[r:r + 1], 1.0, top_k=k, top_p=p)[0] > 0
        np.testing.assert_array_equal(keep[r], want, err_msg=f"row {r}: top_k={k} top_p={p}")
