"""How much a quantization costs: whole-split loss, KL to the float model, and weight bytes.

    rows = quality_report(params, cfg, val_tokens, [("int8", None), ("int4", 32)])

Every row scores the same windows: all targets of the split once, in non-overlapping windows
of max_seq_len (data.full_split_batches, as train()'s whole-split val loss), so the float row
is the training run's `val_loss_full`. KL is KL(p_float || p_quant) in nats per token, averaged
over the same targets: how far the quantized model's next-token distribution moved.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanojax.config import ModelConfig
from nanojax.data import full_split_batches
from nanojax.model import forward
from nanojax.quant.arrays import is_quantized
from nanojax.quant.quantize import quantize, weight_bytes


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sums(params: Any, ref_params: Any, x: jax.Array, y: jax.Array, w: jax.Array, *,
          cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Sum over weighted targets of the loss and of KL(ref || params). x, y, w: (B, T)."""
    logp = jax.nn.log_softmax(forward(params, x, cfg), axis=-1)  # (B, T, V)
    ref = jax.nn.log_softmax(forward(ref_params, x, cfg), axis=-1)
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(ref) * (ref - logp), axis=-1)
    return jnp.sum(nll * w), jnp.sum(kl * w)


def matrix_bytes(params: Any) -> int:
    """Bytes of the records only (their packed values and scales)."""
    leaves = jax.tree.leaves(params, is_leaf=is_quantized)
    return int(sum(x.nbytes for x in leaves if is_quantized(x)))


def quality_report(params: Any, cfg: ModelConfig, tokens: np.ndarray,
                   schemes: list[tuple[str, int | None]], batch_size: int = 64) -> list[dict[str, Any]]:
    """One row per scheme (and the float model first): loss, its relative rise, KL, bytes.

    tokens: the split, (n,) int ids. Returns dicts with scheme, group_size, loss (nats/token),
    rise (relative to float), kl (nats/token), bytes (whole tree), bytes_ratio (to float),
    matrix_ratio (quantized matrices' bytes to the same matrices in float32)."""
    n = len(tokens) - 1
    float_bytes = weight_bytes(params)

    def score(p: Any) -> tuple[float, float]:
        parts = [_sums(p, params, x, y, w, cfg=cfg)
                 for x, y, w in full_split_batches(tokens, cfg.max_seq_len, batch_size)]
        tot = np.sum(np.asarray(jax.device_get(parts), np.float64), axis=0)
        return float(tot[0] / n), float(tot[1] / n)

    base, _ = score(params)
    rows = [dict(scheme="float32", group_size=None, loss=base, rise=0.0, kl=0.0, bytes=float_bytes,
                 bytes_ratio=1.0, matrix_ratio=1.0)]
    for scheme, group in schemes:
        q = quantize(params, cfg, scheme, group)
        loss, kl = score(q)
        recs = [x for x in jax.tree.leaves(q, is_leaf=is_quantized) if is_quantized(x)]
        n_weights = sum(int(np.prod(r.shape)) for r in recs)
        rows.append(dict(scheme=scheme, group_size=group, loss=loss, rise=loss / base - 1.0, kl=kl,
                         bytes=weight_bytes(q), bytes_ratio=weight_bytes(q) / float_bytes,
                         matrix_ratio=matrix_bytes(q) / (4 * n_weights)))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of quality_report's rows."""
    lines = ["| scheme | group | val loss | rise | KL to fp32 (nats/token) | weight bytes | x fp32 "
             "(whole tree) | x fp32 (quantized matrices) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = "channel" if r["group_size"] is None and r["scheme"] == "int8" else (r["group_size"] or "-")
        lines.append(f"| {r['scheme']} | {g} | {r['loss']:.4f} | {100 * r['rise']:+.2f}% | {r['kl']:.5f} | "
                     f"{r['bytes']:,} | {r['bytes_ratio']:.3f} | {r['matrix_ratio']:.3f} |")
    return "\n".join(lines)
