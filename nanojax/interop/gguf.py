"""GGUF (llama.cpp's file format) in and out, with the `gguf` package.

    cfg, params = nj.load_gguf("model.gguf")        # Llama-family; F32/F16/BF16/Q8_0/Q4_0 tensors
    tok = load_gguf_tokenizer("model.gguf")          # from the GGUF vocabulary (see below)
    write_gguf(params, cfg, "model.gguf", "Q4_0")    # a float Llama-family tree -> F32/Q8_0/Q4_0

Q8_0 and Q4_0 blocks (32 weights and one fp16 scale each, along a row = along the input dim)
become nanojax's int8 / int4 records with group 32 as they are: the int8 values are copied and
Q4_0's nibbles re-packed (ggml puts element j in the low nibble and j + 16 in the high one of a
block's 16 bytes; nanojax pairs neighbours, arrays.py), and fp16 -> fp32 scales are exact, so
nothing is rounded twice. F16 and BF16 become float32 arrays (exact).

Q/K rows: llama.cpp's convert_hf_to_gguf.py permutes the rows of attn_q / attn_k within every
head from HF's half-split RoPE order (h = 0..H/2-1 | H/2..H-1) to interleaved pairs
(`permute`: reshape (n_head, 2, H/2, ...), swap axes 1 and 2). nanojax rotates halves as HF
does, so the importer undoes it (and the writer applies it). Permuting rows moves whole rows
of blocks, so quantized tensors are un-permuted exactly.

Tokenizer: a GGUF whose `tokenizer.ggml.model` is "gpt2" (byte-level BPE with merges: GPT-2,
Llama-3, Qwen) is rebuilt as a `tokenizers` BPE. A "llama" (SentencePiece) vocabulary is NOT
rebuilt here: its scores-driven merging is not a `tokenizers` model nanojax builds; load the
model's tokenizer.json instead. `load_gguf_tokenizer` says so in its error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from nanojax.config import ModelConfig
from nanojax.quant.arrays import QuantizedMatrix, QuantizedTable

SUPPORTED_ARCHS = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
WRITE_TYPES = ("F32", "Q8_0", "Q4_0")
Params = dict[str, Any]


class GGUFFormatError(ValueError):
    """A GGUF file nanojax cannot read: damaged, or an architecture / tensor type it does not support."""


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is in install_requires
        raise ImportError("GGUF support needs the `gguf` package: pip install gguf") from e
    return gguf


# ----------------------------------------------------------------------------------------------
# Reading


def _open(path: str | os.PathLike) -> Any:
    """GGUFReader over `path`, with every tensor's bytes checked to lie inside the file."""
    gguf = _gguf()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no GGUF file at {p}")
    size = p.stat().st_size
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError on damaged headers
        raise GGUFFormatError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e}); it may be "
                              "truncated or not GGUF at all: re-download or re-convert it") from None
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size or t.data.nbytes != t.n_bytes:
            raise GGUFFormatError(f"{p} is truncated: tensor {t.name!r} needs bytes up to {end:,} but the "
                                  f"file has {size:,}; re-download or re-convert it")
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def gguf_config(reader: Any, path: Any = "") -> ModelConfig:
    """ModelConfig from a Llama-family GGUF's metadata (`{arch}.block_count`, ...)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFFormatError(f"{path}: GGUF architecture {arch!r} is not supported; nanojax reads "
                              f"{', '.join(SUPPORTED_ARCHS)} (Llama-family) files")

    for t in reader.tensors:  # before anything is built from them
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise GGUFFormatError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which nanojax "
                                  f"does not read; supported: {', '.join(SUPPORTED_TYPES)} (re-quantize "
                                  "with llama.cpp's llama-quantize to Q8_0 or Q4_0)")

    def need(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise GGUFFormatError(f"{path}: GGUF metadata lacks {arch}.{key}, which a {arch} model needs")
        return v

    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFFormatError(f"{path}: no token_embd.weight tensor")
    D, N = int(need("embedding_length")), int(need("attention.head_count"))
    K = int(_field(reader, f"{arch}.attention.head_count_kv", N))
    H = int(_field(reader, f"{arch}.attention.key_length", D // N))
    V = int(names["token_embd.weight"].shape[1])  # ggml shape (D, V)
    try:
        return _config(reader, arch, D, N, K, H, V, names, need)
    except ValueError as e:
        raise GGUFFormatError(f"{path}: the GGUF metadata describe no valid model ({e})") from None


def _config(reader: Any, arch: str, D: int, N: int, K: int, H: int, V: int, names: dict,
            need: Any) -> ModelConfig:
    return ModelConfig(
        vocab_size=V, n_layer=int(need("block_count")), n_head=N, n_kv_head=K, d_model=D,
        head_dim=None if H * N == D else H, d_ff=int(need("feed_forward_length")),
        max_seq_len=int(_field(reader, f"{arch}.context_length", 2048)), pos_emb="rope",
        rope_theta=_f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)), norm="rmsnorm",
        norm_eps=_f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        mlp="swiglu", bias=False, tie_embeddings="output.weight" not in names)


def _f32(x: Any) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (1e-06, not
    9.99999997e-07), as the config.json it was converted from had it."""
    return float(str(np.float32(x)))


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's q/k row permutation: (n*H, ...) interleaved -> half-split."""
    O = rows.shape[0]
    return rows.reshape(n_head, O // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's permutation: HF half-split rows -> ggml's interleaved pairs."""
    O = rows.shape[0]
    return rows.reshape(n_head, 2, O // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _rows(t: Any) -> tuple[str, np.ndarray, np.ndarray | None]:
    """A 2-D tensor as out-major rows: ("float", (O, I) float32, None) or (type, values (O, I)
    int8, scales (O, I / 32) float32) for Q8_0 / Q4_0."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    kind = t.tensor_type
    O = int(t.shape[1]) if len(t.shape) > 1 else 1
    raw = np.asarray(t.data)
    if kind == T.Q8_0:
        blocks = raw.reshape(O, -1, 34)
        scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        vals = blocks[..., 2:].copy().view(np.int8).reshape(O, -1)
        return "Q8_0", vals, scale
    if kind == T.Q4_0:
        blocks = raw.reshape(O, -1, 18)
        scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 2:]
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j, then j + 16
        return "Q4_0", nib.reshape(O, -1), scale  # nibbles (value + 8), not yet packed
    if kind in (T.F32, T.F16):
        return "float", raw.astype(np.float32).reshape(O, -1), None
    if kind == T.BF16:
        return "float", gguf.quants.dequantize(raw, kind).astype(np.float32).reshape(O, -1), None
    raise AssertionError(kind)  # types are checked before any tensor is read


def _record(kind: str, vals: np.ndarray, scale: np.ndarray, shape: tuple[int, ...]) -> QuantizedMatrix:
    if kind == "Q8_0":
        return QuantizedMatrix(jnp.asarray(vals), jnp.asarray(scale), 8, 32, shape)
    packed = (vals[:, 0::2] | (vals[:, 1::2] << 4)).astype(np.uint8)  # nibbles already hold value + 8
    return QuantizedMatrix(jnp.asarray(packed), jnp.asarray(scale), 4, 32, shape)


def load_gguf(path: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) from a Llama-family GGUF file.

    Q8_0 / Q4_0 matrices become int8 / int4 group-32 `QuantizedMatrix` records (the token
    embedding a `QuantizedTable`) without re-rounding; F32 / F16 / BF16 tensors float32 arrays.
    Everything is checked (architecture, names, shapes, tensor types, file length) before a
    tensor is converted. Raises GGUFFormatError naming what is wrong and what is supported.
    """
    reader = _open(path)
    cfg = gguf_config(reader, path)
    gguf = _gguf()
    D, N, K, H, F, V = (cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.resolved_head_dim, cfg.ff_dim,
                        cfg.vocab_size)
    # name -> (path in params, ggml shape (I, O) or (n,), stored nanojax shape, heads to un-permute)
    plan: dict[str, tuple[tuple, tuple, tuple, int]] = {
        "token_embd.weight": (("wte",), (D, V), (V, D), 0),
        "output_norm.weight": (("ln_f", "scale"), (D,), (D,), 0)}
    if not cfg.tie_embeddings:
        plan["output.weight"] = (("lm_head",), (D, V), (D, V), 0)
    for i in range(cfg.n_layer):
        b, L = f"blk.{i}.", ("layers", i)
        plan.update({
            b + "attn_norm.weight": ((*L, "ln1", "scale"), (D,), (D,), 0),
            b + "ffn_norm.weight": ((*L, "ln2", "scale"), (D,), (D,), 0),
            b + "attn_q.weight": ((*L, "attn", "wq"), (D, N * H), (D, N, H), N),
            b + "attn_k.weight": ((*L, "attn", "wk"), (D, K * H), (D, K, H), K),
            b + "attn_v.weight": ((*L, "attn", "wv"), (D, K * H), (D, K, H), 0),
            b + "attn_output.weight": ((*L, "attn", "wo"), (N * H, D), (N, H, D), 0),
            b + "ffn_gate.weight": ((*L, "mlp", "w_gate"), (D, F), (D, F), 0),
            b + "ffn_up.weight": ((*L, "mlp", "w_up"), (D, F), (D, F), 0),
            b + "ffn_down.weight": ((*L, "mlp", "w_down"), (F, D), (F, D), 0),
        })
    tensors = {t.name: t for t in reader.tensors}
    missing = [n for n in plan if n not in tensors]
    extra = [n for n in tensors if n not in plan and not n.endswith("rope_freqs.weight")]
    if missing or extra:
        raise GGUFFormatError(f"{path}: tensors do not match a {cfg.n_layer}-layer Llama: missing "
                              f"{missing[:5]}, unexpected {extra[:5]}")
    for name, (_, ggml_shape, _, _) in plan.items():
        t = tensors[name]
        if tuple(int(s) for s in t.shape) != ggml_shape:
            raise GGUFFormatError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                                  f"{ggml_shape} from the metadata")
    params: Params = {"layers": [{"ln1": {}, "ln2": {}, "attn": {}, "mlp": {}} for _ in range(cfg.n_layer)],
                      "ln_f": {}}
    for name, (path_, _, shape, heads) in plan.items():
        t = tensors[name]
        if len(shape) == 1:
            value: Any = jnp.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
                                     .astype(np.float32).reshape(shape))
        else:
            kind, vals, scale = _rows(t)
            if heads:
                vals = _unpermute(vals, heads)
                scale = None if scale is None else _unpermute(scale, heads)
            if kind == "float":
                value = jnp.asarray(vals.T.reshape(shape) if name != "token_embd.weight" else vals)
            else:
                rec_shape = (D, V) if name == "token_embd.weight" else shape
                value = _record(kind, vals, scale, rec_shape)
                if name == "token_embd.weight":
                    value = QuantizedTable(value)
        parent = params
        for k in path_[:-1]:
            parent = parent[k]
        parent[path_[-1]] = value
    return cfg, params


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a GGUF's vocabulary as a nanojax HFTokenizer ("gpt2" byte-level BPE).

    Raises GGUFFormatError for vocabularies it does not rebuild (SentencePiece "llama", ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from nanojax.tokenizer import HFTokenizer

    reader = _open(path)
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFFormatError(f"{path}: tokenizer.ggml.model={model!r} is not rebuilt by nanojax (only "
                              "'gpt2' byte-level BPE is); load the model's tokenizer.json instead")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return HFTokenizer(tok)


# ----------------------------------------------------------------------------------------------
# Writing (tests, and llama.cpp side-by-side benchmarks on the same weights)


def write_gguf(params: Params, cfg: ModelConfig, path: str | os.PathLike, qtype: str = "F32",
               tokenizer: Any = None, head_qtype: str | None = None) -> Path:
    """Writes a float Llama-family params tree as a GGUF file llama.cpp and transformers read.

    qtype: "F32", "Q8_0" or "Q4_0" for the 2-D weights (quantized by gguf.quants, which matches
    ggml's reference rounding); norms stay F32. head_qtype: the type of an untied head
    (output.weight), one of the same; None: qtype. (llama.cpp's own quantizer keeps the head
    wider than a 4-bit body, Q6_K by default, which gguf.quants cannot write; "Q8_0" is the
    nearest, and as wide as nanojax's int8 head.) tokenizer: an HFTokenizer with a byte-level BPE
    model is written as "gpt2" vocab + merges; otherwise placeholder tokens "<id>" are written
    (enough for llama.cpp to load and time the model, not to tokenize text).
    """
    gguf = _gguf()
    for arg, value in (("qtype", qtype), ("head_qtype", head_qtype or qtype)):
        if value not in WRITE_TYPES:
            raise ValueError(f"{arg} must be one of {WRITE_TYPES}, got {value!r}")
    if cfg.pos_emb != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.bias:
        raise ValueError("write_gguf writes Llama-family models (rope, rmsnorm, swiglu, no biases)")
    D, N, K, H, F = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.resolved_head_dim, cfg.ff_dim
    T = gguf.GGMLQuantizationType
    qt = getattr(T, qtype)
    if qtype != "F32":
        bad = [n for n, v in (("d_model", D), ("mlp", F), ("heads*head_dim", N * H)) if v % 32]
        if bad:
            raise ValueError(f"{qtype} needs input dims divisible by 32; {bad} are not")
    p = Path(path)
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(D)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(F)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_rope_dimension_count(H)
    if H * N != D:
        w.add_key_length(H)
        w.add_value_length(H)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"F32": 0, "Q8_0": 7, "Q4_0": 2}[qtype])
    _add_vocab(w, cfg.vocab_size, tokenizer)

    def mat(name: str, a: Any, in_dims: int, heads: int = 0, as_type: Any = qt) -> None:
        a = np.asarray(a, np.float32)
        rows = a.reshape(int(np.prod(a.shape[:in_dims])), -1).T.copy()  # (O, I), HF/ggml order
        if heads:
            rows = _permute(rows, heads)
        if as_type == T.F32:
            w.add_tensor(name, rows)
        else:
            w.add_tensor(name, gguf.quants.quantize(rows, as_type), raw_dtype=as_type)

    def vec(name: str, a: Any) -> None:
        w.add_tensor(name, np.asarray(a, np.float32))

    mat("token_embd.weight", np.asarray(params["wte"]).T, 1)
    for i, lp in enumerate(params["layers"]):
        b = f"blk.{i}."
        vec(b + "attn_norm.weight", lp["ln1"]["scale"])
        mat(b + "attn_q.weight", lp["attn"]["wq"], 1, N)
        mat(b + "attn_k.weight", lp["attn"]["wk"], 1, K)
        mat(b + "attn_v.weight", lp["attn"]["wv"], 1)
        mat(b + "attn_output.weight", lp["attn"]["wo"], 2)
        vec(b + "ffn_norm.weight", lp["ln2"]["scale"])
        mat(b + "ffn_gate.weight", lp["mlp"]["w_gate"], 1)
        mat(b + "ffn_up.weight", lp["mlp"]["w_up"], 1)
        mat(b + "ffn_down.weight", lp["mlp"]["w_down"], 1)
    vec("output_norm.weight", params["ln_f"]["scale"])
    if not cfg.tie_embeddings:
        mat("output.weight", params["lm_head"], 1, as_type=getattr(T, head_qtype or qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def _add_vocab(w: Any, vocab_size: int, tokenizer: Any) -> None:
    inner = getattr(tokenizer, "tok", None)
    if inner is not None:
        import json

        model = json.loads(inner.to_str())["model"]
        if model.get("type") == "BPE":
            vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            w.add_tokenizer_model("gpt2")
            w.add_token_list([t for t, _ in vocab] + [f"<pad{i}>" for i in range(len(vocab), vocab_size)])
            w.add_token_merges(merges)
            return
    # No BPE tokenizer: placeholder tokens "<id>" as a "llama" (SentencePiece-style) vocabulary with
    # zero scores. llama.cpp refuses a "gpt2" vocabulary without merges; this one it loads, which is
    # enough to run and time the model on token ids (not to tokenize text).
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<{i}>" for i in range(vocab_size)])
    w.add_token_scores([0.0] * vocab_size)
    w.add_token_types([1] * vocab_size)  # 1: a normal token
