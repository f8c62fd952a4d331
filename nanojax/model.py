"""The whole transformer, top to bottom: params, init, forward.

Params are a nested dict; `params["layers"]` is a list with one dict per block, walked by a plain
Python loop (nanoGPT's `for block in self.h`). Layout, with logical axis names for sharding:

    wte      (V, D)     vocab, embed         token embedding (also the head when tied)
    wpe      (T, D)     -, embed             learned positions (GPT-2 only)
    layers[i]:
      ln1/ln2  {scale (D), bias (D)}          LayerNorm, or RMSNorm with scale only
      attn     wq (D, N, H), wk/wv (D, K, H), wo (N, H, D); optional bq/bk/bv, bo
      mlp      gelu:   w_in (D, F), w_out (F, D), optional b_in (F), b_out (D)
               swiglu: w_gate (D, F), w_up (D, F), w_down (F, D)
    ln_f     final norm
    lm_head  (D, V)                          only when the head is untied

Activations stay 2-D, (B*T, D), through dense layers, norms and residuals: on XLA:CPU the weight
gradient of a 3-D `x @ W` contracts two axes and became a slow transposing fusion (DESIGN.md).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.ad_checkpoint
import jax.numpy as jnp

from nanojax.attention import attention
from nanojax.config import REMAT, ModelConfig
from nanojax.dense import dense, dense_transposed, lookup

Params = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Parameter specs: one place that knows every leaf's shape, logical axes and initialiser.


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, mapped to mesh axes by nanojax.sharding
    init: str  # "normal", "zeros" or "ones"
    std: float = 0.0


def param_specs(cfg: ModelConfig) -> Params:
    """The params pytree with a ParamSpec at every leaf."""
    D, N, K, H, F = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.resolved_head_dim, cfg.ff_dim
    std = cfg.init_std
    # GPT-2 scales the init of the projections that write into the residual stream by
    # 1/sqrt(2L), so the stream's variance does not grow with depth (GPT-2 paper, section 2.3).
    proj_std = std / math.sqrt(2 * cfg.n_layer)

    def w(shape, axes, s=std):
        return ParamSpec(tuple(shape), tuple(axes), "normal", s)

    def zeros(shape, axes):
        return ParamSpec(tuple(shape), tuple(axes), "zeros")

    def norm():
        p = {"scale": ParamSpec((D,), ("embed",), "ones")}
        if cfg.norm == "layernorm" and cfg.bias:
            p["bias"] = zeros((D,), ("embed",))
        return p

    def layer():
        attn = {
            "wq": w((D, N, H), ("embed", "heads", "head_dim")),
            "wk": w((D, K, H), ("embed", "kv_heads", "head_dim")),
            "wv": w((D, K, H), ("embed", "kv_heads", "head_dim")),
            "wo": w((N, H, D), ("heads", "head_dim", "embed"), proj_std),
        }
        if cfg.use_qkv_bias:
            attn["bq"] = zeros((N, H), ("heads", "head_dim"))
            attn["bk"] = zeros((K, H), ("kv_heads", "head_dim"))
            attn["bv"] = zeros((K, H), ("kv_heads", "head_dim"))
        if cfg.bias:
            attn["bo"] = zeros((D,), ("embed",))
        if cfg.mlp == "swiglu":
            mlp = {
                "w_gate": w((D, F), ("embed", "mlp")),
                "w_up": w((D, F), ("embed", "mlp")),
                "w_down": w((F, D), ("mlp", "embed"), proj_std),
            }
        else:
            mlp = {"w_in": w((D, F), ("embed", "mlp")), "w_out": w((F, D), ("mlp", "embed"), proj_std)}
        if cfg.bias:
            mlp["b_in" if cfg.mlp == "gelu" else "b_up"] = zeros((F,), ("mlp",))
            mlp["b_out" if cfg.mlp == "gelu" else "b_down"] = zeros((D,), ("embed",))
            if cfg.mlp == "swiglu":
                mlp["b_gate"] = zeros((F,), ("mlp",))
        return {"ln1": norm(), "attn": attn, "ln2": norm(), "mlp": mlp}

    specs: Params = {"wte": w((cfg.vocab_size, D), ("vocab", "embed"))}
    if cfg.pos_emb == "learned":
        specs["wpe"] = w((cfg.max_seq_len, D), (None, "embed"), cfg.pos_init_std)
    specs["layers"] = [layer() for _ in range(cfg.n_layer)]
    specs["ln_f"] = norm()
    if not cfg.tie_embeddings:
        specs["lm_head"] = w((D, cfg.vocab_size), ("embed", "vocab"))
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> Params:
    """The params pytree with the tuple of logical axis names at every leaf."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shapes(cfg: ModelConfig) -> Params:
    """The params pytree of `jax.ShapeDtypeStruct`s, without allocating anything."""
    dt = cfg.weight_dtype
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dt), param_specs(cfg), is_leaf=_is_spec)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random params in `cfg.param_dtype`: N(0, 0.02) weights, zero biases, unit norm scales."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    dt = cfg.weight_dtype

    def make(spec: ParamSpec, k: jax.Array) -> jax.Array:
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dt)
        if spec.init == "ones":
            return jnp.ones(spec.shape, dt)
        return (spec.std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dt)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys, strict=True)])


# ----------------------------------------------------------------------------------------------
# Building blocks. x is always 2-D here: (M, D) with M = B * T. Weight matrices go through
# nanojax.dense.dense, the one matmul seam.


def norm(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """LayerNorm or RMSNorm over the last axis, computed in float32. x: (M, D) -> x's dtype.

    A training or prefill batch on the CPU runs the fused kernel (nanojax.kernels.cpu_norm:
    the same numbers to fp32 rounding) where `cpu_norm.use_kernel` says so; otherwise XLA."""
    from nanojax.kernels import cpu_norm  # imports nanojax.dense, which imports this module

    if cpu_norm.use_kernel(x):
        return cpu_norm.layer_norm(x, p["scale"], p.get("bias"), rms=cfg.norm == "rmsnorm", eps=cfg.norm_eps,
                                   out_dtype=x.dtype)
    xf = x.astype(jnp.float32)
    if cfg.norm == "rmsnorm":
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
    else:
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        xc = xf - mean
        y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + cfg.norm_eps)
    y = y * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def rope_table(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """RoPE's cos and sin for `positions` (B, T) int: float32 (B, T, 1, H/2) each, angle
    positions * theta^(-2i/H) for pair i.

    Every layer rotates by the same angles, so `hidden_states` traces this once for all blocks.
    XLA:CPU may still fuse a copy of the sin/cos into each layer's q and k fusions and evaluate
    them per output element (N*H elements, not H/2): in a decode step that cost ~6 us per layer
    at llama-134m, so the decode loops pass `rope_cs` gathered from a table they make before their
    while loop (docs/performance/decode.md, "Decode: the non-matmul ops")."""
    inv_freq = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)  # (H/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rope(x: jax.Array, positions: jax.Array, theta: float,
         table: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Rotary position embedding, half-split convention (GPT-NeoX / HF Llama).

    x: (B, T, N, H); positions: (B, T) int. Pairs (i, i + H/2) rotate by positions * theta^(-2i/H).
    table: `rope_table(positions, H, theta)` if the caller already has it (the same numbers).
    """
    cos, sin = table if table is not None else rope_table(positions, x.shape[-1], theta)  # (B, T, 1, H/2)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _w(a: jax.Array, cfg: ModelConfig) -> jax.Array:
    return a.astype(cfg.compute_dtype)


def _plus_bias_f32(h: jax.Array, bias: jax.Array | None) -> jax.Array:
    """h (M, F) + bias (F,) in float32, for the MLP's activation to run in float32 before the
    result goes back to the compute dtype. XLA:CPU emulates bf16 elementwise math: GELU's forward
    and backward over GPT-2's (512, 3072) took 2.2 + 8.4 ms in bf16 against 0.8 + 1.6 in fp32
    (Zen 5). In fp32 training the casts are no-ops; on a GPU they fuse into the same kernel."""
    hf = h.astype(jnp.float32)
    return hf if bias is None else hf + bias.astype(jnp.float32)


# An attention callable: (q (B,T,N,H), k (B,T,K,H), v (B,T,K,H), layer_state) -> (out, new_state).
# Training uses plain causal attention; generate.py passes one that reads and writes a KV cache;
# the manual sharded step passes ring attention over the sequence shards.
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class BlockComms:
    """Where Megatron tensor parallelism communicates inside a block (Shoeybi et al. 2019, sec. 3,
    their f and g). `enter` takes the normed input of the column-split projections (q/k/v, MLP
    in); `leave` takes the row-split projections' partial outputs (attention out, MLP down)
    before their bias. nanojax.train.manual supplies them; None in `block` means no calls."""

    enter: Callable[[jax.Array], jax.Array]  # (M, D) -> (M, D): identity forward
    leave: Callable[[jax.Array], jax.Array]  # (M, D) partial sums -> (M, D) full sums


def checkpoint_name(x: jax.Array, name: str) -> jax.Array:
    """Names x for the remat policy "names" (an identity outside jax.checkpoint)."""
    return jax.ad_checkpoint.checkpoint_name(x, name)


# Names the "names" policy saves: attention's output before its projection (recomputing it means
# recomputing attention) and the MLP's activated hidden layer (the widest tensor of a block).
REMAT_SAVED_NAMES = ("attn_context", "mlp_hidden")


def remat_policy(name: str) -> Callable | None:
    """The jax.checkpoint_policies policy for a ModelConfig.remat name; None for "none"."""
    cp = jax.checkpoint_policies
    policies = {
        "none": None,
        "full": cp.nothing_saveable,
        "dots": cp.dots_saveable,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
        "names": cp.save_only_these_names(*REMAT_SAVED_NAMES),
    }
    if name not in policies:
        raise ValueError(f"remat={name!r}; expected one of {REMAT}")
    return policies[name]


def remat_block(fn: Callable, cfg: ModelConfig) -> Callable:
    """fn wrapped in jax.checkpoint with cfg.remat's policy (fn itself for "none")."""
    if cfg.remat == "none":
        return fn
    return jax.checkpoint(fn, policy=remat_policy(cfg.remat))


def block(
    p: Params,
    x: jax.Array,
    cfg: ModelConfig,
    positions: jax.Array,
    attend: AttendFn,
    layer_state: Any = None,
    rng: jax.Array | None = None,
    comms: BlockComms | None = None,
    rope_cs: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, Any]:
    """One pre-norm transformer block. x: (B*T, D); positions: (B, T). Returns (x, layer_state).

    rope_cs: `rope_table(positions, ...)`, shared by all layers (computed here when None).

    comms: tensor parallelism's two collectives (BlockComms); None on one device and under jit,
    where the partitioner places them. With comms, cfg's n_head, n_kv_head and d_ff are this
    rank's shares."""
    B, T = positions.shape
    N, K, H = cfg.n_head, cfg.kv_heads, cfg.resolved_head_dim
    a = p["attn"]
    rngs = jax.random.split(rng, 2) if rng is not None else (None, None)

    h = norm(p["ln1"], x, cfg)
    if comms is not None:
        h = comms.enter(h)
    q = dense(h, a["wq"], cfg.compute_dtype)  # (B*T, N*H)
    k = dense(h, a["wk"], cfg.compute_dtype)  # (B*T, K*H)
    v = dense(h, a["wv"], cfg.compute_dtype)
    if "bq" in a:
        q = q + _w(a["bq"], cfg).reshape(N * H)
        k = k + _w(a["bk"], cfg).reshape(K * H)
        v = v + _w(a["bv"], cfg).reshape(K * H)
    q = q.reshape(B, T, N, H)
    k = k.reshape(B, T, K, H)
    v = v.reshape(B, T, K, H)
    if cfg.pos_emb == "rope":
        if rope_cs is None:
            rope_cs = rope_table(positions, H, cfg.rope_theta)
        q = rope(q, positions, cfg.rope_theta, rope_cs)
        k = rope(k, positions, cfg.rope_theta, rope_cs)
    o, layer_state = attend(q, k, v, layer_state)  # (B, T, N, H)
    o = checkpoint_name(o, "attn_context")
    o = dense(o.reshape(B * T, N * H), a["wo"], cfg.compute_dtype)  # (B*T, D)
    if comms is not None:
        o = comms.leave(o)
    if "bo" in a:
        o = o + _w(a["bo"], cfg)
    x = x + _dropout(o, cfg.dropout, rngs[0])

    m = p["mlp"]
    h = norm(p["ln2"], x, cfg)
    if comms is not None:
        h = comms.enter(h)
    if cfg.mlp == "swiglu":
        gate = _plus_bias_f32(dense(h, m["w_gate"], cfg.compute_dtype), m.get("b_gate"))
        up = _plus_bias_f32(dense(h, m["w_up"], cfg.compute_dtype), m.get("b_up"))
        hidden = (jax.nn.silu(gate) * up).astype(cfg.compute_dtype)
        h = dense(checkpoint_name(hidden, "mlp_hidden"), m["w_down"], cfg.compute_dtype)
        if comms is not None:
            h = comms.leave(h)
        if "b_down" in m:
            h = h + _w(m["b_down"], cfg)
    else:
        h = _plus_bias_f32(dense(h, m["w_in"], cfg.compute_dtype), m.get("b_in"))
        # tanh GELU: GPT-2's own ("gelu_new" in HF), and ~2x cheaper than erf's expansion on CPU.
        hidden = jax.nn.gelu(h, approximate=True).astype(cfg.compute_dtype)
        h = dense(checkpoint_name(hidden, "mlp_hidden"), m["w_out"], cfg.compute_dtype)
        if comms is not None:
            h = comms.leave(h)
        if "b_out" in m:
            h = h + _w(m["b_out"], cfg)
    x = x + _dropout(h, cfg.dropout, rngs[1])
    return x, layer_state


def causal_attend(cfg: ModelConfig) -> AttendFn:
    """Plain causal self-attention over the current tokens: the training path."""

    def attend(q, k, v, state):
        return attention(q, k, v, impl=cfg.attn_impl), state

    return attend


# Activation sharding. The model names logical axes only; while a sharded step is traced,
# nanojax.sharding.activation_sharding(mesh) installs the function that maps them to the mesh.
# Outside it (one device, generate, tests) `constrain` is the identity.
ConstrainFn = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
ACTIVATION_CONSTRAINT: contextvars.ContextVar[ConstrainFn | None] = contextvars.ContextVar(
    "nanojax_activation_constraint", default=None)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pins activation x's sharding by logical axis names (one per dim), if a mesh is active."""
    fn = ACTIVATION_CONSTRAINT.get()
    # A record (a quantized table, ...) is not an array: it is left where it lies.
    return x if fn is None or not isinstance(x, jax.Array) else fn(x, axes)


def embed(params: Params, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """tokens, positions: (B, T) int -> (B*T, D) in the compute dtype.

    Under a mesh the tables are gathered whole along the width first (FSDP's all-gather), so the
    looked-up rows come out split like the batch, not like the table."""
    x = lookup(constrain(params["wte"], ("vocab", None)), tokens, cfg.compute_dtype)  # (B, T, D)
    if cfg.pos_emb == "learned":
        x = x + lookup(constrain(params["wpe"], (None, None)), positions, cfg.compute_dtype)
    return constrain(x.reshape(-1, cfg.d_model).astype(cfg.compute_dtype), ("batch", None))


def unembed(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and head. x: (M, D) -> float32 logits (M, V)."""
    x = norm(params["ln_f"], x, cfg)
    if cfg.tie_embeddings:  # wte (V, D) is the head (D, V), read in place where it can be
        return dense_transposed(x, params["wte"], cfg.compute_dtype).astype(jnp.float32)
    return dense(x, params["lm_head"], cfg.compute_dtype).astype(jnp.float32)


def hidden_states(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array | None = None,
    attend: AttendFn | None = None,
    layer_states: list[Any] | None = None,
    dropout_rng: jax.Array | None = None,
    lora: Any = None,
    rope_cs: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, list[Any] | None]:
    """Embeddings and all blocks, before the final norm. Returns ((B*T, D), new layer states).

    rope_cs: `rope_table(positions, ...)` when the caller has it cheaper (a decode loop gathers it
    from a table made once outside the loop: see `rope_table`); computed here when None.

    lora: an adapter (nanojax.lora: LoraAdapter, or StackedLora for one adapter per row) whose
    `wrap` puts its low-rank updates on the weights it targets; they apply at the matmul seam.
    """
    B, T = tokens.shape
    if lora is not None:
        # The adapter's own dropout stream, independent of the model's (which it leaves as is).
        lora_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 0x10A)
        params = lora.wrap(params, cfg, lora_rng)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    attend = attend or causal_attend(cfg)
    rng_emb = rng_layers = None
    if dropout_rng is not None and cfg.dropout > 0:
        rng_emb, rng_layers = jax.random.split(dropout_rng)
    x = _dropout(embed(params, tokens, positions, cfg), cfg.dropout, rng_emb)

    # One RoPE table for every layer (rope_table says why).
    if rope_cs is None and cfg.pos_emb == "rope":
        rope_cs = rope_table(positions, cfg.resolved_head_dim, cfg.rope_theta)

    def run_block(p, x, state, rng):
        return block(p, x, cfg, positions, attend, state, rng, rope_cs=rope_cs)

    run_block = remat_block(run_block, cfg)

    L = cfg.n_layer
    layer_rngs = [None] * L if rng_layers is None else list(jax.random.split(rng_layers, L))
    if cfg.scan_layers and layer_states is None:
        # Stack inside the jit and scan: one compiled block, O(1) compile time in depth.
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *params["layers"])
        rngs = None if rng_layers is None else jnp.stack(layer_rngs)

        def body(x, inputs):
            p, rng = inputs
            x, _ = run_block(p, x, None, rng)
            return x, None

        x, _ = jax.lax.scan(body, x, (stacked, rngs))
        return x, None

    new_states = []
    for i, p in enumerate(params["layers"]):
        state = None if layer_states is None else layer_states[i]
        x, state = run_block(p, x, state, layer_rngs[i])
        new_states.append(state)
    return x, (new_states if layer_states is not None else None)


def forward(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    lora: Any = None,
) -> jax.Array:
    """Causal LM forward: int32 tokens (B, T) -> float32 logits (B, T, V).

    positions: optional (B, T) int positions (default 0..T-1 per row). dropout_rng: enables
    dropout (training); None is deterministic. lora: a LoRA adapter applied on top of the params
    (nanojax.lora; see hidden_states).
    """
    B, T = tokens.shape
    if T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
    x, _ = hidden_states(params, tokens, cfg, positions=positions, dropout_rng=dropout_rng, lora=lora)
    return unembed(params, x, cfg).reshape(B, T, cfg.vocab_size)
