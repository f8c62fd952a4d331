"""`quantize(params, cfg, scheme)`: a float params tree -> the same tree with quantized records.

    qparams = nj.quantize(params, cfg, "int8")                  # per output channel
    qparams = nj.quantize(params, cfg, "int4", group_size=32)   # group-wise along the input dim
    logits = nj.forward(qparams, tokens, cfg)                   # forward / generate take it as is

What is quantized: every weight matrix of the blocks (wq wk wv wo, the MLP's), each through its
2-D (I, O) view; the embedding tables (tokens, learned positions) and an untied head in int8,
one scale per row (`embeddings=True`). Norm scales and biases stay float: small and sensitive.

Rounding is symmetric round-to-nearest. int8: scale = max|w| / 127 per group. int4: the scale
is the group's signed extreme divided by -8, so the extreme lands exactly on -8 and all 16
levels are used (ggml's Q4_0 rule, ggml-quants.c `quantize_row_q4_0_ref`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanojax.config import ModelConfig
from nanojax.quant.arrays import INT4_GROUPS, QuantizedMatrix, QuantizedTable, is_quantized, pack_int4

SCHEMES = ("int8", "int4")
Params = dict[str, Any]


class QuantizeError(ValueError):
    """A quantization request that cannot be carried out as asked."""


def _matrices(params: Params) -> list[tuple[tuple, int]]:
    """(path, in_dims) of every block weight matrix: in_dims leading axes form I."""
    out = []
    for i, layer in enumerate(params["layers"]):
        for name in layer["attn"]:
            if name.startswith("w"):
                out.append((("layers", i, "attn", name), 2 if name == "wo" else 1))
        for name in layer["mlp"]:
            if name.startswith("w"):
                out.append((("layers", i, "mlp", name), 1))
    if "lm_head" in params:
        out.append((("lm_head",), 1))
    return out


def _get(tree: Any, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _fmt(path: tuple) -> str:
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")


def _check(params: Params, scheme: str, group_size: int | None) -> int | None:
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantization scheme {scheme!r}; supported: {', '.join(SCHEMES)}")
    if not isinstance(params, dict) or "layers" not in params or "wte" not in params:
        raise QuantizeError("params must be a nanojax params tree (a dict with 'wte' and 'layers'), "
                            f"got {type(params).__name__}")
    done = [jax.tree_util.keystr(kp) for kp, x in
            jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0] if is_quantized(x)]
    if done:
        raise QuantizeError(f"params are already quantized ({len(done)} records, e.g. at {done[0]}); "
                            "quantize the float params (load the unquantized checkpoint again)")
    if group_size is None:
        return None if scheme == "int8" else 32
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer) or group_size < 2:
        raise QuantizeError(f"group_size must be an int >= 2 (or None), got {group_size!r}")
    if scheme == "int4" and group_size not in INT4_GROUPS:
        raise QuantizeError(f"int4 group_size must be one of {INT4_GROUPS}, got {group_size}")
    return int(group_size)


def quantize(params: Params, cfg: ModelConfig, scheme: str, group_size: int | None = None, *,
             embeddings: bool = True, kernel_activations: str = "fp32") -> Params:
    """The params tree with every block weight matrix replaced by a `QuantizedMatrix`.

    scheme: "int8" (symmetric, one scale per output channel, or per `group_size` inputs when
      given) or "int4" (symmetric, group-wise along the input dim; group_size 32, 64 or 128,
      default 32; two values a byte).
    embeddings: also hold the token embedding, learned positions and an untied head in int8,
      one scale per row. The lookup then dequantizes only the rows it gathers; a tied head is
      the same record as the embedding.
    kernel_activations: "fp32" (exact: the CPU kernels give the pure-JAX numbers) or "int8"
      (the block weights' CPU kernels round x to int8 per 32 inputs and use AVX-512 VNNI, as
      llama.cpp does: faster, ~0.5-1% output error; see nanojax/quant/ffi.py).
    Scales are in `cfg.compute_dtype`. Every check runs before anything is quantized, so a bad
    request leaves nothing half-done. Raises QuantizeError.
    """
    group = _check(params, scheme, group_size)
    if kernel_activations not in ("fp32", "int8"):
        raise QuantizeError(f"kernel_activations must be 'fp32' or 'int8', got {kernel_activations!r}")
    bits = 8 if scheme == "int8" else 4
    todo = []
    for path, in_dims in _matrices(params):
        if path == ("lm_head",):
            if embeddings:
                todo.append((path, in_dims, 8, None))
            continue
        w = _get(params, path)
        I = int(np.prod(w.shape[:in_dims]))
        g = group or I
        if I % g:
            raise QuantizeError(
                f"group_size={g} does not divide the input dim I={I} of {_fmt(path)} (shape "
                f"{tuple(w.shape)}); pick a group size that divides every input dim "
                f"(d_model={cfg.d_model}, mlp={cfg.ff_dim}, heads*head_dim="
                f"{cfg.n_head * cfg.resolved_head_dim})")
        todo.append((path, in_dims, bits, g))
    dtype = cfg.compute_dtype
    out = jax.tree.map(lambda x: x, params)  # a fresh container tree; leaves shared
    for path, in_dims, b, g in todo:
        w = np.asarray(_get(params, path), np.float32)
        rec = quantize_matrix(w.reshape(int(np.prod(w.shape[:in_dims])), -1), b, g, dtype, w.shape)
        if path != ("lm_head",):
            rec = rec.replace(kernel_activations=kernel_activations)
        parent = _get(out, path[:-1]) if len(path) > 1 else out
        parent[path[-1]] = rec
    if embeddings:
        wte = np.asarray(params["wte"], np.float32)  # (V, D): the tied head (D, V) is wte.T
        out["wte"] = QuantizedTable(quantize_matrix(wte.T, 8, None, dtype, wte.T.shape))
        if "wpe" in params:  # learned positions: a table too, looked up by position
            wpe = np.asarray(params["wpe"], np.float32)
            out["wpe"] = QuantizedTable(quantize_matrix(wpe.T, 8, None, dtype, wpe.T.shape))
    return out


def quantize_matrix(w: np.ndarray, bits: int, group_size: int | None, dtype: Any = jnp.float32,
                    shape: tuple[int, ...] | None = None) -> QuantizedMatrix:
    """w float (I, O) -> QuantizedMatrix (bits 8 or 4, groups of `group_size` inputs; None: I).

    shape: the stored shape the record stands for (default (I, O))."""
    w = np.asarray(w, np.float32)
    I, O = w.shape
    G = group_size or I
    wt = w.T.reshape(O, I // G, G)  # out-major groups
    if bits == 8:
        amax = np.abs(wt).max(axis=-1)
        scale = np.asarray(jnp.asarray(amax / 127.0, dtype).astype(jnp.float32))
        lo, hi = -127, 127
    else:
        idx = np.abs(wt).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(wt, idx, axis=-1)[..., 0]  # signed value of largest |w|
        scale = np.asarray(jnp.asarray(extreme / -8.0, dtype).astype(jnp.float32))
        lo, hi = -8, 7
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    vals = np.clip(np.rint(wt * inv[..., None]), lo, hi).astype(np.int8).reshape(O, I)
    q = vals if bits == 8 else pack_int4(vals)
    return QuantizedMatrix(jnp.asarray(q), jnp.asarray(scale, dtype), bits, G,
                           tuple(shape) if shape is not None else (I, O))


def dequantize(params: Params, dtype: Any = jnp.float32) -> Params:
    """Every record back to a float array of its stored shape: the reference the tests compare
    the quantized forward against."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def weight_bytes(params: Params) -> int:
    """Bytes of every array in the tree (records count their packed values and scales)."""
    return int(sum(x.nbytes for x in jax.tree.leaves(params)))
